// Expert rebalancing while serving: the Coordinator's placement versions
// (see "Placement version" in coordinator.h and docs/CLUSTER.md).

#include <algorithm>
#include <numeric>
#include <set>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "coordinator/coordinator.h"
#include "coordinator/journal_records.pb.h"
#include "glog/logging.h"
#include "topology/eplb.h"
#include "topology/plan_proto.h"

namespace expertmesh::coordinator {

namespace {

int64_t UnixMs() { return absl::ToUnixMillis(absl::Now()); }

// Same stages, layers, experts and slot counts: a placement of one plan can
// replace the other's.
bool SameShape(const topology::Plan& a, const topology::Plan& b) {
  if (a.pp != b.pp || a.ep != b.ep || a.redundant_experts != b.redundant_experts ||
      a.stages.size() != b.stages.size()) {
    return false;
  }
  for (size_t s = 0; s < a.stages.size(); ++s) {
    const topology::StagePlan &x = a.stages[s], &y = b.stages[s];
    if (x.layer_begin != y.layer_begin || x.layer_end != y.layer_end || x.has_embedding != y.has_embedding ||
        x.has_head != y.has_head || x.placement.size() != y.placement.size()) {
      return false;
    }
    for (const auto& [layer, p] : x.placement) {
      auto it = y.placement.find(layer);
      if (it == y.placement.end() || it->second.num_experts() != p.num_experts() ||
          it->second.num_slots() != p.num_slots() || it->second.num_ranks() != p.num_ranks()) {
        return false;
      }
    }
  }
  return true;
}

// Experts of `next` that rank r does not hold in `old` (the weights rank r must load).
int64_t ExpertsToLoad(const topology::ExpertPlacement& old, const topology::ExpertPlacement& next) {
  int64_t n = 0;
  for (int64_t r = 0; r < next.num_ranks(); ++r) {
    const std::set<int32_t> have(old.slots_of_rank(r).begin(), old.slots_of_rank(r).end());
    for (int32_t e : std::set<int32_t>(next.slots_of_rank(r).begin(), next.slots_of_rank(r).end())) {
      n += have.count(e) == 0 ? 1 : 0;
    }
  }
  return n;
}

// EPLB computes a placement from scratch; its ranks are interchangeable (the
// coordinator treats a stage's ranks as one node). Renumbers them so that
// each keeps as many of its current experts as it can (greedy on the overlap
// matrix): the same rank loads, far fewer experts to load.
absl::StatusOr<topology::ExpertPlacement> KeepExpertsInPlace(const topology::ExpertPlacement& old,
                                                            const topology::ExpertPlacement& next) {
  const int64_t R = next.num_ranks();
  std::vector<std::tuple<int64_t, int64_t, int64_t>> pairs;  // (-overlap, new rank, old rank)
  for (int64_t a = 0; a < R; ++a) {
    const std::set<int32_t> mine(next.slots_of_rank(a).begin(), next.slots_of_rank(a).end());
    for (int64_t b = 0; b < R; ++b) {
      int64_t common = 0;
      for (int32_t e : std::set<int32_t>(old.slots_of_rank(b).begin(), old.slots_of_rank(b).end())) {
        common += mine.count(e);
      }
      pairs.emplace_back(-common, a, b);
    }
  }
  std::sort(pairs.begin(), pairs.end());
  std::vector<int64_t> to(R, -1);
  std::vector<bool> taken(R, false);
  for (const auto& [neg, a, b] : pairs) {
    if (to[a] >= 0 || taken[b]) continue;
    to[a] = b;
    taken[b] = true;
  }
  std::vector<std::vector<int32_t>> slots(R);
  for (int64_t a = 0; a < R; ++a) slots[to[a]] = next.slots_of_rank(a);
  return topology::ExpertPlacement::Create(next.num_experts(), std::move(slots));
}

}  // namespace

double Coordinator::WindowImbalanceLocked(const topology::Plan& plan, int64_t* tokens_per_layer) const {
  double sum = 0;
  int64_t layers = 0, loaded = 0, tokens = 0;
  const int64_t top_k = std::max<int64_t>(1, config_.num_experts_per_tok);
  for (const auto& stage : plan.stages) {
    for (const auto& [layer, placement] : stage.placement) {
      ++layers;
      auto it = window_load_.find(layer);
      if (it == window_load_.end()) continue;
      const int64_t routed = std::accumulate(it->second.begin(), it->second.end(), int64_t{0});
      if (routed == 0) continue;
      tokens += routed / top_k;
      sum += topology::ImbalanceFactor(placement, std::vector<double>(it->second.begin(), it->second.end()));
      ++loaded;
    }
  }
  if (tokens_per_layer != nullptr) *tokens_per_layer = layers > 0 ? tokens / layers : 0;
  return loaded > 0 ? sum / static_cast<double>(loaded) : 1.0;
}

absl::Status Coordinator::StartRebalanceLocked(bool force, v1::RebalanceExpertsResponse* resp) {
  if (config_.num_moe_layers() == 0) {
    return absl::FailedPreconditionError(absl::StrCat("expert rebalancing: the model (", config_.model_type,
                                                      ") has no MoE layers, so no experts to place"));
  }
  if (std::any_of(workers_.begin(), workers_.end(), [](const Worker& w) { return w.vacant; })) {
    return absl::FailedPreconditionError("a worker's place is vacant (elastic EP): rebalance once it is held again");
  }
  if (plan_.ep < 2) {
    return absl::FailedPreconditionError("expert rebalancing needs --ep > 1 (with one EP rank a stage holds every "
                                         "expert)");
  }
  if ((config_.n_routed_experts + plan_.redundant_experts) % plan_.ep != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "expert rebalancing (EPLB) needs n_routed_experts + --redundant-experts (", config_.n_routed_experts, " + ",
        plan_.redundant_experts, ") divisible by --ep ", plan_.ep));
  }
  if (shutdown_requested_ || stopped_) return absl::FailedPreconditionError("the cluster is shutting down");
  if (pending_placement_.has_value()) {
    return absl::FailedPreconditionError(absl::StrCat("placement version ", pending_placement_->version,
                                                      " is still being loaded (", WorkersStagedLocked(), " of ",
                                                      workers_.size(),
                                                      " workers staged it); try again when it is committed"));
  }
  if (!ServingLocked()) {
    return absl::FailedPreconditionError("the cluster is not serving (every worker READY): rebalance once it is");
  }
  int64_t tokens = 0;
  const double before = WindowImbalanceLocked(plan_, &tokens);
  if (tokens == 0) {
    return absl::FailedPreconditionError("no expert load observed since the last rebalance: run some jobs first");
  }
  resp->set_imbalance_before(before);
  if (tokens < options_.eplb_min_tokens && !force) {
    resp->set_reason(absl::StrCat("only ", tokens, " routed tokens per MoE layer observed since the last rebalance "
                                  "(--eplb-min-tokens ", options_.eplb_min_tokens, ")"));
    return absl::OkStatus();
  }
  topology::EplbOptions eo;
  eo.num_ranks = plan_.ep;
  eo.ranks_per_node = plan_.ep;  // the coordinator treats a stage's ranks as one node, as BuildPlan does
  eo.num_groups = config_.n_group > 0 && config_.n_routed_experts % config_.n_group == 0 ? config_.n_group : 1;
  eo.redundant = plan_.redundant_experts;
  // Per layer: EPLB's placement, its ranks renumbered to keep experts in
  // place; a layer keeps its placement when it has no load in the window or
  // (unless forced) gains less than eplb_min_gain itself.
  topology::Plan next = plan_;
  int64_t moved = 0;
  for (auto& stage : next.stages) {
    for (auto& [layer, placement] : stage.placement) {
      auto it = window_load_.find(layer);
      if (it == window_load_.end()) continue;
      if (std::accumulate(it->second.begin(), it->second.end(), int64_t{0}) == 0) continue;
      const std::vector<double> load(it->second.begin(), it->second.end());
      ASSIGN_OR_RETURN(std::vector<topology::ExpertPlacement> p, topology::RebalanceExperts({load}, eo));
      ASSIGN_OR_RETURN(topology::ExpertPlacement kept, KeepExpertsInPlace(placement, p[0]));
      const double now = topology::ImbalanceFactor(placement, load), then = topology::ImbalanceFactor(kept, load);
      if (!force && then > now * (1.0 - options_.eplb_min_gain)) continue;
      moved += ExpertsToLoad(placement, kept);
      placement = std::move(kept);
    }
  }
  resp->set_experts_to_load(moved);
  const double after = WindowImbalanceLocked(next, nullptr);
  resp->set_imbalance_after(after);
  if (next == plan_) {
    resp->set_reason(force ? "the placement EPLB computes for the observed load is the one in use"
                           : absl::StrFormat("no MoE layer's imbalance would drop by --eplb-min-gain %.2f",
                                             options_.eplb_min_gain));
    return absl::OkStatus();
  }
  if (!force && after > before * (1.0 - options_.eplb_min_gain)) {
    resp->set_reason(absl::StrFormat("the imbalance would only go from %.3f to %.3f (--eplb-min-gain %.2f)", before,
                                     after, options_.eplb_min_gain));
    return absl::OkStatus();
  }
  PendingPlacement p;
  // A new number even after a dropped one: a worker may still hold the
  // experts it staged for that one.
  last_pending_version_ = std::max(last_pending_version_, placement_version_) + 1;
  p.version = last_pending_version_;
  p.proto = topology::PlanToProto(next, options_.checkpoint, model_json_, p.version);
  p.plan = std::move(next);
  p.imbalance_before = before;
  p.imbalance_after = after;
  LOG(INFO) << absl::StrFormat(
      "coordinator: rebalancing experts: placement version %d (imbalance %.3f -> %.3f on %d routed tokens per MoE "
      "layer); the workers load %d experts they do not hold yet",
      p.version, before, after, tokens, moved);
  pending_placement_ = std::move(p);
  rebalance_error_.clear();
  resp->set_started(true);
  resp->set_pending_version(pending_placement_->version);
  changed_.notify_all();
  return absl::OkStatus();
}

