#include "coordinator/coordinator.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <random>
#include <sstream>
#include <unordered_set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "coordinator/journal_records.pb.h"
#include "coordinator/validation.h"
#include "glog/logging.h"
#include "nlohmann/json.hpp"
#include "topology/plan_proto.h"

namespace expertmesh::coordinator {
namespace {

constexpr int64_t kMaxStoreBytes = 64 << 20;
constexpr size_t kMaxStoreValue = 4 << 20;

int64_t NowMs() { return absl::ToUnixMillis(absl::Now()); }

std::string JobIdOf(int64_t n) { return absl::StrFormat("job-%06d", n); }

std::string NewEpoch() {
  std::random_device rd;
  const uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ static_cast<uint64_t>(absl::GetCurrentTimeNanos());
  return absl::StrFormat("%016x", v);
}

bool IsFinalState(v1::JobState s) {
  return s == v1::JOB_STATE_SUCCEEDED || s == v1::JOB_STATE_CANCELLED || s == v1::JOB_STATE_FAILED;
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// {"<layer>": [counts]} or ClusterStatus JSON {"expertLoad": [{"layer": L, "tokensPerExpert": [...]}]}.
absl::StatusOr<std::map<int64_t, std::vector<double>>> ReadExpertLoad(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", why,
                                                   "; expected {\"<layer>\": [tokens per expert]} or the output of "
                                                   "`expertmesh status --json`"));
  };
  if (j.is_discarded() || !j.is_object()) return bad("not a JSON object");
  auto number = [](const nlohmann::json& v, double* out) {
    if (v.is_number()) {
      *out = v.get<double>();
      return true;
    }
    return v.is_string() && absl::SimpleAtod(v.get<std::string>(), out);
  };
  std::map<int64_t, std::vector<double>> load;
  auto add = [&](int64_t layer, const nlohmann::json& arr) -> absl::Status {
    if (!arr.is_array()) return bad(absl::StrCat("layer ", layer, ": counts are not an array"));
    std::vector<double> v;
    for (const auto& x : arr) {
      double d = 0;
      if (!number(x, &d) || d < 0) return bad(absl::StrCat("layer ", layer, ": counts must be numbers >= 0"));
      v.push_back(d);
    }
    load[layer] = std::move(v);
    return absl::OkStatus();
  };
  const char* list_key = j.contains("expertLoad") ? "expertLoad" : (j.contains("expert_load") ? "expert_load" : nullptr);
  if (list_key != nullptr) {
    for (const auto& e : j[list_key]) {
      double layer = 0;
      if (!e.is_object() || !e.contains("layer") || !number(e["layer"], &layer)) return bad("entry without a layer");
      const char* k = e.contains("tokensPerExpert") ? "tokensPerExpert" : "tokens_per_expert";
      RETURN_IF_ERROR(add(static_cast<int64_t>(layer), e.value(k, nlohmann::json::array())));
    }
    return load;
  }
  for (auto it = j.begin(); it != j.end(); ++it) {
    int64_t layer = 0;
    if (!absl::SimpleAtoi(it.key(), &layer)) return bad(absl::StrCat("key \"", it.key(), "\" is not a layer index"));
    RETURN_IF_ERROR(add(layer, it.value()));
  }
  return load;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Create(const CoordinatorOptions& options) {
  std::unique_ptr<Coordinator> c(new Coordinator(options));
  RETURN_IF_ERROR(c->Init());
  return c;
}

Coordinator::~Coordinator() { Stop(); }

absl::Status Coordinator::Init() {
  const CoordinatorOptions& o = options_;
  if (o.checkpoint.empty()) return absl::InvalidArgumentError("--checkpoint DIR is required (the folder with config.json)");
  if (o.max_queued_sequences < 1 || o.max_sequences_per_job < 1) {
    return absl::InvalidArgumentError("--max-queued-sequences and --max-sequences-per-job must be >= 1");
  }
  if (!(o.heartbeat_timeout_s > 0) || !(o.register_timeout_s > 0) || !(o.startup_timeout_s > 0) ||
      !(o.shutdown_timeout_s >= 0) || !(o.monitor_interval_s > 0)) {
    return absl::InvalidArgumentError("coordinator timeouts must be > 0");
  }
  if (!(o.job_retention_s >= 0) || std::isinf(o.job_retention_s)) {
    return absl::InvalidArgumentError("--job-retention-s must be >= 0 seconds (0 keeps jobs forever)");
  }
  if (o.journal_compact_min_bytes < 0 || o.journal_compact_min_waste_bytes < 0) {
    return absl::InvalidArgumentError("journal compaction thresholds must be >= 0 bytes");
  }
  if (!(o.eplb_interval_s >= 0) || std::isinf(o.eplb_interval_s)) {
    return absl::InvalidArgumentError("--eplb-interval-s must be >= 0 seconds (0: rebalance only on request)");
  }
  if (!(o.eplb_min_gain >= 0 && o.eplb_min_gain < 1)) {
    return absl::InvalidArgumentError("--eplb-min-gain must be in [0, 1)");
  }
  if (o.eplb_min_tokens < 0) return absl::InvalidArgumentError("--eplb-min-tokens must be >= 0");
  const std::string config_path = o.checkpoint + "/config.json";
  ASSIGN_OR_RETURN(model_json_, ReadFile(config_path));
  ASSIGN_OR_RETURN(config_, ModelConfig::FromFile(config_path));
  topology::PlanOptions po;
  po.pp = o.pp;
  po.ep = o.ep;
  po.redundant_experts = o.redundant_experts;
  po.layers_per_stage = o.layers_per_stage;
  if (!o.expert_load_file.empty()) {
    ASSIGN_OR_RETURN(po.expert_load, ReadExpertLoad(o.expert_load_file));
  }
  ASSIGN_OR_RETURN(plan_, topology::BuildPlan(config_, po));
  plan_proto_ = PlanToProto(plan_, o.checkpoint, model_json_, placement_version_);
  workers_.resize(static_cast<size_t>(plan_.num_workers()));
  for (const auto& st : plan_.stages) {
    for (const auto& [layer, placement] : st.placement) {
      expert_load_[layer].assign(static_cast<size_t>(placement.num_experts()), 0);
    }
  }
  window_load_ = expert_load_;
  if (o.eplb_interval_s > 0) next_auto_rebalance_ = absl::Now() + absl::Seconds(o.eplb_interval_s);
  epoch_ = NewEpoch();
  if (!o.journal_path.empty()) {
    std::vector<std::string> records;
    ASSIGN_OR_RETURN(journal_, Journal::Open(o.journal_path, &records));
    std::lock_guard<std::mutex> lock(mu_);
    RETURN_IF_ERROR(Annotate(Replay(records), o.journal_path));
    live_journal_bytes_ += placement_record_bytes_;
    records.clear();
    records.shrink_to_fit();
    compacted_bytes_ = journal_->size_bytes();
    const int64_t expired = ExpireJobsLocked(NowMs());
    if (expired > 0) {
      LOG(INFO) << "coordinator: " << expired << " jobs of the journal ended more than " << o.job_retention_s
                << " s ago (--job-retention-s) and are forgotten";
    }
    MaybeCompactJournalLocked();
  } else {
    LOG(WARNING) << "coordinator: no journal (--journal FILE): accepted jobs are lost if this process dies";
  }
  LOG(INFO) << "coordinator: epoch " << epoch_ << ", plan pp=" << plan_.pp << " ep=" << plan_.ep << " ("
            << plan_.num_workers() << " workers), " << jobs_.size() << " jobs from the journal, " << queued_
            << " sequences queued";
  return absl::OkStatus();
}

// ---------------------------------------------------------------- jobs (mu_ held)

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
                                 int64_t now_ms) {
  Sequence& s = j->seqs[static_cast<size_t>(index)];
  if (s.state == SeqState::kDone) return;
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
  if (journal_ != nullptr && !replaying_) {
    JournalRecord rec;
    rec.set_unix_ms(now_ms);
    rec.set_job_id(j->id);
    SequenceFinished* f = rec.mutable_finished();
    f->set_index(index);
    *f->mutable_tokens() = r.tokens();
    f->set_finish_reason(reason);
    pending_records_.push_back(rec.SerializeAsString());
    CountJournalRecord(j, pending_records_.back().size());
  }
  j->results.push_back(std::move(r));
  j->result_ms.push_back(now_ms);
  UpdateJobState(j, now_ms);
  j->result_states.push_back(j->state);
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

void Coordinator::Requeue(Job* j, int index) {
  Sequence& s = j->seqs[static_cast<size_t>(index)];
  if (s.state != SeqState::kAssigned) return;
  if (s.worker >= 0) workers_[static_cast<size_t>(s.worker)].assigned.erase(absl::StrCat(j->id, "/", index));
  j->generated_tokens -= static_cast<int64_t>(s.tokens.size());
  s.tokens.clear();
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
               << " go back to the queue and restart from scratch";
  // Requeue pushes to the front: newest first, so the oldest ends up in front.
  std::sort(back.begin(), back.end(), [](const auto& a, const auto& b) {
    if (a.first->submitted_ms != b.first->submitted_ms) return a.first->submitted_ms > b.first->submitted_ms;
    if (a.first->id != b.first->id) return a.first->id > b.first->id;
    return a.second > b.second;
  });
  for (auto& [j, index] : back) Requeue(j, index);
  w.assigned.clear();
}

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
  for (auto it = store_.begin(); it != store_.end();) {
    if (it->first.rfind(keep, 0) == 0) {
      ++it;
      continue;
    }
    store_bytes_ -= static_cast<int64_t>(it->first.size() + it->second.size());
    it = store_.erase(it);
  }
  changed_.notify_all();
}

