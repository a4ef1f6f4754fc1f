// One pipeline stage's share of the model on one EP rank, behind one
// interface whether it runs on the CPU (ModelShard + Engine, worker/model.h)
// or on a CUDA GPU (CudaEngine, worker/cuda_engine.h). The worker holds a
// StageEngine and never asks which.
//
// A StageEngine owns:
//   * the weights of the stage's layers [layer_begin, layer_end) (plus the
//     embedding on the first stage, the final norm and lm_head on the last);
//   * the latent KV caches of its sequences (NewSequence / ReleaseSequence,
//     or the StageSequence handle that releases on destruction);
//   * the MoE exchange seam (worker/expert_exchange.h): with expert
//     parallelism, SetExpertParallel builds the engine's own exchange
//     (CpuEpExchange or CudaEpExchange) over the stage's EP communicator.
// Step runs one micro-batch through the stage: each segment is n new tokens
// of one sequence (n may be 0 on a rank with nothing to do: it still joins
// every MoE exchange). Input: token ids (first stage) or the previous
// stage's hidden states; output: the logits of each segment's last token
// (last stage) or the hidden states for the next stage.
//
//   StageEngineOptions o;
//   o.checkpoint = dir;
//   o.filter = filter;                       // layers, embed/head, experts of this rank
//   ASSIGN_OR_RETURN(auto eng, MakeStageEngine(o));
//   StageSequence seq(eng.get());
//   StageEngine::StepIo io;
//   io.logits = &logits;                     // a stage with the head
//   RETURN_IF_ERROR(eng->Step({{seq.id(), prompt.data(), n}}, io));
//
// Not thread safe: one owner thread (the stage thread), except caps(),
// config() and times(), which may be read from another thread (plain
// doubles: a torn read is harmless).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/checkpoint.h"
#include "common/config.h"
#include "topology/placement.h"
#include "worker/comm/communicator.h"
#include "worker/cuda_engine.h"
#include "worker/expert_exchange.h"
#include "worker/model.h"
#include "worker/sequence_handle.h"

namespace expertmesh::worker {

struct StageEngineOptions {
  std::string checkpoint;  // checkpoint folder (config.json + safetensors)
  ShardFilter filter;      // the stage's layers, embed/head, and this rank's experts
  bool cuda = false;       // run on a CUDA GPU (CudaEngine) instead of the CPU
  CudaEngineOptions cuda_options;
};

// What an implementation can do (asked before, never failed late).
struct StageEngineCaps {
  bool cuda = false;               // runs on a GPU
  bool device_hidden = false;      // StepIo::hidden_on_device / device_hidden_out are taken
  bool expert_rebalancing = false; // ReplaceExperts / LoadedExperts work
};

class StageEngine {
 public:
  using SeqId = int64_t;
  struct Segment {
    SeqId seq = -1;
    const int32_t* tokens = nullptr;  // host ids, for stages with the embedding
    int64_t n = 0;
  };
  // Where a step's input comes from and its output goes.
  struct StepIo {
    // Stages without the embedding: [T, H] fp32 hidden states of the
    // segments' tokens (T = sum of n), host memory, or device memory when
    // hidden_on_device (caps().device_hidden).
    const float* hidden_in = nullptr;
    bool hidden_on_device = false;
    // Stages without the head: the output hidden states [T, H] fp32 (host).
    std::vector<float>* hidden_out = nullptr;
    // caps().device_hidden: instead, the output stays on the device and
    // *device_hidden_out points at it until the next step.
    const float** device_hidden_out = nullptr;
    // Stages with the head: logits [segments with n > 0, vocab], in segment order.
    std::vector<float>* logits = nullptr;
  };

  virtual ~StageEngine() = default;

  virtual StageEngineCaps caps() const = 0;
  virtual const ModelConfig& config() const = 0;
  virtual bool has_embed() const = 0;
  virtual bool has_head() const = 0;
  // One line: the device and precision.
  virtual std::string Describe() const = 0;