absl::StatusOr<v1::RebalanceExpertsResponse> Coordinator::RebalanceExperts(const v1::RebalanceExpertsRequest& request) {
  std::lock_guard<std::mutex> lock(mu_);
  v1::RebalanceExpertsResponse resp;
  RETURN_IF_ERROR(StartRebalanceLocked(request.force(), &resp));
  return resp;
}

void Coordinator::PlacementHeartbeatLocked(int worker_id, const v1::HeartbeatRequest& request,
                                           v1::HeartbeatResponse* resp) {
  Worker& w = workers_[static_cast<size_t>(worker_id)];
  w.staged_placement_version = request.staged_placement_version();
  if (pending_placement_.has_value()) {
    if (!request.staging_error().empty()) {
      DropPendingPlacementLocked(absl::StrCat("worker ", worker_id, " could not load it: ", request.staging_error()));
    } else if (std::all_of(workers_.begin(), workers_.end(), [this](const Worker& x) {
                 return x.vacant || (Live(x) && x.staged_placement_version == pending_placement_->version);
               })) {
      CommitPlacementLocked();
    }
  }
  resp->set_placement_version(placement_version_);
  if (pending_placement_.has_value()) {
    resp->set_next_placement_version(pending_placement_->version);
    if (w.staged_placement_version != pending_placement_->version) *resp->mutable_next_plan() = pending_placement_->proto;
  }
}

