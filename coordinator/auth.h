// Who may call what on the coordinator (docs/SECURITY.md).
//
// Two credentials, checked on every call of the services that need them:
//   * the client token ("authorization: Bearer <token>"): JobService and
//     ClusterService (so Shutdown and RebalanceExperts too) and GET /metrics;
//   * the cluster secret ("x-expertmesh-worker-secret: <secret>"):
//     WorkerService (Register, Heartbeat, Sync, StoreSet, StoreGet). The
//     client token is not enough there.
// grpc.health.v1.Health and server reflection stay open. A credential that
// is not configured leaves its services open (today's behaviour; the server
// warns at start). Secrets are compared in constant time.
//
// Errors: UNAUTHENTICATED when the needed credential is missing,
// PERMISSION_DENIED when one was sent but it is wrong or of the other kind;
// the message names the credential and the flag that configures it.
#pragma once

#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "grpcpp/grpcpp.h"

namespace expertmesh::coordinator {

class Authenticator {
 public:
  Authenticator(std::string client_token, std::string cluster_secret)
      : client_token_(std::move(client_token)), cluster_secret_(std::move(cluster_secret)) {}

  // `authorization` and `worker_secret`: the metadata values sent, nullptr
  // when absent. `service` names what is called, for messages.
  absl::Status CheckClient(const std::string* authorization, const std::string* worker_secret,
                           absl::string_view service) const;
  absl::Status CheckWorker(const std::string* authorization, const std::string* worker_secret,
                           absl::string_view service) const;

  // The same from a gRPC call's metadata.
  grpc::Status Client(const grpc::ServerContext* ctx, absl::string_view service) const;
  grpc::Status Worker(const grpc::ServerContext* ctx, absl::string_view service) const;

  bool client_open() const { return client_token_.empty(); }
  bool worker_open() const { return cluster_secret_.empty(); }

 private:
  const std::string client_token_;
  const std::string cluster_secret_;
};

}  // namespace expertmesh::coordinator
