#include "worker/runtime/data_plane.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "topology/lanes.h"
#include "worker/comm/mpi_communicator.h"
#include "worker/comm/registry.h"
#include "worker/comm/vacant_communicator.h"

namespace expertmesh::worker::runtime {

absl::StatusOr<std::unique_ptr<comm::Communicator>> DefaultCommFactory::Create(const GroupSpec& spec) {
  if (spec.backend == "mpi") {
    std::vector<int> world;
    for (int w : spec.worker_ids) world.push_back(w + mpi_world_offset_);
    return comm::CreateMpiGroupCommunicator(world, spec.mpi_tag);
  }
  comm::StoreBootstrap boot(store_, spec.key_prefix, spec.rank, static_cast<int>(spec.worker_ids.size()));
  comm::CommOptions opts;
  // Peers may still be loading their shard (a replacement loads after it registered).
  opts.connect_timeout = std::max(opts.connect_timeout, connect_timeout_);
  if (spec.backend == "nccl") opts.cuda_device = cuda_device_;
  return comm::CreateCommunicator(spec.backend, &boot, opts);
}

DataPlane::DataPlane(CommFactory* factory, const Options& options, int64_t pp, int64_t ep, int worker_id, int stage,
                     int ep_rank)
    : factory_(factory), o_(options), pp_(pp), ep_(ep), worker_id_(worker_id), stage_(stage), ep_rank_(ep_rank) {}

DataPlane::~DataPlane() { Release(); }

DataPlane::Generation DataPlane::generation() const {
  std::lock_guard<std::mutex> l(mu_);
  return gen_;
}

void DataPlane::SetGeneration(const std::string& epoch, int64_t generation, bool clear_stale) {
  std::lock_guard<std::mutex> l(mu_);
  gen_.epoch = epoch;
  gen_.generation = generation;
  if (clear_stale) stale_ = false;
}

bool DataPlane::MarkStaleIfMoved(const std::string& epoch, int64_t generation) {
  std::lock_guard<std::mutex> l(mu_);
  const bool moved = epoch == gen_.epoch && generation != gen_.generation && !stale_;
  if (moved) stale_ = true;
  return moved;
}

void DataPlane::SetVacant(std::vector<int> vacant_worker_ids) {
  std::sort(vacant_worker_ids.begin(), vacant_worker_ids.end());
  std::lock_guard<std::mutex> l(mu_);
  vacant_ = std::move(vacant_worker_ids);
}

bool DataPlane::stale() const {
  std::lock_guard<std::mutex> l(mu_);
  return stale_;
}

absl::StatusOr<std::unique_ptr<comm::Communicator>> DataPlane::Make(const std::string& name,
                                                                    const std::vector<int>& ids,
                                                                    const std::string& backend, int mpi_tag) {
  GroupSpec spec;
  spec.name = name;
  spec.worker_ids = ids;
  spec.backend = backend;
  spec.mpi_tag = mpi_tag;
  {
    std::lock_guard<std::mutex> l(mu_);
    spec.key_prefix = absl::StrCat(gen_.epoch, "/g", gen_.generation, "/", name);
  }
  spec.rank = static_cast<int>(std::find(ids.begin(), ids.end(), worker_id_) - ids.begin());
  return factory_->Create(spec);
}

absl::Status DataPlane::Build() {
  std::array<std::unique_ptr<comm::Communicator>, 4> made;
  // A group's host communicator and, with the NCCL device plane, its NCCL twin.
  auto group = [&](const std::string& name, const std::vector<int>& ids, int mpi_tag, int slot) -> absl::Status {
    ASSIGN_OR_RETURN(made[slot], Make(name, ids, o_.backend, mpi_tag));
    if (o_.nccl_twins) {
      ASSIGN_OR_RETURN(made[slot + 2], Make(name + "-nccl", ids, "nccl", mpi_tag));
    }
    return absl::OkStatus();
  };
  std::vector<int> vacant;
  {
    std::lock_guard<std::mutex> l(mu_);
    vacant = vacant_;
  }
  auto is_vacant = [&](int id) { return std::binary_search(vacant.begin(), vacant.end(), id); };
  if (!vacant.empty()) {
    if (o_.nccl_twins) {
      return absl::FailedPreconditionError(absl::StrCat(
          "worker ", worker_id_, ": serving with vacant EP ranks needs the host data plane (not the NCCL device "
          "data plane)"));
    }
    if (is_vacant(worker_id_)) {
      return absl::FailedPreconditionError(absl::StrCat("worker ", worker_id_, " is vacant in this generation"));
    }
  }
  if (ep_ > 1) {
    std::vector<int> ids, live_ranks;
    for (int r = 0; r < ep_; ++r) {
      const int id = static_cast<int>(stage_ * ep_ + r);
      if (is_vacant(id)) continue;
      ids.push_back(id);
      live_ranks.push_back(r);
    }
    RETURN_IF_ERROR(group(absl::StrCat("stage", stage_), ids, 100 + stage_, 0));
    if (static_cast<int64_t>(ids.size()) < ep_) {  // elastic: logical EP ranks over the live members
      ASSIGN_OR_RETURN(made[0], comm::VacantRankCommunicator::Create(std::move(made[0]), live_ranks,
                                                                     static_cast<int>(ep_)));
    }
  }
  std::vector<int> laneless;
  int leader = -1;
  if (pp_ > 1) {
    // Lane l is EP rank l of every stage while every place is held; around
    // vacant places the lanes are re-paired (topology/lanes.h).
    const topology::Lanes lanes = topology::ComputeLanes(pp_, ep_, vacant);
    for (int r = 0; r < ep_; ++r) {
      const int id = static_cast<int>(stage_ * ep_ + r);
      if (is_vacant(id)) continue;
      if (lanes.lane_of[static_cast<size_t>(id)] < 0) {
        laneless.push_back(r);
      } else if (leader < 0) {
        leader = r;
      }
    }
    const int mine = lanes.lane_of[static_cast<size_t>(worker_id_)];
    if (mine >= 0) {
      // Named after its stage-0 worker: the same lane keeps the same name.
      const std::vector<int>& ids = lanes.lanes[static_cast<size_t>(mine)];
      RETURN_IF_ERROR(group(absl::StrCat("lane", ids[0]), ids, 10000 + ids[0], 1));
    }
  }
  std::lock_guard<std::mutex> l(mu_);
  comms_ = std::move(made);
  laneless_ranks_ = std::move(laneless);
  lane_leader_ = leader;
  ++builds_;
  if (stale_) {  // the generation moved on while we connected: fail the first step, rejoin again
    const absl::Status why = absl::AbortedError("the data-plane generation moved on while connecting");
    for (auto& c : comms_) {
      if (c != nullptr) c->Abort(why);
    }
  }
  return absl::OkStatus();
}

void DataPlane::Release() {
  std::array<std::unique_ptr<comm::Communicator>, 4> old;
  {
    std::lock_guard<std::mutex> l(mu_);
    old = std::move(comms_);
  }
  // Destroyed outside the lock: closing endpoints to a dead peer may take a grace period.
}

void DataPlane::Abort(const absl::Status& reason) {
  std::lock_guard<std::mutex> l(mu_);
  for (auto& c : comms_) {
    if (c != nullptr) c->Abort(reason);
  }
}

bool DataPlane::Broken() const {
  std::lock_guard<std::mutex> l(mu_);
  for (const auto& c : comms_) {
    if (c != nullptr && !c->health().ok()) return true;
  }
  return false;
}

}  // namespace expertmesh::worker::runtime
