// Prometheus metrics of a coordinator, served over HTTP (text exposition
// format, GET /metrics) for Prometheus, Grafana or `curl`.
//
// Everything is read at scrape time from the coordinator's own state
// (GetClusterStatus, ListJobs, journal_stats), so the metrics can never
// disagree with `expertmesh status`, and nothing is added to the hot paths.
// Counters come from cumulative values (a worker's tokens and time since it
// started serving: they restart at 0 when a replacement takes its place, which
// Prometheus' rate() treats as a counter reset).
//
//   ASSIGN_OR_RETURN(auto m, MetricsServer::Start(coordinator, "0.0.0.0:9400"));
//   LOG(INFO) << "metrics on port " << m->port();
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "coordinator/coordinator.h"
#include "coordinator/http_server.h"

namespace expertmesh::coordinator {

// The HTTP hardening (coordinator/http_server.h); GET /metrics takes no body.
using MetricsHttpLimits = HttpLimits;

class MetricsServer {
 public:
  // Serves GET /metrics on `listen` ("host:port"; port 0 picks a free one),
  // behind the coordinator's options().client_auth_token when set.
  // INVALID_ARGUMENT for a malformed address or limits, UNAVAILABLE when it
  // cannot be bound. `coordinator` must outlive the server.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(const Coordinator* coordinator,
                                                              const std::string& listen,
                                                              const MetricsHttpLimits& limits = {});
  virtual ~MetricsServer() = default;
  virtual int port() const = 0;
};

// The exposition text of the coordinator's metrics, as GET /metrics serves it.
std::string MetricsText(const Coordinator& coordinator);

}  // namespace expertmesh::coordinator
