// The model shard on a CUDA GPU: the twin of Engine (model.h) with weights,
// latent KV caches and activations in device memory.
//
// Weights are loaded straight from the checkpoint to the device (no fp32 copy
// of the shard on the host). Two precisions:
//   * kBf16 (serving): bf16 activations and weights; fp8 block-scaled
//     checkpoints keep their fp8 weights where the kernels take them natively
//     (cuBLASLt block scaling: K % 128 == 0, N % 16 == 0; routed experts when
//     hidden and moe_intermediate are multiples of 128), others are
//     dequantised to bf16 at load; the residual stream, norms, router logits
//     and routing weights stay fp32; GEMMs accumulate in fp32.
//   * kFp32 (checking): fp32 weights (dequantised exactly as the CPU does)
//     and activations, fp32 CUDA-core GEMMs without TF32. It runs the model as
//     the CPU engine does, to fp32 rounding, so greedy tokens can be compared
//     one for one (tests/gpu_engine).
//
// A step runs a batch of segments, each `n` new tokens of one sequence, as
// Engine::Forward does; prefill, decode and mixed batches are one call.
// Attention is MLA in its absorbed form over a paged latent cache
// ([pages, page_size, kv_lora + rope] per layer, bf16 or fp32), for prefill
// (the q_len new tokens of a sequence attend causally) and decode alike.
// The MoE layer: router GEMM -> cuda::Route -> ExpertLayout -> Permute ->
// grouped experts -> weighted combine added to the residual, plus the shared
// expert. Decode-sized batches run the experts with offsets read on the
// device (GroupedSwiGluFfn), so a decode step has no host synchronisation and
// is captured once per batch shape into a CUDA graph and replayed; larger
// batches (prefill) take one host round trip for the offsets and run
// cuBLASLt GEMMs per expert (bf16) instead.
//
// With expert parallelism the routed experts of a stage are spread over EP
// ranks: the engine then hands each MoE layer's routes to an
// `ExpertExchange` (worker/expert_exchange.h; worker/cuda_ep.h implements
// it) to move tokens to the ranks that hold their experts and back.
//
// No CUDA type appears here; the engine's stream is its own. Not thread
// safe: one owner thread.
//
//   CudaEngineOptions o;
//   ASSIGN_OR_RETURN(auto eng, CudaEngine::Load(dir, ShardFilter{}, o));
//   CudaEngine::SeqId s = eng->NewSequence();
//   RETURN_IF_ERROR(eng->Forward({{s, prompt.data(), n}}, &logits));  // [1, vocab]
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/checkpoint.h"
#include "common/config.h"
#include "worker/expert_exchange.h"
#include "worker/generation.h"

namespace expertmesh::worker {

enum class CudaPrecision { kBf16, kFp32 };
inline const char* CudaPrecisionName(CudaPrecision p) { return p == CudaPrecision::kBf16 ? "bf16" : "fp32"; }
inline absl::StatusOr<CudaPrecision> ParseCudaPrecision(const std::string& s) {
  if (s == "bf16") return CudaPrecision::kBf16;
  if (s == "fp32") return CudaPrecision::kFp32;
  return absl::InvalidArgumentError(absl::StrCat("precision \"", s, "\": expected bf16 or fp32"));
}

struct CudaEngineOptions {
  CudaPrecision precision = CudaPrecision::kBf16;
  int device = 0;
  bool cuda_graphs = true;            // capture decode steps (every segment n == 1, embed and head on this shard)
  int64_t page_size = 64;             // tokens per latent-cache page
  int64_t cache_tokens = 1 << 17;     // latent-cache capacity of the shard, all sequences together
  int64_t max_step_tokens = 16384;    // tokens one step may hold (sizes the scratch arena)
  int64_t max_step_sequences = 1024;  // segments one step may hold (their logits live in the arena)
  int64_t decode_expert_rows = 1024;  // routed (token, expert) pairs up to which experts read device offsets
  int64_t max_graphs = 64;            // captured decode shapes kept (least recently used dropped)
};

// The CUDA engine runs the DeepSeek-V3 architecture (MLA, MoE) only:
// FailedPrecondition (one line) for the dense architectures (qwen2, llama),
// which run on the CPU engine. Load, Random and MakeStageEngine check it first.
absl::Status CheckCudaArchitecture(const ModelConfig& cfg);

class CudaEngine {
 public:
  using SeqId = int64_t;
  struct Segment {
    SeqId seq = -1;
    const int32_t* tokens = nullptr;  // host ids, for shards with the embedding
    int64_t n = 0;
  };

