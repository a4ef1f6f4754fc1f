// The scheduler part of the Coordinator (contract: coordinator/scheduler.h).
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "coordinator/coordinator.h"
#include "coordinator/job_store.h"
#include "coordinator/scheduler.h"
#include "glog/logging.h"
#include "topology/lanes.h"

namespace expertmesh::coordinator {

void Coordinator::Requeue(Job* j, int index) {
  Sequence& s = j->seqs[static_cast<size_t>(index)];
  if (s.state != SeqState::kAssigned) return;
  if (s.worker >= 0) workers_[static_cast<size_t>(s.worker)].assigned.erase(absl::StrCat(j->id, "/", index));
  // The tokens generated so far stay: the next worker resumes after them
  // (SequenceAssignment.resume_tokens), so none is generated twice or lost.
  s.state = SeqState::kQueued;
  s.worker = -1;
  --j->num_assigned;
  --running_;
  ++queued_;
  queue_.emplace_front(j, index);
  UpdateJobState(j, NowMs());
  changed_.notify_all();
}

void Coordinator::RevokeSequences(int worker_id, bool tell_worker) {
  Worker& w = workers_[static_cast<size_t>(worker_id)];
  std::vector<std::pair<Job*, int>> back;
  for (const std::string& id : w.assigned) {
    Job* j = nullptr;
    int index = 0;
    if (ParseSeqId(id, &j, &index) && j->seqs[static_cast<size_t>(index)].state == SeqState::kAssigned &&
        j->seqs[static_cast<size_t>(index)].worker == worker_id) {
      back.emplace_back(j, index);
    }
    if (tell_worker) w.pending_cancel.push_back(id);
  }
  if (back.empty()) return;
  LOG(WARNING) << "coordinator: " << back.size() << " sequences of worker " << worker_id
               << " go back to the queue and resume after their generated tokens";
  // Requeue pushes to the front: newest first, so the oldest ends up in front.
  std::sort(back.begin(), back.end(), [](const auto& a, const auto& b) {
    if (a.first->submitted_ms != b.first->submitted_ms) return a.first->submitted_ms > b.first->submitted_ms;
    if (a.first->id != b.first->id) return a.first->id > b.first->id;
    return a.second > b.second;
  });
  for (auto& [j, index] : back) Requeue(j, index);
  w.assigned.clear();
}

absl::StatusOr<v1::SyncResponse> Coordinator::Sync(const v1::SyncRequest& request) {
  std::unique_lock<std::mutex> lock(mu_);
  v1::SyncResponse resp;
  resp.set_epoch(epoch_);
  resp.set_shutdown(shutdown_requested_);
  resp.set_generation(generation_);
  resp.set_placement_version(placement_version_);
  if (request.epoch() != epoch_) return resp;  // drop everything, sync again
  const int id = request.worker_id();
  if (id < 0 || id >= static_cast<int>(workers_.size()) || !workers_[static_cast<size_t>(id)].registered) {
    return absl::NotFoundError(absl::StrCat("worker_id: ", id, " is not registered with this coordinator (epoch ",
                                            epoch_, "); call Register with worker_id=", id));
  }
  if (id >= plan_.ep) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker_id: ", id, " is in stage ", id / plan_.ep, "; only stage-0 workers (ids 0..", plan_.ep - 1,
                     ") call Sync"));
  }
  {
    // Only the process that registered the place reports results for it (as
    // Heartbeat): a stale process of a replaced worker, or a forger, is refused.
    const Worker& w = workers_[static_cast<size_t>(id)];
    if (request.pid() != w.pid || request.host() != w.host) {
      return absl::FailedPreconditionError(absl::StrCat(
          "worker_id: ", id, " is now held by ", w.host, ":", w.pid, ", not by ",
          request.host().empty() && request.pid() == 0 ? std::string("a sender without host and pid")
                                                       : absl::StrCat(request.host(), ":", request.pid()),
          "; its Sync is refused (a worker replaced after it went MISSING must exit)"));
    }
  }
  if (request.generation() != generation_) return resp;  // rebuild the data plane first
  // Check every update before applying any: a token outside the vocabulary
  // never becomes part of a result (a worker bug, or a forged report).
  const int64_t vocab = config_.vocab_size;
  for (int i = 0; i < request.updates_size(); ++i) {
    const v1::SequenceUpdate& u = request.updates(i);
    for (int k = 0; k < u.new_tokens_size(); ++k) {
      const int32_t t = u.new_tokens(k);
      if (t < 0 || t >= vocab) {
        LOG(WARNING) << "coordinator: worker " << id << " reported token " << t << " for " << u.seq_id()
                     << ", outside the vocabulary; the Sync is refused";
        return absl::InvalidArgumentError(absl::StrCat("updates[", i, "] (seq ", u.seq_id(), ").new_tokens[", k,
                                                       "]: ", t, " is out of range [0, ", vocab,
                                                       "); the whole Sync is refused"));
      }
    }
  }
  Worker& w = workers_[static_cast<size_t>(id)];
  const int64_t now = NowMs();
  for (const v1::SequenceUpdate& u : request.updates()) {
    Job* j = nullptr;
    int index = 0;
    if (!ParseSeqId(u.seq_id(), &j, &index) || j->seqs[static_cast<size_t>(index)].state != SeqState::kAssigned ||
        j->seqs[static_cast<size_t>(index)].worker != id) {
      VLOG(1) << "coordinator: ignoring an update for " << u.seq_id() << " from worker " << id << " (not assigned to it)";
      continue;
    }
    Sequence& s = j->seqs[static_cast<size_t>(index)];
    const v1::SequenceRequest& req = j->request.sequences(index);
    const size_t room = static_cast<size_t>(req.max_new_tokens()) - std::min(s.tokens.size(), size_t(req.max_new_tokens()));
    const size_t take = std::min(room, static_cast<size_t>(u.new_tokens_size()));
    if (take < static_cast<size_t>(u.new_tokens_size())) {
      LOG(WARNING) << "coordinator: worker " << id << " sent tokens past max_new_tokens for " << u.seq_id()
                   << "; truncated";
    }
    s.tokens.insert(s.tokens.end(), u.new_tokens().begin(), u.new_tokens().begin() + static_cast<int>(take));
    Publish(&s, s.tokens);
    j->generated_tokens += static_cast<int64_t>(take);
    v1::FinishReason reason = u.finish_reason();
    if (reason == v1::FINISH_REASON_UNSPECIFIED && s.tokens.size() >= static_cast<size_t>(req.max_new_tokens())) {
      reason = v1::FINISH_REASON_LENGTH;
    }
    if (reason == v1::FINISH_REASON_CANCELLED) {
      // The worker gave the sequence back (had it been cancelled here, it would no longer be assigned).
      Requeue(j, index);
      continue;
    }
    if (reason != v1::FINISH_REASON_UNSPECIFIED) {
      std::vector<int32_t> tokens = s.tokens;  // FinishSequence accounts for the tokens counted so far
      FinishSequence(j, index, std::move(tokens), reason, now, u.error());
    }
  }
  // Results are written with the next group commit; Sync answers once they are
  // durable (waiting without mu_). A failure is logged; the results stay in
  // memory and a restart regenerates them.
  const uint64_t ticket = EnqueuePendingRecordsLocked();
  for (auto& c : w.pending_cancel) resp.add_cancel(std::move(c));
  w.pending_cancel.clear();
  // Elastic EP with pp > 1: only stage-0 workers with a pipeline lane get
  // sequences (topology/lanes.h); a lane-less one serves its stage's experts.
  const topology::Lanes lanes = topology::ComputeLanes(plan_.pp, plan_.ep, VacantIdsLocked());
  auto has_lane = [&](int i) { return lanes.lane_of[static_cast<size_t>(i)] >= 0; };
  if (!shutdown_requested_ && Live(w) && has_lane(id) && request.free_slots() > 0 && queued_ > 0) {
    int64_t live0 = 0, held0 = 0;
    for (int i = 0; i < plan_.ep; ++i) {
      const Worker& x = workers_[static_cast<size_t>(i)];
      if (!Live(x) || !has_lane(i)) continue;
      ++live0;
      held0 += static_cast<int64_t>(x.assigned.size());
    }
    const int64_t share = FairShare(queued_, held0, live0);
    int64_t give = std::min<int64_t>({request.free_slots(), queued_, share - static_cast<int64_t>(w.assigned.size())});
    while (give > 0 && !queue_.empty()) {
      auto [j, index] = queue_.front();
      queue_.pop_front();
      Sequence& s = j->seqs[static_cast<size_t>(index)];
      if (s.state != SeqState::kQueued || Final(*j)) continue;
      s.state = SeqState::kAssigned;
      s.worker = id;
      --queued_;
      ++running_;
      ++j->num_assigned;
      UpdateJobState(j, now);
      const std::string seq_id = absl::StrCat(j->id, "/", index);
      w.assigned.insert(seq_id);
      v1::SequenceAssignment* a = resp.add_assign();
      a->set_seq_id(seq_id);
      *a->mutable_request() = j->request.sequences(index);
      *a->mutable_resume_tokens() = {s.tokens.begin(), s.tokens.end()};
      --give;
    }
  }
  changed_.notify_all();
  lock.unlock();
  WaitJournal(ticket).IgnoreError();
  return resp;
}

}  // namespace expertmesh::coordinator
