// CudaEngine in builds without CUDA (CMake compiles this file instead of
// cuda_engine.cc): every entry point says that the build has no CUDA, so
// `--device cuda` fails with one clear line and the CPU path is unchanged.
#include <cstdlib>

#include "worker/cuda_ep.h"
#include "worker/cuda_stage.h"

namespace expertmesh::worker {

namespace {
absl::Status NoCuda() {
  return absl::FailedPreconditionError(
      "no CUDA device: this expertmesh was built without CUDA (install the CUDA toolkit so CMake finds nvcc, "
      "and rebuild)");
}
}  // namespace

struct CudaEngine::Impl {};

CudaEngine::CudaEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaEngine::~CudaEngine() = default;

absl::StatusOr<std::unique_ptr<CudaEngine>> CudaEngine::Load(const std::string&, const ShardFilter&,
                                                             const CudaEngineOptions&) {
  return NoCuda();
}
absl::StatusOr<std::unique_ptr<CudaEngine>> CudaEngine::Random(const ModelConfig&, const ShardFilter&, uint64_t,
                                                               const CudaEngineOptions&) {
  return NoCuda();
}

// Unreachable: no CudaEngine can be constructed in this build.
const ModelConfig& CudaEngine::config() const { std::abort(); }
const CudaEngineOptions& CudaEngine::options() const { std::abort(); }
bool CudaEngine::has_embed() const { return false; }
bool CudaEngine::has_head() const { return false; }
std::string CudaEngine::Describe() const { return "no CUDA"; }
CudaEngine::SeqId CudaEngine::NewSequence() { return -1; }
void CudaEngine::ReleaseSequence(SeqId) {}
int64_t CudaEngine::SequenceLength(SeqId) const { return -1; }
absl::Status CudaEngine::Forward(const std::vector<Segment>&, std::vector<float>*) { return NoCuda(); }
absl::Status CudaEngine::Step(const std::vector<Segment>&, const StageIo&) { return NoCuda(); }
void CudaEngine::SetExpertExchange(ExpertExchange*) {}
void CudaEngine::SetRouteObserver(RouteObserver) {}
absl::Status CudaEngine::RunLocalExperts(int64_t, const void*, int64_t, const int32_t*, const float*, int64_t, float*) {
  return NoCuda();
}
void* CudaEngine::stream() const { return nullptr; }
bool CudaEngine::bf16() const { return false; }
const CudaEngine::Stats& CudaEngine::stats() const {
  static const Stats s;
  return s;
}

absl::StatusOr<std::vector<GenerationResult>> GenerateBatchCuda(CudaEngine*, const std::vector<GenerationRequest>&,
                                                                GenerationStats*) {
  return NoCuda();
}

struct CudaEpExchange::Impl {};
CudaEpExchange::CudaEpExchange(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaEpExchange::~CudaEpExchange() = default;
absl::StatusOr<std::unique_ptr<CudaEpExchange>> CudaEpExchange::Create(
    CudaEngine*, comm::Communicator*, const std::map<int64_t, topology::ExpertPlacement>*, const CudaEpOptions&) {
  return NoCuda();
}
absl::Status CudaEpExchange::Run(const Layer&) { return NoCuda(); }
const CudaEpTimes& CudaEpExchange::phase_times() const {
  static const CudaEpTimes t;
  return t;
}

CudaDeviceBuffer::~CudaDeviceBuffer() = default;
absl::Status CudaDeviceBuffer::Reserve(size_t) { return NoCuda(); }

int CudaDeviceCount() { return 0; }

bool CudaEngineAvailable(std::string* why) {
  if (why != nullptr) *why = std::string(NoCuda().message());
  return false;
}

}  // namespace expertmesh::worker
