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

namespace expertmesh::coordinator {

// What keeps scrapes answered when clients misbehave (idle connections,
// slowloris headers): each connection has its own thread while it is open, so
// no client can hold the threads a scrape needs.
struct MetricsHttpLimits {
  // Connections open at once. A new one past this closes the connection that
  // has waited longest without a request in hand (idle, or still sending its
  // request); when every one is being answered, the new one is closed.
  int max_connections = 64;
  // A request (request line, headers and any body) must arrive in full within
  // this time of its first byte, however slowly it trickles in.
  absl::Duration request_read_timeout = absl::Seconds(5);
  // A connection that sends no (further) request for this long is closed.
  absl::Duration idle_timeout = absl::Seconds(2);
  // Requests one keep-alive connection may make before it is closed.
  int max_requests_per_connection = 100;
};

class MetricsServer {
 public:
  // Serves GET /metrics on `listen` ("host:port"; port 0 picks a free one).
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
