// The membership part of the Coordinator (contract: coordinator/membership.h).
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "coordinator/coordinator.h"
#include "coordinator/job_store.h"
#include "coordinator/membership.h"
#include "glog/logging.h"
#include "topology/lanes.h"

namespace expertmesh::coordinator {

void Coordinator::NewGenerationLocked(const std::string& reason) {
  int64_t running = 0;
  for (const Worker& w : workers_) running += static_cast<int64_t>(w.assigned.size());
  ++generation_;
  generation_issued_ = false;
  DropPendingPlacementLocked(absl::StrCat("data-plane generation ", generation_, " (", reason, ")"));
  LOG(WARNING) << "coordinator: data-plane generation " << generation_ << ": " << reason << "; " << running
               << " running sequences go back to the queue and the workers rebuild their data planes";
  for (size_t id = 0; id < workers_.size(); ++id) {
    RevokeSequences(static_cast<int>(id), /*tell_worker=*/false);  // the workers drop everything themselves
    workers_[id].pending_cancel.clear();
  }
  const std::string keep = absl::StrCat(epoch_, "/g", generation_, "/");
  store_.KeepOnly(keep);  // lock order: mu_, then the store's
  changed_.notify_all();
}

void Coordinator::WorkerLostLocked(int worker_id, const std::string& how) {
  if (shutdown_requested_) return;  // leaving is expected then
  ++workers_lost_;
  // Without a Register answered in this generation no data plane exists to rebuild.
  if (!generation_issued_) return;
  std::string vacancy;
  if (options_.elastic_ep && plan_.ep > 1) {
    const size_t ep = static_cast<size_t>(plan_.ep), first = static_cast<size_t>(worker_id) / ep * ep;
    int others = 0;
    for (size_t i = first; i < first + ep; ++i) {
      others += i != static_cast<size_t>(worker_id) && Live(workers_[i]) && !workers_[i].vacant ? 1 : 0;
    }
    if (others == 0) {
      LOG(WARNING) << "coordinator: worker " << worker_id << " was the last live worker of stage "
                   << worker_id / plan_.ep << "; waiting for a replacement (--elastic-ep serves around a loss only "
                   << "while its stage keeps a live worker)";
    } else {
      workers_[static_cast<size_t>(worker_id)].vacant = true;
      if (ReplaceForVacanciesLocked(absl::StrCat("worker ", worker_id, " lost, its place vacant"))) {
        vacancy = absl::StrCat("; its place is vacant and ", others, " workers of its stage serve without it");
        if (plan_.pp > 1) {
          const topology::Lanes lanes = topology::ComputeLanes(plan_.pp, plan_.ep, VacantIdsLocked());
          int laneless = 0;
          for (size_t i = 0; i < workers_.size(); ++i) {
            laneless += !workers_[i].vacant && lanes.lane_of[i] < 0 ? 1 : 0;
          }
          absl::StrAppend(&vacancy, "; ", lanes.lanes.size(), " pipeline lane(s) serve, ", laneless,
                          " live worker(s) without a lane hold their experts only");
        }
      } else {
        workers_[static_cast<size_t>(worker_id)].vacant = false;
      }
    }
  }
  NewGenerationLocked(absl::StrCat("worker ", worker_id, " ", how, vacancy));
}

v1::ClusterStatus Coordinator::GetClusterStatus() const {
  std::lock_guard<std::mutex> lock(mu_);
  v1::ClusterStatus st;
  *st.mutable_plan() = plan_proto_;
  for (size_t id = 0; id < workers_.size(); ++id) {
    const Worker& w = workers_[id];
    v1::WorkerStatus* ws = st.add_workers();
    ws->set_worker_id(static_cast<int32_t>(id));
    ws->set_stage(static_cast<int32_t>(id / static_cast<size_t>(plan_.ep)));
    ws->set_ep_rank(static_cast<int32_t>(id % static_cast<size_t>(plan_.ep)));
    ws->set_host(w.host);
    ws->set_pid(w.pid);
    ws->set_health(w.registered ? w.health : v1::WORKER_HEALTH_UNSPECIFIED);
    ws->set_last_heartbeat_unix_ms(w.heartbeat_seen ? absl::ToUnixMillis(w.last_heartbeat) : 0);
    ws->set_active_sequences(w.active_sequences);
    ws->set_steps(w.steps);
    ws->set_tokens_processed(w.tokens_processed);
    *ws->mutable_times() = w.times;
  }
  for (const auto& [layer, counts] : expert_load_) {
    v1::LayerExpertLoad* l = st.add_expert_load();
    l->set_layer(static_cast<int32_t>(layer));
    l->mutable_tokens_per_expert()->Add(counts.begin(), counts.end());
  }
  st.set_queued_sequences(static_cast<int32_t>(queued_));
  st.set_running_sequences(static_cast<int32_t>(running_));
  st.set_serving(ServingLocked());
  st.set_generation(generation_);
  st.set_workers_lost(workers_lost_);
  st.set_vacancy_experts_to_load(experts_loaded_for_vacancies_);
  for (int id : VacantIdsLocked()) st.add_vacant_worker_ids(id);
  *st.mutable_rebalance() = RebalanceStatusLocked();
  return st;
}

void Coordinator::RequestShutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!shutdown_requested_) {
      shutdown_requested_ = true;
      shutdown_at_ = absl::Now();
      LOG(INFO) << "coordinator: shutdown requested; waiting up to " << options_.shutdown_timeout_s
                << " s for the workers to exit";
    }
    changed_.notify_all();
  }
  Tick();
}

