// The coordinator's gRPC services: thin sync services that turn each call
// into one call on the Coordinator state object and its absl::Status into a
// grpc::Status (the codes map one to one). Every method first checks the
// caller's credential with the Authenticator (coordinator/auth.h): the client
// token for JobService and ClusterService, the cluster secret for
// WorkerService.
#pragma once

#include "absl/status/status.h"
#include "coordinator/auth.h"
#include "coordinator/coordinator.h"
#include "grpcpp/grpcpp.h"
#include "proto/expertmesh.grpc.pb.h"

namespace expertmesh::coordinator {

grpc::Status ToGrpcStatus(const absl::Status& s);
absl::Status FromGrpcStatus(const grpc::Status& s);
// "INVALID_ARGUMENT" etc., for messages.
const char* GrpcCodeName(grpc::StatusCode code);

class JobServiceImpl final : public v1::JobService::Service {
 public:
  JobServiceImpl(Coordinator* c, const Authenticator* auth) : c_(c), auth_(auth) {}
  grpc::Status SubmitJob(grpc::ServerContext* ctx, const v1::SubmitJobRequest* req, v1::SubmitJobResponse* resp) override;
  grpc::Status GetJob(grpc::ServerContext* ctx, const v1::GetJobRequest* req, v1::Job* resp) override;
  grpc::Status WatchJob(grpc::ServerContext* ctx, const v1::WatchJobRequest* req,
                        grpc::ServerWriter<v1::WatchJobResponse>* writer) override;
  grpc::Status CancelJob(grpc::ServerContext* ctx, const v1::CancelJobRequest* req, v1::Job* resp) override;
  grpc::Status ListJobs(grpc::ServerContext* ctx, const v1::ListJobsRequest* req, v1::ListJobsResponse* resp) override;

 private:
  Coordinator* c_;
  const Authenticator* auth_;
};

class ClusterServiceImpl final : public v1::ClusterService::Service {
 public:
  ClusterServiceImpl(Coordinator* c, const Authenticator* auth) : c_(c), auth_(auth) {}
  grpc::Status GetClusterStatus(grpc::ServerContext* ctx, const v1::GetClusterStatusRequest*,
                                v1::ClusterStatus* resp) override;
  grpc::Status Shutdown(grpc::ServerContext* ctx, const v1::ShutdownRequest*, v1::ShutdownResponse*) override;
  grpc::Status RebalanceExperts(grpc::ServerContext* ctx, const v1::RebalanceExpertsRequest* req,
                                v1::RebalanceExpertsResponse* resp) override;

 private:
  Coordinator* c_;
  const Authenticator* auth_;
};

class WorkerServiceImpl final : public v1::WorkerService::Service {
 public:
  WorkerServiceImpl(Coordinator* c, const Authenticator* auth) : c_(c), auth_(auth) {}
  grpc::Status Register(grpc::ServerContext* ctx, const v1::RegisterRequest* req, v1::RegisterResponse* resp) override;
  grpc::Status Heartbeat(grpc::ServerContext* ctx, const v1::HeartbeatRequest* req, v1::HeartbeatResponse* resp) override;
  grpc::Status Sync(grpc::ServerContext* ctx, const v1::SyncRequest* req, v1::SyncResponse* resp) override;
  grpc::Status StoreSet(grpc::ServerContext* ctx, const v1::StoreSetRequest* req, v1::StoreSetResponse*) override;
  grpc::Status StoreGet(grpc::ServerContext* ctx, const v1::StoreGetRequest* req, v1::StoreGetResponse* resp) override;

 private:
  Coordinator* c_;
  const Authenticator* auth_;
};

}  // namespace expertmesh::coordinator