void Coordinator::CommitPlacementLocked() {
  PendingPlacement& p = *pending_placement_;
  const int64_t old_version = placement_version_;
  topology::Plan old_plan = std::move(plan_);
  plan_ = p.plan;
  placement_version_ = p.version;
  last_rebalance_ms_ = UnixMs();
  // A restarted coordinator must serve the workers' placement: journal it first.
  absl::Status s = JournalPlacementLocked();
  if (!s.ok()) {
    plan_ = std::move(old_plan);
    placement_version_ = old_version;
    DropPendingPlacementLocked(absl::StrCat("journal write failed: ", s.message()));
    return;
  }
  plan_proto_ = std::move(p.proto);
  ++rebalances_;
  last_imbalance_before_ = p.imbalance_before;
  last_imbalance_after_ = p.imbalance_after;
  for (auto& [layer, counts] : window_load_) std::fill(counts.begin(), counts.end(), 0);
  LOG(INFO) << "coordinator: placement version " << placement_version_
            << " committed (every worker loaded it); the stages switch at their next step";
  pending_placement_.reset();
  changed_.notify_all();
}

void Coordinator::DropPendingPlacementLocked(const std::string& why) {
  if (!pending_placement_.has_value()) return;
  rebalance_error_ = absl::StrCat("placement version ", pending_placement_->version, " dropped: ", why);
  LOG(WARNING) << "coordinator: " << rebalance_error_ << " (placement version " << placement_version_
               << " stays in use)";
  pending_placement_.reset();
  changed_.notify_all();
}