std::vector<int> Coordinator::VacantIdsLocked() const {
  std::vector<int> ids;
  for (size_t i = 0; i < workers_.size(); ++i) {
    if (workers_[i].vacant) ids.push_back(static_cast<int>(i));
  }
  return ids;
}

bool Coordinator::ClusterCompleteLocked() const {
  return std::all_of(workers_.begin(), workers_.end(), [this](const Worker& w) { return w.vacant || Live(w); });
}

bool Coordinator::ServingLocked() const {
  if (shutdown_requested_ || stopped_) return false;
  // Every worker READY and in the current generation: after a survivor
  // reports a failed data plane (a peer stalled past the step timeout, e.g.
  // SIGSTOPped) the cluster does not serve until every worker rejoined, even
  // before the stalled one misses its heartbeats.
  return std::all_of(workers_.begin(), workers_.end(), [this](const Worker& w) {
    return w.vacant || (w.registered && w.health == v1::WORKER_HEALTH_READY && w.joined_generation == generation_);
  });
}

absl::StatusOr<v1::RegisterResponse> Coordinator::Register(const v1::RegisterRequest& request, absl::Time deadline,
                                                           const std::function<bool()>& cancelled) {
  const int n = static_cast<int>(workers_.size());
  std::unique_lock<std::mutex> lock(mu_);
  if (shutdown_requested_ || stopped_) return absl::UnavailableError("the coordinator is shutting down");
  const int want = request.worker_id();
  auto holder = [&](const Worker& w) {
    return absl::StrCat(w.host, ":", w.pid, " (", v1::WorkerHealth_Name(w.health), ")");
  };
  auto same = [&](const Worker& w) { return w.registered && w.host == request.host() && w.pid == request.pid(); };
  int id = -1;
  if (want >= n || want < -1) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker_id: ", want, " is out of range [0, ", n, ") for pp=", plan_.pp, " ep=", plan_.ep,
                     "; pass -1 to be assigned a place"));
  } else if (want >= 0) {
    Worker& w = workers_[static_cast<size_t>(want)];
    if (Live(w) && !same(w)) {
      return absl::AlreadyExistsError(absl::StrCat(
          "worker_id: ", want, " is held by ", holder(w),
          "; retry after that worker exits or misses heartbeats for ", options_.heartbeat_timeout_s, " s"));
    }
    id = want;
  } else {
    for (int i = 0; i < n && id < 0; ++i) {
      if (same(workers_[static_cast<size_t>(i)])) id = i;  // a retried Register
    }
    for (int i = 0; i < n && id < 0; ++i) {
      if (!workers_[static_cast<size_t>(i)].registered) id = i;
    }
    for (int i = 0; i < n && id < 0; ++i) {
      if (!Live(workers_[static_cast<size_t>(i)])) id = i;  // replace a MISSING or EXITED worker
    }
    if (id < 0) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the cluster already has its ", n, " workers (pp=", plan_.pp, " ep=", plan_.ep,
                       "), all alive; a worker may only replace one that is MISSING or EXITED"));
    }
  }
  if (want >= 0 && request.has_running_plan()) AdoptRunningPlacementLocked(id, request.running_plan());
  Worker& w = workers_[static_cast<size_t>(id)];
  const bool rejoin = request.rejoin_after_generation() > 0;
  const bool was_vacant = w.vacant;
  if (same(w) && !Live(w)) {  // a worker found MISSING that is alive after all
    LOG(INFO) << "coordinator: worker " << id << " " << holder(w) << " is back";
    w.health = v1::WORKER_HEALTH_STARTING;
    w.registered_at = absl::Now();
  }
  if (!same(w)) {
    if (w.registered) {
      LOG(WARNING) << "coordinator: worker " << id << " " << holder(w) << " is replaced by " << request.host() << ":"
                   << request.pid();
      RevokeSequences(id, /*tell_worker=*/false);
    }
    w = Worker();
    w.registered = true;
    w.host = request.host();
    w.pid = request.pid();
    w.health = v1::WORKER_HEALTH_STARTING;
    w.registered_at = absl::Now();
    LOG(INFO) << "coordinator: worker " << id << " (stage " << id / plan_.ep << ", ep_rank " << id % plan_.ep
              << ") registered from " << w.host << ":" << w.pid;
    changed_.notify_all();
  }
  if (was_vacant) {  // a replacement, or the lost worker back: the place is held again
    workers_[static_cast<size_t>(id)].vacant = false;
    ReplaceForVacanciesLocked(absl::StrCat("worker ", id, " holds its place again"));
    NewGenerationLocked(absl::StrCat("worker ", id, " holds its vacant place again"));
  } else if (rejoin && request.rejoin_after_generation() >= generation_) {
    NewGenerationLocked(absl::StrCat("worker ", id, " reports that its data plane of generation ",
                                     request.rejoin_after_generation(), " failed"));
  }
  const std::string host = w.host;
  const int pid = w.pid;
  while (!ClusterCompleteLocked()) {
    const bool still_mine = workers_[static_cast<size_t>(id)].registered &&
                            workers_[static_cast<size_t>(id)].host == host && workers_[static_cast<size_t>(id)].pid == pid;
    absl::Status fail;
    if (!still_mine) {
      fail = absl::AbortedError(absl::StrCat("worker_id ", id, " was taken over while waiting; register again"));
    } else if (stopped_ || shutdown_requested_) {
      fail = absl::UnavailableError("the coordinator is shutting down");
    } else if (cancelled && cancelled()) {
      fail = absl::CancelledError("Register cancelled by the worker");
    } else if (absl::Now() >= deadline) {
      const int have = static_cast<int>(
          std::count_if(workers_.begin(), workers_.end(), [](const Worker& x) { return x.registered; }));
      fail = absl::DeadlineExceededError(absl::StrCat("the cluster is incomplete: ", have, " of ", n,
                                                      " workers registered before the deadline; start the others "
                                                      "(expertmesh worker --coordinator ADDR)"));
    }
    if (!fail.ok()) {
      if (still_mine && !rejoin) {  // a rejoining worker keeps its place (and its loaded shard)
        workers_[static_cast<size_t>(id)] = Worker();  // free the place for someone else
        if (was_vacant && !stopped_ && !shutdown_requested_) {
          // It never served: the place is vacant again (not half-registered),
          // the survivors serve around it as before, and a later worker can
          // take it.
          workers_[static_cast<size_t>(id)].vacant = true;
          if (ReplaceForVacanciesLocked(absl::StrCat("worker ", id, "'s new holder gave up registering"))) {
            NewGenerationLocked(absl::StrCat("place ", id, " is vacant again (its new holder's Register failed: ",
                                             fail.message(), ")"));
          } else {
            workers_[static_cast<size_t>(id)].vacant = false;
          }
        }
        changed_.notify_all();
      }
      return fail;
    }
    changed_.wait_until(lock, absl::ToChronoTime(std::min(deadline, absl::Now() + absl::Milliseconds(100))));
  }
  v1::RegisterResponse resp;
  resp.set_worker_id(id);
  resp.set_stage(static_cast<int32_t>(id / plan_.ep));
  resp.set_ep_rank(static_cast<int32_t>(id % plan_.ep));
  *resp.mutable_plan() = plan_proto_;
  resp.set_epoch(epoch_);
  resp.set_generation(generation_);
  for (size_t i = 0; i < workers_.size(); ++i) {
    if (workers_[i].vacant) resp.add_vacant_worker_ids(static_cast<int32_t>(i));
  }
  workers_[static_cast<size_t>(id)].joined_generation = generation_;
  generation_issued_ = true;
  lock.unlock();
  NotifyServing();
  return resp;
}

