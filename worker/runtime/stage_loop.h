// The step loop of one worker: what its pipeline stage does, step after
// step, until the cluster stops or the data plane fails.
//
// Stage 0 (RunStage0): syncs with the coordinator through the scheduler,
// agrees with the other EP ranks of the stage on each step (all-gather of
// "have work / want to stop / drained / placement version I can run"; work
// anywhere: everyone runs the layers, so every rank joins every MoE
// all-to-all, also with zero tokens; all switch placement at the same step),
// runs the stage, sends the micro-batch down the lane and keeps up to P of
// them in flight, applying the tokens the last stage returns. When idle, a
// keep-alive now and then keeps the downstream receives within their
// deadline. Later stages (RunDownstream) receive, switch placement when a
// micro-batch of a newer version arrives, run and forward; the last one
// samples and returns the tokens to stage 0.
//
// Threads: the stage thread only. Everything here blocks on the data plane
// (each exchange up to step_timeout) or on Sync; an Abort of the data plane
// from the heartbeat thread ends a blocked step with an error, which Run
// returns (the worker then decides whether to rejoin). The loop owns the
// downstream stages' caches; the scheduler owns stage 0's.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/runtime/control_session.h"
#include "worker/runtime/data_plane.h"
#include "worker/runtime/messages.h"
#include "worker/runtime/placement_stager.h"
#include "worker/runtime/scheduler.h"
#include "worker/runtime/stage_executor.h"
#include "worker/runtime/stage_stats.h"

namespace expertmesh::worker::runtime {

class StageLoop {
 public:
  struct Options {
    int worker_id = 0;
    int stage = 0;
    int64_t pp = 1, ep = 1;
    int64_t hidden_size = 0;
    absl::Duration step_timeout = absl::Seconds(120);
  };
  // scheduler: stage 0 only (null on later stages). All outlive the loop.
  StageLoop(const Options& options, ControlSession* session, DataPlane* data_plane, StageExecutor* executor,
            PlacementStager* stager, Scheduler* scheduler, StageStats* stats);

  // Runs steps until the cluster stops (OK) or something fails.
  absl::Status Run();

 private:
  absl::Status RunStage0();
  absl::Status RunDownstream();
  // A later stage's worker without a lane (elastic EP, pp > 1, vacant places
  // elsewhere; DataPlane::laneless): the stage's lane leader tells it each
  // micro-batch's kind and placement version over the stage group, and it
  // runs its layers with zero tokens so the stage's all-to-alls stay in
  // lockstep.
  absl::Status RunLaneless();
  // The lane leader of a later stage: tells the lane-less ranks of its stage
  // about a micro-batch (kind, tick, placement version; no tokens).
  absl::Status TellLaneless(const MicroBatch& mb);
  // Lane messages (size header, then body) over the data plane's lane group.
  absl::StatusOr<std::string> Recv(int peer);
  absl::Status Send(int peer, const std::string& bytes);
  absl::Status Switch(int64_t version);

  const Options o_;
  ControlSession* session_;
  DataPlane* dp_;
  StageExecutor* exec_;
  PlacementStager* stager_;
  Scheduler* sched_;
  StageStats* stats_;
  absl::Time last_sync_ = absl::InfinitePast();  // stage 0: the last Sync attempt
};

}  // namespace expertmesh::worker::runtime