void Coordinator::AutoRebalanceLocked() {
  if (options_.eplb_interval_s <= 0) return;
  const absl::Time now = absl::Now();
  if (now < next_auto_rebalance_) return;
  next_auto_rebalance_ = now + absl::Seconds(options_.eplb_interval_s);
  if (pending_placement_.has_value() || !ServingLocked() || plan_.ep < 2) return;
  v1::RebalanceExpertsResponse r;
  absl::Status s = StartRebalanceLocked(/*force=*/false, &r);
  if (!s.ok()) {
    VLOG(1) << "coordinator: automatic rebalance: " << s.message();
  } else if (!r.started()) {
    LOG(INFO) << "coordinator: automatic rebalance skipped: " << r.reason();
  }
}

v1::RebalanceStatus Coordinator::RebalanceStatusLocked() const {
  v1::RebalanceStatus st;
  st.set_placement_version(placement_version_);
  if (pending_placement_.has_value()) {
    st.set_pending_version(pending_placement_->version);
    st.set_workers_staged(WorkersStagedLocked());
  }
  st.set_rebalances(rebalances_);
  st.set_imbalance_before(last_imbalance_before_);
  st.set_imbalance_after(last_imbalance_after_);
  st.set_last_unix_ms(last_rebalance_ms_);
  st.set_last_error(rebalance_error_);
  st.set_interval_s(options_.eplb_interval_s);
  int64_t tokens = 0;
  st.set_window_imbalance(WindowImbalanceLocked(plan_, &tokens));
  st.set_window_tokens(tokens);
  return st;
}

void Coordinator::ReplayPlacement(const PlacementCommitted& rec) {
  const int64_t version = rec.version();
  absl::StatusOr<topology::Plan> plan = absl::InternalError("unparsable");
  if (rec.has_plan()) {
    plan = topology::PlanFromProto(rec.plan());
  } else {
    // A journal written before the plan became a message: its ToJson text.
    try {
      plan = topology::Plan::FromJson(nlohmann::json::parse(rec.plan_json()));
    } catch (const std::exception& e) {
      plan = absl::DataLossError(e.what());
    }
  }
  if (!plan.ok() || !SameShape(*plan, plan_)) {
    LOG(WARNING) << "journal: the expert placement version " << version << " it holds "
                 << (plan.ok() ? "does not fit this plan (other --pp/--ep/--redundant-experts/--layers-per-stage)"
                               : std::string(plan.status().message()))
                 << "; serving the placement built from the flags";
    return;
  }
  plan_ = *std::move(plan);
  placement_version_ = version;
  plan_proto_ = topology::PlanToProto(plan_, options_.checkpoint, model_json_, version);
}

