// Expert rebalancing on a worker: staging a new expert placement in the
// background and switching to it between steps.
//
// The coordinator announces a pending placement (version v, a plan) in its
// heartbeat responses. The stager loads, on a loader thread, the experts the
// new placement puts on this EP rank that it does not hold yet, next to the
// ones in use, and reports v as staged with the next heartbeat (sent at once).
// Once every worker staged v the coordinator commits it; the stage thread
// then switches between two steps (all EP ranks of a stage at the same step,
// later stages when the first micro-batch of v reaches them): the staged
// experts move into the shard, the ones no longer held are dropped, and the
// live plan takes the new placement. A staged placement the coordinator
// dropped (neither pending nor committed any more), or one staged for a
// coordinator that has restarted since (another epoch), is dropped.
//
// Threads and ownership:
//   * OnHeartbeat, TakeError, RunningPlanProto: the heartbeat thread;
//   * Switch, OfferVersion: the stage thread, between steps (it is the only
//     writer of the live plan, which it reads without the lock);
//   * the loader thread: loads experts through ExpertStore::LoadExperts
//     (which must not touch the live shard), then publishes under the lock;
//   * the version accessors: any thread (atomics).
// One mutex guards the staged experts, the staging error and the live plan's
// placements against the heartbeat thread. Nothing here blocks on the
// network; Switch blocks for the in-memory swap only; Join waits for a
// running load (disk).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/expertmesh.pb.h"
#include "topology/plan.h"
#include "worker/model.h"

namespace expertmesh::worker::runtime {

// The routed experts of a model shard, as rebalancing sees them.
class ExpertStore {
 public:
  using ExpertSet = ModelShard::ExpertSet;
  virtual ~ExpertStore() = default;
  // OK when this shard's experts can be restaged; else why not (reported to
  // the coordinator as the staging error).
  virtual absl::Status CanStage() const = 0;
  // The experts held for a MoE layer (any thread; the stager serializes it
  // against ReplaceExperts).
  virtual std::vector<int32_t> LoadedExperts(int64_t layer) const = 0;
  // Reads experts from the checkpoint without touching the live shard (the
  // loader thread, while the stage thread runs steps). Blocks on the disk.
  virtual absl::StatusOr<ExpertSet> LoadExperts(const std::string& dir,
                                                const std::map<int64_t, std::vector<int32_t>>& need) = 0;
  // Moves `experts` in and drops every expert of a layer not in keep[layer]
  // (the stage thread, between steps).
  virtual absl::Status ReplaceExperts(ExpertSet experts, const std::map<int64_t, std::set<int32_t>>& keep) = 0;
};

// The plan from the coordinator (Register, or a pending placement), checked
// against what a worker relies on.
absl::StatusOr<topology::Plan> PlanFromCoordinator(const v1::Plan& p);

class PlacementStager {
 public:
  struct Hooks {
    // A load finished (staged or failed): tell the coordinator now (any thread).
    std::function<void()> beat_now;
    // After a switch, on the stage thread: whatever points at the old placement.
    std::function<void()> switched;
  };
  // live_plan: the plan the worker runs (owned by the caller, outlives this).
  // version: the placement version it runs now.
  PlacementStager(int worker_id, int stage, int ep_rank, topology::Plan* live_plan, int64_t version,
                  ExpertStore* store, Hooks hooks);
  ~PlacementStager();  // joins the loader

  // Heartbeat thread: the coordinator's answer. Stages the pending placement
  // (`next_version` with `next_plan`, when has_next) if nothing is staged or
  // loading, or drops a staged one the coordinator no longer wants.
  void OnHeartbeat(const std::string& epoch, int64_t committed_version, int64_t next_version, bool has_next,
                   const v1::Plan& next_plan);
  // Starts loading placement `version` (of coordinator `epoch`) on the
  // loader thread; failures end up in TakeError.
  void StartStaging(int64_t version, const std::string& epoch, const v1::Plan& proto);
  // Stage thread, between steps: switches to the staged placement `version`.
  // kInternal when it is not the one staged (the coordinator commits only
  // what every worker staged).
  absl::Status Switch(int64_t version);
  // Stage thread: the placement version this rank can run from the next step
  // on: `committed` when it is newer and staged, else the current one.
  int64_t OfferVersion(int64_t committed) const;
  // The last staging error (empty: none), once.
  std::string TakeError();
  // The live plan as the coordinator's proto (re-registration with a
  // restarted coordinator), and its JSON text, under the lock.
  v1::Plan RunningPlanProto(const v1::Plan& registered, topology::Plan* running) const;
  void Join();

  int64_t placement_version() const { return placement_version_.load(); }
  int64_t staged_version() const { return staged_version_.load(); }
  int64_t loading_version() const { return loading_version_.load(); }

 private:
  const int worker_id_, stage_, ep_rank_;
  topology::Plan* const plan_;
  ExpertStore* const store_;
  const Hooks hooks_;
  mutable std::mutex mu_;
  struct Staged {  // its version: staged_version_
    std::string epoch;  // of the coordinator that sent it (versions are unique per epoch)
    topology::Plan plan;
    ExpertStore::ExpertSet experts;
  } staged_;
  std::string error_;                       // reported once with the next heartbeat
  std::atomic<int64_t> placement_version_;
  std::atomic<int64_t> staged_version_{0};  // of staged_ (0: none); written under mu_
  std::atomic<int64_t> loading_version_{0};
  std::thread loader_;
};

}  // namespace expertmesh::worker::runtime
