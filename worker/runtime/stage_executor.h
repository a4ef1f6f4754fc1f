// The stage executor: this worker's share of the model behind one
// StageEngine (worker/stage_engine.h, made by MakeStageEngine: the CPU engine
// or the CUDA one, which the executor never asks), wired to the worker: the
// load counter and MoE time split of the heartbeat (StageStats), the data
// plane's EP communicator for the engine's exchange, the placement switch,
// the expert store of the placement stager, and the device hidden states of
// a lane with a device communicator (GPU to GPU over NCCL). Everything else
// in worker/runtime/ holds opaque StageCache handles and calls Step/Sample.
//
// Threads and ownership: the stage thread calls everything, except
// compute_times() (the heartbeat thread; plain doubles, a torn read is
// harmless) and expert_store() (the placement stager, which serializes its
// use). The executor owns the engine; it borrows the live plan (placements)
// and the data plane's communicators between AttachDataPlane and
// DetachDataPlane. Step and the hidden-state transfers block on the data
// plane (up to step_timeout per exchange).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/config.h"
#include "topology/plan.h"
#include "worker/cuda_engine.h"
#include "worker/model.h"
#include "worker/stage_engine.h"
#include "worker/runtime/data_plane.h"
#include "worker/runtime/messages.h"
#include "worker/runtime/placement_stager.h"
#include "worker/runtime/stage_stats.h"

namespace expertmesh::worker::runtime {

// A sequence's cache (its KV/latent cache on this stage), move-only; frees
// its memory when destroyed. A default-constructed one is empty (length 0)
// and cannot run steps.
class StageCache {
 public:
  StageCache();
  ~StageCache();
  StageCache(StageCache&&) noexcept;
  StageCache& operator=(StageCache&&) noexcept;
  int64_t length() const;  // tokens cached

 private:
  friend class StageExecutor;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// n new tokens of one sequence (tokens: host ids on the stage with the
// embedding, else null).
struct StepSegment {
  StageCache* cache = nullptr;
  const int32_t* tokens = nullptr;
  int64_t n = 0;
};

struct StageExecutorOptions {
  bool cuda = false;                      // the CUDA StageEngine instead of the CPU one
  CudaEngineOptions cuda_options;
  bool nccl_data_plane = false;           // an engine with device hidden states: EP tokens and hidden states over NCCL
  absl::Duration step_timeout = absl::Seconds(120);
};

class StageExecutor {
 public:
  // Loads the layers and experts of (stage, ep_rank) of *plan from the
  // checkpoint `dir`. plan: the live plan (its placements change on a switch;
  // it outlives the executor). stats: where the engine's routes are counted
  // and its MoE times added.
  static absl::StatusOr<std::unique_ptr<StageExecutor>> Load(const StageExecutorOptions& options,
                                                             const std::string& dir, const topology::Plan* plan,
                                                             int stage, int ep_rank, StageStats* stats);
  ~StageExecutor();
  StageExecutor(const StageExecutor&) = delete;
  StageExecutor& operator=(const StageExecutor&) = delete;

  const ModelConfig& config() const;
  std::string Describe() const;  // for the log: the engine's device and precision
  // The data plane must build NCCL twins of its groups (an engine with
  // device hidden states, and nccl_data_plane).
  bool wants_nccl_twins() const;

  // ---- data plane (stage thread)
  // Takes the engine's EP exchange onto the freshly built data plane (its
  // device twin of the stage group when there is one).
  absl::Status AttachDataPlane(DataPlane* dp);
  // Lets go of the data plane before it is released.
  void DetachDataPlane();
  // After a placement switch: the engine's exchange takes the new placement.
  void PlacementSwitched();
  // The engine's routed experts, for the placement stager.
  ExpertStore* expert_store();

  // ---- steps (stage thread)
  StageCache NewCache();
  // Hidden states move GPU to GPU between the stages of the lane (the lane
  // has an NCCL twin): RecvHidden before Step, SendHidden after.
  bool device_hidden() const;
  // One step of this stage on the segments. On the first stage the engine
  // embeds the tokens; on later ones `hidden` holds the previous stage's
  // hidden states [T, H] (host; empty with device_hidden(), RecvHidden got
  // them). Afterwards: on the last stage `hidden` is empty and the logits
  // wait for Sample; else `hidden` holds this stage's output (host), or is
  // empty when it stayed on the device for SendHidden. Segments may have n == 0.
  absl::Status Step(bool first, const std::vector<StepSegment>& segs, std::vector<float>* hidden);
  // Last stage, after Step: samples the next token of each segment of mb
  // from the step's logits (token 0 for a segment with sample == 0: a
  // prefill chunk before the prompt's last).
  Return Sample(const MicroBatch& mb);
  // The device data plane: the T hidden rows of the last Step to `peer`, or
  // the previous stage's into the executor's device buffer.
  absl::Status SendHidden(int peer, int64_t T);
  absl::Status RecvHidden(int peer, int64_t T);

  // ---- heartbeat thread
  // The engine's compute split (attention, dense; zeros on the GPU engine,
  // whose kernels run async).
  EngineTimes compute_times() const;

 private:
  struct Impl;
  StageExecutor(const StageExecutorOptions& o, std::unique_ptr<Impl> impl);
  // Adds the engine's embed/head and MoE time since the last call to the stats.
  void AccountTimes();
  const StageExecutorOptions o_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace expertmesh::worker::runtime
