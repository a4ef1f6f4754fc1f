#include "worker/stage_engine.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "worker/cuda_ep.h"
#include "worker/cuda_stage.h"
#include "worker/dispatch.h"

namespace expertmesh::worker {

namespace {

double Now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// a + b, phase by phase.
ExchangeTimes Plus(ExchangeTimes a, const ExchangeTimes& b) {
  a.dispatch += b.dispatch;
  a.expert += b.expert;
  a.combine += b.combine;
  return a;
}

// The times of the exchanges replaced so far (past) plus the live one's.
ExchangeTimes TimesSoFar(const ExchangeTimes& past, const ExpertExchange* live) {
  return live != nullptr ? Plus(past, live->times()) : past;
}

// ------------------------------------------------------------ CPU

// ModelShard + Engine, a SequenceCache per sequence, CpuEpExchange.
class CpuStageEngine : public StageEngine {
 public:
  explicit CpuStageEngine(std::unique_ptr<ModelShard> shard) : shard_(std::move(shard)), engine_(shard_.get()) {}

  StageEngineCaps caps() const override {
    StageEngineCaps c;
    c.expert_rebalancing = true;
    return c;
  }
  const ModelConfig& config() const override { return shard_->config(); }
  bool has_embed() const override { return shard_->has_embed(); }
  bool has_head() const override { return shard_->has_head(); }
  std::string Describe() const override {
    return absl::StrCat("CPU, fp32, layers [", shard_->layer_begin(), ", ", shard_->layer_end(), ")");
  }

  SeqId NewSequence() override {
    const SeqId id = next_++;
    caches_.emplace(id, engine_.NewCache());
    return id;
  }
  void ReleaseSequence(SeqId seq) override { caches_.erase(seq); }
  int64_t SequenceLength(SeqId seq) const override {
    auto it = caches_.find(seq);
    return it == caches_.end() ? -1 : it->second.length;
  }

  absl::Status Step(const std::vector<StageEngine::Segment>& segs, const StepIo& io) override {
    const ModelConfig& c = config();
    std::vector<worker::Segment> cs;
    cs.reserve(segs.size());
    int64_t T = 0;
    for (const StageEngine::Segment& s : segs) {
      auto it = caches_.find(s.seq);
      if (it == caches_.end()) return absl::InvalidArgumentError(absl::StrCat("stage engine: unknown sequence ", s.seq));
      if (s.n < 0) return absl::InvalidArgumentError("stage engine: negative segment length");
      if (has_embed()) {
        if (s.n > 0 && s.tokens == nullptr) return absl::InvalidArgumentError("stage engine: segment without tokens");
        for (int64_t i = 0; i < s.n; ++i) {
          if (s.tokens[i] < 0 || s.tokens[i] >= c.vocab_size) {
            return absl::InvalidArgumentError(
                absl::StrCat("stage engine: token id ", s.tokens[i], " out of range [0, ", c.vocab_size, ")"));
          }
        }
      }
      cs.push_back({&it->second, s.tokens, s.n});
      T += s.n;
    }
    if (io.hidden_on_device || io.device_hidden_out != nullptr) {
      return absl::InvalidArgumentError("stage engine: the CPU engine has no device hidden states");
    }
    if (has_head() ? io.logits == nullptr : io.hidden_out == nullptr) {
      return absl::InvalidArgumentError(has_head() ? "stage engine: a stage with the head needs logits"
                                                   : "stage engine: a stage without the head needs hidden_out");
    }
    std::vector<float> hidden;
    if (has_embed()) {
      const double t0 = Now();
      engine_.Embed(cs, &hidden);
      embed_head_ += Now() - t0;
    } else {
      if (T > 0 && io.hidden_in == nullptr) {
        return absl::InvalidArgumentError("stage engine: a stage without the embedding needs hidden_in");
      }
      hidden.assign(io.hidden_in, io.hidden_in + T * c.hidden_size);
    }
    RETURN_IF_ERROR(engine_.RunLayers(cs, &hidden));
    if (has_head()) {
      const double t0 = Now();
      engine_.Head(cs, hidden, io.logits);
      embed_head_ += Now() - t0;
    } else {
      *io.hidden_out = std::move(hidden);
    }
    return absl::OkStatus();
  }

