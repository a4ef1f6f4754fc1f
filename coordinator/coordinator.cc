// The Coordinator's facade: creation (config, plan, journal replay) and the
// life cycle (Tick, serving notifications, shutdown, Stop). The parts behind
// it live in job_store.cc, scheduler.cc, membership.cc and rebalance.cc; each
// part's header comment states its threads, locks and ownership.
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
#include "common/file.h"
#include "coordinator/job_store.h"
#include "coordinator/journal_records.pb.h"
#include "coordinator/validation.h"
#include "glog/logging.h"
#include "nlohmann/json.hpp"
#include "topology/plan_proto.h"

namespace expertmesh::coordinator {
namespace {

std::string NewEpoch() {
  std::random_device rd;
  const uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ static_cast<uint64_t>(absl::GetCurrentTimeNanos());
  return absl::StrFormat("%016x", v);
}

// {"<layer>": [counts]} or ClusterStatus JSON {"expertLoad": [{"layer": L, "tokensPerExpert": [...]}]}.
absl::StatusOr<std::map<int64_t, std::vector<double>>> ReadExpertLoad(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
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
  ASSIGN_OR_RETURN(model_json_, ReadFileToString(config_path));
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
  plan_proto_ = topology::PlanToProto(plan_, o.checkpoint, model_json_, placement_version_);
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
    std::optional<CompactionSnapshot> snap;
    {
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
      snap = MaybeCompactJournalLocked();
    }
    if (snap.has_value()) RunCompaction(std::move(*snap)).IgnoreError();  // logged; the journal in use is complete
  } else {
    LOG(WARNING) << "coordinator: no journal (--journal FILE): accepted jobs are lost if this process dies";
  }
  LOG(INFO) << "coordinator: epoch " << epoch_ << ", plan pp=" << plan_.pp << " ep=" << plan_.ep << " ("
            << plan_.num_workers() << " workers), " << jobs_.size() << " jobs from the journal, " << queued_
            << " sequences queued";
  return absl::OkStatus();
}

void Coordinator::Tick() { TickImpl(/*maintain=*/true); }

void Coordinator::TickImpl(bool maintain) {
  std::optional<CompactionSnapshot> snap;
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
    if (maintain) snap = MaintainLocked();
    AutoRebalanceLocked();
  }
  if (snap.has_value()) RunCompaction(std::move(*snap)).IgnoreError();  // logged
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
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopped_ = true;
    changed_.notify_all();
  }
  // No journal write after this returns (a write under way ends first).
  if (journal_ != nullptr) journal_->Close();
}

}  // namespace expertmesh::coordinator
