// The coordinator process: a gRPC server with JobService, ClusterService,
// WorkerService, grpc.health.v1.Health and server reflection over one
// Coordinator, plus the health monitor thread.
//
//   CoordinatorOptions o; o.checkpoint = "ckpt"; o.pp = 2; o.ep = 2; o.journal_path = "c.journal";
//   RETURN_IF_ERROR(RunCoordinator(o, [](const std::string& addr) { /* tell the workers */ }));
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "coordinator/auth.h"
#include "coordinator/coordinator.h"
#include "coordinator/metrics.h"
#include "grpcpp/grpcpp.h"

namespace expertmesh::coordinator {

class JobServiceImpl;
class ClusterServiceImpl;
class WorkerServiceImpl;

// Health service names set together: "" (the whole server) and this one.
inline constexpr char kJobServiceName[] = "expertmesh.v1.JobService";

class CoordinatorServer {
 public:
  // Builds the Coordinator (config, plan, journal replay) and starts serving
  // on options.listen. UNAVAILABLE when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Start(const CoordinatorOptions& options);
  ~CoordinatorServer();  // Stop()

  // host:port actually bound (port 0 resolved; a wildcard host becomes this machine's name).
  const std::string& address() const { return address_; }
  int port() const { return port_; }
  // A channel that skips the network (and TLS) but not the credential
  // checks: calls carry `security`'s token and secret.
  std::shared_ptr<grpc::Channel> InProcessChannel(const rpc::ClientSecurity& security = {});
  Coordinator* coordinator() { return coordinator_.get(); }
  // The port of GET /metrics (options.metrics_listen), 0 when off.
  int metrics_port() const { return metrics_ != nullptr ? metrics_->port() : 0; }

  // Blocks until a Shutdown request completed (workers exited or the timeout),
  // Stop() was called, or *stop (if given) turns non-zero.
  void Wait(const std::atomic<int>* stop = nullptr);
  // Stops serving at once: waiting calls answer UNAVAILABLE, in-flight calls
  // get a short grace period. Nothing is written to the journal afterwards,
  // so a test can "crash" a coordinator with it and start another on the
  // same journal.
  void Stop();

 private:
  CoordinatorServer() = default;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<Authenticator> auth_;
  std::unique_ptr<JobServiceImpl> jobs_;
  std::unique_ptr<ClusterServiceImpl> cluster_;
  std::unique_ptr<WorkerServiceImpl> workers_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<MetricsServer> metrics_;
  std::thread monitor_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false, stopped_ = false;
  std::string address_;
  int port_ = 0;
};

// `expertmesh coordinator` and rank 0 of `expertmesh launch`: serves until a
// Shutdown request completes, or until *stop (if given; e.g. set by SIGTERM)
// turns non-zero: then it stops serving at once and leaves the workers
// running (they re-register with the next coordinator on the same journal).
// `on_listening` gets the bound address once the server accepts calls (may
// be empty).
absl::Status RunCoordinator(const CoordinatorOptions& options,
                            std::function<void(const std::string& bound_address)> on_listening,
                            const std::atomic<int>* stop = nullptr);

}  // namespace expertmesh::coordinator
