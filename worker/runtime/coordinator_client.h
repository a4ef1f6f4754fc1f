// A worker's connection to the coordinator (WorkerService), behind an
// interface so that tests drive the worker with a fake coordinator, and a
// comm::Store backed by the coordinator's key-value RPCs, used to bootstrap
// UCX data planes of standalone workers.
//
// Contract: every method may be called from any thread at once (the
// heartbeat thread, the stage thread, the expert loader); each one blocks
// for at most its timeout or deadline. Errors carry canonical codes (gRPC's
// codes map one to one): UNAVAILABLE / DEADLINE_EXCEEDED for an unreachable
// coordinator, NOT_FOUND for a coordinator that does not know this worker
// (restarted), FAILED_PRECONDITION for a place taken over by another worker,
// RESOURCE_EXHAUSTED / ALREADY_EXISTS when no place is free.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "proto/expertmesh.grpc.pb.h"
#include "proto/security.h"
#include "worker/comm/bootstrap.h"

namespace expertmesh::worker::runtime {

// Converts a gRPC status to absl::Status (the codes map one to one).
absl::Status FromGrpc(const grpc::Status& s, absl::string_view what);

class CoordinatorClient {
 public:
  virtual ~CoordinatorClient() = default;
  // host:port, for messages.
  virtual const std::string& address() const = 0;

  // Retries while the coordinator is unreachable until it answers or
  // `deadline` passes (it may still be starting, or restarting); other errors
  // return at once.
  virtual absl::StatusOr<v1::RegisterResponse> Register(const v1::RegisterRequest& req, absl::Time deadline) = 0;
  // One try each. The heartbeat also reports load, stage times and staging.
  virtual absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& req,
                                                          absl::Duration timeout) = 0;
  virtual absl::StatusOr<v1::SyncResponse> Sync(const v1::SyncRequest& req, absl::Duration timeout) = 0;
  // The coordinator's key-value store (bootstrap of UCX data planes).
  virtual absl::Status StoreSet(const std::string& key, const std::string& value, absl::Duration timeout) = 0;
  // found = false when the key does not exist (yet).
  virtual absl::StatusOr<std::pair<bool, std::string>> StoreGet(const std::string& key, absl::Duration timeout) = 0;
};

// The real client: WorkerService over one gRPC channel.
class GrpcCoordinatorClient : public CoordinatorClient {
 public:
  // `security`: TLS and the cluster secret, sent with every call.
  GrpcCoordinatorClient(const std::string& address, const rpc::ClientSecurity& security = {});
  const std::string& address() const override { return address_; }

  absl::StatusOr<v1::RegisterResponse> Register(const v1::RegisterRequest& req, absl::Time deadline) override;
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& req, absl::Duration timeout) override;
  absl::StatusOr<v1::SyncResponse> Sync(const v1::SyncRequest& req, absl::Duration timeout) override;
  absl::Status StoreSet(const std::string& key, const std::string& value, absl::Duration timeout) override;
  absl::StatusOr<std::pair<bool, std::string>> StoreGet(const std::string& key, absl::Duration timeout) override;

 private:
  std::string address_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::WorkerService::Stub> stub_;
};

// The coordinator's key-value store for the data planes' bootstrap. Get
// polls until the key appears, the deadline passes, or the generation the
// key belongs to moved on (the coordinator answers ABORTED, or `abandon`, if
// given, returns true): kAborted, the worker rejoins the newer generation.
class CoordinatorStore : public comm::Store {
 public:
  explicit CoordinatorStore(CoordinatorClient* client, std::function<bool()> abandon = nullptr)
      : client_(client), abandon_(std::move(abandon)) {}
  absl::Status Set(absl::string_view key, absl::string_view value) override;
  absl::StatusOr<std::string> Get(absl::string_view key, absl::Time deadline) override;

 private:
  CoordinatorClient* client_;
  std::function<bool()> abandon_;
};

}  // namespace expertmesh::worker::runtime