  absl::Status SetExpertParallel(comm::Communicator* comm,
                                 const std::map<int64_t, topology::ExpertPlacement>* placements,
                                 absl::Duration timeout) override {
    if (exchange_ == nullptr || placements != placements_) {
      DispatchOptions o;
      o.timeout = timeout;
      past_ = TimesSoFar(past_, exchange_.get());
      exchange_ = std::make_unique<CpuEpExchange>(shard_.get(), comm, placements, o);
      placements_ = placements;
      engine_.SetExpertExchange(exchange_.get());
    } else {
      exchange_->Reset(comm);  // new communicator or new placements: the per-layer state goes
    }
    return absl::OkStatus();
  }
  void SetRouteObserver(RouteObserver observer) override { engine_.SetRouteObserver(std::move(observer)); }

  EngineTimes times() const override {
    EngineTimes t = engine_.times();
    t.embed_head += embed_head_;
    return t;
  }
  ExchangeTimes exchange_times() const override { return TimesSoFar(past_, exchange_.get()); }

  ExchangeTimes moe_times() const override {
    ExchangeTimes t = exchange_times();
    t.expert = std::max(0.0, engine_.times().moe - t.dispatch - t.combine);
    return t;
  }
  absl::StatusOr<float*> DeviceHiddenBuffer(int64_t) override {
    return absl::FailedPreconditionError("stage engine: the CPU engine has no device hidden states");
  }

  absl::Status CanReplaceExperts() const override { return absl::OkStatus(); }
  std::vector<int32_t> LoadedExperts(int64_t layer) const override { return shard_->LoadedExperts(layer); }
  absl::Status ReplaceExperts(ModelShard::ExpertSet experts,
                              const std::map<int64_t, std::set<int32_t>>& keep) override {
    RETURN_IF_ERROR(shard_->ReplaceExperts(std::move(experts), keep));
    if (exchange_ != nullptr) exchange_->Reset(comm_of_exchange());  // its layers checked the old experts
    return absl::OkStatus();
  }

 private:
  comm::Communicator* comm_of_exchange() const { return exchange_ != nullptr ? exchange_->comm() : nullptr; }

  std::unique_ptr<ModelShard> shard_;
  Engine engine_;
  std::map<SeqId, SequenceCache> caches_;
  SeqId next_ = 1;
  std::unique_ptr<CpuEpExchange> exchange_;
  const std::map<int64_t, topology::ExpertPlacement>* placements_ = nullptr;
  ExchangeTimes past_;     // of exchanges replaced since
  double embed_head_ = 0;  // Embed and Head of the steps
};

// ------------------------------------------------------------ CUDA

// CudaEngine (its sequences own the paged latent caches), CudaEpExchange.
class CudaStageEngine : public StageEngine {
 public:
  explicit CudaStageEngine(std::unique_ptr<CudaEngine> gpu) : gpu_(std::move(gpu)) {}
  ~CudaStageEngine() override { gpu_->SetExpertExchange(nullptr); }

  StageEngineCaps caps() const override {
    StageEngineCaps c;
    c.cuda = true;
    c.device_hidden = true;
    return c;
  }
  const ModelConfig& config() const override { return gpu_->config(); }
  bool has_embed() const override { return gpu_->has_embed(); }
  bool has_head() const override { return gpu_->has_head(); }
  std::string Describe() const override { return gpu_->Describe(); }

  SeqId NewSequence() override { return gpu_->NewSequence(); }
  void ReleaseSequence(SeqId seq) override { gpu_->ReleaseSequence(seq); }
  int64_t SequenceLength(SeqId seq) const override { return gpu_->SequenceLength(seq); }

