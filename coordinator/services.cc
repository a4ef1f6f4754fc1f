#include "coordinator/services.h"

#include <chrono>
#include <string>
#include <vector>

namespace expertmesh::coordinator {

grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

const char* GrpcCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN";
  }
}

namespace {
template <typename T>
grpc::Status Answer(absl::StatusOr<T> r, T* out) {
  if (!r.ok()) return ToGrpcStatus(r.status());
  *out = *std::move(r);
  return grpc::Status::OK;
}
}  // namespace

// ---------------------------------------------------------------- JobService

grpc::Status JobServiceImpl::SubmitJob(grpc::ServerContext* ctx, const v1::SubmitJobRequest* req,
                                       v1::SubmitJobResponse* resp) {
  if (grpc::Status a = auth_->Client(ctx, "JobService.SubmitJob"); !a.ok()) return a;
  return Answer(c_->SubmitJob(*req), resp);
}

grpc::Status JobServiceImpl::GetJob(grpc::ServerContext* ctx, const v1::GetJobRequest* req, v1::Job* resp) {
  if (grpc::Status a = auth_->Client(ctx, "JobService.GetJob"); !a.ok()) return a;
  return Answer(c_->GetJob(req->job_id()), resp);
}

grpc::Status JobServiceImpl::WatchJob(grpc::ServerContext* ctx, const v1::WatchJobRequest* req,
                                      grpc::ServerWriter<v1::WatchJobResponse>* writer) {
  if (grpc::Status a = auth_->Client(ctx, "JobService.WatchJob"); !a.ok()) return a;
  size_t cursor = 0;
  while (true) {
    std::vector<v1::WatchJobResponse> batch;
    // Short waits so that a client that went away is noticed.
    absl::StatusOr<bool> done = c_->WaitJobResults(req->job_id(), &cursor, absl::Now() + absl::Milliseconds(200), &batch);
    if (!done.ok()) return ToGrpcStatus(done.status());
    for (const auto& m : batch) {
      if (!writer->Write(m)) return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
    }
    if (*done) return grpc::Status::OK;
    if (ctx->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
  }
}

grpc::Status JobServiceImpl::CancelJob(grpc::ServerContext* ctx, const v1::CancelJobRequest* req, v1::Job* resp) {
  if (grpc::Status a = auth_->Client(ctx, "JobService.CancelJob"); !a.ok()) return a;
  return Answer(c_->CancelJob(req->job_id()), resp);
}

grpc::Status JobServiceImpl::ListJobs(grpc::ServerContext* ctx, const v1::ListJobsRequest* req,
                                      v1::ListJobsResponse* resp) {
  if (grpc::Status a = auth_->Client(ctx, "JobService.ListJobs"); !a.ok()) return a;
  return Answer(c_->ListJobs(*req), resp);
}

// ---------------------------------------------------------------- ClusterService

grpc::Status ClusterServiceImpl::GetClusterStatus(grpc::ServerContext* ctx, const v1::GetClusterStatusRequest*,
                                                  v1::ClusterStatus* resp) {
  if (grpc::Status a = auth_->Client(ctx, "ClusterService.GetClusterStatus"); !a.ok()) return a;
  *resp = c_->GetClusterStatus();
  return grpc::Status::OK;
}

grpc::Status ClusterServiceImpl::Shutdown(grpc::ServerContext* ctx, const v1::ShutdownRequest*, v1::ShutdownResponse*) {
  if (grpc::Status a = auth_->Client(ctx, "ClusterService.Shutdown"); !a.ok()) return a;
  c_->RequestShutdown();
  return grpc::Status::OK;
}

grpc::Status ClusterServiceImpl::RebalanceExperts(grpc::ServerContext* ctx, const v1::RebalanceExpertsRequest* req,
                                                  v1::RebalanceExpertsResponse* resp) {
  if (grpc::Status a = auth_->Client(ctx, "ClusterService.RebalanceExperts"); !a.ok()) return a;
  return Answer(c_->RebalanceExperts(*req), resp);
}

// ---------------------------------------------------------------- WorkerService

grpc::Status WorkerServiceImpl::Register(grpc::ServerContext* ctx, const v1::RegisterRequest* req,
                                         v1::RegisterResponse* resp) {
  if (grpc::Status a = auth_->Worker(ctx, "WorkerService.Register"); !a.ok()) return a;
  absl::Duration wait = absl::Seconds(c_->options().register_timeout_s);
  const auto left = ctx->deadline() - std::chrono::system_clock::now();  // huge without a client deadline
  if (left < absl::ToChronoSeconds(wait)) wait = absl::FromChrono(left);
  const absl::Time deadline = absl::Now() + wait;
  return Answer(c_->Register(*req, deadline, [ctx] { return ctx->IsCancelled(); }), resp);
}

grpc::Status WorkerServiceImpl::Heartbeat(grpc::ServerContext* ctx, const v1::HeartbeatRequest* req,
                                          v1::HeartbeatResponse* resp) {
  if (grpc::Status a = auth_->Worker(ctx, "WorkerService.Heartbeat"); !a.ok()) return a;
  return Answer(c_->Heartbeat(*req), resp);
}

grpc::Status WorkerServiceImpl::Sync(grpc::ServerContext* ctx, const v1::SyncRequest* req, v1::SyncResponse* resp) {
  if (grpc::Status a = auth_->Worker(ctx, "WorkerService.Sync"); !a.ok()) return a;
  return Answer(c_->Sync(*req), resp);
}

grpc::Status WorkerServiceImpl::StoreSet(grpc::ServerContext* ctx, const v1::StoreSetRequest* req, v1::StoreSetResponse*) {
  if (grpc::Status a = auth_->Worker(ctx, "WorkerService.StoreSet"); !a.ok()) return a;
  return ToGrpcStatus(c_->StoreSet(req->key(), req->value()));
}

grpc::Status WorkerServiceImpl::StoreGet(grpc::ServerContext* ctx, const v1::StoreGetRequest* req,
                                         v1::StoreGetResponse* resp) {
  if (grpc::Status a = auth_->Worker(ctx, "WorkerService.StoreGet"); !a.ok()) return a;
  absl::StatusOr<std::optional<std::string>> v = c_->StoreGet(req->key());
  if (!v.ok()) return ToGrpcStatus(v.status());
  resp->set_found(v->has_value());
  if (v->has_value()) resp->set_value(**v);
  return grpc::Status::OK;
}

}  // namespace expertmesh::coordinator
