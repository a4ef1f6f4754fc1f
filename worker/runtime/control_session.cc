#include "worker/runtime/control_session.h"

#include <unistd.h>

#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "glog/logging.h"
#include "worker/runtime/placement_stager.h"

namespace expertmesh::worker::runtime {

ControlSession::ControlSession(const Options& options, CoordinatorClient* client) : o_(options), client_(client) {}

ControlSession::~ControlSession() { Stop(); }

absl::Status ControlSession::fatal() const {
  std::lock_guard<std::mutex> l(mu_);
  return fatal_;
}

v1::RegisterRequest ControlSession::MakeRegisterRequest(int worker_id) const {
  v1::RegisterRequest req;
  req.set_host(o_.host);
  req.set_pid(getpid());
  req.set_worker_id(worker_id);
  return req;
}

absl::StatusOr<ControlSession::Registration> ControlSession::Register() {
  // A replacement started before the coordinator noticed the loss of the
  // worker it replaces finds every place held: it waits for one to free up.
  const absl::Time deadline = absl::Now() + o_.register_timeout;
  absl::StatusOr<v1::RegisterResponse> r;
  for (bool logged = false;; logged = true) {
    r = client_->Register(MakeRegisterRequest(o_.requested_worker_id), deadline);
    const bool full = absl::IsResourceExhausted(r.status()) || absl::IsAlreadyExists(r.status());
    if (!full || absl::Now() + absl::Seconds(1) >= deadline) break;
    if (!logged) LOG(INFO) << "no place free yet (" << r.status().message() << "); waiting";
    absl::SleepFor(absl::Seconds(1));
  }
  RETURN_IF_ERROR(r.status());
  Registration reg;
  reg.response = *std::move(r);
  worker_id_ = reg.response.worker_id();
  stage_ = reg.response.stage();
  ep_rank_ = reg.response.ep_rank();
  ASSIGN_OR_RETURN(reg.plan, PlanFromCoordinator(reg.response.plan()));
  if (stage_ < 0 || stage_ >= reg.plan.pp || ep_rank_ < 0 || ep_rank_ >= reg.plan.ep) {
    return absl::DataLossError(absl::StrCat("coordinator assigned stage ", stage_, " rank ", ep_rank_,
                                            " outside its plan"));
  }
  LOG(INFO) << "worker " << worker_id_ << ": stage " << stage_ << " of " << reg.plan.pp << ", EP rank " << ep_rank_
            << " of " << reg.plan.ep << ", epoch " << reg.response.epoch();
  return reg;
}

absl::StatusOr<std::optional<ControlSession::Registration>> ControlSession::Rejoin(int64_t failed) {
  v1::RegisterRequest req = MakeRegisterRequest(worker_id_);
  req.set_rejoin_after_generation(failed);
  absl::StatusOr<v1::RegisterResponse> r = client_->Register(req, absl::Now() + o_.rejoin_timeout);
  if (!r.ok()) {
    if (shutdown_.load() && fatal().ok()) return std::nullopt;  // the cluster was shut down meanwhile
    return absl::UnavailableError(absl::StrCat("rejoining after the data plane failed: ", r.status().message()));
  }
  Registration reg;
  reg.response = *std::move(r);
  ASSIGN_OR_RETURN(reg.plan, PlanFromCoordinator(reg.response.plan()));
  return std::optional<Registration>(std::move(reg));
}

void ControlSession::Start(DataPlane* data_plane, Hooks hooks) {
  dp_ = data_plane;
  hooks_ = std::move(hooks);
  thread_ = std::thread([this] { Loop(); });
}

void ControlSession::Stop() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> l(hb_mu_);
    stop_ = true;
  }
  hb_cv_.notify_all();
  thread_.join();
}

void ControlSession::BeatNow() {
  {
    std::lock_guard<std::mutex> l(hb_mu_);
    beat_now_ = true;
  }
  hb_cv_.notify_all();
}

void ControlSession::Loop() {
  if (o_.serving != nullptr) *o_.serving = true;
  for (bool first = true;; first = false) {
    if (!first) {  // the first heartbeat goes out at once: the worker is READY
      std::unique_lock<std::mutex> l(hb_mu_);
      const absl::Duration wait = o_.stop_signal != nullptr ? std::min(o_.heartbeat_interval, absl::Milliseconds(200))
                                                            : o_.heartbeat_interval;
      hb_cv_.wait_for(l, absl::ToChronoMilliseconds(wait), [this] { return stop_.load() || beat_now_; });
      const bool stop_now = StopRequested() && !leaving_.load();
      const bool now = std::exchange(beat_now_, false);
      if (!stop_.load() && !stop_now && !now && absl::Now() - last_heartbeat_ < o_.heartbeat_interval) {
        continue;
      }
    }
    if (!Beat()) return;
  }
}

