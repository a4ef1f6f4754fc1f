// Wiring of the worker's parts (see worker.h and docs/CLUSTER.md, "Worker
// internals"): the control session (registration, heartbeats), the data
// plane, the stage executor (the engine), the placement stager, the stage-0
// scheduler and the step loop. This file owns them and decides, after the
// step loop failed, whether the worker rejoins the cluster or exits.
//
// Threads: the calling thread is the stage thread (Setup, the step loop,
// Rejoin, the teardown); ControlSession runs the heartbeat thread and
// PlacementStager the expert loader; both are joined before Run returns.
#include "worker/runtime/worker.h"

#include <unistd.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "glog/logging.h"
#include "topology/plan.h"
#include "worker/runtime/control_session.h"
#include "worker/runtime/coordinator_client.h"
#include "worker/runtime/data_plane.h"
#include "worker/runtime/placement_stager.h"
#include "worker/runtime/scheduler.h"
#include "worker/runtime/stage_executor.h"
#include "worker/runtime/stage_loop.h"
#include "worker/runtime/stage_stats.h"

namespace expertmesh::worker::runtime {

namespace {

std::string ThisHost() {
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  return host;
}

ControlSession::Options SessionOptions(const WorkerOptions& o) {
  ControlSession::Options s;
  s.host = ThisHost();
  s.requested_worker_id = o.requested_worker_id;
  s.register_timeout = o.register_timeout;
  s.rejoin_timeout = o.rejoin_timeout;
  s.heartbeat_interval = o.heartbeat_interval;
  s.stop_signal = o.stop_signal;
  s.serving = o.serving;
  return s;
}

class Worker {
 public:
  Worker(const WorkerOptions& o, CoordinatorClient* client)
      : o_(o), client_(client), session_(SessionOptions(o), client) {}
  absl::Status Run();

 private:
  absl::Status Setup();
  // Creates the communicators of the data plane's generation and takes the
  // executor's EP exchange onto them; TearDownDataPlane aborts and destroys them.
  absl::Status BuildDataPlane();
  // Loads the experts of committed placement `version` this rank lacks (the
  // stage thread, data plane down); returns once staged.
  absl::Status StageNow(int64_t version, const std::string& epoch, const v1::Plan& plan);
  void TearDownDataPlane(const absl::Status& reason);
  // After a data-plane failure: drop every sequence, wait (Register with
  // rejoin_after_generation) until the cluster is complete again, rebuild.
  // False: the cluster was shut down meanwhile (exit cleanly).
  absl::StatusOr<bool> Rejoin(const absl::Status& why);
  bool Recoverable(const absl::Status& s);
  // Heartbeat thread: counters, times, load and placement state.
  void Report(v1::HeartbeatRequest* req);