void Coordinator::WorkerLostLocked(int worker_id, const std::string& how) {
  if (shutdown_requested_) return;  // leaving is expected then
  ++workers_lost_;
  // Without a Register answered in this generation no data plane exists to rebuild.
  if (generation_issued_) NewGenerationLocked(absl::StrCat("worker ", worker_id, " ", how));
}

Coordinator::Job* Coordinator::FindJob(const std::string& job_id) const {
  auto it = jobs_.find(job_id);
  return it == jobs_.end() ? nullptr : it->second.get();
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

absl::Status Coordinator::FlushJournal() {
  if (pending_records_.empty()) return absl::OkStatus();
  std::vector<std::string> records;
  records.swap(pending_records_);
  if (journal_ == nullptr || stopped_) return absl::OkStatus();
  absl::Status s = journal_->Append(records);
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

void Coordinator::MaintainLocked() {
  const absl::Time now = absl::Now();
  if (now < next_maintenance_) return;
  next_maintenance_ = now + absl::Seconds(options_.monitor_interval_s);
  ExpireJobsLocked(absl::ToUnixMillis(now));
  MaybeCompactJournalLocked();
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

void Coordinator::MaybeCompactJournalLocked() {
  if (journal_ == nullptr || stopped_) return;
  const int64_t now_ms = NowMs();
  if (now_ms < compact_retry_at_ms_) return;
  const int64_t size = journal_->size_bytes();
  const int64_t waste = size - live_journal_bytes_;
  const int64_t grown_at = std::max(options_.journal_compact_min_bytes, 2 * compacted_bytes_);
  std::string why;
  if (waste > 0 && waste >= std::max(options_.journal_compact_min_waste_bytes, size / 4)) {
    why = absl::StrCat("about ", waste, " bytes belong to forgotten jobs");
  } else if (size >= grown_at && size > 0) {
    if (waste < size / 8) {
      // Every record still belongs to a kept job: a rewrite would copy the
      // file under the lock and gain nothing. Look again when it has doubled.
      VLOG(1) << "coordinator: journal at " << size << " bytes, about " << waste
              << " reclaimable: not compacted";
      compacted_bytes_ = size;
      return;
    }
    why = absl::StrCat("grew past ", grown_at, " bytes, about ", waste, " bytes reclaimable");
  } else {
    return;
  }
  absl::Status s = CompactJournalLocked(why);
  if (!s.ok()) {
    compact_retry_at_ms_ = now_ms + 60000;
    LOG(ERROR) << "coordinator: journal compaction failed (retrying in 60 s; the journal in use is complete): " << s;
  }
}

absl::Status Coordinator::CompactJournalLocked(const std::string& why) {
  const absl::Time t0 = absl::Now();
  const int64_t before = journal_->size_bytes();
  // Per retained job, in submission order: the records that replay it as it
  // is. Results with finish reason CANCELLED come from CancelJob and are
  // covered by its JobCancelled record, as in the original journal.
  std::vector<std::string> payloads;
  int64_t live = 0;
  auto add = [&](Job* j, const JournalRecord& rec) {
    payloads.push_back(rec.SerializeAsString());
    const int64_t n = Journal::kRecordHeaderBytes + static_cast<int64_t>(payloads.back().size());
    if (j != nullptr) j->journal_bytes += n;
    live += n;
  };
  if (placement_version_ > 1) {  // the workers' expert placement, before the jobs
    add(nullptr, PlacementRecord());
    placement_record_bytes_ = Journal::kRecordHeaderBytes + static_cast<int64_t>(payloads.back().size());
  }
  for (auto& entry : job_order_) {
    Job* j = entry.second;
    j->journal_bytes = 0;
    JournalRecord sub;
    sub.set_unix_ms(j->submitted_ms);
    sub.set_job_id(j->id);
    sub.mutable_submitted()->set_client_request_id(j->client_request_id);
    sub.mutable_submitted()->set_request(j->request.SerializeAsString());
    add(j, sub);
    for (size_t i = 0; i < j->results.size(); ++i) {
      const v1::SequenceResult& r = j->results[i];
      if (r.finish_reason() == v1::FINISH_REASON_CANCELLED) continue;
      JournalRecord rec;
      rec.set_unix_ms(j->result_ms[i]);
      rec.set_job_id(j->id);
      SequenceFinished* f = rec.mutable_finished();
      f->set_index(r.index());
      *f->mutable_tokens() = r.tokens();
      f->set_finish_reason(r.finish_reason());
      add(j, rec);
    }
    if (j->state == v1::JOB_STATE_CANCELLED) {
      JournalRecord rec;
      rec.set_unix_ms(j->finished_ms);
      rec.set_job_id(j->id);
      rec.mutable_cancelled();
      add(j, rec);
    }
  }
  // The last id handed out, should its job be gone: a restart continues after it.
  const std::string last_id = JobIdOf(next_job_ - 1);
  if (next_job_ > 1 && FindJob(last_id) == nullptr) {
    JournalRecord mark;
    mark.set_unix_ms(NowMs());
    mark.set_job_id(last_id);
    mark.mutable_cancelled();
    add(nullptr, mark);
  }
  live_journal_bytes_ = live;
  RETURN_IF_ERROR(journal_->Rewrite(payloads));
  compacted_bytes_ = journal_->size_bytes();
  ++compactions_;
  last_compaction_ = absl::Now() - t0;
  LOG(INFO) << "coordinator: compacted the journal " << journal_->path() << " (" << why << "): " << before << " -> "
            << compacted_bytes_ << " bytes, " << payloads.size() << " records of " << jobs_.size() << " jobs, in "
            << absl::FormatDuration(last_compaction_);
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
                       rec.unix_ms());
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

// ---------------------------------------------------------------- JobService

absl::StatusOr<v1::SubmitJobResponse> Coordinator::SubmitJob(const v1::SubmitJobRequest& request) {
  std::lock_guard<std::mutex> lock(mu_);
  if (shutdown_requested_ || stopped_) {
    return absl::UnavailableError("the coordinator is shutting down; submit to its successor");
  }
  v1::SubmitJobResponse resp;
  if (!request.client_request_id().empty()) {
    auto it = by_request_id_.find(request.client_request_id());
    if (it != by_request_id_.end()) {
      resp.set_job_id(it->second);
      resp.set_deduplicated(true);
      return resp;
    }
  }
  const JobLimits limits{config_.vocab_size, config_.max_position_embeddings, options_.max_sequences_per_job};
  RETURN_IF_ERROR(ValidateSubmitJob(request, limits));
  if (queued_ + request.sequences_size() > options_.max_queued_sequences) {
    return absl::ResourceExhaustedError(absl::StrCat("queue full: ", queued_, " sequences queued, the job adds ",
                                                     request.sequences_size(), ", the limit is ",
                                                     options_.max_queued_sequences, "; retry later"));
  }
  auto job = std::make_unique<Job>();
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
    const std::string payload = rec.SerializeAsString();
    absl::Status s = journal_->Append({payload});
    if (!s.ok()) {
      LOG(ERROR) << "coordinator: cannot journal job " << job->id << ": " << s;
      return absl::UnavailableError(absl::StrCat("cannot journal the job, so it was not accepted: ", s.message()));
    }
    CountJournalRecord(job.get(), payload.size());
  }
  ++next_job_;
  for (int i = 0; i < request.sequences_size(); ++i) queue_.emplace_back(job.get(), i);
  queued_ += request.sequences_size();
  if (!job->client_request_id.empty()) by_request_id_[job->client_request_id] = job->id;
  resp.set_job_id(job->id);
  VLOG(1) << "coordinator: accepted " << job->id << " with " << request.sequences_size() << " sequences";
  job->order = next_order_++;
  job_order_[job->order] = job.get();
  jobs_[job->id] = std::move(job);
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

absl::StatusOr<bool> Coordinator::WaitJobResults(const std::string& job_id, size_t* cursor, absl::Time deadline,
                                                 std::vector<v1::WatchJobResponse>* out) {
  if (job_id.empty()) return absl::InvalidArgumentError("job_id: empty");
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    // Looked up again after every wait: retention may forget the job meanwhile.
    const Job* j = FindJob(job_id);
    if (j == nullptr) return JobNotFound(job_id);
    if (*cursor < j->results.size()) {
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
  std::lock_guard<std::mutex> lock(mu_);
  Job* j = FindJob(job_id);
  if (j == nullptr) return JobNotFound(job_id);
  if (!Final(*j)) {
    const int64_t now = NowMs();
    if (journal_ != nullptr && !stopped_) {
      JournalRecord rec;
      rec.set_unix_ms(now);
      rec.set_job_id(j->id);
      rec.mutable_cancelled();
      const std::string payload = rec.SerializeAsString();
      absl::Status s = journal_->Append({payload});
      if (!s.ok()) return absl::UnavailableError(absl::StrCat("cannot journal the cancellation: ", s.message()));
      CountJournalRecord(j, payload.size());
    }
    CancelUnfinished(j, now);
    LOG(INFO) << "coordinator: cancelled " << j->id;
    changed_.notify_all();
  }
  return JobProto(*j, /*with_results=*/true);
}

absl::StatusOr<v1::ListJobsResponse> Coordinator::ListJobs(const v1::ListJobsRequest& request) const {
  if (request.limit() < 0) return absl::InvalidArgumentError(absl::StrCat("limit: ", request.limit(), " must be >= 0"));
  const size_t limit = request.limit() == 0 ? 100 : static_cast<size_t>(request.limit());
  std::lock_guard<std::mutex> lock(mu_);
  v1::ListJobsResponse resp;
  for (auto it = job_order_.rbegin(); it != job_order_.rend() && static_cast<size_t>(resp.jobs_size()) < limit; ++it) {
    *resp.add_jobs() = JobProto(*it->second, /*with_results=*/false);
  }
  return resp;
}

std::map<v1::JobState, int64_t> Coordinator::JobCountsByState() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::map<v1::JobState, int64_t> n;
  for (const auto& [id, j] : jobs_) ++n[j->state];
  return n;
}

// ---------------------------------------------------------------- ClusterService

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

// ---------------------------------------------------------------- WorkerService

bool Coordinator::ClusterCompleteLocked() const {
  return std::all_of(workers_.begin(), workers_.end(), [this](const Worker& w) { return Live(w); });
}

bool Coordinator::ServingLocked() const {
  if (shutdown_requested_ || stopped_) return false;
  return std::all_of(workers_.begin(), workers_.end(),
                     [](const Worker& w) { return w.registered && w.health == v1::WORKER_HEALTH_READY; });
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
  if (rejoin && request.rejoin_after_generation() >= generation_) {
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
    if (request.pid() != 0 && (request.pid() != w.pid || request.host() != w.host)) {
      return absl::FailedPreconditionError(absl::StrCat("worker_id: ", id, " is now held by ", w.host, ":", w.pid,
                                                        " (this worker was replaced after it went MISSING); exit"));
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
  Tick();
  return resp;
}

absl::StatusOr<v1::SyncResponse> Coordinator::Sync(const v1::SyncRequest& request) {
  std::lock_guard<std::mutex> lock(mu_);
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
  if (request.generation() != generation_) return resp;  // rebuild the data plane first
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
      FinishSequence(j, index, std::move(tokens), reason, now);
    }
  }
  FlushJournal().IgnoreError();  // logged; results stay in memory, a restart regenerates them
  for (auto& c : w.pending_cancel) resp.add_cancel(std::move(c));
  w.pending_cancel.clear();
  if (!shutdown_requested_ && Live(w) && request.free_slots() > 0 && queued_ > 0) {
    int64_t live0 = 0, held0 = 0;
    for (int i = 0; i < plan_.ep; ++i) {
      const Worker& x = workers_[static_cast<size_t>(i)];
      if (!Live(x)) continue;
      ++live0;
      held0 += static_cast<int64_t>(x.assigned.size());
    }
    const int64_t share = (queued_ + held0 + live0 - 1) / std::max<int64_t>(live0, 1);
    int64_t give = std::min<int64_t>({request.free_slots(), queued_, share - static_cast<int64_t>(w.assigned.size())});
    while (give > 0 && !queue_.empty()) {
      auto [j, index] = queue_.front();
      queue_.pop_front();
      Sequence& s = j->seqs[static_cast<size_t>(index)];
      if (s.state != SeqState::kQueued || Final(*j)) continue;
      s.state = SeqState::kAssigned;
      s.worker = id;
      s.tokens.clear();
      --queued_;
      ++running_;
      ++j->num_assigned;
      UpdateJobState(j, now);
      const std::string seq_id = absl::StrCat(j->id, "/", index);
      w.assigned.insert(seq_id);
      v1::SequenceAssignment* a = resp.add_assign();
      a->set_seq_id(seq_id);
      *a->mutable_request() = j->request.sequences(index);
      --give;
    }
  }
  changed_.notify_all();
  return resp;
}

absl::Status Coordinator::StoreSet(const std::string& key, const std::string& value) {
  if (key.empty()) return absl::InvalidArgumentError("key: empty");
  if (value.size() > kMaxStoreValue) {
    return absl::InvalidArgumentError(absl::StrCat("value: ", value.size(), " bytes exceed the limit of ", kMaxStoreValue));
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto it = store_.find(key);
  const int64_t old = it == store_.end() ? 0 : static_cast<int64_t>(key.size() + it->second.size());
  const int64_t add = static_cast<int64_t>(key.size() + value.size());
  if (store_bytes_ - old + add > kMaxStoreBytes) {
    return absl::ResourceExhaustedError(absl::StrCat("the store holds ", store_bytes_, " bytes, the limit is ", kMaxStoreBytes));
  }
  store_bytes_ += add - old;
  store_[key] = value;
  changed_.notify_all();
  return absl::OkStatus();
}

absl::StatusOr<std::optional<std::string>> Coordinator::StoreGet(const std::string& key) const {
  if (key.empty()) return absl::InvalidArgumentError("key: empty");
  std::lock_guard<std::mutex> lock(mu_);
  auto it = store_.find(key);
  if (it == store_.end()) return std::optional<std::string>();
  return std::optional<std::string>(it->second);
}

// ---------------------------------------------------------------- life cycle

void Coordinator::Tick() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    const absl::Time now = absl::Now();
    for (size_t id = 0; id < workers_.size(); ++id) {
      Worker& w = workers_[id];
      if (!w.registered) continue;
      const bool late_ready = w.health == v1::WORKER_HEALTH_READY &&
                              now - w.last_heartbeat > absl::Seconds(options_.heartbeat_timeout_s);
      const bool late_start = w.health == v1::WORKER_HEALTH_STARTING &&
                              now - w.registered_at > absl::Seconds(options_.startup_timeout_s);
      if (late_ready || late_start) {
        LOG(WARNING) << "coordinator: worker " << id << " (" << w.host << ":" << w.pid << ") is MISSING: no "
                     << (late_ready ? "heartbeat" : "first heartbeat") << " for "
                     << absl::FormatDuration(now - (late_ready ? w.last_heartbeat : w.registered_at));
        w.health = v1::WORKER_HEALTH_MISSING;
        RevokeSequences(static_cast<int>(id), /*tell_worker=*/true);
        WorkerLostLocked(static_cast<int>(id), "is MISSING");
        changed_.notify_all();
      }
    }
    if (shutdown_requested_ && !shutdown_done_) {
      const bool all_gone = std::all_of(workers_.begin(), workers_.end(), [](const Worker& w) {
        return !w.registered || w.health == v1::WORKER_HEALTH_EXITED || w.health == v1::WORKER_HEALTH_MISSING;
      });
      const bool timed_out = now - shutdown_at_ >= absl::Seconds(options_.shutdown_timeout_s);
      if (all_gone || timed_out) {
        if (!all_gone) LOG(WARNING) << "coordinator: shutdown timeout; not every worker said goodbye";
        shutdown_done_ = true;
        changed_.notify_all();
      }
    }
    MaintainLocked();
    AutoRebalanceLocked();
  }
  NotifyServing();
}

void Coordinator::NotifyServing() {
  std::lock_guard<std::mutex> nlock(notify_mu_);
  const bool now = serving();
  if (last_serving_.has_value() && *last_serving_ == now) return;
  last_serving_ = now;
  LOG(INFO) << "coordinator: " << (now ? "SERVING" : "NOT_SERVING");
  if (serving_listener_) serving_listener_(now);
}

void Coordinator::SetServingListener(std::function<void(bool)> listener) {
  std::lock_guard<std::mutex> nlock(notify_mu_);
  serving_listener_ = std::move(listener);
  last_serving_.reset();
  const bool now = serving();
  last_serving_ = now;
  if (serving_listener_) serving_listener_(now);
}

bool Coordinator::serving() const {
  std::lock_guard<std::mutex> lock(mu_);
  return ServingLocked();
}

bool Coordinator::shutdown_done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return shutdown_done_;
}

bool Coordinator::WaitForShutdown(absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  const absl::Time deadline = absl::Now() + timeout;
  while (!shutdown_done_ && !stopped_) {
    if (absl::Now() >= deadline) return false;
    changed_.wait_until(lock, absl::ToChronoTime(deadline));
  }
  return shutdown_done_;
}

void Coordinator::Stop() {
  std::lock_guard<std::mutex> lock(mu_);
  stopped_ = true;
  changed_.notify_all();
}

}  // namespace expertmesh::coordinator
