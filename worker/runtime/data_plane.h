// The worker's data plane: the communicator of its stage group (the EP ranks
// of its pipeline stage, for the MoE all-to-alls and the step agreement) and
// of its lane group (EP rank r of every stage, for the pipeline messages),
// each with an NCCL twin when hidden states and EP tokens move GPU to GPU.
//
// A data plane belongs to one (coordinator epoch, generation): the
// coordinator starts a new generation whenever a worker is lost, leaves or is
// replaced, and the survivors rebuild. UCX groups rendezvous under the key
// prefix "<epoch>/g<generation>/<group>" in the coordinator's store, so a
// rebuild never meets a stale peer of an older generation.
//
// Threads and ownership:
//   * the stage thread owns the communicators: Build, Release and the
//     accessors (stage(), lane(), ...) are called from it only, and the
//     pointers stay valid until the next Release;
//   * any thread may call Abort, Broken, the generation accessors and
//     MarkStaleIfMoved (the heartbeat thread does, when the coordinator moves
//     to another generation or this worker must leave); a mutex guards the
//     pointers and the generation against them.
// Blocking: Build blocks until every peer of both groups has connected (up to
// the factory's connect timeout); Abort never blocks; Release may take a
// grace period to close endpoints to a dead peer (never under the mutex).
#pragma once

#include <array>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/comm/bootstrap.h"
#include "worker/comm/communicator.h"

namespace expertmesh::worker::runtime {

// One communicator group to create.
struct GroupSpec {
  std::string name;             // "stage<s>" or "lane<r>", "-nccl" appended for the NCCL twin
  std::vector<int> worker_ids;  // the members in rank order
  int rank = 0;                 // this worker's rank in the group
  std::string backend;          // "mpi", "ucx" or "nccl"
  std::string key_prefix;       // "<epoch>/g<generation>/<name>": unique per generation
  int mpi_tag = 0;              // mpi: keeps the stage and lane groups apart
};

// Creates communicators; collective over the group's members (blocks until
// they have all joined or the factory's timeout passes). Tests inject fakes.
class CommFactory {
 public:
  virtual ~CommFactory() = default;
  virtual absl::StatusOr<std::unique_ptr<comm::Communicator>> Create(const GroupSpec& spec) = 0;
};

// The real factory: MPI groups of the mpirun world (world rank = worker id +
// mpi_world_offset), or any registry backend bootstrapped over `store`.
class DefaultCommFactory : public CommFactory {
 public:
  DefaultCommFactory(comm::Store* store, int mpi_world_offset, absl::Duration connect_timeout, int cuda_device)
      : store_(store), mpi_world_offset_(mpi_world_offset), connect_timeout_(connect_timeout),
        cuda_device_(cuda_device) {}
  absl::StatusOr<std::unique_ptr<comm::Communicator>> Create(const GroupSpec& spec) override;

 private:
  comm::Store* store_;
  int mpi_world_offset_;
  absl::Duration connect_timeout_;
  int cuda_device_;
};

class DataPlane {
 public:
  struct Options {
    std::string backend = "ucx";  // host communicators
    bool nccl_twins = false;      // also an NCCL communicator per group (device data plane)
  };
  // The groups of worker `worker_id` at (stage, ep_rank) of a pp x ep plan.
  DataPlane(CommFactory* factory, const Options& options, int64_t pp, int64_t ep, int worker_id, int stage,
            int ep_rank);
  ~DataPlane();
  DataPlane(const DataPlane&) = delete;
  DataPlane& operator=(const DataPlane&) = delete;

  // ---- identity (any thread)
  struct Generation {
    std::string epoch;
    int64_t generation = 0;
  };
  Generation generation() const;
  // The generation the next Build is for. clear_stale: a fresh start after a
  // rejoin (else a staleness noticed meanwhile is kept).
  void SetGeneration(const std::string& epoch, int64_t generation, bool clear_stale);
  // The coordinator of our epoch runs another generation: marks this data
  // plane stale (once) and returns true; false when it was already stale, or
  // the epoch differs (a restarted coordinator), or the generation is ours.
  bool MarkStaleIfMoved(const std::string& epoch, int64_t generation);
  bool stale() const;
  // Elastic EP (UCX/host data plane): the worker ids (of any stage) that
  // are vacant in the generation the next Build is for (their worker was
  // lost and nobody replaced it yet). Build then connects the live members
  // of the stage only and hands out a comm::VacantRankCommunicator of the
  // full EP size (vacant ranks send nothing and receive nothing; see
  // worker/comm/vacant_communicator.h). With pp > 1 the lanes are re-paired
  // around the vacant places (topology/lanes.h): the lane group is this
  // worker's lane, or none when it is lane-less (lane() is null; see
  // laneless()). kFailedPrecondition from Build with NCCL twins, and when
  // this worker itself is vacant.
  void SetVacant(std::vector<int> vacant_worker_ids);

  // ---- stage thread
  // Creates the groups of the current generation (stage group when ep > 1,
  // lane group when pp > 1). When the generation went stale while
  // connecting, they are aborted at once, so the first step fails and the
  // worker rejoins again.
  absl::Status Build();
  // Destroys the communicators (Abort them first, and detach whatever uses them).
  void Release();
  comm::Communicator* stage() const { return comms_[0].get(); }
  comm::Communicator* lane() const { return comms_[1].get(); }
  comm::Communicator* stage_device() const { return comms_[2].get(); }
  comm::Communicator* lane_device() const { return comms_[3].get(); }
  // pp > 1 with vacant places: this worker has no lane (it runs its stage's
  // layers with zero tokens, driven by the stage's lane leader).
  bool laneless() const { return pp_ > 1 && comms_[1] == nullptr; }
  // Its stage's lane-less EP ranks (live, no lane), ascending; and the
  // lowest EP rank of its stage that has a lane (-1: none), which tells the
  // lane-less ones every micro-batch's kind over the stage group.
  const std::vector<int>& laneless_ranks() const { return laneless_ranks_; }
  int lane_leader() const { return lane_leader_; }
  // How many times Build succeeded.
  int builds() const { return builds_; }

  // ---- any thread
  // Makes every running and later exchange of the current communicators fail
  // with kAborted (reason). Does not block.
  void Abort(const absl::Status& reason);
  // Some communicator failed (an exchange error or an Abort).
  bool Broken() const;

 private:
  absl::StatusOr<std::unique_ptr<comm::Communicator>> Make(const std::string& name, const std::vector<int>& ids,
                                                           const std::string& backend, int mpi_tag);

  CommFactory* factory_;
  const Options o_;
  const int64_t pp_, ep_;
  const int worker_id_, stage_, ep_rank_;
  mutable std::mutex mu_;  // guards comms_ (against Abort/Broken) and the generation
  Generation gen_;
  bool stale_ = false;
  std::vector<int> vacant_;  // worker ids, for the next Build
  std::vector<int> laneless_ranks_;  // of the last Build
  int lane_leader_ = -1;
  std::array<std::unique_ptr<comm::Communicator>, 4> comms_;  // stage, lane, stage nccl, lane nccl
  int builds_ = 0;
};

}  // namespace expertmesh::worker::runtime