void Coordinator::AdoptRunningPlacementLocked(int worker_id, const v1::Plan& running) {
  const int64_t version = running.placement_version();
  if (version <= placement_version_) return;
  auto refuse = [&](const std::string& why) {
    LOG(WARNING) << "coordinator: worker " << worker_id << " runs expert placement version " << version
                 << "; not adopted (" << why << ")";
  };
  if (rebalances_ > 0 || pending_placement_.has_value() || last_pending_version_ > placement_version_) {
    return refuse("this coordinator has rebalanced itself");
  }
  absl::StatusOr<topology::Plan> plan = topology::PlanFromProto(running);
  if (!plan.ok()) return refuse(std::string(plan.status().message()));
  if (!SameShape(*plan, plan_) || running.checkpoint() != options_.checkpoint) {
    return refuse("another plan shape or checkpoint");
  }
  topology::Plan old = std::move(plan_);
  const int64_t old_version = placement_version_;
  plan_ = *std::move(plan);
  placement_version_ = version;
  absl::Status s = JournalPlacementLocked();  // a later restart on this journal serves it too
  if (!s.ok()) {
    plan_ = std::move(old);
    placement_version_ = old_version;
    return refuse(absl::StrCat("journal write failed: ", s.message()));
  }
  last_pending_version_ = version;
  plan_proto_ = topology::PlanToProto(plan_, options_.checkpoint, model_json_, version);
  LOG(INFO) << "coordinator: adopted expert placement version " << version << " from worker " << worker_id
            << " (the workers run it; this coordinator started without it)";
}

absl::StatusOr<topology::ExpertPlacement> PlaceOverLive(const topology::ExpertPlacement& p,
                                                        const std::vector<bool>& live) {
  const int64_t R = p.num_ranks();
  std::vector<std::vector<int32_t>> slots(static_cast<size_t>(R));
  std::vector<int32_t> orphans;
  int64_t nlive = 0;
  for (int64_t r = 0; r < R; ++r) {
    if (live[static_cast<size_t>(r)]) {
      slots[static_cast<size_t>(r)] = p.slots_of_rank(r);
      ++nlive;
    } else {
      orphans.insert(orphans.end(), p.slots_of_rank(r).begin(), p.slots_of_rank(r).end());
    }
  }
  if (nlive == 0) return absl::FailedPreconditionError("no live rank to place experts on");
  auto holds = [&](int64_t r, int32_t e) {
    const auto& s = slots[static_cast<size_t>(r)];
    return std::find(s.begin(), s.end(), e) != s.end();
  };
  // Replicas first: an orphaned slot whose expert a live rank still holds
  // goes to such a rank (the fewest slots among them): its weights are there,
  // nothing is loaded. Only an expert with no live copy left goes to the live
  // rank with the fewest slots, which loads it.
  auto key = [&](int64_t r, int32_t e) { return std::make_pair(!holds(r, e), slots[static_cast<size_t>(r)].size()); };
  for (int32_t e : orphans) {
    int64_t best = -1;
    for (int64_t r = 0; r < R; ++r) {
      if (!live[static_cast<size_t>(r)]) continue;
      if (best < 0 || key(r, e) < key(best, e)) best = r;
    }
    slots[static_cast<size_t>(best)].push_back(e);
  }
  // Only a rank back from vacancy (live, no slot in p) evens the slots out:
  // after a loss nothing moves between the survivors (moving would load).
  bool returning = false;
  for (int64_t r = 0; r < R; ++r) returning |= live[static_cast<size_t>(r)] && p.slots_of_rank(r).empty();
  const size_t share = static_cast<size_t>(p.num_slots() / nlive);
  for (int64_t guard = 0; returning && guard < p.num_slots(); ++guard) {
    int64_t low = -1, high = -1;
    for (int64_t r = 0; r < R; ++r) {
      if (!live[static_cast<size_t>(r)]) continue;
      if (low < 0 || slots[r].size() < slots[low].size()) low = r;
      if (high < 0 || slots[r].size() > slots[high].size()) high = r;
    }
    if (slots[low].size() >= share || slots[high].size() <= slots[low].size() + 1) break;
    auto& from = slots[static_cast<size_t>(high)];
    size_t pick = from.size() - 1;
    for (size_t i = from.size(); i-- > 0;) {
      if (!holds(low, from[i])) {
        pick = i;
        break;
      }
    }
    slots[static_cast<size_t>(low)].push_back(from[pick]);
    from.erase(from.begin() + static_cast<std::ptrdiff_t>(pick));
  }
  return topology::ExpertPlacement::Create(p.num_experts(), std::move(slots));
}