  // Sequences, each with its latent cache in this engine.
  virtual SeqId NewSequence() = 0;
  virtual void ReleaseSequence(SeqId seq) = 0;
  virtual int64_t SequenceLength(SeqId seq) const = 0;  // tokens cached; -1 for an unknown id

  // One step of the stage (see StepIo). Cache lengths advance by n. Errors:
  // kInvalidArgument for bad segments or io, the exchange's errors
  // (collective: a failed step leaves the caches of its segments unusable).
  virtual absl::Status Step(const std::vector<Segment>& segs, const StepIo& io) = 0;

  // Expert parallelism: the stage's routed experts are spread over the ranks
  // of `comm` as `placements` (MoE layer -> placement over comm->size()
  // ranks) says; the engine builds its exchange on them. Called again with a
  // new communicator (after a lost peer) or new placements (after a
  // rebalance: the map's contents changed); comm == nullptr: no data plane
  // for now, MoE steps fail with kFailedPrecondition until the next call.
  // comm and placements must outlive the engine's steps. Without a call the
  // engine runs all the stage's experts itself.
  virtual absl::Status SetExpertParallel(comm::Communicator* comm,
                                         const std::map<int64_t, topology::ExpertPlacement>* placements,
                                         absl::Duration timeout) = 0;
  // Sees every MoE layer's routes once, on the host (expert load). The GPU
  // engine observes routes only with expert parallelism (without it its
  // routes never leave the device).
  virtual void SetRouteObserver(RouteObserver observer) = 0;

  // Time spent so far (cumulative seconds): compute by kind (the CPU engine;
  // the GPU engine's kernels run asynchronously and are not split) and the
  // exchange's phases over the engine's life.
  virtual EngineTimes times() const = 0;
  virtual ExchangeTimes exchange_times() const = 0;
  // The MoE layers' time split for the heartbeat (cumulative seconds):
  // dispatch and combine are the exchange's; expert is the rest of the MoE
  // layers on the CPU engine (router, shared and routed experts), the
  // exchange's expert phase on the GPU engine (zeros without an exchange).
  virtual ExchangeTimes moe_times() const = 0;

  // caps().device_hidden: a device buffer for T rows [T, H] fp32 of hidden
  // states, where the previous stage's arrive over a device communicator and
  // which StepIo::hidden_in (with hidden_on_device) may then point at; valid
  // until the next call. Other engines: kFailedPrecondition.
  virtual absl::StatusOr<float*> DeviceHiddenBuffer(int64_t T) = 0;

  // Last stage: the token sampled from row `row` of a step's logits with a
  // sequence's sampling parameters at its generation step (kernels::Sample;
  // the same token on every engine whenever the logits agree).
  int32_t Sample(const std::vector<float>& logits, int64_t row, const kernels::SamplingParams& params,
                 int64_t step) const;

  // Expert rebalancing (caps().expert_rebalancing, else kUnimplemented):
  // CanReplaceExperts says why not (OK when it works), the routed experts
  // loaded for a MoE layer, and ModelShard::ReplaceExperts.
  virtual absl::Status CanReplaceExperts() const = 0;
  virtual std::vector<int32_t> LoadedExperts(int64_t layer) const = 0;
  virtual absl::Status ReplaceExperts(ModelShard::ExpertSet experts,
                                      const std::map<int64_t, std::set<int32_t>>& keep) = 0;
};

// The CPU engine or, with options.cuda, the GPU engine, loaded from
// options.checkpoint. FailedPrecondition (one line) when cuda is asked for
// and there is no usable device or the build has no CUDA.
absl::StatusOr<std::unique_ptr<StageEngine>> MakeStageEngine(const StageEngineOptions& options);

// Owns one sequence of a StageEngine (move-only); its cache goes back to the
// engine when the handle is destroyed.
using StageSequence = SequenceHandle<StageEngine>;

}  // namespace expertmesh::worker
