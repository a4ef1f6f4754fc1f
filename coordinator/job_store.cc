// The job store part of the Coordinator (contract: coordinator/job_store.h).
#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "coordinator/coordinator.h"
#include "coordinator/job_store.h"
#include "coordinator/journal_records.pb.h"
#include "coordinator/validation.h"
#include "glog/logging.h"
#include "google/protobuf/util/message_differencer.h"

namespace expertmesh::coordinator {

bool Coordinator::Final(const Job& j) const { return IsFinalState(j.state); }

void Coordinator::BecameFinal(Job* j) { final_by_time_.emplace(j->finished_ms, j); }

void Coordinator::CountJournalRecord(Job* j, size_t payload_bytes) {
  const int64_t n = Journal::kRecordHeaderBytes + static_cast<int64_t>(payload_bytes);
  j->journal_bytes += n;
  live_journal_bytes_ += n;
}

void Coordinator::UpdateJobState(Job* j, int64_t now_ms) {
  if (Final(*j)) return;
  if (j->num_done == static_cast<int>(j->seqs.size())) {
    j->state = v1::JOB_STATE_SUCCEEDED;
    j->finished_ms = now_ms;
    BecameFinal(j);
  } else if (j->num_done > 0 || j->num_assigned > 0) {
    j->state = v1::JOB_STATE_RUNNING;
  } else {
    j->state = v1::JOB_STATE_QUEUED;
  }
}

void Coordinator::FinishSequence(Job* j, int index, std::vector<int32_t> tokens, v1::FinishReason reason,
                                 int64_t now_ms, const std::string& error) {
  Sequence& s = j->seqs[static_cast<size_t>(index)];
  if (s.state == SeqState::kDone) return;
  Publish(&s, tokens);
  if (s.state == SeqState::kQueued) --queued_;
  if (s.state == SeqState::kAssigned) {
    --running_;
    --j->num_assigned;
    if (s.worker >= 0) workers_[static_cast<size_t>(s.worker)].assigned.erase(absl::StrCat(j->id, "/", index));
  }
  j->generated_tokens += static_cast<int64_t>(tokens.size()) - static_cast<int64_t>(s.tokens.size());
  s.state = SeqState::kDone;
  s.worker = -1;
  s.tokens.clear();
  ++j->num_done;
  v1::SequenceResult r;
  r.set_index(index);
  r.mutable_tokens()->Add(tokens.begin(), tokens.end());
  r.set_finish_reason(reason);
  if (reason == v1::FINISH_REASON_ERROR) r.set_error(error);
  if (journal_ != nullptr && !replaying_) {
    JournalRecord rec;
    rec.set_unix_ms(now_ms);
    rec.set_job_id(j->id);
    SequenceFinished* f = rec.mutable_finished();
    f->set_index(index);
    *f->mutable_tokens() = r.tokens();
    f->set_finish_reason(reason);
    if (reason == v1::FINISH_REASON_ERROR) f->set_error(error);
    pending_records_.push_back(rec.SerializeAsString());
    CountJournalRecord(j, pending_records_.back().size());
  }
  j->results.push_back(std::move(r));
  j->result_ms.push_back(now_ms);
  if (reason != v1::FINISH_REASON_ERROR || Final(*j)) {
    UpdateJobState(j, now_ms);
    j->result_states.push_back(j->state);
    return;
  }
  // The job fails first, so every result below carries that state.
  j->state = v1::JOB_STATE_FAILED;
  j->error = absl::StrCat("sequence ", index, " failed: ", error);
  j->finished_ms = now_ms;
  BecameFinal(j);
  j->result_states.push_back(j->state);
  LOG(WARNING) << "coordinator: job " << j->id << " failed: " << j->error;
  for (int i = 0; i < static_cast<int>(j->seqs.size()); ++i) {
    Sequence& q = j->seqs[static_cast<size_t>(i)];
    if (q.state == SeqState::kDone) continue;
    if (q.state == SeqState::kAssigned && q.worker >= 0) {
      workers_[static_cast<size_t>(q.worker)].pending_cancel.push_back(absl::StrCat(j->id, "/", i));
    }
    std::vector<int32_t> partial = q.tokens;
    const bool saved = replaying_;
    replaying_ = true;  // the failed sequence's record covers these results
    FinishSequence(j, i, std::move(partial), v1::FINISH_REASON_CANCELLED, now_ms);
    replaying_ = saved;
  }
}

void Coordinator::CancelUnfinished(Job* j, int64_t now_ms) {
  // The job turns CANCELLED first, so every result below carries that state.
  j->state = v1::JOB_STATE_CANCELLED;
  j->finished_ms = now_ms;
  BecameFinal(j);
  for (int i = 0; i < static_cast<int>(j->seqs.size()); ++i) {
    Sequence& s = j->seqs[static_cast<size_t>(i)];
    if (s.state == SeqState::kDone) continue;
    if (s.state == SeqState::kAssigned && s.worker >= 0) {
      workers_[static_cast<size_t>(s.worker)].pending_cancel.push_back(absl::StrCat(j->id, "/", i));
    }
    std::vector<int32_t> partial = s.tokens;
    const bool saved = replaying_;
    replaying_ = true;  // the JobCancelled record covers these results
    FinishSequence(j, i, std::move(partial), v1::FINISH_REASON_CANCELLED, now_ms);
    replaying_ = saved;
  }
}

Coordinator::Job* Coordinator::FindAnyJob(const std::string& job_id) const {
  auto it = jobs_.find(job_id);
  return it == jobs_.end() ? nullptr : it->second.get();
}

Coordinator::Job* Coordinator::FindJob(const std::string& job_id) const {
  Job* j = FindAnyJob(job_id);
  return j != nullptr && j->pending_ticket == 0 ? j : nullptr;
}

bool Coordinator::ParseSeqId(const std::string& seq_id, Job** job, int* index) const {
  const size_t slash = seq_id.rfind('/');
  if (slash == std::string::npos) return false;
  Job* j = FindJob(seq_id.substr(0, slash));
  int i = 0;
  if (j == nullptr || !absl::SimpleAtoi(seq_id.substr(slash + 1), &i) || i < 0 ||
      i >= static_cast<int>(j->seqs.size())) {
    return false;
  }
  *job = j;
  *index = i;
  return true;
}

v1::Job Coordinator::JobProto(const Job& j, bool with_results) const {
  v1::Job p;
  p.set_job_id(j.id);
  p.set_state(j.state);
  p.set_client_request_id(j.client_request_id);
  p.set_num_sequences(static_cast<int32_t>(j.seqs.size()));
  p.set_num_finished(j.num_done);
  if (with_results) {
    std::vector<const v1::SequenceResult*> sorted;
    for (const auto& r : j.results) sorted.push_back(&r);
    std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->index() < b->index(); });
    for (auto* r : sorted) *p.add_results() = *r;
  }
  p.set_error(j.error);
  p.set_submitted_unix_ms(j.submitted_ms);
  p.set_finished_unix_ms(j.finished_ms);
  p.set_generated_tokens(j.generated_tokens);
  return p;
}

