#include "worker/runtime/stage_loop.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "glog/logging.h"

namespace expertmesh::worker::runtime {

namespace {

absl::Status SendMessage(comm::Communicator* c, int peer, const std::string& bytes, absl::Duration timeout) {
  const uint64_t n = bytes.size();
  comm::Batch b;
  b.Send(peer, &n, sizeof(n));
  b.Send(peer, bytes.data(), bytes.size());
  return c->Run(b, absl::Now() + timeout);
}

}  // namespace

StageLoop::StageLoop(const Options& options, ControlSession* session, DataPlane* data_plane,
                     StageExecutor* executor, PlacementStager* stager, Scheduler* scheduler, StageStats* stats)
    : o_(options), session_(session), dp_(data_plane), exec_(executor), stager_(stager), sched_(scheduler),
      stats_(stats) {}

absl::StatusOr<std::string> StageLoop::Recv(int peer) {
  // The size header arrives when the peer is done with its step: waiting for
  // it is idle time; the body that follows is transfer.
  const absl::Time t0 = absl::Now();
  uint64_t n = 0;
  comm::Batch b;
  b.Recv(peer, &n, sizeof(n));
  b.patient = true;  // waits for the peer's whole step, or for work
  RETURN_IF_ERROR(dp_->lane()->Run(b, absl::Now() + o_.step_timeout));
  const absl::Time t1 = absl::Now();
  AddTime(&stats_->times.idle, absl::ToDoubleSeconds(t1 - t0));
  if (n > (1ull << 34)) return absl::DataLossError(absl::StrCat("message of ", n, " bytes announced: corrupt"));
  std::string bytes(n, '\0');
  b.Clear();
  b.Recv(peer, bytes.data(), n);
  RETURN_IF_ERROR(dp_->lane()->Run(b, absl::Now() + o_.step_timeout));
  AddTime(&stats_->times.transfer, SecondsSince(t1));
  return bytes;
}

absl::Status StageLoop::Send(int peer, const std::string& bytes) {
  const absl::Time t0 = absl::Now();
  absl::Status s = SendMessage(dp_->lane(), peer, bytes, o_.step_timeout);
  AddTime(&stats_->times.transfer, SecondsSince(t0));
  return s;
}

absl::Status StageLoop::Switch(int64_t version) { return stager_->Switch(version); }

absl::Status StageLoop::Run() {
  if (o_.stage == 0) return RunStage0();
  return dp_->laneless() ? RunLaneless() : RunDownstream();
}

absl::Status StageLoop::TellLaneless(const MicroBatch& mb) {
  if (dp_->laneless_ranks().empty() || dp_->lane_leader() != static_cast<int>(o_.worker_id % o_.ep)) {
    return absl::OkStatus();
  }
  MicroBatch head;
  head.kind = mb.kind;
  head.tick = mb.tick;
  head.placement_version = mb.placement_version;
  const std::string bytes = Encode(head);
  const absl::Time t0 = absl::Now();
  for (int r : dp_->laneless_ranks()) RETURN_IF_ERROR(SendMessage(dp_->stage(), r, bytes, o_.step_timeout));
  AddTime(&stats_->times.transfer, SecondsSince(t0));
  return absl::OkStatus();
}

absl::Status StageLoop::RunLaneless() {
  const int leader = dp_->lane_leader();
  if (leader < 0 || dp_->stage() == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("worker ", o_.worker_id, ": no lane, and no lane in stage ",
                                                      o_.stage, " to follow"));
  }
  LOG(INFO) << "worker " << o_.worker_id << ": no pipeline lane in this generation (vacant places); serving stage "
            << o_.stage << "'s experts with zero tokens, led by EP rank " << leader;
  std::vector<float> hidden;
  while (true) {
    const absl::Time t0 = absl::Now();
    uint64_t n = 0;
    comm::Batch b;
    b.Recv(leader, &n, sizeof(n));
    b.patient = true;  // waits for the lane leader's micro-batch
    RETURN_IF_ERROR(dp_->stage()->Run(b, absl::Now() + o_.step_timeout));
    AddTime(&stats_->times.idle, SecondsSince(t0));
    if (n > (1u << 20)) return absl::DataLossError(absl::StrCat("message of ", n, " bytes announced: corrupt"));
    std::string bytes(n, '\0');
    b.Clear();
    b.Recv(leader, bytes.data(), n);
    RETURN_IF_ERROR(dp_->stage()->Run(b, absl::Now() + o_.step_timeout));
    ASSIGN_OR_RETURN(MicroBatch mb, DecodeMicroBatch(bytes, 0));
    if (mb.placement_version > stager_->placement_version()) RETURN_IF_ERROR(Switch(mb.placement_version));
    stats_->active = 0;
    if (mb.kind == BatchKind::kStop) {
      LOG(INFO) << "worker " << o_.worker_id << ": stopping";
      return absl::OkStatus();
    }
    if (mb.kind == BatchKind::kIdle) continue;
    hidden.clear();
    RETURN_IF_ERROR(exec_->Step(/*first=*/false, {}, &hidden));
    ++stats_->steps;
  }
}

