// A worker's connection to the coordinator (WorkerService over gRPC), and a
// comm::Store backed by the coordinator's key-value RPCs, used to bootstrap
// UCX data planes of standalone workers.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "proto/expertmesh.grpc.pb.h"
#include "worker/comm/bootstrap.h"

namespace expertmesh::worker::runtime {

// Converts a gRPC status to absl::Status (the codes map one to one).
absl::Status FromGrpc(const grpc::Status& s, absl::string_view what);

class CoordinatorClient {
 public:
  explicit CoordinatorClient(const std::string& address);
  const std::string& address() const { return address_; }

  // Retries until the coordinator answers or `deadline` passes (the
  // coordinator may still be starting, or restarting).
  absl::StatusOr<v1::RegisterResponse> Register(const v1::RegisterRequest& req, absl::Time deadline);
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& req, absl::Duration timeout);
  absl::StatusOr<v1::SyncResponse> Sync(const v1::SyncRequest& req, absl::Duration timeout);
  absl::Status StoreSet(const std::string& key, const std::string& value, absl::Duration timeout);
  // found = false when the key does not exist (yet).
  absl::StatusOr<std::pair<bool, std::string>> StoreGet(const std::string& key, absl::Duration timeout);

 private:
  std::string address_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::WorkerService::Stub> stub_;
};

class CoordinatorStore : public comm::Store {
 public:
  explicit CoordinatorStore(CoordinatorClient* client) : client_(client) {}
  absl::Status Set(absl::string_view key, absl::string_view value) override;
  absl::StatusOr<std::string> Get(absl::string_view key, absl::Time deadline) override;

 private:
  CoordinatorClient* client_;
};

}  // namespace expertmesh::worker::runtime