absl::StatusOr<v1::HeartbeatResponse> Coordinator::Heartbeat(const v1::HeartbeatRequest& request) {
  v1::HeartbeatResponse resp;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const int id = request.worker_id();
    if (id < 0 || id >= static_cast<int>(workers_.size()) || !workers_[static_cast<size_t>(id)].registered) {
      return absl::NotFoundError(absl::StrCat("worker_id: ", id, " is not registered with this coordinator (epoch ",
                                              epoch_, "); call Register with worker_id=", id));
    }
    for (int i = 0; i < request.expert_load_size(); ++i) {
      const v1::LayerExpertLoad& l = request.expert_load(i);
      auto it = expert_load_.find(l.layer());
      if (it == expert_load_.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("expert_load[", i, "].layer: ", l.layer(), " is not a MoE layer of the plan"));
      }
      if (l.tokens_per_expert_size() > static_cast<int>(it->second.size())) {
        return absl::InvalidArgumentError(absl::StrCat("expert_load[", i, "].tokens_per_expert: ",
                                                       l.tokens_per_expert_size(), " counts for ", it->second.size(),
                                                       " experts"));
      }
      for (int64_t v : l.tokens_per_expert()) {
        if (v < 0) return absl::InvalidArgumentError(absl::StrCat("expert_load[", i, "].tokens_per_expert: negative"));
      }
    }
    Worker& w = workers_[static_cast<size_t>(id)];
    // Only the process that registered the place may beat for it: a forged
    // beat (another host or pid, or none) can neither keep a lost worker
    // READY nor, with `exiting`, force a new data-plane generation.
    if (request.pid() != w.pid || request.host() != w.host) {
      return absl::FailedPreconditionError(absl::StrCat(
          "worker_id: ", id, " is now held by ", w.host, ":", w.pid, ", not by ",
          request.host().empty() && request.pid() == 0 ? std::string("a sender without host and pid")
                                                       : absl::StrCat(request.host(), ":", request.pid()),
          " (a worker replaced after it went MISSING must exit)"));
    }
    for (const auto& l : request.expert_load()) {
      auto it = expert_load_.find(l.layer());
      if (it == expert_load_.end() || it->second.size() < static_cast<size_t>(l.tokens_per_expert_size())) {
        LOG(WARNING) << "coordinator: worker " << id << " reported load of layer " << l.layer() << " for "
                     << l.tokens_per_expert_size() << " experts; ignored (not a MoE layer of the plan, or too many experts)";
        continue;
      }
      std::vector<int64_t>& sum = it->second;
      std::vector<int64_t>& window = window_load_[l.layer()];
      for (int e = 0; e < l.tokens_per_expert_size(); ++e) {
        sum[static_cast<size_t>(e)] += l.tokens_per_expert(e);
        window[static_cast<size_t>(e)] += l.tokens_per_expert(e);
      }
    }
    w.times = request.times();
    w.last_heartbeat = absl::Now();
    w.heartbeat_seen = true;
    w.active_sequences = request.active_sequences();
    w.steps = request.steps();
    w.tokens_processed = request.tokens_processed();
    if (request.exiting()) {
      const bool was_live = Live(w);
      if (w.health != v1::WORKER_HEALTH_EXITED) LOG(INFO) << "coordinator: worker " << id << " exited";
      w.health = v1::WORKER_HEALTH_EXITED;
      RevokeSequences(id, /*tell_worker=*/false);
      if (was_live) WorkerLostLocked(id, "exited unasked");
    } else if (w.health != v1::WORKER_HEALTH_READY && w.health != v1::WORKER_HEALTH_EXITED) {
      LOG(INFO) << "coordinator: worker " << id << " is READY"
                << (w.health == v1::WORKER_HEALTH_MISSING ? " again" : "");
      w.health = v1::WORKER_HEALTH_READY;
    }
    resp.set_epoch(epoch_);
    resp.set_shutdown(shutdown_requested_);
    resp.set_generation(generation_);
    PlacementHeartbeatLocked(id, request, &resp);
    changed_.notify_all();
  }
  TickImpl(/*maintain=*/false);  // retention and compaction are the monitor's
  return resp;
}