  // Loads the shard from a checkpoint folder (validating it as
  // ModelShard::Load does) onto the device. FailedPrecondition with one line
  // when there is no usable CUDA device.
  static absl::StatusOr<std::unique_ptr<CudaEngine>> Load(const std::string& dir, const ShardFilter& filter,
                                                          const CudaEngineOptions& options);
  // The same from random weights (RandomTensor with `seed`, as
  // ModelShard::Random), without touching the disk: for tests.
  static absl::StatusOr<std::unique_ptr<CudaEngine>> Random(const ModelConfig& cfg, const ShardFilter& filter,
                                                            uint64_t seed, const CudaEngineOptions& options);
  ~CudaEngine();
  CudaEngine(const CudaEngine&) = delete;
  CudaEngine& operator=(const CudaEngine&) = delete;

  const ModelConfig& config() const;
  const CudaEngineOptions& options() const;
  bool has_embed() const;
  bool has_head() const;
  // "NVIDIA H100 80GB HBM3, bf16 (fp8 experts), 1.2 GiB of weights"
  std::string Describe() const;

  // Sequences: a latent cache each (pages taken as the sequence grows).
  SeqId NewSequence();
  void ReleaseSequence(SeqId seq);
  int64_t SequenceLength(SeqId seq) const;  // tokens cached; -1 for an unknown id

  // Embedding + layers + head for a shard holding the whole model (as
  // Engine::Forward): logits [segments, vocab] of each segment's last token.
  // Every segment needs n >= 1. Captured and replayed as a CUDA graph when
  // every segment is a decode token and graphs are on.
  absl::Status Forward(const std::vector<Segment>& segs, std::vector<float>* logits);

  // One pipeline stage step (as Engine::Embed/RunLayers/Head together):
  // input from the segments' tokens (shards with the embedding) or
  // hidden_in [T, H] fp32 (host, or device memory when hidden_on_device);
  // output logits [segments with n > 0, vocab] (shards with the head) or
  // hidden_out [T, H] fp32 (host vector). Segments may have n == 0.
  struct StageIo {
    const float* hidden_in = nullptr;
    bool hidden_on_device = false;
    std::vector<float>* hidden_out = nullptr;
    std::vector<float>* logits = nullptr;
    // When set, hidden_out stays on the device: *device_hidden_out points at
    // [T, H] fp32 valid until the next step (pipeline sends over NCCL).
    const float** device_hidden_out = nullptr;
  };
  absl::Status Step(const std::vector<Segment>& segs, const StageIo& io);

  // The MoE seam (worker/expert_exchange.h): the exchange (null: all routed
  // experts are local) gets every MoE layer's routes in device memory; the
  // observer is passed to it in Layer::on_route (routes stay on the device
  // without an exchange, and are not observed). Both must outlive the
  // engine's steps.
  void SetExpertExchange(ExpertExchange* ex);
  void SetRouteObserver(RouteObserver observer);

  // Runs the routed experts this device holds on rows received by an
  // exchange: out_f32[rows, H] = sum over each row's (expert, weight) pairs,
  // ids [rows, k] logical experts loaded on this device or -1 (skipped),
  // weights [rows, k]; x [rows, H] in the activation type. Device pointers;
  // enqueued on the engine's stream.
  absl::Status RunLocalExperts(int64_t layer, const void* x, int64_t rows, const int32_t* ids, const float* weights,
                               int64_t k, float* out_f32);

  // The engine's stream (a cudaStream_t) and whether activations are bf16.
  void* stream() const;
  bool bf16() const;

  struct Stats {
    int64_t steps = 0, graph_replays = 0, graph_captures = 0, eager_steps = 0;
  };
  const Stats& stats() const;

  struct Impl;

 private:
  explicit CudaEngine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// GenerateBatch (generation.h) on the GPU engine: the same schedule (all
// prompts prefill together, then one token per active sequence per step;
// split into several engine steps where a step would exceed
// max_step_tokens or max_step_sequences) and the same sampling (by each
// sequence's seed and step), so the tokens equal the CPU's whenever the
// logits agree.
absl::StatusOr<std::vector<GenerationResult>> GenerateBatchCuda(CudaEngine* engine,
                                                                const std::vector<GenerationRequest>& requests,
                                                                GenerationStats* stats = nullptr);

// True when a CUDA device can run the engine; otherwise `why` says why not
// in one line ("no CUDA device: ..."). Always false in builds without CUDA.
bool CudaEngineAvailable(std::string* why);
// CUDA devices this process sees (0 without a driver, a device or CUDA).
int CudaDeviceCount();

}  // namespace expertmesh::worker