uint64_t Coordinator::EnqueuePendingRecordsLocked() {
  if (pending_records_.empty()) return 0;
  std::vector<std::string> records;
  records.swap(pending_records_);
  if (journal_ == nullptr || stopped_) return 0;
  absl::StatusOr<uint64_t> t = journal_->Enqueue(std::move(records));
  if (!t.ok()) {
    LOG(ERROR) << "coordinator: journal write failed: " << t.status();
    return 0;
  }
  return *t;
}

absl::Status Coordinator::WaitJournal(uint64_t ticket) {
  if (ticket == 0) return absl::OkStatus();
  absl::Status s = journal_->Wait(ticket);
  if (!s.ok()) LOG(ERROR) << "coordinator: journal write failed: " << s;
  return s;
}

absl::Status Coordinator::JobNotFound(const std::string& job_id) const {
  // Ids are handed out in order and never reused (compaction keeps a mark of
  // the last one), so a well-formed id below next_job_ that is not here was
  // forgotten by retention, even before a restart.
  int64_t n = 0;
  if (absl::StartsWith(job_id, "job-") && absl::SimpleAtoi(job_id.substr(4), &n) && n >= 1 && n < next_job_ &&
      job_id == JobIdOf(n)) {
    const std::string now = options_.job_retention_s > 0 ? absl::StrCat(options_.job_retention_s, " s")
                                                           : "0 s = forever; it expired under an earlier setting";
    return absl::NotFoundError(absl::StrCat("job_id: job \"", job_id,
                                            "\" expired: jobs are forgotten, results included, once they have been "
                                            "final for the retention period (--job-retention-s, now ",
                                            now, ")"));
  }
  return absl::NotFoundError(absl::StrCat("job_id: no job \"", job_id, "\""));
}