absl::Status StageLoop::RunStage0() {
  const bool last = o_.pp == 1;
  // Elastic EP, pp > 1: a stage-0 worker without a lane (its lane lost a
  // place) gets no sequences from the coordinator; it agrees on every step
  // and runs its layers with zero tokens, sending nothing down.
  const bool laneless = dp_->laneless();
  if (laneless) {
    LOG(INFO) << "worker " << o_.worker_id << ": no pipeline lane in this generation (vacant places); serving "
              << "stage 0's experts with zero tokens";
  }
  const int E = static_cast<int>(o_.ep);
  StageTimes& t = stats_->times;
  int64_t inflight = 0;
  absl::Time last_sent = absl::Now();
  sched_->ResetSyncClock();
  uint64_t tick = 0;
  std::vector<float> hidden;
  bool want_stop = false;
  while (true) {
    if (session_->leaving()) return absl::CancelledError("leaving on request");
    // Sync with the coordinator at most every 20 ms while busy (each call is a
    // gRPC round trip); every loop while idle, so new work starts at once.
    absl::Time t0 = absl::Now();
    if ((sched_->empty() && !laneless) || t0 - last_sync_ >= absl::Milliseconds(20) || session_->shutdown()) {
      const bool busy = !sched_->empty();
      RETURN_IF_ERROR(sched_->Sync(&want_stop));
      last_sync_ = absl::Now();
      AddTime(busy ? &t.control : &t.idle, SecondsSince(t0));  // polling for work while idle is idle time
    }
    stats_->active = sched_->size();
    MicroBatch mb;
    std::vector<StepSegment> segs;
    if (!want_stop && !laneless) sched_->BuildMicroBatch(&mb, &segs);
    mb.release = sched_->TakeReleases();
    // Agree with the other EP ranks of stage 0: work anywhere -> everyone runs
    // the layers; stop only when everyone is drained.
    // The 4th value: the placement version this rank can run from this step
    // on (the committed one once its experts are staged); all switch to the
    // smallest, so at the same step.
    const int64_t active = stager_->placement_version();
    const int64_t offer = stager_->OfferVersion(sched_->committed_placement());
    int32_t mine[4] = {mb.segments.empty() ? 0 : 1, want_stop ? 1 : 0, inflight == 0 ? 1 : 0,
                       static_cast<int32_t>(offer)};
    constexpr int kAgree = 4;
    std::vector<int32_t> gathered(kAgree * E);
    if (dp_->stage() != nullptr) {
      t0 = absl::Now();
      RETURN_IF_ERROR(dp_->stage()->AllGather(mine, gathered.data(), sizeof(mine), comm::MemoryKind::kHost,
                                              absl::Now() + o_.step_timeout));
      AddTime(&t.idle, SecondsSince(t0));
    } else {
      std::memcpy(gathered.data(), mine, sizeof(mine));
    }
    bool any_work = false, any_stop = false, all_drained = true;
    int64_t agreed = offer;
    for (int r = 0; r < E; ++r) {
      // A vacant rank (elastic EP, comm/vacant_communicator.h) reads as
      // zeros; a live rank offers a placement version >= 1. No vote.
      if (gathered[kAgree * r + 3] == 0) continue;
      any_work |= gathered[kAgree * r] != 0;
      any_stop |= gathered[kAgree * r + 1] != 0;
      all_drained &= gathered[kAgree * r + 2] != 0;
      agreed = std::min<int64_t>(agreed, gathered[kAgree * r + 3]);
    }
    if (agreed > active) RETURN_IF_ERROR(Switch(agreed));
    mb.placement_version = stager_->placement_version();
    if (any_stop && !any_work && all_drained) {
      if (!last && !laneless) {
        mb.kind = BatchKind::kStop;
        RETURN_IF_ERROR(Send(1, Encode(mb)));
      }
      LOG(INFO) << "worker " << o_.worker_id << ": stopping after " << tick << " steps";
      return absl::OkStatus();
    }
    if (!any_work) {
      if (inflight > 0) {  // drain: wait for a return (releases go out with a later micro-batch)
        sched_->DeferReleases(mb.release);
        ASSIGN_OR_RETURN(std::string bytes, Recv(o_.pp - 1));
        ASSIGN_OR_RETURN(Return r, DecodeReturn(bytes));
        --inflight;
        sched_->ApplyReturn(r);
        continue;
      }
      // Idle: a keep-alive now and then keeps downstream receives within their deadline.
      if (!last && !laneless && (absl::Now() - last_sent > absl::Seconds(1) || !mb.release.empty())) {
        MicroBatch idle;
        idle.kind = BatchKind::kIdle;
        idle.tick = tick;
        idle.placement_version = stager_->placement_version();
        idle.release = std::move(mb.release);
        RETURN_IF_ERROR(Send(1, Encode(idle)));
        ++inflight;
        last_sent = absl::Now();
      } else {
        sched_->DeferReleases(mb.release);
      }
      t0 = absl::Now();
      absl::SleepFor(absl::Milliseconds(5));
      AddTime(&t.idle, SecondsSince(t0));
      continue;
    }
    // A work step (this lane may have zero tokens).
    mb.kind = BatchKind::kWork;
    mb.tick = tick++;
    int64_t T = 0;
    for (const auto& m : mb.segments) T += m.n;
    stats_->active = sched_->size();
    RETURN_IF_ERROR(exec_->Step(/*first=*/true, segs, &hidden));
    ++stats_->steps;
    stats_->tokens += T;
    if (last) {
      sched_->ApplyReturn(exec_->Sample(mb));
      continue;
    }
    if (laneless) continue;
    const bool on_device = exec_->device_hidden();
    mb.hidden = std::move(hidden);  // empty when the hidden states stayed on the device
    RETURN_IF_ERROR(Send(1, Encode(mb)));
    if (on_device) RETURN_IF_ERROR(exec_->SendHidden(1, T));
    hidden.clear();
    ++inflight;
    last_sent = absl::Now();
    if (inflight >= o_.pp) {
      ASSIGN_OR_RETURN(std::string bytes, Recv(o_.pp - 1));
      ASSIGN_OR_RETURN(Return r, DecodeReturn(bytes));
      --inflight;
      sched_->ApplyReturn(r);
    }
  }
}