  const WorkerOptions o_;
  CoordinatorClient* client_;
  topology::Plan plan_;       // the live plan (placements change on a switch)
  v1::Plan registered_plan_;  // as Register gave it (checkpoint, config text)
  StageStats stats_;
  std::unique_ptr<CoordinatorStore> store_;
  std::unique_ptr<CommFactory> comm_factory_;
  std::unique_ptr<DataPlane> dp_;
  std::unique_ptr<StageExecutor> exec_;
  std::unique_ptr<PlacementStager> stager_;
  std::unique_ptr<Scheduler> sched_;  // stage 0
  std::unique_ptr<StageLoop> loop_;
  // Last: destroyed first (its heartbeat thread uses the parts above).
  ControlSession session_;
};

absl::Status Worker::Setup() {
  ASSIGN_OR_RETURN(ControlSession::Registration reg, session_.Register());
  const int worker_id = session_.worker_id(), stage = session_.stage(), ep_rank = session_.ep_rank();
  plan_ = std::move(reg.plan);
  registered_plan_ = reg.response.plan();
  const int64_t placement_version = std::max<int64_t>(1, registered_plan_.placement_version());

  const topology::StagePlan& sp = plan_.stages[stage];
  const std::string dir = registered_plan_.checkpoint();
  const absl::Time t0 = absl::Now();
  StageExecutorOptions eo;
  eo.cuda = o_.cuda;
  eo.cuda_options = o_.cuda_options;
  eo.nccl_data_plane = o_.device_data_plane == "nccl";
  eo.step_timeout = o_.step_timeout;
  ASSIGN_OR_RETURN(exec_, StageExecutor::Load(eo, dir, &plan_, stage, ep_rank, &stats_));
  LOG(INFO) << "worker " << worker_id << ": on " << exec_->Describe();
  LOG(INFO) << "worker " << worker_id << ": loaded layers [" << sp.layer_begin << ", " << sp.layer_end << ") from "
            << dir << " in " << absl::FormatDuration(absl::Now() - t0);

  // A bootstrap of a generation that moved on meanwhile (a worker was found
  // MISSING while we waited for its address) gives up at once.
  store_ = std::make_unique<CoordinatorStore>(client_, [this] { return dp_ != nullptr && dp_->stale(); });
  comm_factory_ = std::make_unique<DefaultCommFactory>(store_.get(), o_.mpi_world_offset, o_.register_timeout,
                                                       o_.cuda_options.device);
  DataPlane::Options dpo;
  dpo.backend = o_.backend;
  dpo.nccl_twins = exec_->wants_nccl_twins();
  dp_ = std::make_unique<DataPlane>(comm_factory_.get(), dpo, plan_.pp, plan_.ep, worker_id, stage, ep_rank);
  dp_->SetGeneration(reg.response.epoch(), reg.response.generation(), /*clear_stale=*/false);
  dp_->SetVacant({reg.response.vacant_worker_ids().begin(), reg.response.vacant_worker_ids().end()});

  PlacementStager::Hooks sh;
  sh.beat_now = [this] { session_.BeatNow(); };
  sh.switched = [this] { exec_->PlacementSwitched(); };
  stager_ = std::make_unique<PlacementStager>(worker_id, stage, ep_rank, &plan_, placement_version,
                                              exec_->expert_store(), std::move(sh));
  if (stage == 0) {
    Scheduler::Options so;
    so.worker_id = worker_id;
    so.host = ThisHost();
    so.pp = plan_.pp;
    so.max_sequences = o_.max_sequences;
    so.max_step_tokens = o_.max_step_tokens;
    so.coordinator_timeout = o_.coordinator_timeout;
    sched_ = std::make_unique<Scheduler>(so, client_, dp_.get(), session_.shutdown_flag(), &exec_->config(),
                                         [this] { return exec_->NewCache(); });
    sched_->SetEpoch(reg.response.epoch(), placement_version);
  }
  absl::Status built = BuildDataPlane();
  // The generation moved on while we connected (another worker was lost
  // meanwhile): rejoin the newer one, as a serving worker would.
  while (absl::IsAborted(built)) {
    absl::StatusOr<bool> again = Rejoin(built);
    if (again.ok() && !*again) return absl::UnavailableError("the cluster shut down while this worker started");
    built = again.status();
  }
  // DATA_LOSS: a peer's bootstrap bytes in the coordinator's store were
  // damaged (or written by someone else); Run rejoins on a new generation.
  if (!built.ok() && (!absl::IsDataLoss(built) || o_.backend == "mpi")) return built;
  StageLoop::Options lo;
  lo.worker_id = worker_id;
  lo.stage = stage;
  lo.pp = plan_.pp;
  lo.ep = plan_.ep;
  lo.hidden_size = exec_->config().hidden_size;
  lo.step_timeout = o_.step_timeout;
  loop_ = std::make_unique<StageLoop>(lo, &session_, dp_.get(), exec_.get(), stager_.get(), sched_.get(), &stats_);

  stats_.serving_since = absl::Now();
  ControlSession::Hooks hooks;
  hooks.report = [this](v1::HeartbeatRequest* req) { Report(req); };
  hooks.answered = [this](const v1::HeartbeatResponse& r) {
    stager_->OnHeartbeat(r.epoch(), r.placement_version(), r.next_placement_version(), r.has_next_plan(),
                         r.next_plan());
  };
  hooks.running_plan = [this](topology::Plan* running) { return stager_->RunningPlanProto(registered_plan_, running); };
  session_.Start(dp_.get(), std::move(hooks));  // READY from the first heartbeat on
  return built;
}

void Worker::Report(v1::HeartbeatRequest* req) {
  req->set_active_sequences(static_cast<int32_t>(stats_.active.load()));
  req->set_steps(stats_.steps.load());
  req->set_tokens_processed(stats_.tokens.load());
  req->set_placement_version(stager_->placement_version());
  req->set_staged_placement_version(stager_->staged_version());
  req->set_staging_error(stager_->TakeError());
  // Plain doubles written by the stage thread: a torn read is harmless. The
  // GPU engine reports no per-kind compute split (its kernels run async).
  const EngineTimes et = exec_->compute_times();
  const StageTimes& st = stats_.times;
  v1::StageTimes* t = req->mutable_times();
  t->set_attention_s(et.attention);
  t->set_dense_s(et.dense);
  t->set_expert_s(st.expert.load());
  t->set_dispatch_s(st.dispatch.load());
  t->set_combine_s(st.combine.load());
  t->set_transfer_s(st.transfer.load());
  t->set_idle_s(st.idle.load());
  t->set_embed_head_s(st.embed_head.load());
  t->set_control_s(st.control.load());
  t->set_wall_s(absl::ToDoubleSeconds(absl::Now() - stats_.serving_since));
  for (auto& [layer, counts] : stats_.load.Take()) {
    auto* l = req->add_expert_load();
    l->set_layer(static_cast<int32_t>(layer));
    for (int64_t c : counts) l->add_tokens_per_expert(c);
  }
}

absl::Status Worker::BuildDataPlane() {
  RETURN_IF_ERROR(dp_->Build());
  return exec_->AttachDataPlane(dp_.get());
}

void Worker::TearDownDataPlane(const absl::Status& reason) {
  dp_->Abort(reason);
  exec_->DetachDataPlane();
  dp_->Release();
}

bool Worker::Recoverable(const absl::Status& s) {
  if (o_.backend == "mpi") return false;  // under mpirun a lost process ends the job
  if (session_.leaving()) return false;
  if (!session_.fatal().ok()) return false;
  if (dp_->stale()) return true;
  // A failed exchange leaves its communicator broken; other errors (a lost
  // coordinator, corrupt messages) are not the data plane's.
  if (dp_->Broken()) return true;
  return absl::IsAborted(s);  // Sync: the generation moved on
}

absl::StatusOr<bool> Worker::Rejoin(const absl::Status& why) {
  const absl::Time t0 = absl::Now();
  const int worker_id = session_.worker_id();
  const int64_t failed = dp_->generation().generation;
  LOG(WARNING) << "worker " << worker_id << ": data plane of generation " << failed << " failed (" << why.message()
               << "); dropping " << (sched_ != nullptr ? sched_->size() : 0)
               << " sequences and waiting for the cluster to be complete again";
  TearDownDataPlane(why);
  if (sched_ != nullptr) sched_->DropAll();  // the coordinator put them back in its queue
  stats_.active = 0;
  ASSIGN_OR_RETURN(std::optional<ControlSession::Registration> reg, session_.Rejoin(failed));
  if (!reg.has_value()) return false;  // the cluster was shut down meanwhile
  const v1::RegisterResponse& r = reg->response;
  const int64_t committed = std::max<int64_t>(1, r.plan().placement_version());
  if (committed > stager_->placement_version()) {
    // Committed while this worker waited for the stage to switch (a
    // rebalance), or committed with the new generation without a staging
    // round (elastic EP re-placed a vacant place's experts): load what this
    // rank gains now, then switch; no step runs now.
    if (stager_->staged_version() != committed) RETURN_IF_ERROR(StageNow(committed, r.epoch(), r.plan()));
    RETURN_IF_ERROR(stager_->Switch(committed));
  }
  if (r.worker_id() != worker_id || reg->plan != plan_) {
    return absl::FailedPreconditionError("rejoining: the coordinator has another plan or place for this worker");
  }
  if (sched_ != nullptr) sched_->SetEpoch(r.epoch(), committed);
  dp_->SetGeneration(r.epoch(), r.generation(), /*clear_stale=*/true);
  dp_->SetVacant({r.vacant_worker_ids().begin(), r.vacant_worker_ids().end()});
  if (!r.vacant_worker_ids().empty()) {
    LOG(INFO) << "worker " << worker_id << ": generation " << r.generation() << " serves without "
              << r.vacant_worker_ids_size() << " vacant place(s) (elastic EP)";
  }
  RETURN_IF_ERROR(BuildDataPlane());
  LOG(INFO) << "worker " << worker_id << ": data plane rebuilt for generation " << r.generation() << " in "
            << absl::FormatDuration(absl::Now() - t0);
  return true;
}

absl::Status Worker::StageNow(int64_t version, const std::string& epoch, const v1::Plan& plan) {
  const absl::Time t0 = absl::Now(), deadline = t0 + o_.register_timeout;
  while (stager_->loading_version() != 0) {  // an earlier load: let it finish first
    if (absl::Now() > deadline) return absl::DeadlineExceededError("waiting for an earlier expert load");
    absl::SleepFor(absl::Milliseconds(2));
  }
  stager_->StartStaging(version, epoch, plan);
  while (stager_->staged_version() != version) {
    if (stager_->loading_version() == 0 && stager_->staged_version() != version) {
      return absl::InternalError(absl::StrCat("worker ", session_.worker_id(), ": cannot load the experts of placement "
                                              "version ", version, ": ", stager_->TakeError()));
    }
    if (absl::Now() > deadline) return absl::DeadlineExceededError("loading the experts of a new placement");
    absl::SleepFor(absl::Milliseconds(2));
  }
  LOG(INFO) << "worker " << session_.worker_id() << ": staged placement version " << version << " in "
            << absl::FormatDuration(absl::Now() - t0);
  return absl::OkStatus();
}

absl::Status Worker::Run() {
  absl::Status s = Setup();
  // A data plane whose bootstrap bytes were damaged (DATA_LOSS) is rebuilt on
  // a new generation, a few times in a row at most.
  int damaged = absl::IsDataLoss(s) && loop_ != nullptr ? 1 : 0;
  while (s.ok() || (damaged > 0 && damaged <= 3)) {
    if (damaged == 0) {
      s = loop_->Run();
      if (s.ok() || !Recoverable(s)) break;
    }
    absl::StatusOr<bool> again = Rejoin(s);
    // The generation moved on again while we rebuilt (e.g. a wedged peer was
    // found MISSING while we waited for its address): rejoin the newer one.
    while (!again.ok() && absl::IsAborted(again.status()) && Recoverable(again.status())) {
      again = Rejoin(again.status());
    }
    s = again.status();
    damaged = absl::IsDataLoss(s) && o_.backend != "mpi" ? damaged + 1 : 0;
    if (s.ok() && !*again) break;  // shut down while waiting to rejoin
  }
  if (session_.leaving()) {
    LOG(INFO) << "worker " << session_.worker_id() << ": left the cluster on request";
    s = absl::OkStatus();
  }
  if (!s.ok() && dp_ != nullptr) dp_->Abort(s);
  if (absl::Status fatal = session_.fatal(); !fatal.ok()) s = fatal;
  if (o_.serving != nullptr) *o_.serving = false;
  session_.Stop();
  if (stager_ != nullptr) stager_->Join();
  return s;
}

}  // namespace

absl::Status RunWorker(const WorkerOptions& options, CoordinatorClient* client) {
  if (options.max_sequences < 1 || options.max_step_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_sequences (", options.max_sequences, ") and max_step_tokens (",
                                                   options.max_step_tokens, ") must be >= 1"));
  }
  if (options.cuda && options.max_step_tokens > options.cuda_options.max_step_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max-step-tokens ", options.max_step_tokens, " exceeds --cuda-max-step-tokens ",
        options.cuda_options.max_step_tokens, " (the GPU scratch of one step): lower the first or raise the second"));
  }
  Worker w(options, client);
  return w.Run();
}

absl::Status RunWorker(const WorkerOptions& options) {
  GrpcCoordinatorClient client(options.coordinator, options.security);
  return RunWorker(options, &client);
}

}  // namespace expertmesh::worker::runtime