std::optional<Coordinator::CompactionSnapshot> Coordinator::MaintainLocked() {
  const absl::Time now = absl::Now();
  if (now < next_maintenance_) return std::nullopt;
  next_maintenance_ = now + absl::Seconds(options_.monitor_interval_s);
  ExpireJobsLocked(absl::ToUnixMillis(now));
  return MaybeCompactJournalLocked();
}

int64_t Coordinator::ExpireJobsLocked(int64_t now_ms) {
  if (!(options_.job_retention_s > 0)) return 0;
  const int64_t cutoff = now_ms - static_cast<int64_t>(std::llround(options_.job_retention_s * 1000));
  std::unordered_set<const Job*> gone;
  while (!final_by_time_.empty() && final_by_time_.begin()->first <= cutoff) {
    gone.insert(final_by_time_.begin()->second);
    final_by_time_.erase(final_by_time_.begin());
  }
  if (gone.empty()) return 0;
  // Queue entries of final jobs are stale (skipped when popped) but point at
  // the jobs: they go first.
  queue_.erase(std::remove_if(queue_.begin(), queue_.end(), [&](const auto& e) { return gone.count(e.first) > 0; }),
               queue_.end());
  for (const Job* j : gone) {
    VLOG(1) << "coordinator: forgetting " << j->id << " (" << v1::JobState_Name(j->state) << " since "
            << absl::FormatTime(absl::FromUnixMillis(j->finished_ms)) << ")";
    job_order_.erase(j->order);
    auto r = by_request_id_.find(j->client_request_id);
    if (r != by_request_id_.end() && r->second == j->id) by_request_id_.erase(r);
    live_journal_bytes_ -= j->journal_bytes;
    const std::string id = j->id;
    jobs_.erase(id);  // destroys *j
  }
  VLOG(1) << "coordinator: forgot " << gone.size() << " jobs final for more than " << options_.job_retention_s
          << " s; " << jobs_.size() << " jobs kept";
  changed_.notify_all();
  return static_cast<int64_t>(gone.size());
}

std::optional<Coordinator::CompactionSnapshot> Coordinator::MaybeCompactJournalLocked() {
  if (journal_ == nullptr || stopped_ || compacting_) return std::nullopt;
  const int64_t now_ms = NowMs();
  if (now_ms < compact_retry_at_ms_) return std::nullopt;
  const int64_t size = journal_->size_bytes();
  const int64_t waste = size - live_journal_bytes_;
  const int64_t grown_at = std::max(options_.journal_compact_min_bytes, 2 * compacted_bytes_);
  std::string why;
  if (waste > 0 && waste >= std::max(options_.journal_compact_min_waste_bytes, size / 4)) {
    why = absl::StrCat("about ", waste, " bytes belong to forgotten jobs");
  } else if (size >= grown_at && size > 0) {
    if (waste < size / 8) {
      // Every record still belongs to a kept job: a rewrite would copy the
      // file and gain nothing. Look again when it has doubled.
      VLOG(1) << "coordinator: journal at " << size << " bytes, about " << waste
              << " reclaimable: not compacted";
      compacted_bytes_ = size;
      return std::nullopt;
    }
    why = absl::StrCat("grew past ", grown_at, " bytes, about ", waste, " bytes reclaimable");
  } else {
    return std::nullopt;
  }
  return TakeSnapshotLocked(why);
}