absl::Status StageLoop::RunDownstream() {
  const int stage = o_.stage;
  const bool last = stage == o_.pp - 1;
  std::map<uint64_t, StageCache> caches;
  while (true) {
    ASSIGN_OR_RETURN(std::string bytes, Recv(stage - 1));
    // With the device data plane the hidden states follow separately, GPU to GPU.
    const bool on_device = exec_->device_hidden();
    ASSIGN_OR_RETURN(MicroBatch mb, DecodeMicroBatch(bytes, on_device ? 0 : o_.hidden_size));
    if (mb.placement_version > stager_->placement_version()) RETURN_IF_ERROR(Switch(mb.placement_version));
    for (uint64_t k : mb.release) caches.erase(k);
    stats_->active = static_cast<int64_t>(caches.size());
    RETURN_IF_ERROR(TellLaneless(mb));  // before our layers: the lane-less ranks join their all-to-alls
    if (mb.kind == BatchKind::kStop) {
      if (!last) RETURN_IF_ERROR(Send(stage + 1, bytes));
      LOG(INFO) << "worker " << o_.worker_id << ": stopping";
      return absl::OkStatus();
    }
    if (mb.kind == BatchKind::kIdle) {
      if (last) {
        Return r;
        r.kind = BatchKind::kIdle;
        r.tick = mb.tick;
        RETURN_IF_ERROR(Send(0, Encode(r)));
      } else {
        RETURN_IF_ERROR(Send(stage + 1, bytes));
      }
      continue;
    }
    std::vector<StepSegment> segs;
    int64_t T = 0;
    for (const auto& m : mb.segments) {
      T += m.n;
      auto it = caches.find(m.key);
      if (it == caches.end()) {
        if (m.start != 0) {
          return absl::DataLossError(absl::StrCat("stage ", stage, ": sequence ", m.key, " continues at ", m.start,
                                                  " but this stage has no cache for it"));
        }
        it = caches.emplace(m.key, exec_->NewCache()).first;
      } else if (it->second.length() != m.start) {
        return absl::DataLossError(absl::StrCat("stage ", stage, ": sequence ", m.key, " at ", m.start,
                                                " but this stage cached ", it->second.length(), " tokens"));
      }
      segs.push_back({&it->second, nullptr, m.n});
    }
    stats_->active = static_cast<int64_t>(caches.size());
    if (on_device) RETURN_IF_ERROR(exec_->RecvHidden(stage - 1, T));
    RETURN_IF_ERROR(exec_->Step(/*first=*/false, segs, &mb.hidden));
    ++stats_->steps;
    stats_->tokens += T;
    if (last) {
      RETURN_IF_ERROR(Send(0, Encode(exec_->Sample(mb))));
    } else {
      RETURN_IF_ERROR(Send(stage + 1, Encode(mb)));
      if (on_device) RETURN_IF_ERROR(exec_->SendHidden(stage + 1, T));
    }
  }
}

}  // namespace expertmesh::worker::runtime