bool ControlSession::Beat() {
  if (StopRequested() && !leaving_.exchange(true)) {
    LOG(WARNING) << "worker " << worker_id_ << ": signal " << o_.stop_signal->load()
                 << ": leaving the cluster (its sequences go back to the coordinator's queue)";
    if (dp_ != nullptr) dp_->Abort(absl::CancelledError("this worker is leaving (signal)"));
  }
  last_heartbeat_ = absl::Now();
  const bool exiting = stop_.load();
  v1::HeartbeatRequest req;
  req.set_worker_id(worker_id_);
  req.set_host(o_.host);
  req.set_pid(getpid());
  req.set_exiting(exiting);
  if (hooks_.report) hooks_.report(&req);
  auto r = client_->Heartbeat(req, absl::Seconds(5));
  if (r.ok()) {
    warned_ = false;
    if (r->shutdown()) shutdown_ = true;
    int64_t mine = 0;
    bool moved = false;
    if (dp_ != nullptr) {
      mine = dp_->generation().generation;
      moved = dp_->MarkStaleIfMoved(r->epoch(), r->generation());
    }
    if (hooks_.answered) hooks_.answered(*r);
    if (moved) {
      LOG(WARNING) << "worker " << worker_id_ << ": the cluster moved to data-plane generation " << r->generation()
                   << " (this worker runs " << mine << "): aborting the data plane";
      dp_->Abort(absl::AbortedError(absl::StrCat("the cluster moved to data-plane generation ", r->generation(),
                                                 " (a worker was lost or replaced)")));
    }
  } else if (r.status().code() == absl::StatusCode::kFailedPrecondition && !exiting) {
    // Our place belongs to a replacement now: nothing of ours is valid.
    LOG(ERROR) << "worker " << worker_id_ << ": " << r.status().message();
    {
      std::lock_guard<std::mutex> l(mu_);
      if (fatal_.ok()) fatal_ = r.status();
    }
    shutdown_ = true;
    if (dp_ != nullptr) dp_->Abort(r.status());
  } else if (r.status().code() == absl::StatusCode::kNotFound && !exiting) {
    // A restarted coordinator (new epoch, journal replayed) does not know us
    // yet: take our old place again. Sync picks up the new epoch.
    absl::Status s = Reregister();
    if (!s.ok()) LOG(WARNING) << "worker " << worker_id_ << ": re-registration failed: " << s.message();
  } else if (!warned_) {
    LOG(WARNING) << "worker " << worker_id_ << ": " << r.status().message() << " (will keep trying)";
    warned_ = true;
  }
  return !exiting;
}

absl::Status ControlSession::Reregister() {
  LOG(INFO) << "worker " << worker_id_ << ": coordinator does not know this worker (restarted?): registering again";
  v1::RegisterRequest req = MakeRegisterRequest(worker_id_);
  topology::Plan running;
  // What this worker runs: a restarted coordinator without the journal
  // that holds a rebalanced placement adopts it.
  if (hooks_.running_plan) *req.mutable_running_plan() = hooks_.running_plan(&running);
  ASSIGN_OR_RETURN(v1::RegisterResponse reg, client_->Register(req, absl::Now() + o_.register_timeout));
  ASSIGN_OR_RETURN(topology::Plan plan, PlanFromCoordinator(reg.plan()));
  if (reg.worker_id() != worker_id_ || plan != running) {
    // The data plane and the loaded shard belong to the old plan.
    LOG(ERROR) << "worker " << worker_id_ << ": the restarted coordinator has another plan; exiting";
    shutdown_ = true;
    return absl::FailedPreconditionError("coordinator restarted with a different plan");
  }
  // Same processes, same data plane: it now answers to the new coordinator's generation.
  if (dp_ != nullptr) dp_->SetGeneration(reg.epoch(), reg.generation(), /*clear_stale=*/false);
  LOG(INFO) << "worker " << worker_id_ << ": registered again, epoch " << reg.epoch() << ", generation "
            << reg.generation();
  return absl::OkStatus();
}

}  // namespace expertmesh::worker::runtime