Coordinator::CompactionSnapshot Coordinator::TakeSnapshotLocked(const std::string& why) {
  compacting_ = true;
  CompactionSnapshot snap;
  snap.why = why;
  snap.started = absl::Now();
  snap.covers = journal_->BeginSnapshot();  // under mu_: the state below is that of every record enqueued so far
  snap.size_before = journal_->size_bytes();
  snap.live_before = live_journal_bytes_;
  snap.placement_version = placement_version_;
  if (placement_version_ > 1) snap.placement_record = PlacementRecord().SerializeAsString();
  // Per retained job, in submission order: what replays it as it is. Results
  // with finish reason CANCELLED come from CancelJob and are covered by its
  // JobCancelled record, as in the original journal.
  snap.jobs.reserve(job_order_.size());
  for (auto& entry : job_order_) {
    const Job* j = entry.second;
    CompactionSnapshot::JobRecords r;
    r.id = j->id;
    r.pending_ticket = j->pending_ticket;
    r.submitted = j->submitted_record;
    for (size_t i = 0; i < j->results.size(); ++i) {
      if (j->results[i].finish_reason() == v1::FINISH_REASON_CANCELLED) continue;
      r.results.emplace_back(j->results[i], j->result_ms[i]);
    }
    r.cancelled = j->state == v1::JOB_STATE_CANCELLED;
    r.finished_ms = j->finished_ms;
    r.bytes_before = j->journal_bytes;
    snap.jobs.push_back(std::move(r));
  }
  // The last id handed out, should its job be gone: a restart continues after it.
  const std::string last_id = JobIdOf(next_job_ - 1);
  if (next_job_ > 1 && FindAnyJob(last_id) == nullptr) {
    JournalRecord mark;
    mark.set_unix_ms(NowMs());
    mark.set_job_id(last_id);
    mark.mutable_cancelled();
    snap.id_mark = mark.SerializeAsString();
  }
  return snap;
}

absl::Status Coordinator::RunCompaction(CompactionSnapshot snap) {
  std::vector<Journal::SnapshotRecord> records;
  std::vector<int64_t> job_bytes(snap.jobs.size(), 0);
  int64_t live = 0, placement_bytes = 0;
  auto add = [&](std::string payload, uint64_t unless_failed, int64_t* bytes) {
    const int64_t n = Journal::kRecordHeaderBytes + static_cast<int64_t>(payload.size());
    records.push_back({std::move(payload), unless_failed});
    if (bytes != nullptr) *bytes += n;
    live += n;
  };
  if (!snap.placement_record.empty()) add(snap.placement_record, 0, &placement_bytes);  // before the jobs
  for (size_t k = 0; k < snap.jobs.size(); ++k) {
    const CompactionSnapshot::JobRecords& j = snap.jobs[k];
    // A job still being submitted keeps its record only if its write succeeds.
    add(*j.submitted, j.pending_ticket, &job_bytes[k]);
    for (const auto& [r, ms] : j.results) {
      JournalRecord rec;
      rec.set_unix_ms(ms);
      rec.set_job_id(j.id);
      SequenceFinished* f = rec.mutable_finished();
      f->set_index(r.index());
      *f->mutable_tokens() = r.tokens();
      f->set_finish_reason(r.finish_reason());
      add(rec.SerializeAsString(), 0, &job_bytes[k]);
    }
    if (j.cancelled) {
      JournalRecord rec;
      rec.set_unix_ms(j.finished_ms);
      rec.set_job_id(j.id);
      rec.mutable_cancelled();
      add(rec.SerializeAsString(), 0, &job_bytes[k]);
    }
  }
  if (!snap.id_mark.empty()) add(snap.id_mark, 0, nullptr);
  const size_t num_records = records.size();
  absl::Status s = journal_->RewriteSnapshot(records, snap.covers);
  records.clear();
  std::lock_guard<std::mutex> lock(mu_);
  compacting_ = false;
  if (!s.ok()) {
    compact_retry_at_ms_ = NowMs() + 60000;
    LOG(ERROR) << "coordinator: journal compaction failed (retrying in 60 s; the journal in use is complete): " << s;
    return s;
  }
  // The bytes the snapshot gave each job, plus what was journaled for it since.
  for (size_t k = 0; k < snap.jobs.size(); ++k) {
    Job* j = FindAnyJob(snap.jobs[k].id);
    if (j != nullptr) j->journal_bytes = job_bytes[k] + (j->journal_bytes - snap.jobs[k].bytes_before);
  }
  if (placement_version_ == snap.placement_version && placement_version_ > 1) {
    placement_record_bytes_ = placement_bytes;
  }
  live_journal_bytes_ = live + (live_journal_bytes_ - snap.live_before);
  compacted_bytes_ = journal_->size_bytes();
  ++compactions_;
  last_compaction_ = absl::Now() - snap.started;
  LOG(INFO) << "coordinator: compacted the journal " << journal_->path() << " (" << snap.why << "): "
            << snap.size_before << " -> " << compacted_bytes_ << " bytes, " << num_records << " records of "
            << snap.jobs.size() << " jobs, in " << absl::FormatDuration(last_compaction_);
  return absl::OkStatus();
}

