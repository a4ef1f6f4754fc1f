#include "worker/runtime/worker.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "coordinator/plan_proto.h"
#include "glog/logging.h"
#include "topology/plan.h"
#include "worker/comm/bootstrap.h"
#include "worker/comm/mpi_communicator.h"
#include "worker/comm/registry.h"
#include "worker/cuda_ep.h"
#include "worker/cuda_stage.h"
#include "worker/dispatch.h"
#include "worker/model.h"
#include "worker/runtime/coordinator_client.h"
#include "worker/runtime/messages.h"

namespace expertmesh::worker::runtime {

namespace {

// ------------------------------------------------------------ plan

// The plan from Register, checked against what this worker relies on.
absl::StatusOr<topology::Plan> PlanFromRegister(const v1::Plan& p) {
  ASSIGN_OR_RETURN(topology::Plan plan, coordinator::PlanFromProto(p));
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

std::string ThisHost() {
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  return host;
}

// ------------------------------------------------------------ messages over a communicator

absl::Status SendMessage(comm::Communicator* c, int peer, const std::string& bytes, absl::Duration timeout) {
  const uint64_t n = bytes.size();
  comm::Batch b;
  b.Send(peer, &n, sizeof(n));
  b.Send(peer, bytes.data(), bytes.size());
  return c->Run(b, absl::Now() + timeout);
}

// ------------------------------------------------------------ time accounting

// Where a worker's time goes (seconds, cumulative). Written by the stage
// thread only, read by the heartbeat thread.
struct Times {
  std::atomic<double> transfer{0}, idle{0}, control{0}, embed_head{0}, dispatch{0}, combine{0}, expert{0};
};

void Add(std::atomic<double>* a, double v) { a->store(a->load(std::memory_order_relaxed) + v, std::memory_order_relaxed); }

double Seconds(absl::Time since) { return absl::ToDoubleSeconds(absl::Now() - since); }

// ------------------------------------------------------------ expert load

// Routed tokens per expert per layer since the last heartbeat.
class LoadCounter {
 public:
  void Add(int64_t layer, int64_t num_experts, const std::vector<int32_t>& ids) {
    std::lock_guard<std::mutex> l(mu_);
    auto& v = counts_[layer];
    if (v.empty()) v.assign(num_experts, 0);
    for (int32_t e : ids) ++v[e];
  }
  std::map<int64_t, std::vector<int64_t>> Take() {
    std::lock_guard<std::mutex> l(mu_);
    return std::exchange(counts_, {});
  }

 private:
  std::mutex mu_;
  std::map<int64_t, std::vector<int64_t>> counts_;
};

// ------------------------------------------------------------ the worker

class Worker {
 public:
  explicit Worker(const WorkerOptions& o) : o_(o), client_(o.coordinator), host_(ThisHost()) {}
  absl::Status Run();

 private:
  absl::Status Setup();
  // Creates the communicators of generation dp_generation_ (and the EP
  // exchange on top); TearDownDataPlane aborts and destroys them.
  absl::Status BuildDataPlane();
  void TearDownDataPlane(const absl::Status& reason);
  // Aborts the communicators from any thread (they stay allocated).
  void AbortDataPlane(const absl::Status& reason);
  // After a data-plane failure: drop every sequence, wait (Register with
  // rejoin_after_generation) until the cluster is complete again, rebuild.
  // False: the cluster was shut down meanwhile (exit cleanly).
  absl::StatusOr<bool> Rejoin(const absl::Status& why);
  bool Recoverable(const absl::Status& s);
  absl::StatusOr<std::unique_ptr<comm::Communicator>> MakeComm(const std::string& name,
                                                               const std::vector<int>& worker_ids,
                                                               const std::string& backend);
  absl::Status RunStage0();
  absl::Status RunDownstream();
  // Expert rebalancing. StartStaging (heartbeat thread): loads, on a loader
  // thread, the experts the pending plan puts on this rank that it does not
  // hold. SwitchPlacement (stage thread, between steps): moves them in,
  // unloads the ones it no longer holds and takes the new placement.
  void StartStaging(int64_t version, const std::string& epoch, const v1::Plan& proto);
  absl::Status SwitchPlacement(int64_t version);
  void JoinLoader();
  void HeartbeatLoop();
  absl::Status Reregister();
  v1::RegisterRequest MakeRegisterRequest(int worker_id) const;
  void StopHeartbeats();

  // Stage 0 state.
  struct Seq {
    std::string seq_id;
    v1::SequenceRequest req;
    kernels::SamplingParams sp;
    std::vector<int32_t> generated;
    SequenceCache cache;
    CudaSequence gpu;  // --device cuda: the sequence's latent cache on the GPU
    bool in_flight = false, prefilled = false, dropped = false;
    int32_t next_token = 0;
  };
  absl::Status SyncWithCoordinator(bool* want_stop);
  void Finish(uint64_t key, v1::FinishReason reason);
  void ApplyToken(uint64_t key, int32_t token);
  absl::Status ApplyReturn(const Return& r);
  void BuildMicroBatch(MicroBatch* mb, std::vector<Segment>* segs, std::vector<CudaEngine::Segment>* gsegs);
  // --device cuda: one step of this stage on the GPU. hidden_in: the previous
  // stage's hidden states (host, or device with a device data plane), null on
  // stage 0. On the last stage the logits land in logits_; else the hidden
  // states go to *hidden_out (host) or stay on the device (*dev_hidden_out).
  absl::Status GpuStep(const std::vector<CudaEngine::Segment>& segs, const float* hidden_in, bool hidden_on_device,
                       std::vector<float>* hidden_out, const float** dev_hidden_out);
  bool device_pipeline() const { return lane_dev_comm_ != nullptr; }
  // Last stage: final norm + lm_head of each segment's last token, then sampling.
  Return HeadAndSample(const MicroBatch& mb, const std::vector<Segment>& segs, const std::vector<float>& hidden);
  std::vector<float> logits_;

  WorkerOptions o_;
  CoordinatorClient client_;
  const std::string host_;  // sent with Register and every Heartbeat
  int worker_id_ = -1, stage_ = 0, ep_rank_ = 0;
  std::string epoch_;
  topology::Plan plan_;
  ModelConfig cfg_;
  std::unique_ptr<ModelShard> shard_;
  std::unique_ptr<CoordinatorStore> store_;
  // dp_mu_ guards the communicator pointers against AbortDataPlane from the
  // heartbeat thread (the stage thread, which owns them, reads them without
  // it), and the (epoch, generation) the data plane was built for.
  std::mutex dp_mu_;
  std::string dp_epoch_;
  int64_t dp_generation_ = 0;
  bool dp_stale_ = false;          // the coordinator moved to another generation
  absl::Status fatal_;             // this worker must exit (its place was taken over)
  std::atomic<bool> leaving_{false};  // stop requested by a signal
  std::unique_ptr<comm::Communicator> stage_comm_, lane_comm_;
  std::array<comm::Communicator*, 4> CommsLocked() const {  // with dp_mu_ held (or on the stage thread)
    return {stage_comm_.get(), lane_comm_.get(), stage_dev_comm_.get(), lane_dev_comm_.get()};
  }
  LoadCounter load_;
  // Rebalancing state. staging_mu_ guards staged_ and staging_error_, and
  // plan_'s placements against the heartbeat thread (the stage thread, their
  // only writer, reads them without it).
  std::mutex staging_mu_;
  struct Staged {  // its version: staged_version_
    std::string epoch;  // of the coordinator that sent it (versions are unique per epoch)
    topology::Plan plan;
    ModelShard::ExpertSet experts;
  } staged_;
  std::string staging_error_;               // reported once with the next heartbeat
  std::atomic<int64_t> placement_version_{1};
  std::atomic<int64_t> staged_version_{0};  // of staged_ (0: none); written under staging_mu_
  std::atomic<int64_t> loading_version_{0};
  std::thread loader_;
  int64_t committed_placement_ = 1;         // stage 0: from Sync
  v1::Plan registered_plan_;                // as Register gave it (checkpoint, config text)
  std::unique_ptr<CpuEpExchange> cpu_ep_;  // EP > 1 on the CPU: the engine's exchange
  std::unique_ptr<Engine> engine_;
  // --device cuda: the engine, its EP exchange and the device data plane.
  std::unique_ptr<CudaEngine> gpu_;
  std::unique_ptr<CudaEpExchange> gpu_ep_;
  std::unique_ptr<comm::Communicator> stage_dev_comm_, lane_dev_comm_;
  CudaDeviceBuffer gpu_hidden_;  // hidden states received over lane_dev_comm_
  ExchangeTimes ep_seen_;        // exchange times already added to t_
  double moe_seen_ = 0;          // CPU engine MoE time already added to t_
  // Adds the MoE time of the steps since the last call to t_: the exchange's
  // dispatch and combine, the rest as expert time.
  void AccountMoeTimes();

  std::map<uint64_t, Seq> seqs_;
  uint64_t next_key_ = 1;
  std::vector<uint64_t> release_;
  std::vector<v1::SequenceUpdate> updates_;
  absl::Time last_sync_ok_;
  absl::Time last_sync_ = absl::InfinitePast();
  bool sync_warned_ = false;

  Times t_;
  absl::Time serving_since_ = absl::Now();
  absl::StatusOr<std::string> Recv(int peer);
  absl::Status Send(int peer, const std::string& bytes);
  // The device data plane: T hidden rows (fp32) GPU to GPU over lane_dev_comm_.
  absl::Status SendDeviceHidden(int peer, const float* dev, int64_t T);
  absl::StatusOr<const float*> RecvDeviceHidden(int peer, int64_t T);

  std::atomic<bool> shutdown_{false};
  std::atomic<bool> stop_heartbeats_{false};
  std::atomic<int64_t> steps_{0}, tokens_{0}, active_{0};
  std::mutex hb_mu_;
  std::condition_variable hb_cv_;
  bool beat_now_ = false;  // under hb_mu_: send the next heartbeat at once (a placement was staged)
  std::thread hb_thread_;
  absl::Time last_heartbeat_ = absl::InfinitePast();
  bool StopRequested() const { return o_.stop_signal != nullptr && o_.stop_signal->load() != 0; }
};

absl::StatusOr<std::unique_ptr<comm::Communicator>> Worker::MakeComm(const std::string& name,
                                                                     const std::vector<int>& worker_ids,
                                                                     const std::string& backend) {
  const int size = static_cast<int>(worker_ids.size());
  const int rank = static_cast<int>(std::find(worker_ids.begin(), worker_ids.end(), worker_id_) - worker_ids.begin());
  if (backend == "mpi") {
    std::vector<int> world;
    for (int w : worker_ids) world.push_back(w + o_.mpi_world_offset);
    // Tags keep the stage groups and lane groups apart (a worker is in one of each).
    const int tag = name.rfind("stage", 0) == 0 ? 100 + stage_ : 10000 + ep_rank_;
    return comm::CreateMpiGroupCommunicator(world, tag);
  }
  std::string prefix;
  {
    std::lock_guard<std::mutex> l(dp_mu_);
    prefix = absl::StrCat(dp_epoch_, "/g", dp_generation_, "/", name);
  }
  comm::StoreBootstrap boot(store_.get(), prefix, rank, size);
  comm::CommOptions opts;
  // Peers may still be loading their shard (a replacement loads after it registered).
  opts.connect_timeout = std::max(opts.connect_timeout, o_.register_timeout);
  if (backend == "nccl") opts.cuda_device = o_.cuda_options.device;
  return comm::CreateCommunicator(backend, &boot, opts);
}

v1::RegisterRequest Worker::MakeRegisterRequest(int worker_id) const {
  v1::RegisterRequest req;
  req.set_host(host_);
  req.set_pid(getpid());
  req.set_worker_id(worker_id);
  return req;
}

absl::Status Worker::Setup() {
  // A replacement started before the coordinator noticed the loss of the
  // worker it replaces finds every place held: it waits for one to free up.
  const absl::Time deadline = absl::Now() + o_.register_timeout;
  absl::StatusOr<v1::RegisterResponse> r;
  for (bool logged = false;; logged = true) {
    r = client_.Register(MakeRegisterRequest(o_.requested_worker_id), deadline);
    const bool full = absl::IsResourceExhausted(r.status()) || absl::IsAlreadyExists(r.status());
    if (!full || absl::Now() + absl::Seconds(1) >= deadline) break;
    if (!logged) LOG(INFO) << "no place free yet (" << r.status().message() << "); waiting";
    absl::SleepFor(absl::Seconds(1));
  }
  RETURN_IF_ERROR(r.status());
  const v1::RegisterResponse& reg = *r;
  worker_id_ = reg.worker_id();
  stage_ = reg.stage();
  ep_rank_ = reg.ep_rank();
  epoch_ = reg.epoch();
  ASSIGN_OR_RETURN(plan_, PlanFromRegister(reg.plan()));
  registered_plan_ = reg.plan();
  placement_version_ = std::max<int64_t>(1, reg.plan().placement_version());
  committed_placement_ = placement_version_.load();
  if (stage_ < 0 || stage_ >= plan_.pp || ep_rank_ < 0 || ep_rank_ >= plan_.ep) {
    return absl::DataLossError(absl::StrCat("coordinator assigned stage ", stage_, " rank ", ep_rank_,
                                            " outside its plan"));
  }
  LOG(INFO) << "worker " << worker_id_ << ": stage " << stage_ << " of " << plan_.pp << ", EP rank " << ep_rank_
            << " of " << plan_.ep << ", epoch " << epoch_;

  const topology::StagePlan& sp = plan_.stages[stage_];
  ShardFilter f;
  f.layer_begin = sp.layer_begin;
  f.layer_end = sp.layer_end;
  f.embed = sp.has_embedding;
  f.head = sp.has_head;
  const int rank = ep_rank_;
  f.expert = [&sp, rank](int64_t layer, int64_t e) {
    auto it = sp.placement.find(layer);
    if (it == sp.placement.end()) return false;
    const auto& slots = it->second.slots_of_rank(rank);
    return std::find(slots.begin(), slots.end(), e) != slots.end();
  };
  const std::string dir = reg.plan().checkpoint();
  const absl::Time t0 = absl::Now();
  if (o_.cuda) {
    ASSIGN_OR_RETURN(gpu_, CudaEngine::Load(dir, f, o_.cuda_options));
    cfg_ = gpu_->config();
    LOG(INFO) << "worker " << worker_id_ << ": on " << gpu_->Describe();
  } else {
    ASSIGN_OR_RETURN(shard_, ModelShard::Load(dir, f));
    cfg_ = shard_->config();
  }
  LOG(INFO) << "worker " << worker_id_ << ": loaded layers [" << sp.layer_begin << ", " << sp.layer_end << ") from "
            << dir << " in " << absl::FormatDuration(absl::Now() - t0);
  store_ = std::make_unique<CoordinatorStore>(&client_);
  {
    std::lock_guard<std::mutex> l(dp_mu_);
    dp_epoch_ = reg.epoch();
    dp_generation_ = reg.generation();
  }
  // Expert load: counted from the routes each MoE layer computes once.
  const int64_t num_experts = cfg_.n_routed_experts;
  RouteObserver count_load = [this, num_experts](int64_t layer, const int32_t* ids, int64_t n) {
    load_.Add(layer, num_experts, std::vector<int32_t>(ids, ids + n));
  };
  if (o_.cuda) {
    gpu_->SetRouteObserver(count_load);
  } else {
    engine_ = std::make_unique<Engine>(shard_.get());
    engine_->SetRouteObserver(count_load);
    if (plan_.ep > 1) {
      DispatchOptions eo;
      eo.timeout = o_.step_timeout;
      cpu_ep_ = std::make_unique<CpuEpExchange>(shard_.get(), nullptr, &plan_.stages[stage_].placement, eo);
      engine_->SetExpertExchange(cpu_ep_.get());
    }
  }
  RETURN_IF_ERROR(BuildDataPlane());
  serving_since_ = absl::Now();
  hb_thread_ = std::thread([this] { HeartbeatLoop(); });  // READY from the first heartbeat on
  return absl::OkStatus();
}

absl::Status Worker::BuildDataPlane() {
  const bool nccl = o_.cuda && o_.device_data_plane == "nccl";
  std::unique_ptr<comm::Communicator> stage_comm, lane_comm, stage_dev_comm, lane_dev_comm;
  // A group's host communicator and, with the NCCL device plane, its NCCL twin.
  auto group = [&](const std::string& name, const std::vector<int>& ids, std::unique_ptr<comm::Communicator>* host,
                   std::unique_ptr<comm::Communicator>* dev) -> absl::Status {
    ASSIGN_OR_RETURN(*host, MakeComm(name, ids, o_.backend));
    if (nccl) {
      ASSIGN_OR_RETURN(*dev, MakeComm(name + "-nccl", ids, "nccl"));
    }
    return absl::OkStatus();
  };
  if (plan_.ep > 1) {
    std::vector<int> ids;
    for (int r = 0; r < plan_.ep; ++r) ids.push_back(static_cast<int>(plan_.WorkerId(stage_, r)));
    RETURN_IF_ERROR(group(absl::StrCat("stage", stage_), ids, &stage_comm, &stage_dev_comm));
  }
  if (plan_.pp > 1) {
    std::vector<int> ids;
    for (int s = 0; s < plan_.pp; ++s) ids.push_back(static_cast<int>(plan_.WorkerId(s, ep_rank_)));
    RETURN_IF_ERROR(group(absl::StrCat("lane", ep_rank_), ids, &lane_comm, &lane_dev_comm));
  }
  {
    std::lock_guard<std::mutex> l(dp_mu_);
    stage_comm_ = std::move(stage_comm);
    lane_comm_ = std::move(lane_comm);
    stage_dev_comm_ = std::move(stage_dev_comm);
    lane_dev_comm_ = std::move(lane_dev_comm);
    if (dp_stale_) {  // the generation moved on while we connected: fail the first step, rejoin again
      const absl::Status why = absl::AbortedError("the data-plane generation moved on while connecting");
      for (comm::Communicator* c : CommsLocked()) {
        if (c != nullptr) c->Abort(why);
      }
    }
  }
  if (plan_.ep > 1) {
    if (o_.cuda) {
      CudaEpOptions eo;
      eo.timeout = o_.step_timeout;
      ASSIGN_OR_RETURN(gpu_ep_, CudaEpExchange::Create(gpu_.get(), nccl ? stage_dev_comm_.get() : stage_comm_.get(),
                                                      &plan_.stages[stage_].placement, eo));
      gpu_->SetExpertExchange(gpu_ep_.get());
      ep_seen_ = gpu_ep_->times();
    } else {
      cpu_ep_->Reset(stage_comm_.get());
    }
  }
  return absl::OkStatus();
}

void Worker::AbortDataPlane(const absl::Status& reason) {
  std::lock_guard<std::mutex> l(dp_mu_);
  for (comm::Communicator* c : CommsLocked()) {
    if (c != nullptr) c->Abort(reason);
  }
}

void Worker::TearDownDataPlane(const absl::Status& reason) {
  AbortDataPlane(reason);
  if (gpu_ != nullptr) gpu_->SetExpertExchange(nullptr);
  gpu_ep_.reset();
  if (cpu_ep_ != nullptr) cpu_ep_->Reset(nullptr);
  std::unique_ptr<comm::Communicator> a, b, c, d;
  {
    std::lock_guard<std::mutex> l(dp_mu_);
    a = std::move(stage_comm_);
    b = std::move(lane_comm_);
    c = std::move(stage_dev_comm_);
    d = std::move(lane_dev_comm_);
  }
  // Destroyed outside the lock: closing endpoints to a dead peer may take a grace period.
}

absl::StatusOr<std::string> Worker::Recv(int peer) {
  // The size header arrives when the peer is done with its step: waiting for
  // it is idle time; the body that follows is transfer.
  const absl::Time t0 = absl::Now();
  uint64_t n = 0;
  comm::Batch b;
  b.Recv(peer, &n, sizeof(n));
  b.patient = true;  // waits for the peer's whole step, or for work
  RETURN_IF_ERROR(lane_comm_->Run(b, absl::Now() + o_.step_timeout));
  const absl::Time t1 = absl::Now();
  Add(&t_.idle, absl::ToDoubleSeconds(t1 - t0));
  if (n > (1ull << 34)) return absl::DataLossError(absl::StrCat("message of ", n, " bytes announced: corrupt"));
  std::string bytes(n, '\0');
  b.Clear();
  b.Recv(peer, bytes.data(), n);
  RETURN_IF_ERROR(lane_comm_->Run(b, absl::Now() + o_.step_timeout));
  Add(&t_.transfer, Seconds(t1));
  return bytes;
}

absl::Status Worker::Send(int peer, const std::string& bytes) {
  const absl::Time t0 = absl::Now();
  absl::Status s = SendMessage(lane_comm_.get(), peer, bytes, o_.step_timeout);
  Add(&t_.transfer, Seconds(t0));
  return s;
}

absl::Status Worker::SendDeviceHidden(int peer, const float* dev, int64_t T) {
  const absl::Time t0 = absl::Now();
  comm::Batch b;
  b.memory = comm::MemoryKind::kDevice;
  b.Send(peer, dev, static_cast<size_t>(T * cfg_.hidden_size) * sizeof(float));
  absl::Status s = lane_dev_comm_->Run(b, absl::Now() + o_.step_timeout);
  Add(&t_.transfer, Seconds(t0));
  return s;
}

absl::StatusOr<const float*> Worker::RecvDeviceHidden(int peer, int64_t T) {
  const absl::Time t0 = absl::Now();
  const size_t bytes = static_cast<size_t>(T * cfg_.hidden_size) * sizeof(float);
  RETURN_IF_ERROR(gpu_hidden_.Reserve(std::max<size_t>(bytes, 1)));
  comm::Batch b;
  b.memory = comm::MemoryKind::kDevice;
  b.Recv(peer, gpu_hidden_.data(), bytes);
  RETURN_IF_ERROR(lane_dev_comm_->Run(b, absl::Now() + o_.step_timeout));
  Add(&t_.transfer, Seconds(t0));
  return static_cast<const float*>(gpu_hidden_.data());
}

void Worker::HeartbeatLoop() {
  bool warned = false;
  if (o_.serving != nullptr) *o_.serving = true;
  for (bool first = true;; first = false) {
    if (!first) {  // the first heartbeat goes out at once: the worker is READY
      std::unique_lock<std::mutex> l(hb_mu_);
      hb_cv_.wait_for(l, std::chrono::milliseconds(o_.stop_signal != nullptr ? 200 : 1000),
                      [this] { return stop_heartbeats_.load() || beat_now_; });
      const bool stop_now = StopRequested() && !leaving_.load();
      const bool now = std::exchange(beat_now_, false);
      if (!stop_heartbeats_.load() && !stop_now && !now && absl::Now() - last_heartbeat_ < absl::Seconds(1)) {
        continue;
      }
    }
    if (StopRequested() && !leaving_.exchange(true)) {
      LOG(WARNING) << "worker " << worker_id_ << ": signal " << o_.stop_signal->load()
                   << ": leaving the cluster (its sequences go back to the coordinator's queue)";
      AbortDataPlane(absl::CancelledError("this worker is leaving (signal)"));
    }
    last_heartbeat_ = absl::Now();
    const bool exiting = stop_heartbeats_.load();
    v1::HeartbeatRequest req;
    req.set_worker_id(worker_id_);
    req.set_host(host_);
    req.set_pid(getpid());
    req.set_active_sequences(static_cast<int32_t>(active_.load()));
    req.set_steps(steps_.load());
    req.set_tokens_processed(tokens_.load());
    req.set_exiting(exiting);
    req.set_placement_version(placement_version_.load());
    req.set_staged_placement_version(staged_version_.load());
    {
      std::lock_guard<std::mutex> l(staging_mu_);
      req.set_staging_error(std::exchange(staging_error_, {}));
    }
    if (engine_ != nullptr || gpu_ != nullptr) {
      // Plain doubles written by the stage thread: a torn read is harmless. The
      // GPU engine reports no per-kind compute split (its kernels run async).
      const EngineTimes et = engine_ != nullptr ? engine_->times() : EngineTimes{};
      v1::StageTimes* t = req.mutable_times();
      t->set_attention_s(et.attention);
      t->set_dense_s(et.dense);
      t->set_expert_s(t_.expert.load());
      t->set_dispatch_s(t_.dispatch.load());
      t->set_combine_s(t_.combine.load());
      t->set_transfer_s(t_.transfer.load());
      t->set_idle_s(t_.idle.load());
      t->set_embed_head_s(t_.embed_head.load());
      t->set_control_s(t_.control.load());
      t->set_wall_s(absl::ToDoubleSeconds(absl::Now() - serving_since_));
    }
    for (auto& [layer, counts] : load_.Take()) {
      auto* l = req.add_expert_load();
      l->set_layer(static_cast<int32_t>(layer));
      for (int64_t c : counts) l->add_tokens_per_expert(c);
    }
    auto r = client_.Heartbeat(req, absl::Seconds(5));
    if (r.ok()) {
      warned = false;
      if (r->shutdown()) shutdown_ = true;
      bool moved = false;
      int64_t mine = 0;
      {
        std::lock_guard<std::mutex> l(dp_mu_);
        mine = dp_generation_;
        moved = r->epoch() == dp_epoch_ && r->generation() != dp_generation_ && !dp_stale_;
        if (moved) dp_stale_ = true;
      }
      // Rebalancing: stage a pending placement; drop a staged one the
      // coordinator dropped (neither pending nor committed any more), or one
      // staged for a coordinator that has restarted since.
      const int64_t next = r->next_placement_version(), staged = staged_version_.load();
      if (staged != 0 && loading_version_.load() == 0) {
        std::lock_guard<std::mutex> l(staging_mu_);
        if (staged_.epoch != r->epoch() || (staged != next && staged != r->placement_version())) {
          LOG(INFO) << "worker " << worker_id_ << ": placement version " << staged
                    << " was dropped; unloading its experts";
          staged_ = Staged();
          staged_version_ = 0;
        }
      } else if (next > placement_version_.load() && staged == 0 && loading_version_.load() == 0 &&
                 r->has_next_plan()) {
        StartStaging(next, r->epoch(), r->next_plan());
      }
      if (moved) {
        LOG(WARNING) << "worker " << worker_id_ << ": the cluster moved to data-plane generation " << r->generation()
                     << " (this worker runs " << mine << "): aborting the data plane";
        AbortDataPlane(absl::AbortedError(absl::StrCat("the cluster moved to data-plane generation ",
                                                       r->generation(), " (a worker was lost or replaced)")));
      }
    } else if (r.status().code() == absl::StatusCode::kFailedPrecondition && !exiting) {
      // Our place belongs to a replacement now: nothing of ours is valid.
      LOG(ERROR) << "worker " << worker_id_ << ": " << r.status().message();
      {
        std::lock_guard<std::mutex> l(dp_mu_);
        if (fatal_.ok()) fatal_ = r.status();
      }
      shutdown_ = true;
      AbortDataPlane(r.status());
    } else if (r.status().code() == absl::StatusCode::kNotFound && !exiting) {
      // A restarted coordinator (new epoch, journal replayed) does not know us
      // yet: take our old place again. Sync picks up the new epoch.
      absl::Status s = Reregister();
      if (!s.ok()) LOG(WARNING) << "worker " << worker_id_ << ": re-registration failed: " << s.message();
    } else if (!warned) {
      LOG(WARNING) << "worker " << worker_id_ << ": " << r.status().message() << " (will keep trying)";
      warned = true;
    }
    if (exiting) return;
  }
}

absl::Status Worker::Reregister() {
  LOG(INFO) << "worker " << worker_id_ << ": coordinator does not know this worker (restarted?): registering again";
  v1::RegisterRequest req = MakeRegisterRequest(worker_id_);
  std::string running;
  {
    // What this worker runs: a restarted coordinator without the journal
    // that holds a rebalanced placement adopts it.
    std::lock_guard<std::mutex> l(staging_mu_);
    *req.mutable_running_plan() = coordinator::PlanToProto(plan_, registered_plan_.checkpoint(),
                                                           registered_plan_.model_json(), placement_version_.load());
    running = plan_.ToJson().dump();
  }
  ASSIGN_OR_RETURN(v1::RegisterResponse reg, client_.Register(req, absl::Now() + o_.register_timeout));
  ASSIGN_OR_RETURN(topology::Plan plan, PlanFromRegister(reg.plan()));
  if (reg.worker_id() != worker_id_ || plan.ToJson().dump() != running) {
    // The data plane and the loaded shard belong to the old plan.
    LOG(ERROR) << "worker " << worker_id_ << ": the restarted coordinator has another plan; exiting";
    shutdown_ = true;
    return absl::FailedPreconditionError("coordinator restarted with a different plan");
  }
  {
    // Same processes, same data plane: it now answers to the new coordinator's generation.
    std::lock_guard<std::mutex> l(dp_mu_);
    dp_epoch_ = reg.epoch();
    dp_generation_ = reg.generation();
  }
  LOG(INFO) << "worker " << worker_id_ << ": registered again, epoch " << reg.epoch() << ", generation "
            << reg.generation();
  return absl::OkStatus();
}

void Worker::JoinLoader() {
  if (loader_.joinable()) loader_.join();
}

void Worker::StartStaging(int64_t version, const std::string& epoch, const v1::Plan& proto) {
  auto fail = [&](const std::string& why) {
    LOG(ERROR) << "worker " << worker_id_ << ": cannot load placement version " << version << ": " << why;
    std::lock_guard<std::mutex> l(staging_mu_);
    staging_error_ = why;
  };
  if (gpu_ != nullptr) {
    fail("expert rebalancing is not implemented for --device cuda workers (their experts live on the GPU)");
    return;
  }
  absl::StatusOr<topology::Plan> plan = PlanFromRegister(proto);
  if (!plan.ok()) {
    fail(std::string(plan.status().message()));
    return;
  }
  // The experts this rank's new slots need that it does not hold now.
  std::map<int64_t, std::vector<int32_t>> need;
  int64_t keep = 0;
  {
    std::lock_guard<std::mutex> l(staging_mu_);
    if (plan->stages.size() != plan_.stages.size() || plan->stages[stage_].placement.size() !=
                                                          plan_.stages[stage_].placement.size()) {
      staging_error_ = "the pending plan has other stages or MoE layers than the one this worker runs";
      return;
    }
    for (const auto& [layer, pl] : plan->stages[stage_].placement) {
      const std::vector<int32_t> held = shard_->LoadedExperts(layer);
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
  JoinLoader();  // a finished earlier loader
  loading_version_ = version;
  const std::string dir = proto.checkpoint();
  loader_ = std::thread([this, version, epoch, dir, need = std::move(need), plan = *std::move(plan), n]() mutable {
    const absl::Time t0 = absl::Now();
    absl::StatusOr<ModelShard::ExpertSet> experts = ModelShard::LoadExperts(dir, need);
    std::lock_guard<std::mutex> l(staging_mu_);
    if (!experts.ok()) {
      LOG(ERROR) << "worker " << worker_id_ << ": loading the experts of placement version " << version
                 << " failed: " << experts.status();
      staging_error_ = std::string(experts.status().message());
    } else {
      staged_.epoch = epoch;
      staged_.plan = std::move(plan);
      staged_.experts = *std::move(experts);
      staged_version_ = version;
      LOG(INFO) << "worker " << worker_id_ << ": placement version " << version << " staged (" << n
                << " experts loaded in " << absl::FormatDuration(absl::Now() - t0) << ")";
    }
    loading_version_ = 0;
    {
      // Tell the coordinator now (staged, or why not), not with the next periodic heartbeat.
      std::lock_guard<std::mutex> h(hb_mu_);
      beat_now_ = true;
    }
    hb_cv_.notify_all();
  });
}

absl::Status Worker::SwitchPlacement(int64_t version) {
  const absl::Time t0 = absl::Now();
  std::lock_guard<std::mutex> l(staging_mu_);
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
  RETURN_IF_ERROR(shard_->ReplaceExperts(std::move(staged_.experts), keep));
  for (size_t s = 0; s < plan_.stages.size(); ++s) plan_.stages[s].placement = staged_.plan.stages[s].placement;
  if (cpu_ep_ != nullptr) cpu_ep_->Reset(stage_comm_.get());  // its per-layer state points at the old placement
  placement_version_ = version;
  staged_ = Staged();
  staged_version_ = 0;
  LOG(INFO) << "worker " << worker_id_ << ": switched to placement version " << version << " (" << in
            << " experts moved in) in " << absl::FormatDuration(absl::Now() - t0);
  return absl::OkStatus();
}

void Worker::StopHeartbeats() {
  if (!hb_thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> l(hb_mu_);
    stop_heartbeats_ = true;
  }
  hb_cv_.notify_all();
  hb_thread_.join();
}

// ------------------------------------------------------------ stage 0

void Worker::Finish(uint64_t key, v1::FinishReason reason) {
  auto it = seqs_.find(key);
  if (it == seqs_.end()) return;
  if (!it->second.dropped) {
    v1::SequenceUpdate u;
    u.set_seq_id(it->second.seq_id);
    u.set_finish_reason(reason);
    updates_.push_back(std::move(u));
  }
  if (it->second.in_flight) {  // released when its token comes back
    it->second.dropped = true;
    return;
  }
  release_.push_back(key);
  seqs_.erase(it);
}

void Worker::ApplyToken(uint64_t key, int32_t token) {
  auto it = seqs_.find(key);
  if (it == seqs_.end()) return;
  Seq& s = it->second;
  s.in_flight = false;
  if (s.dropped) {
    release_.push_back(key);
    seqs_.erase(it);
    return;
  }
  s.prefilled = true;
  s.generated.push_back(token);
  s.next_token = token;
  v1::SequenceUpdate u;
  u.set_seq_id(s.seq_id);
  u.add_new_tokens(token);
  const auto& stop = s.req.stop_token_ids();
  v1::FinishReason reason = v1::FINISH_REASON_UNSPECIFIED;
  if (std::find(stop.begin(), stop.end(), token) != stop.end()) {
    reason = v1::FINISH_REASON_STOP;
  } else if (static_cast<int64_t>(s.generated.size()) >= s.req.max_new_tokens()) {
    reason = v1::FINISH_REASON_LENGTH;
  }
  u.set_finish_reason(reason);
  updates_.push_back(std::move(u));
  if (reason != v1::FINISH_REASON_UNSPECIFIED) {
    release_.push_back(key);
    seqs_.erase(it);
  }
}

absl::Status Worker::ApplyReturn(const Return& r) {
  for (size_t i = 0; i < r.keys.size(); ++i) ApplyToken(r.keys[i], r.tokens[i]);
  return absl::OkStatus();
}

absl::Status Worker::SyncWithCoordinator(bool* want_stop) {
  v1::SyncRequest req;
  req.set_worker_id(worker_id_);
  req.set_epoch(epoch_);
  int64_t generation = 0;
  std::string dp_epoch;
  {
    std::lock_guard<std::mutex> l(dp_mu_);
    generation = dp_generation_;
    dp_epoch = dp_epoch_;
  }
  req.set_generation(generation);
  for (auto& u : updates_) *req.add_updates() = u;
  const int64_t live = static_cast<int64_t>(seqs_.size());
  req.set_free_slots(static_cast<int32_t>(std::max<int64_t>(0, o_.max_sequences - live)));
  auto r = client_.Sync(req, absl::Seconds(10));
  if (!r.ok()) {
    if (!sync_warned_) {
      LOG(WARNING) << "worker " << worker_id_ << ": " << r.status().message() << " (will keep trying)";
      sync_warned_ = true;
    }
    if (absl::Now() - last_sync_ok_ > o_.coordinator_timeout) {
      return absl::UnavailableError(absl::StrCat("coordinator ", client_.address(), " unreachable for ",
                                                 absl::FormatDuration(o_.coordinator_timeout), ": ",
                                                 r.status().message()));
    }
    return absl::OkStatus();  // keep the updates for the next try
  }
  sync_warned_ = false;
  last_sync_ok_ = absl::Now();
  updates_.clear();
  if (r->epoch() == epoch_ && r->generation() == generation) committed_placement_ = r->placement_version();
  if (r->shutdown()) shutdown_ = true;
  *want_stop = shutdown_.load();
  if (r->epoch() != epoch_) {
    LOG(INFO) << "worker " << worker_id_ << ": coordinator epoch changed (" << epoch_ << " -> " << r->epoch()
              << "): dropping " << seqs_.size() << " sequences";
    epoch_ = r->epoch();
    std::vector<uint64_t> keys;
    for (auto& [k, s] : seqs_) keys.push_back(k);
    for (uint64_t k : keys) {
      seqs_[k].dropped = true;
      Finish(k, v1::FINISH_REASON_CANCELLED);
    }
    updates_.clear();
    return absl::OkStatus();
  }
  if (r->generation() != generation) {
    // Nothing was applied or assigned. With the coordinator our data plane was
    // built for, the generation moved on: rebuild. Otherwise (a restarted
    // coordinator) wait until the heartbeat thread registered again.
    if (r->epoch() == dp_epoch) {
      return absl::AbortedError(absl::StrCat("the cluster moved to data-plane generation ", r->generation()));
    }
    return absl::OkStatus();
  }
  for (const auto& id : r->cancel()) {
    for (auto& [k, s] : seqs_) {
      if (s.seq_id == id) {
        Finish(k, v1::FINISH_REASON_CANCELLED);
        break;
      }
    }
  }
  for (const auto& a : r->assign()) {
    Seq s;
    s.seq_id = a.seq_id();
    s.req = a.request();
    s.sp.temperature = s.req.sampling().temperature();
    s.sp.top_k = s.req.sampling().top_k();
    s.sp.top_p = s.req.sampling().top_p() > 0 ? s.req.sampling().top_p() : 1.0f;
    s.sp.seed = s.req.sampling().seed();
    if (gpu_ != nullptr) {
      s.gpu = CudaSequence(gpu_.get());
    } else {
      s.cache = engine_->NewCache();
    }
    std::vector<int32_t> prompt(s.req.tokens().begin(), s.req.tokens().end());
    absl::Status v = ValidatePrompt(cfg_, prompt, s.req.max_new_tokens(), s.seq_id);
    if (!v.ok()) {  // the coordinator validates; this guards the worker against a bad peer
      LOG(ERROR) << "worker " << worker_id_ << ": rejected " << v.message();
      v1::SequenceUpdate u;
      u.set_seq_id(s.seq_id);
      u.set_finish_reason(v1::FINISH_REASON_CANCELLED);
      updates_.push_back(u);
      continue;
    }
    seqs_.emplace(next_key_++, std::move(s));
  }
  return absl::OkStatus();
}

void Worker::BuildMicroBatch(MicroBatch* mb, std::vector<Segment>* segs, std::vector<CudaEngine::Segment>* gsegs) {
  // At most 1/P of the live sequences per micro-batch, so P micro-batches
  // are in flight at once and the stages overlap.
  int64_t live = 0;
  for (auto& [k, s] : seqs_) live += s.dropped ? 0 : 1;
  const int64_t cap = std::max<int64_t>(1, (live + plan_.pp - 1) / plan_.pp);
  mb->segments.clear();
  mb->tokens.clear();
  segs->clear();
  gsegs->clear();
  std::vector<std::pair<uint64_t, Seq*>> chosen;
  for (auto& [k, s] : seqs_) {
    if (static_cast<int64_t>(chosen.size()) >= cap) break;
    if (s.in_flight || s.dropped) continue;
    chosen.push_back({k, &s});
  }
  // Token storage first (segments point into it).
  for (auto& [k, s] : chosen) {
    SegmentMeta m;
    m.key = k;
    m.start = gpu_ != nullptr ? s->gpu.length() : s->cache.length;
    if (!s->prefilled) {
      m.n = s->req.tokens_size();
      mb->tokens.insert(mb->tokens.end(), s->req.tokens().begin(), s->req.tokens().end());
    } else {
      m.n = 1;
      mb->tokens.push_back(s->next_token);
    }
    m.temperature = s->sp.temperature;
    m.top_k = s->sp.top_k;
    m.top_p = s->sp.top_p;
    m.seed = s->sp.seed;
    m.step = s->generated.size();
    mb->segments.push_back(m);
    s->in_flight = true;
  }
  int64_t off = 0;
  for (size_t i = 0; i < chosen.size(); ++i) {
    if (gpu_ != nullptr) {
      gsegs->push_back({chosen[i].second->gpu.id(), mb->tokens.data() + off, mb->segments[i].n});
    } else {
      segs->push_back({&chosen[i].second->cache, mb->tokens.data() + off, mb->segments[i].n});
    }
    off += mb->segments[i].n;
  }
}

Return Worker::HeadAndSample(const MicroBatch& mb, const std::vector<Segment>& segs,
                             const std::vector<float>& hidden) {
  const absl::Time t0 = absl::Now();
  Return r;
  r.tick = mb.tick;
  if (gpu_ == nullptr) engine_->Head(segs, hidden, &logits_);  // the GPU step has filled logits_
  const int64_t V = cfg_.vocab_size;
  for (size_t i = 0; i < mb.segments.size(); ++i) {  // every segment has n >= 1: one logits row each
    const SegmentMeta& m = mb.segments[i];
    kernels::SamplingParams sp{m.temperature, m.top_k, m.top_p, m.seed};
    r.keys.push_back(m.key);
    r.tokens.push_back(kernels::Sample(logits_.data() + i * V, V, sp, m.step));
  }
  Add(&t_.embed_head, Seconds(t0));
  return r;
}

absl::Status Worker::GpuStep(const std::vector<CudaEngine::Segment>& segs, const float* hidden_in,
                             bool hidden_on_device, std::vector<float>* hidden_out, const float** dev_hidden_out) {
  CudaEngine::StageIo io;
  io.hidden_in = hidden_in;
  io.hidden_on_device = hidden_on_device;
  if (gpu_->has_head()) {
    io.logits = &logits_;
  } else {
    io.hidden_out = dev_hidden_out == nullptr ? hidden_out : nullptr;
    io.device_hidden_out = dev_hidden_out;
  }
  absl::Status s = gpu_->Step(segs, io);
  AccountMoeTimes();
  return s;
}

void Worker::AccountMoeTimes() {
  const ExpertExchange* ex = gpu_ != nullptr ? static_cast<const ExpertExchange*>(gpu_ep_.get()) : cpu_ep_.get();
  if (gpu_ != nullptr && ex == nullptr) return;  // the GPU engine reports no MoE time of its own
  const ExchangeTimes now = ex != nullptr ? ex->times() : ExchangeTimes{};
  const double dispatch = now.dispatch - ep_seen_.dispatch, combine = now.combine - ep_seen_.combine;
  Add(&t_.dispatch, dispatch);
  Add(&t_.combine, combine);
  if (gpu_ != nullptr) {
    Add(&t_.expert, now.expert - ep_seen_.expert);
  } else {  // the CPU engine's MoE layers, less their exchange time
    const double moe = engine_->times().moe;
    Add(&t_.expert, std::max(0.0, moe - moe_seen_ - dispatch - combine));
    moe_seen_ = moe;
  }
  ep_seen_ = now;
}

absl::Status Worker::RunStage0() {
  const bool last = plan_.pp == 1;
  const int E = static_cast<int>(plan_.ep);
  int64_t inflight = 0;
  absl::Time last_sent = absl::Now();
  last_sync_ok_ = absl::Now();
  uint64_t tick = 0;
  std::vector<float> hidden;
  bool want_stop = false;
  while (true) {
    if (leaving_.load()) return absl::CancelledError("leaving on request");
    // Sync with the coordinator at most every 20 ms while busy (each call is a
    // gRPC round trip); every loop while idle, so new work starts at once.
    absl::Time t0 = absl::Now();
    if (seqs_.empty() || t0 - last_sync_ >= absl::Milliseconds(20) || shutdown_.load()) {
      const bool busy = !seqs_.empty();
      RETURN_IF_ERROR(SyncWithCoordinator(&want_stop));
      last_sync_ = absl::Now();
      Add(busy ? &t_.control : &t_.idle, Seconds(t0));  // polling for work while idle is idle time
    }
    active_ = static_cast<int64_t>(seqs_.size());
    MicroBatch mb;
    std::vector<Segment> segs;
    std::vector<CudaEngine::Segment> gsegs;
    if (!want_stop) BuildMicroBatch(&mb, &segs, &gsegs);
    mb.release = std::exchange(release_, {});
    // Agree with the other EP ranks of stage 0: work anywhere -> everyone runs
    // the layers; stop only when everyone is drained.
    // The 4th value: the placement version this rank can run from this step
    // on (the committed one once its experts are staged); all switch to the
    // smallest, so at the same step.
    const int64_t active = placement_version_.load();
    const int64_t offer = committed_placement_ > active && staged_version_.load() == committed_placement_
                              ? committed_placement_
                              : active;
    int32_t mine[4] = {mb.segments.empty() ? 0 : 1, want_stop ? 1 : 0, inflight == 0 ? 1 : 0,
                       static_cast<int32_t>(offer)};
    constexpr int kAgree = 4;
    std::vector<int32_t> gathered(kAgree * E);
    if (stage_comm_ != nullptr) {
      t0 = absl::Now();
      RETURN_IF_ERROR(stage_comm_->AllGather(mine, gathered.data(), sizeof(mine), comm::MemoryKind::kHost,
                                             absl::Now() + o_.step_timeout));
      Add(&t_.idle, Seconds(t0));
    } else {
      std::memcpy(gathered.data(), mine, sizeof(mine));
    }
    bool any_work = false, any_stop = false, all_drained = true;
    int64_t agreed = offer;
    for (int r = 0; r < E; ++r) {
      any_work |= gathered[kAgree * r] != 0;
      any_stop |= gathered[kAgree * r + 1] != 0;
      all_drained &= gathered[kAgree * r + 2] != 0;
      agreed = std::min<int64_t>(agreed, gathered[kAgree * r + 3]);
    }
    if (agreed > active) RETURN_IF_ERROR(SwitchPlacement(agreed));
    mb.placement_version = placement_version_.load();
    if (any_stop && !any_work && all_drained) {
      if (!last) {
        mb.kind = BatchKind::kStop;
        RETURN_IF_ERROR(Send(1, Encode(mb)));
      }
      LOG(INFO) << "worker " << worker_id_ << ": stopping after " << tick << " steps";
      return absl::OkStatus();
    }
    if (!any_work) {
      if (inflight > 0) {  // drain: wait for a return (releases go out with a later micro-batch)
        release_.insert(release_.end(), mb.release.begin(), mb.release.end());
        ASSIGN_OR_RETURN(std::string bytes, Recv(plan_.pp - 1));
        ASSIGN_OR_RETURN(Return r, DecodeReturn(bytes));
        --inflight;
        RETURN_IF_ERROR(ApplyReturn(r));
        continue;
      }
      // Idle: a keep-alive now and then keeps downstream receives within their deadline.
      if (!last && (absl::Now() - last_sent > absl::Seconds(1) || !mb.release.empty())) {
        MicroBatch idle;
        idle.kind = BatchKind::kIdle;
        idle.tick = tick;
        idle.placement_version = placement_version_.load();
        idle.release = std::move(mb.release);
        RETURN_IF_ERROR(Send(1, Encode(idle)));
        ++inflight;
        last_sent = absl::Now();
      } else {
        release_.insert(release_.end(), mb.release.begin(), mb.release.end());
      }
      t0 = absl::Now();
      absl::SleepFor(absl::Milliseconds(5));
      Add(&t_.idle, Seconds(t0));
      continue;
    }
    // A work step (this lane may have zero tokens).
    mb.kind = BatchKind::kWork;
    mb.tick = tick++;
    int64_t T = 0;
    for (const auto& m : mb.segments) T += m.n;
    active_ = static_cast<int64_t>(seqs_.size());
    const float* dev_hidden = nullptr;
    if (gpu_ != nullptr) {
      RETURN_IF_ERROR(GpuStep(gsegs, nullptr, false, &hidden, device_pipeline() ? &dev_hidden : nullptr));
    } else {
      t0 = absl::Now();
      engine_->Embed(segs, &hidden);
      Add(&t_.embed_head, Seconds(t0));
      RETURN_IF_ERROR(engine_->RunLayers(segs, &hidden));
      AccountMoeTimes();
    }
    ++steps_;
    tokens_ += T;
    if (last) {
      RETURN_IF_ERROR(ApplyReturn(HeadAndSample(mb, segs, hidden)));
      continue;
    }
    if (dev_hidden == nullptr) mb.hidden = std::move(hidden);
    RETURN_IF_ERROR(Send(1, Encode(mb)));
    if (dev_hidden != nullptr) RETURN_IF_ERROR(SendDeviceHidden(1, dev_hidden, T));
    hidden.clear();
    ++inflight;
    last_sent = absl::Now();
    if (inflight >= plan_.pp) {
      ASSIGN_OR_RETURN(std::string bytes, Recv(plan_.pp - 1));
      ASSIGN_OR_RETURN(Return r, DecodeReturn(bytes));
      --inflight;
      RETURN_IF_ERROR(ApplyReturn(r));
    }
  }
}

// ------------------------------------------------------------ stages 1..P-1

absl::Status Worker::RunDownstream() {
  const bool last = stage_ == plan_.pp - 1;
  std::map<uint64_t, SequenceCache> caches;
  std::map<uint64_t, CudaSequence> gcaches;  // --device cuda
  const int64_t H = cfg_.hidden_size;
  while (true) {
    ASSIGN_OR_RETURN(std::string bytes, Recv(stage_ - 1));
    // With the device data plane the hidden states follow separately, GPU to GPU.
    ASSIGN_OR_RETURN(MicroBatch mb, DecodeMicroBatch(bytes, device_pipeline() ? 0 : H));
    if (mb.placement_version > placement_version_.load()) RETURN_IF_ERROR(SwitchPlacement(mb.placement_version));
    for (uint64_t k : mb.release) {
      caches.erase(k);
      gcaches.erase(k);
    }
    active_ = static_cast<int64_t>(caches.size() + gcaches.size());
    if (mb.kind == BatchKind::kStop) {
      if (!last) RETURN_IF_ERROR(Send(stage_ + 1, bytes));
      LOG(INFO) << "worker " << worker_id_ << ": stopping";
      return absl::OkStatus();
    }
    if (mb.kind == BatchKind::kIdle) {
      if (last) {
        Return r;
        r.kind = BatchKind::kIdle;
        r.tick = mb.tick;
        RETURN_IF_ERROR(Send(0, Encode(r)));
      } else {
        RETURN_IF_ERROR(Send(stage_ + 1, bytes));
      }
      continue;
    }
    std::vector<Segment> segs;
    std::vector<CudaEngine::Segment> gsegs;
    int64_t T = 0;
    for (const auto& m : mb.segments) {
      T += m.n;
      if (gpu_ != nullptr) {
        auto it = gcaches.find(m.key);
        if (it == gcaches.end()) {
          if (m.start != 0) {
            return absl::DataLossError(absl::StrCat("stage ", stage_, ": sequence ", m.key, " continues at ", m.start,
                                                    " but this stage has no cache for it"));
          }
          it = gcaches.emplace(m.key, CudaSequence(gpu_.get())).first;
        } else if (it->second.length() != m.start) {
          return absl::DataLossError(absl::StrCat("stage ", stage_, ": sequence ", m.key, " at ", m.start,
                                                  " but this stage cached ", it->second.length(), " tokens"));
        }
        gsegs.push_back({it->second.id(), nullptr, m.n});
        continue;
      }
      auto it = caches.find(m.key);
      if (it == caches.end()) {
        if (m.start != 0) {
          return absl::DataLossError(absl::StrCat("stage ", stage_, ": sequence ", m.key, " continues at ", m.start,
                                                  " but this stage has no cache for it"));
        }
        it = caches.emplace(m.key, engine_->NewCache()).first;
      } else if (it->second.length != m.start) {
        return absl::DataLossError(absl::StrCat("stage ", stage_, ": sequence ", m.key, " at ", m.start,
                                                " but this stage cached ", it->second.length, " tokens"));
      }
      segs.push_back({&it->second, nullptr, m.n});
    }
    active_ = static_cast<int64_t>(caches.size() + gcaches.size());
    const float* dev_hidden = nullptr;
    if (gpu_ != nullptr) {
      const float* in = mb.hidden.data();
      if (device_pipeline()) {
        ASSIGN_OR_RETURN(in, RecvDeviceHidden(stage_ - 1, T));
      }
      std::vector<float> out;
      RETURN_IF_ERROR(GpuStep(gsegs, in, device_pipeline(), &out, device_pipeline() && !last ? &dev_hidden : nullptr));
      if (!last && dev_hidden == nullptr) mb.hidden = std::move(out);
    } else {
      RETURN_IF_ERROR(engine_->RunLayers(segs, &mb.hidden));
      AccountMoeTimes();
    }
    ++steps_;
    tokens_ += T;
    if (last) {
      RETURN_IF_ERROR(Send(0, Encode(HeadAndSample(mb, segs, mb.hidden))));
    } else {
      RETURN_IF_ERROR(Send(stage_ + 1, Encode(mb)));
      if (dev_hidden != nullptr) RETURN_IF_ERROR(SendDeviceHidden(stage_ + 1, dev_hidden, T));
    }
  }
}

bool Worker::Recoverable(const absl::Status& s) {
  if (o_.backend == "mpi") return false;  // under mpirun a lost process ends the job
  if (leaving_.load()) return false;
  std::lock_guard<std::mutex> l(dp_mu_);
  if (!fatal_.ok()) return false;
  if (dp_stale_) return true;
  // A failed exchange leaves its communicator broken; other errors (a lost
  // coordinator, corrupt messages) are not the data plane's.
  for (comm::Communicator* c : CommsLocked()) {
    if (c != nullptr && !c->health().ok()) return true;
  }
  return absl::IsAborted(s);  // Sync: the generation moved on
}

absl::StatusOr<bool> Worker::Rejoin(const absl::Status& why) {
  const absl::Time t0 = absl::Now();
  int64_t failed = 0;
  {
    std::lock_guard<std::mutex> l(dp_mu_);
    failed = dp_generation_;
  }
  LOG(WARNING) << "worker " << worker_id_ << ": data plane of generation " << failed << " failed (" << why.message()
               << "); dropping " << seqs_.size() << " sequences and waiting for the cluster to be complete again";
  TearDownDataPlane(why);
  seqs_.clear();  // the coordinator put them back in its queue
  release_.clear();
  updates_.clear();
  active_ = 0;
  v1::RegisterRequest req = MakeRegisterRequest(worker_id_);
  req.set_rejoin_after_generation(failed);
  absl::StatusOr<v1::RegisterResponse> reg = client_.Register(req, absl::Now() + o_.rejoin_timeout);
  if (!reg.ok()) {
    if (shutdown_.load() && fatal_.ok()) return false;  // the cluster was shut down meanwhile
    return absl::UnavailableError(absl::StrCat("rejoining after the data plane failed: ", reg.status().message()));
  }
  ASSIGN_OR_RETURN(topology::Plan plan, PlanFromRegister(reg->plan()));
  const int64_t committed = std::max<int64_t>(1, reg->plan().placement_version());
  if (committed > placement_version_.load() && staged_version_.load() == committed) {
    // Committed while this worker waited for the stage to switch: no step runs now.
    RETURN_IF_ERROR(SwitchPlacement(committed));
  }
  if (reg->worker_id() != worker_id_ || plan.ToJson() != plan_.ToJson()) {
    return absl::FailedPreconditionError("rejoining: the coordinator has another plan or place for this worker");
  }
  committed_placement_ = committed;
  epoch_ = reg->epoch();
  {
    std::lock_guard<std::mutex> l(dp_mu_);
    dp_epoch_ = reg->epoch();
    dp_generation_ = reg->generation();
    dp_stale_ = false;
  }
  RETURN_IF_ERROR(BuildDataPlane());
  LOG(INFO) << "worker " << worker_id_ << ": data plane rebuilt for generation " << reg->generation() << " in "
            << absl::FormatDuration(absl::Now() - t0);
  return true;
}

absl::Status Worker::Run() {
  absl::Status s = Setup();
  while (s.ok()) {
    s = stage_ == 0 ? RunStage0() : RunDownstream();
    if (s.ok() || !Recoverable(s)) break;
    absl::StatusOr<bool> again = Rejoin(s);
    s = again.status();
    if (s.ok() && !*again) break;  // shut down while waiting to rejoin
  }
  if (leaving_.load()) {
    LOG(INFO) << "worker " << worker_id_ << ": left the cluster on request";
    s = absl::OkStatus();
  }
  if (!s.ok()) AbortDataPlane(s);
  {
    std::lock_guard<std::mutex> l(dp_mu_);
    if (!fatal_.ok()) s = fatal_;
  }
  if (o_.serving != nullptr) *o_.serving = false;
  StopHeartbeats();
  JoinLoader();
  return s;
}

}  // namespace

absl::Status RunWorker(const WorkerOptions& options) {
  Worker w(options);
  return w.Run();
}

}  // namespace expertmesh::worker::runtime
