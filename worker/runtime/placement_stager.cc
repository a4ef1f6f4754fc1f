#include "worker/runtime/placement_stager.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/status.h"
#include "topology/plan_proto.h"
#include "glog/logging.h"

namespace expertmesh::worker::runtime {

absl::StatusOr<topology::Plan> PlanFromCoordinator(const v1::Plan& p) {
  ASSIGN_OR_RETURN(topology::Plan plan, topology::PlanFromProto(p));
  if (static_cast<int64_t>(plan.stages.size()) != plan.pp || plan.pp < 1 || plan.ep < 1) {
    return absl::DataLossError("plan: stages do not match pp/ep");
  }
  for (const auto& s : plan.stages) {
    for (const auto& [layer, pl] : s.placement) {
      if (pl.num_ranks() != plan.ep) {
        return absl::DataLossError(absl::StrCat("plan: placement of layer ", layer, " has ", pl.num_ranks(),
                                                " ranks, expected ep = ", plan.ep));
      }
    }
  }
  return plan;
}

PlacementStager::PlacementStager(int worker_id, int stage, int ep_rank, topology::Plan* live_plan, int64_t version,
                                 ExpertStore* store, Hooks hooks)
    : worker_id_(worker_id), stage_(stage), ep_rank_(ep_rank), plan_(live_plan), store_(store),
      hooks_(std::move(hooks)), placement_version_(version) {}

PlacementStager::~PlacementStager() { Join(); }

void PlacementStager::Join() {
  if (loader_.joinable()) loader_.join();
}

void PlacementStager::OnHeartbeat(const std::string& epoch, int64_t committed_version, int64_t next_version,
                                  bool has_next, const v1::Plan& next_plan) {
  const int64_t staged = staged_version_.load();
  if (staged != 0 && loading_version_.load() == 0) {
    std::lock_guard<std::mutex> l(mu_);
    if (staged_.epoch != epoch || (staged != next_version && staged != committed_version)) {
      LOG(INFO) << "worker " << worker_id_ << ": placement version " << staged << " was dropped; unloading its experts";
      staged_ = Staged();
      staged_version_ = 0;
    }
  } else if (next_version > placement_version_.load() && staged == 0 && loading_version_.load() == 0 && has_next) {
    StartStaging(next_version, epoch, next_plan);
  }
}

void PlacementStager::StartStaging(int64_t version, const std::string& epoch, const v1::Plan& proto) {
  auto fail = [&](const std::string& why) {
    LOG(ERROR) << "worker " << worker_id_ << ": cannot load placement version " << version << ": " << why;
    std::lock_guard<std::mutex> l(mu_);
    error_ = why;
  };
  if (absl::Status can = store_->CanStage(); !can.ok()) {
    fail(std::string(can.message()));
    return;
  }
  absl::StatusOr<topology::Plan> plan = PlanFromCoordinator(proto);
  if (!plan.ok()) {
    fail(std::string(plan.status().message()));
    return;
  }
  // The experts this rank's new slots need that it does not hold now.
  std::map<int64_t, std::vector<int32_t>> need;
  int64_t keep = 0;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (plan->stages.size() != plan_->stages.size() ||
        plan->stages[stage_].placement.size() != plan_->stages[stage_].placement.size()) {
      error_ = "the pending plan has other stages or MoE layers than the one this worker runs";
      return;
    }
    for (const auto& [layer, pl] : plan->stages[stage_].placement) {
      const std::vector<int32_t> held = store_->LoadedExperts(layer);
      std::set<int32_t> want(pl.slots_of_rank(ep_rank_).begin(), pl.slots_of_rank(ep_rank_).end());
      for (int32_t e : want) {
        if (std::find(held.begin(), held.end(), e) == held.end()) {
          need[layer].push_back(e);
        } else {
          ++keep;
        }
      }
    }
  }
  int64_t n = 0;
  for (const auto& [layer, ids] : need) n += static_cast<int64_t>(ids.size());
  LOG(INFO) << "worker " << worker_id_ << ": staging placement version " << version << ": loading " << n
            << " experts next to the ones in use (" << keep << " stay)";
  Join();  // a finished earlier loader
  loading_version_ = version;
  const std::string dir = proto.checkpoint();
  loader_ = std::thread([this, version, epoch, dir, need = std::move(need), plan = *std::move(plan), n]() mutable {
    const absl::Time t0 = absl::Now();
    absl::StatusOr<ExpertStore::ExpertSet> experts = store_->LoadExperts(dir, need);
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!experts.ok()) {
        LOG(ERROR) << "worker " << worker_id_ << ": loading the experts of placement version " << version
                   << " failed: " << experts.status();
        error_ = std::string(experts.status().message());
      } else {
        staged_.epoch = epoch;
        staged_.plan = std::move(plan);
        staged_.experts = *std::move(experts);
        staged_version_ = version;
        LOG(INFO) << "worker " << worker_id_ << ": placement version " << version << " staged (" << n
                  << " experts loaded in " << absl::FormatDuration(absl::Now() - t0) << ")";
      }
      loading_version_ = 0;
    }
    // Tell the coordinator now (staged, or why not), not with the next periodic heartbeat.
    if (hooks_.beat_now) hooks_.beat_now();
  });
}

absl::Status PlacementStager::Switch(int64_t version) {
  const absl::Time t0 = absl::Now();
  std::lock_guard<std::mutex> l(mu_);
  if (staged_version_.load() != version) {
    return absl::InternalError(absl::StrCat("worker ", worker_id_, ": told to switch to placement version ", version,
                                            " but it staged ", staged_version_.load(), " (the coordinator commits "
                                            "only what every worker staged)"));
  }
  std::map<int64_t, std::set<int32_t>> keep;
  for (const auto& [layer, pl] : staged_.plan.stages[stage_].placement) {
    keep[layer] = std::set<int32_t>(pl.slots_of_rank(ep_rank_).begin(), pl.slots_of_rank(ep_rank_).end());
  }
  int64_t in = 0;
  for (const auto& [layer, ids] : staged_.experts) in += static_cast<int64_t>(ids.size());
  RETURN_IF_ERROR(store_->ReplaceExperts(std::move(staged_.experts), keep));
  for (size_t s = 0; s < plan_->stages.size(); ++s) plan_->stages[s].placement = staged_.plan.stages[s].placement;
  if (hooks_.switched) hooks_.switched();  // e.g. EP engines that point at the old placement
  placement_version_ = version;
  staged_ = Staged();
  staged_version_ = 0;
  LOG(INFO) << "worker " << worker_id_ << ": switched to placement version " << version << " (" << in
            << " experts moved in) in " << absl::FormatDuration(absl::Now() - t0);
  return absl::OkStatus();
}

int64_t PlacementStager::OfferVersion(int64_t committed) const {
  const int64_t active = placement_version_.load();
  return committed > active && staged_version_.load() == committed ? committed : active;
}

std::string PlacementStager::TakeError() {
  std::lock_guard<std::mutex> l(mu_);
  return std::exchange(error_, {});
}

v1::Plan PlacementStager::RunningPlanProto(const v1::Plan& registered, topology::Plan* running) const {
  std::lock_guard<std::mutex> l(mu_);
  if (running != nullptr) *running = *plan_;
  return topology::PlanToProto(*plan_, registered.checkpoint(), registered.model_json(), placement_version_.load());
}

}  // namespace expertmesh::worker::runtime