absl::Status Coordinator::StoreSet(const std::string& key, const std::string& value) {
  return store_.Set(key, value);  // the store's own lock, not mu_
}

absl::StatusOr<std::optional<std::string>> Coordinator::StoreGet(const std::string& key) const {
  std::string epoch;
  int64_t generation = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    epoch = epoch_;
    generation = generation_;
  }
  // "<epoch>/g<N>/..." of this epoch with N < generation: never written again.
  const std::string prefix = absl::StrCat(epoch, "/g");
  if (key.rfind(prefix, 0) == 0) {
    int64_t n = 0;
    size_t i = prefix.size();
    for (; i < key.size() && key[i] >= '0' && key[i] <= '9' && n < (int64_t{1} << 40); ++i) n = n * 10 + (key[i] - '0');
    if (i > prefix.size() && i < key.size() && key[i] == '/' && n < generation) {
      return absl::AbortedError(absl::StrCat("key ", key, " belongs to data-plane generation ", n,
                                             "; the cluster moved to generation ", generation, ": rejoin"));
    }
  }
  return store_.Get(key);
}

// ---------------------------------------------------------------- KeyValueStore

absl::Status KeyValueStore::Set(const std::string& key, const std::string& value) {
  if (key.empty()) return absl::InvalidArgumentError("key: empty");
  if (value.size() > kMaxValueBytes) {
    return absl::InvalidArgumentError(absl::StrCat("value: ", value.size(), " bytes exceed the limit of ", kMaxValueBytes));
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(key);
  const int64_t old = it == map_.end() ? 0 : static_cast<int64_t>(key.size() + it->second.size());
  const int64_t add = static_cast<int64_t>(key.size() + value.size());
  if (bytes_ - old + add > kMaxBytes) {
    return absl::ResourceExhaustedError(absl::StrCat("the store holds ", bytes_, " bytes, the limit is ", kMaxBytes));
  }
  bytes_ += add - old;
  map_[key] = value;
  return absl::OkStatus();
}

absl::StatusOr<std::optional<std::string>> KeyValueStore::Get(const std::string& key) const {
  if (key.empty()) return absl::InvalidArgumentError("key: empty");
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(key);
  if (it == map_.end()) return std::optional<std::string>();
  return std::optional<std::string>(it->second);
}

void KeyValueStore::KeepOnly(const std::string& prefix) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = map_.begin(); it != map_.end();) {
    if (it->first.rfind(prefix, 0) == 0) {
      ++it;
      continue;
    }
    bytes_ -= static_cast<int64_t>(it->first.size() + it->second.size());
    it = map_.erase(it);
  }
}

}  // namespace expertmesh::coordinator
