#include "coordinator/metrics.h"

#include <algorithm>
#include <map>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/status.h"
#include "glog/logging.h"
#include "absl/time/clock.h"
#include "httplib.h"
#include "prometheus/metric_family.h"
#include "prometheus/text_serializer.h"

namespace expertmesh::coordinator {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;
using Labels = std::vector<ClientMetric::Label>;

// Builds the families of one scrape.
class Families {
 public:
  // Starts a family; Add appends samples to the last one started.
  void Start(const std::string& name, const std::string& help, MetricType type) {
    MetricFamily f;
    f.name = name;
    f.help = help;
    f.type = type;
    out_.push_back(std::move(f));
  }
  void Add(double value, Labels labels = {}) {
    ClientMetric m;
    m.label = std::move(labels);
    if (out_.back().type == MetricType::Counter) {
      m.counter.value = value;
    } else {
      m.gauge.value = value;
    }
    out_.back().metric.push_back(std::move(m));
  }
  void One(const std::string& name, const std::string& help, MetricType type, double value) {
    Start(name, help, type);
    Add(value);
  }
  std::vector<MetricFamily> Take() { return std::move(out_); }

 private:
  std::vector<MetricFamily> out_;
};

// The API's enum names as label values: "JOB_STATE_SUCCEEDED" -> "succeeded".
std::string LabelOf(const std::string& enum_name, absl::string_view prefix) {
  return absl::AsciiStrToLower(absl::StripPrefix(enum_name, prefix));
}

// A place's health; UNSPECIFIED is a place no worker has registered for.
std::string HealthLabel(v1::WorkerHealth h) {
  return h == v1::WORKER_HEALTH_UNSPECIFIED ? "unregistered" : LabelOf(v1::WorkerHealth_Name(h), "WORKER_HEALTH_");
}

std::vector<MetricFamily> Collect(const Coordinator& c) {
  const v1::ClusterStatus st = c.GetClusterStatus();
  Families f;
  f.One("expertmesh_serving", "1 while every worker is READY (gRPC health SERVING)", MetricType::Gauge,
        st.serving() ? 1 : 0);
  f.One("expertmesh_data_plane_generation", "data-plane generation: grows each time the set of workers changes",
        MetricType::Gauge, static_cast<double>(st.generation()));
  f.One("expertmesh_workers_lost_total", "workers found MISSING or exited unasked since the coordinator started",
        MetricType::Counter, static_cast<double>(st.workers_lost()));
  f.One("expertmesh_vacant_places", "places left vacant by lost workers (elastic EP), served around",
        MetricType::Gauge, static_cast<double>(st.vacant_worker_ids_size()));
  f.One("expertmesh_vacancy_experts_to_load_total",
        "experts that re-placements around vacant places made ranks load from the checkpoint (elastic EP; a slot "
        "whose expert a live replica holds loads nothing)",
        MetricType::Counter, static_cast<double>(st.vacancy_experts_to_load()));
  const v1::RebalanceStatus& rb = st.rebalance();
  f.One("expertmesh_expert_placement_version", "expert placement in use: 1 at start, larger after each committed rebalance",
        MetricType::Gauge, static_cast<double>(rb.placement_version()));
  f.One("expertmesh_expert_rebalances_total", "expert rebalances committed since the coordinator started",
        MetricType::Counter, static_cast<double>(rb.rebalances()));
  f.One("expertmesh_expert_rank_imbalance",
        "mean over MoE layers of max / mean EP-rank load for the load observed since the last rebalance, on the "
        "placement in use (1 = balanced)",
        MetricType::Gauge, rb.window_imbalance());

  f.Start("expertmesh_sequences", "sequences of unfinished jobs by state", MetricType::Gauge);
  f.Add(st.queued_sequences(), {{"state", "queued"}});
  f.Add(st.running_sequences(), {{"state", "running"}});

  const std::map<v1::JobState, int64_t> by_state = c.JobCountsByState();
  f.Start("expertmesh_jobs", "jobs the coordinator holds (finished ones until --job-retention-s), by state",
          MetricType::Gauge);
  for (v1::JobState s : {v1::JOB_STATE_CANCELLED, v1::JOB_STATE_FAILED, v1::JOB_STATE_QUEUED, v1::JOB_STATE_RUNNING,
                         v1::JOB_STATE_SUCCEEDED}) {
    auto it = by_state.find(s);
    f.Add(static_cast<double>(it == by_state.end() ? 0 : it->second),
          {{"state", LabelOf(v1::JobState_Name(s), "JOB_STATE_")}});
  }

  std::map<std::string, int> health;  // every health, zero or not, in label order
  for (v1::WorkerHealth h : {v1::WORKER_HEALTH_UNSPECIFIED, v1::WORKER_HEALTH_STARTING, v1::WORKER_HEALTH_READY,
                             v1::WORKER_HEALTH_MISSING, v1::WORKER_HEALTH_EXITED}) {
    health[HealthLabel(h)] = 0;
  }
  for (const v1::WorkerStatus& w : st.workers()) ++health[HealthLabel(w.health())];
  f.Start("expertmesh_workers", "worker places by health (pp x ep places)", MetricType::Gauge);
  for (const auto& [h, n] : health) f.Add(n, {{"health", h}});

  auto worker_labels = [](const v1::WorkerStatus& w) {
    return Labels{{"worker", absl::StrCat(w.worker_id())},
                  {"stage", absl::StrCat(w.stage())},
                  {"ep_rank", absl::StrCat(w.ep_rank())}};
  };
  f.Start("expertmesh_worker_tokens_total", "tokens a worker's stage processed (prompt and generated)",
          MetricType::Counter);
  for (const auto& w : st.workers()) f.Add(static_cast<double>(w.tokens_processed()), worker_labels(w));
  f.Start("expertmesh_worker_steps_total", "forward steps a worker ran", MetricType::Counter);
  for (const auto& w : st.workers()) f.Add(static_cast<double>(w.steps()), worker_labels(w));
  f.Start("expertmesh_worker_active_sequences", "sequences a worker holds (stage 0) or caches", MetricType::Gauge);
  for (const auto& w : st.workers()) f.Add(w.active_sequences(), worker_labels(w));
  f.Start("expertmesh_worker_heartbeat_age_seconds", "seconds since a worker's last heartbeat", MetricType::Gauge);
  const int64_t now_ms = absl::ToUnixMillis(absl::Now());
  for (const auto& w : st.workers()) {
    if (w.last_heartbeat_unix_ms() > 0) {
      f.Add(static_cast<double>(now_ms - w.last_heartbeat_unix_ms()) / 1000.0, worker_labels(w));
    }
  }
  f.Start("expertmesh_worker_time_seconds_total",
          "where a worker's time went since it started serving (its own accounting)", MetricType::Counter);
  for (const auto& w : st.workers()) {
    const v1::StageTimes& t = w.times();
    const std::pair<const char*, double> kinds[] = {
        {"attention", t.attention_s()}, {"dense", t.dense_s()},       {"expert", t.expert_s()},
        {"dispatch", t.dispatch_s()},   {"combine", t.combine_s()},   {"transfer", t.transfer_s()},
        {"idle", t.idle_s()},           {"embed_head", t.embed_head_s()}, {"control", t.control_s()}};
    for (const auto& [kind, v] : kinds) {
      Labels l = worker_labels(w);
      l.push_back({"kind", kind});
      f.Add(v, std::move(l));
    }
  }

  f.Start("expertmesh_expert_routed_tokens_total", "token-expert pairs routed in a MoE layer", MetricType::Counter);
  std::vector<std::pair<int, double>> imbalance;
  for (const v1::LayerExpertLoad& l : st.expert_load()) {
    double sum = 0, mx = 0;
    for (int64_t v : l.tokens_per_expert()) {
      sum += static_cast<double>(v);
      mx = std::max(mx, static_cast<double>(v));
    }
    f.Add(sum, {{"layer", absl::StrCat(l.layer())}});
    const double mean = l.tokens_per_expert_size() > 0 ? sum / l.tokens_per_expert_size() : 0;
    imbalance.emplace_back(l.layer(), mean > 0 ? mx / mean : 0);
  }
  f.Start("expertmesh_expert_load_imbalance",
          "hottest expert's routed tokens over the mean, per MoE layer (1 = balanced; EPLB input)", MetricType::Gauge);
  for (const auto& [layer, v] : imbalance) f.Add(v, {{"layer", absl::StrCat(layer)}});

  const Coordinator::JournalStats js = c.journal_stats();
  f.One("expertmesh_journal_bytes", "size of the journal file (0 without --journal)", MetricType::Gauge,
        static_cast<double>(js.size_bytes));
  f.One("expertmesh_journal_compactions_total", "journal compactions by this coordinator", MetricType::Counter,
        static_cast<double>(js.compactions));
  return f.Take();
}

// Serves GET /metrics; the text is built at each scrape.
class HttpMetricsServer : public MetricsServer {
 public:
  HttpMetricsServer(const Coordinator* c, const MetricsHttpLimits& limits, std::string bearer_token)
      : c_(c), http_(limits, std::move(bearer_token)) {
    http_.routes().Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(MetricsText(*c_), "text/plain; version=0.0.4; charset=utf-8");
    });
  }
  absl::Status Listen(const std::string& listen) { return http_.Listen("--metrics-listen", listen); }
  int port() const override { return http_.port(); }

 private:
  const Coordinator* c_;
  HttpServer http_;
};

}  // namespace

std::string MetricsText(const Coordinator& coordinator) {
  return prometheus::TextSerializer().Serialize(Collect(coordinator));
}

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(const Coordinator* coordinator,
                                                                    const std::string& listen,
                                                                    const MetricsHttpLimits& limits) {
  auto server = std::make_unique<HttpMetricsServer>(coordinator, limits, coordinator->options().client_auth_token);
  RETURN_IF_ERROR(server->Listen(listen));
  return std::unique_ptr<MetricsServer>(std::move(server));
}

}  // namespace expertmesh::coordinator