  absl::Status Step(const std::vector<StageEngine::Segment>& segs, const StepIo& io) override {
    if (expert_parallel_ && exchange_ == nullptr) {
      return absl::FailedPreconditionError("no data plane (being rebuilt)");
    }
    std::vector<CudaEngine::Segment> gs;
    gs.reserve(segs.size());
    for (const StageEngine::Segment& s : segs) gs.push_back({s.seq, s.tokens, s.n});
    CudaEngine::StageIo g;
    g.hidden_in = io.hidden_in;
    g.hidden_on_device = io.hidden_on_device;
    g.logits = io.logits;
    g.hidden_out = io.device_hidden_out == nullptr ? io.hidden_out : nullptr;
    g.device_hidden_out = io.device_hidden_out;
    return gpu_->Step(gs, g);
  }

  absl::Status SetExpertParallel(comm::Communicator* comm,
                                 const std::map<int64_t, topology::ExpertPlacement>* placements,
                                 absl::Duration timeout) override {
    expert_parallel_ = true;
    gpu_->SetExpertExchange(nullptr);
    past_ = TimesSoFar(past_, exchange_.get());
    exchange_.reset();
    if (comm == nullptr) return absl::OkStatus();
    CudaEpOptions o;
    o.timeout = timeout;
    ASSIGN_OR_RETURN(exchange_, CudaEpExchange::Create(gpu_.get(), comm, placements, o));
    gpu_->SetExpertExchange(exchange_.get());
    return absl::OkStatus();
  }
  void SetRouteObserver(RouteObserver observer) override { gpu_->SetRouteObserver(std::move(observer)); }

  EngineTimes times() const override { return EngineTimes{}; }
  ExchangeTimes exchange_times() const override { return TimesSoFar(past_, exchange_.get()); }

  ExchangeTimes moe_times() const override { return exchange_times(); }
  absl::StatusOr<float*> DeviceHiddenBuffer(int64_t T) override {
    const size_t bytes = static_cast<size_t>(T * config().hidden_size) * sizeof(float);
    RETURN_IF_ERROR(hidden_in_.Reserve(std::max<size_t>(bytes, 1)));
    return static_cast<float*>(hidden_in_.data());
  }

  absl::Status CanReplaceExperts() const override {
    return absl::UnimplementedError(
        "expert rebalancing is not implemented for --device cuda workers (their experts live on the GPU)");
  }
  std::vector<int32_t> LoadedExperts(int64_t) const override { return {}; }
  absl::Status ReplaceExperts(ModelShard::ExpertSet, const std::map<int64_t, std::set<int32_t>>&) override {
    return CanReplaceExperts();
  }

 private:
  std::unique_ptr<CudaEngine> gpu_;
  std::unique_ptr<CudaEpExchange> exchange_;
  bool expert_parallel_ = false;
  ExchangeTimes past_;         // of exchanges replaced since
  CudaDeviceBuffer hidden_in_;  // DeviceHiddenBuffer
};

}  // namespace

absl::Status CheckCudaArchitecture(const ModelConfig& cfg) {
  if (!cfg.dense_arch()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "--device cuda: the CUDA engine runs the DeepSeek-V3 architecture (MLA, MoE) only; ", cfg.architecture(),
      " (", cfg.model_type, ") models run on the CPU engine (--device cpu)"));
}

int32_t StageEngine::Sample(const std::vector<float>& logits, int64_t row, const kernels::SamplingParams& params,
                            int64_t step) const {
  const int64_t V = config().vocab_size;
  return kernels::Sample(logits.data() + row * V, V, params, static_cast<uint64_t>(step));
}

absl::StatusOr<std::unique_ptr<StageEngine>> MakeStageEngine(const StageEngineOptions& options) {
  if (options.cuda) {
    // The architecture first: a clear line also in builds without CUDA.
    ASSIGN_OR_RETURN(ModelConfig cfg, ModelConfig::FromFile(options.checkpoint + "/config.json"));
    RETURN_IF_ERROR(CheckCudaArchitecture(cfg));
    ASSIGN_OR_RETURN(std::unique_ptr<CudaEngine> gpu,
                     CudaEngine::Load(options.checkpoint, options.filter, options.cuda_options));
    return std::unique_ptr<StageEngine>(new CudaStageEngine(std::move(gpu)));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<ModelShard> shard, ModelShard::Load(options.checkpoint, options.filter));
  return std::unique_ptr<StageEngine>(new CpuStageEngine(std::move(shard)));
}

}  // namespace expertmesh::worker