bool Coordinator::ReplaceForVacanciesLocked(const std::string& why) {
  topology::Plan next = plan_;
  int64_t to_load = 0, slots_moved = 0;
  for (size_t s = 0; s < next.stages.size(); ++s) {
    std::vector<bool> live(static_cast<size_t>(plan_.ep));
    for (int64_t r = 0; r < plan_.ep; ++r) {
      live[static_cast<size_t>(r)] = !workers_[s * static_cast<size_t>(plan_.ep) + static_cast<size_t>(r)].vacant;
    }
    for (auto& [layer, placement] : next.stages[s].placement) {
      absl::StatusOr<topology::ExpertPlacement> p = PlaceOverLive(placement, live);
      if (!p.ok()) {
        LOG(WARNING) << "coordinator: cannot re-place the experts of layer " << layer << " (" << why
                     << "): " << p.status().message();
        return false;
      }
      to_load += ExpertsToLoad(placement, *p);
      for (int64_t r = 0; r < placement.num_ranks(); ++r) {
        if (!live[static_cast<size_t>(r)]) slots_moved += static_cast<int64_t>(placement.slots_of_rank(r).size());
      }
      placement = *std::move(p);
    }
  }
  if (next == plan_) return true;
  LOG(INFO) << "coordinator: re-placing for vacancies (" << why << "): " << slots_moved
            << " slots of vacant ranks move to live ones; " << to_load
            << " experts to load from the checkpoint (the rest already held by a live replica)";
  experts_loaded_for_vacancies_ += to_load;
  DropPendingPlacementLocked(why);
  topology::Plan old = std::move(plan_);
  const int64_t old_version = placement_version_;
  plan_ = std::move(next);
  last_pending_version_ = std::max(last_pending_version_, placement_version_) + 1;
  placement_version_ = last_pending_version_;
  last_rebalance_ms_ = UnixMs();
  if (absl::Status s = JournalPlacementLocked(); !s.ok()) {
    plan_ = std::move(old);
    placement_version_ = old_version;
    LOG(WARNING) << "coordinator: placement for " << why << " not committed: journal write failed: " << s.message();
    return false;
  }
  plan_proto_ = topology::PlanToProto(plan_, options_.checkpoint, model_json_, placement_version_);
  LOG(INFO) << "coordinator: placement version " << placement_version_ << " committed (" << why
            << "); the workers load the experts they gain before they serve again";
  return true;
}

JournalRecord Coordinator::PlacementRecord() const {
  JournalRecord rec;
  rec.set_unix_ms(last_rebalance_ms_ > 0 ? last_rebalance_ms_ : UnixMs());
  rec.mutable_placement()->set_version(placement_version_);
  *rec.mutable_placement()->mutable_plan() = topology::PlanToProto(plan_, "", "", placement_version_);
  return rec;
}

absl::Status Coordinator::JournalPlacementLocked() {
  if (journal_ == nullptr) return absl::OkStatus();
  const std::string rec = PlacementRecord().SerializeAsString();
  RETURN_IF_ERROR(journal_->Append({rec}));
  const int64_t bytes = Journal::kRecordHeaderBytes + static_cast<int64_t>(rec.size());
  live_journal_bytes_ += bytes - placement_record_bytes_;  // it replaces the previous placement record
  placement_record_bytes_ = bytes;
  return absl::OkStatus();
}

int Coordinator::WorkersStagedLocked() const {
  if (!pending_placement_.has_value()) return 0;
  return static_cast<int>(std::count_if(workers_.begin(), workers_.end(), [this](const Worker& w) {
    return w.staged_placement_version == pending_placement_->version;
  }));
}

}  // namespace expertmesh::coordinator