Coordinator::JournalStats Coordinator::journal_stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  JournalStats st;
  if (journal_ == nullptr) return st;
  st.size_bytes = journal_->size_bytes();
  st.live_bytes = live_journal_bytes_;
  st.compacted_bytes = compacted_bytes_;
  st.compactions = compactions_;
  st.last_compaction = last_compaction_;
  return st;
}

absl::Status Coordinator::Replay(const std::vector<std::string>& records) {
  replaying_ = true;
  int64_t n = 0;
  for (const std::string& bytes : records) {
    ++n;
    JournalRecord rec;
    if (!rec.ParseFromString(bytes)) {
      replaying_ = false;
      return absl::DataLossError(absl::StrCat("record ", n, " is not a journal record"));
    }
    Job* j = FindJob(rec.job_id());
    // Ids are never reused: every record counts, including the JobCancelled
    // of a forgotten job that compaction keeps as the mark of the last id.
    int64_t num = 0;
    if (absl::StartsWith(rec.job_id(), "job-") && absl::SimpleAtoi(rec.job_id().substr(4), &num)) {
      next_job_ = std::max(next_job_, num + 1);
    }
    switch (rec.kind_case()) {
      case JournalRecord::kSubmitted: {
        if (j != nullptr) {
          LOG(WARNING) << "journal record " << n << ": job " << rec.job_id() << " submitted twice; ignored";
          break;
        }
        auto job = std::make_unique<Job>();
        job->id = rec.job_id();
        job->client_request_id = rec.submitted().client_request_id();
        job->submitted_ms = rec.unix_ms();
        job->submitted_record = std::make_shared<const std::string>(bytes);
        if (!job->request.ParseFromString(rec.submitted().request())) {
          replaying_ = false;
          return absl::DataLossError(absl::StrCat("record ", n, ": unreadable request of job ", rec.job_id()));
        }
        job->seqs.resize(static_cast<size_t>(job->request.sequences_size()));
        queued_ += job->request.sequences_size();  // queue_ entries are added after the replay
        if (!job->client_request_id.empty()) by_request_id_[job->client_request_id] = job->id;
        job->order = next_order_++;
        CountJournalRecord(job.get(), bytes.size());
        job_order_[job->order] = job.get();
        jobs_[job->id] = std::move(job);
        break;
      }
      case JournalRecord::kFinished: {
        const int index = rec.finished().index();
        if (j == nullptr || index < 0 || index >= static_cast<int>(j->seqs.size())) {
          LOG(WARNING) << "journal record " << n << ": result for unknown sequence " << rec.job_id() << "/" << index;
          break;
        }
        if (j->seqs[static_cast<size_t>(index)].state != SeqState::kDone) CountJournalRecord(j, bytes.size());
        std::vector<int32_t> tokens(rec.finished().tokens().begin(), rec.finished().tokens().end());
        FinishSequence(j, index, std::move(tokens), static_cast<v1::FinishReason>(rec.finished().finish_reason()),
                       rec.unix_ms(), rec.finished().error());
        break;
      }
      case JournalRecord::kCancelled:
        if (j != nullptr && !Final(*j)) {
          CountJournalRecord(j, bytes.size());
          CancelUnfinished(j, rec.unix_ms());
        } else if (j == nullptr) {
          live_journal_bytes_ += Journal::kRecordHeaderBytes + static_cast<int64_t>(bytes.size());  // the id mark
        }
        break;
      case JournalRecord::kPlacement:
        placement_record_bytes_ = Journal::kRecordHeaderBytes + static_cast<int64_t>(bytes.size());
        ReplayPlacement(rec.placement());
        break;
      default:
        LOG(WARNING) << "journal record " << n << ": unknown kind; ignored";
    }
  }
  replaying_ = false;
  // Unfinished jobs: check them against the current model, then queue what is left.
  const JobLimits limits{config_.vocab_size, config_.max_position_embeddings, INT32_MAX};
  const int64_t now = NowMs();
  for (auto& entry : job_order_) {
    Job* j = entry.second;
    if (Final(*j)) continue;
    absl::Status s = ValidateSubmitJob(j->request, limits);
    if (!s.ok()) {
      for (const Sequence& q : j->seqs) queued_ -= q.state == SeqState::kQueued ? 1 : 0;
      j->state = v1::JOB_STATE_FAILED;
      j->error = absl::StrCat("after a coordinator restart the job no longer fits the model: ", s.message());
      j->finished_ms = now;
      BecameFinal(j);
      LOG(WARNING) << "journal: job " << j->id << " failed: " << j->error;
      continue;
    }
    for (int i = 0; i < static_cast<int>(j->seqs.size()); ++i) {
      if (j->seqs[static_cast<size_t>(i)].state == SeqState::kQueued) queue_.emplace_back(j, i);
    }
    UpdateJobState(j, now);
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::SubmitJobResponse> Coordinator::SubmitJob(const v1::SubmitJobRequest& request) {
  std::unique_lock<std::mutex> lock(mu_);
  v1::SubmitJobResponse resp;
  while (true) {
    if (shutdown_requested_ || stopped_) {
      return absl::UnavailableError("the coordinator is shutting down; submit to its successor");
    }
    if (request.client_request_id().empty()) break;
    auto it = by_request_id_.find(request.client_request_id());
    if (it == by_request_id_.end()) break;
    const Job* known = FindAnyJob(it->second);
    if (known != nullptr && known->pending_ticket != 0) {
      // The same request is being written: answer once it is accepted (or not).
      changed_.wait(lock);
      continue;
    }
    if (known != nullptr && !google::protobuf::util::MessageDifferencer::Equals(known->request, request)) {
      // A retry carries the same request; another request under a used id is
      // a client bug that must not be answered with someone else's results.
      return absl::AlreadyExistsError(absl::StrCat(
          "client_request_id \"", request.client_request_id(), "\" was already used by job ", it->second,
          " with a different request; a retry must resend the same request, a new request needs a new id"));
    }
    resp.set_job_id(it->second);
    resp.set_deduplicated(true);
    return resp;
  }
  const JobLimits limits{config_.vocab_size, config_.max_position_embeddings, options_.max_sequences_per_job};
  RETURN_IF_ERROR(ValidateSubmitJob(request, limits));
  if (queued_ + request.sequences_size() > options_.max_queued_sequences) {
    return absl::ResourceExhaustedError(absl::StrCat("queue full: ", queued_, " sequences queued, the job adds ",
                                                     request.sequences_size(), ", the limit is ",
                                                     options_.max_queued_sequences, "; retry later"));
  }
  auto owned = std::make_unique<Job>();
  Job* job = owned.get();
  job->id = JobIdOf(next_job_);
  job->client_request_id = request.client_request_id();
  job->request = request;
  job->submitted_ms = NowMs();
  job->seqs.resize(static_cast<size_t>(request.sequences_size()));
  if (journal_ != nullptr) {
    JournalRecord rec;
    rec.set_unix_ms(job->submitted_ms);
    rec.set_job_id(job->id);
    rec.mutable_submitted()->set_client_request_id(job->client_request_id);
    rec.mutable_submitted()->set_request(request.SerializeAsString());
    job->submitted_record = std::make_shared<const std::string>(rec.SerializeAsString());
    absl::StatusOr<uint64_t> ticket = journal_->Enqueue({*job->submitted_record});
    if (!ticket.ok()) {
      LOG(ERROR) << "coordinator: cannot journal job " << job->id << ": " << ticket.status();
      return absl::UnavailableError(
          absl::StrCat("cannot journal the job, so it was not accepted: ", ticket.status().message()));
    }
    job->pending_ticket = *ticket;
    CountJournalRecord(job, job->submitted_record->size());
  }
  // The id and the queue room are taken now; the job is seen (FindJob, the
  // scheduler) only once its record is durable.
  ++next_job_;
  queued_ += request.sequences_size();
  if (!job->client_request_id.empty()) by_request_id_[job->client_request_id] = job->id;
  job->order = next_order_++;
  job_order_[job->order] = job;
  jobs_[job->id] = std::move(owned);
  if (job->pending_ticket != 0) {
    const uint64_t ticket = job->pending_ticket;
    const std::string id = job->id;
    lock.unlock();
    const absl::Status s = journal_->Wait(ticket);  // group commit, without mu_
    lock.lock();
    job = FindAnyJob(id);  // nothing removes a pending job but this call
    CHECK(job != nullptr) << id;
    job->pending_ticket = 0;
    if (!s.ok()) {
      LOG(ERROR) << "coordinator: cannot journal job " << id << ": " << s;
      queued_ -= request.sequences_size();
      live_journal_bytes_ -= job->journal_bytes;
      auto r = by_request_id_.find(job->client_request_id);
      if (r != by_request_id_.end() && r->second == id) by_request_id_.erase(r);
      job_order_.erase(job->order);
      jobs_.erase(id);
      changed_.notify_all();
      return absl::UnavailableError(absl::StrCat("cannot journal the job, so it was not accepted: ", s.message()));
    }
  }
  for (int i = 0; i < request.sequences_size(); ++i) queue_.emplace_back(job, i);
  resp.set_job_id(job->id);
  VLOG(1) << "coordinator: accepted " << job->id << " with " << request.sequences_size() << " sequences";
  changed_.notify_all();
  return resp;
}

absl::StatusOr<v1::Job> Coordinator::GetJob(const std::string& job_id) const {
  if (job_id.empty()) return absl::InvalidArgumentError("job_id: empty");
  std::lock_guard<std::mutex> lock(mu_);
  const Job* j = FindJob(job_id);
  if (j == nullptr) return JobNotFound(job_id);
  return JobProto(*j, /*with_results=*/true);
}

void Coordinator::Publish(Sequence* s, const std::vector<int32_t>& tokens) {
  if (tokens.size() > s->published.size()) {
    s->published.insert(s->published.end(), tokens.begin() + static_cast<std::ptrdiff_t>(s->published.size()),
                        tokens.end());
  }
}

std::optional<std::string> Coordinator::FindJobByRequestId(const std::string& client_request_id) const {
  if (client_request_id.empty()) return std::nullopt;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = by_request_id_.find(client_request_id);
  if (it == by_request_id_.end() || FindJob(it->second) == nullptr) return std::nullopt;
  return it->second;
}

absl::StatusOr<bool> Coordinator::WaitJobResults(const std::string& job_id, size_t* cursor, absl::Time deadline,
                                                 std::vector<v1::WatchJobResponse>* out,
                                                 std::vector<int64_t>* token_offsets) {
  if (job_id.empty()) return absl::InvalidArgumentError("job_id: empty");
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    // Looked up again after every wait: retention may forget the job meanwhile.
    const Job* j = FindJob(job_id);
    if (j == nullptr) return JobNotFound(job_id);
    bool any_delta = false;
    if (token_offsets != nullptr) {
      if (token_offsets->size() != j->seqs.size()) token_offsets->assign(j->seqs.size(), 0);
      v1::WatchJobResponse r;
      for (size_t i = 0; i < j->seqs.size(); ++i) {
        const std::vector<int32_t>& p = j->seqs[i].published;
        int64_t& off = (*token_offsets)[i];
        if (static_cast<int64_t>(p.size()) <= off) continue;
        v1::SequenceDelta* d = r.add_deltas();
        d->set_index(static_cast<int32_t>(i));
        d->set_offset(off);
        d->mutable_new_tokens()->Add(p.begin() + off, p.end());
        off = static_cast<int64_t>(p.size());
      }
      if (r.deltas_size() > 0) {
        r.set_state(j->state);
        out->push_back(std::move(r));
        any_delta = true;
      }
    }
    if (*cursor < j->results.size() || any_delta) {
      for (; *cursor < j->results.size(); ++*cursor) {
        v1::WatchJobResponse r;
        *r.mutable_result() = j->results[*cursor];
        r.set_state(j->result_states[*cursor]);
        out->push_back(std::move(r));
      }
      return Final(*j) && *cursor == j->results.size();
    }
    if (Final(*j)) return true;
    if (stopped_) return absl::UnavailableError("the coordinator is stopping; watch the job again after its restart");
    if (absl::Now() >= deadline) return false;
    changed_.wait_until(lock, absl::ToChronoTime(deadline));
  }
}

absl::StatusOr<v1::Job> Coordinator::CancelJob(const std::string& job_id) {
  if (job_id.empty()) return absl::InvalidArgumentError("job_id: empty");
  std::unique_lock<std::mutex> lock(mu_);
  Job* j = FindJob(job_id);
  if (j == nullptr) return JobNotFound(job_id);
  uint64_t ticket = 0;
  if (!Final(*j)) {
    const int64_t now = NowMs();
    if (journal_ != nullptr && !stopped_) {
      JournalRecord rec;
      rec.set_unix_ms(now);
      rec.set_job_id(j->id);
      rec.mutable_cancelled();
      const std::string payload = rec.SerializeAsString();
      absl::StatusOr<uint64_t> t = journal_->Enqueue({payload});
      if (!t.ok()) return absl::UnavailableError(absl::StrCat("cannot journal the cancellation: ", t.status().message()));
      ticket = *t;
      CountJournalRecord(j, payload.size());
    }
    // Applied with the record's place in the journal fixed (replay sees the
    // same order); acknowledged below once the record is durable.
    CancelUnfinished(j, now);
    LOG(INFO) << "coordinator: cancelled " << j->id;
    changed_.notify_all();
  }
  v1::Job resp = JobProto(*j, /*with_results=*/true);
  if (ticket != 0) {
    lock.unlock();
    absl::Status s = journal_->Wait(ticket);
    if (!s.ok()) return absl::UnavailableError(absl::StrCat("cannot journal the cancellation: ", s.message()));
  }
  return resp;
}

absl::Status Coordinator::StopSequence(const std::string& job_id, int index) {
  if (job_id.empty()) return absl::InvalidArgumentError("job_id: empty");
  std::unique_lock<std::mutex> lock(mu_);
  Job* j = FindJob(job_id);
  if (j == nullptr) return JobNotFound(job_id);
  if (index < 0 || index >= static_cast<int>(j->seqs.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("index: ", index, " is out of range [0, ", j->seqs.size(), ") for job ", job_id));
  }
  Sequence& s = j->seqs[static_cast<size_t>(index)];
  if (Final(*j) || s.state == SeqState::kDone) return absl::OkStatus();
  if (s.state == SeqState::kAssigned && s.worker >= 0) {
    workers_[static_cast<size_t>(s.worker)].pending_cancel.push_back(absl::StrCat(j->id, "/", index));
  }
  std::vector<int32_t> tokens = s.published;
  FinishSequence(j, index, std::move(tokens), v1::FINISH_REASON_STOP, NowMs());
  const uint64_t ticket = EnqueuePendingRecordsLocked();
  changed_.notify_all();
  lock.unlock();
  return WaitJournal(ticket);
}

absl::StatusOr<v1::ListJobsResponse> Coordinator::ListJobs(const v1::ListJobsRequest& request) const {
  if (request.limit() < 0) return absl::InvalidArgumentError(absl::StrCat("limit: ", request.limit(), " must be >= 0"));
  const size_t limit = request.limit() == 0 ? 100 : static_cast<size_t>(request.limit());
  std::lock_guard<std::mutex> lock(mu_);
  v1::ListJobsResponse resp;
  for (auto it = job_order_.rbegin(); it != job_order_.rend() && static_cast<size_t>(resp.jobs_size()) < limit; ++it) {
    if (it->second->pending_ticket != 0) continue;  // not accepted yet
    *resp.add_jobs() = JobProto(*it->second, /*with_results=*/false);
  }
  return resp;
}

std::map<v1::JobState, int64_t> Coordinator::JobCountsByState() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::map<v1::JobState, int64_t> n;
  for (const auto& [id, j] : jobs_) {
    if (j->pending_ticket == 0) ++n[j->state];
  }
  return n;
}

}  // namespace expertmesh::coordinator
