#include "coordinator/auth.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "glog/logging.h"
#include "proto/security.h"

namespace expertmesh::coordinator {
namespace {

// The first value of `key` into *out; false when absent.
bool FindMetadata(const grpc::ServerContext* ctx, const char* key, std::string* out) {
  const auto& md = ctx->client_metadata();
  auto it = md.find(key);
  if (it == md.end()) return false;
  out->assign(it->second.data(), it->second.size());
  return true;
}

grpc::Status ToGrpc(const absl::Status& s, const grpc::ServerContext* ctx) {
  if (s.ok()) return grpc::Status::OK;
  LOG_EVERY_N(WARNING, 100) << "coordinator: refused a call from " << ctx->peer() << ": " << s.message()
                            << " (logged once per 100 refusals)";
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

}  // namespace

absl::Status Authenticator::CheckClient(const std::string* authorization, const std::string* worker_secret,
                                        absl::string_view service) const {
  if (client_token_.empty()) return absl::OkStatus();
  if (authorization == nullptr) {
    if (worker_secret != nullptr) {
      return absl::PermissionDeniedError(absl::StrCat(service, ": the cluster secret does not grant client calls; "
                                                      "send the client bearer token (--auth-token-file)"));
    }
    return absl::UnauthenticatedError(
        absl::StrCat(service, ": missing bearer token (--auth-token-file or $EXPERTMESH_API_KEY)"));
  }
  constexpr absl::string_view kBearer = "Bearer ";
  if (!absl::StartsWith(*authorization, kBearer)) {
    return absl::UnauthenticatedError(
        absl::StrCat(service, ": the authorization header is not \"Bearer <token>\" (--auth-token-file)"));
  }
  if (!rpc::ConstantTimeEquals(absl::string_view(*authorization).substr(kBearer.size()), client_token_)) {
    return absl::PermissionDeniedError(
        absl::StrCat(service, ": wrong bearer token (not the coordinator's --auth-token-file)"));
  }
  return absl::OkStatus();
}

absl::Status Authenticator::CheckWorker(const std::string* authorization, const std::string* worker_secret,
                                        absl::string_view service) const {
  if (cluster_secret_.empty()) return absl::OkStatus();
  if (worker_secret == nullptr) {
    if (authorization != nullptr) {
      return absl::PermissionDeniedError(absl::StrCat(
          service, ": a client token does not grant worker calls; workers need the cluster secret "
                   "(--cluster-secret-file)"));
    }
    return absl::UnauthenticatedError(
        absl::StrCat(service, ": missing cluster secret (x-expertmesh-worker-secret; --cluster-secret-file)"));
  }
  if (!rpc::ConstantTimeEquals(*worker_secret, cluster_secret_)) {
    return absl::PermissionDeniedError(
        absl::StrCat(service, ": wrong cluster secret (not the coordinator's --cluster-secret-file)"));
  }
  return absl::OkStatus();
}

grpc::Status Authenticator::Client(const grpc::ServerContext* ctx, absl::string_view service) const {
  if (client_token_.empty()) return grpc::Status::OK;
  std::string auth, secret;
  const bool has_auth = FindMetadata(ctx, rpc::kAuthorizationKey, &auth);
  const bool has_secret = FindMetadata(ctx, rpc::kWorkerSecretKey, &secret);
  return ToGrpc(CheckClient(has_auth ? &auth : nullptr, has_secret ? &secret : nullptr, service), ctx);
}

grpc::Status Authenticator::Worker(const grpc::ServerContext* ctx, absl::string_view service) const {
  if (cluster_secret_.empty()) return grpc::Status::OK;
  std::string auth, secret;
  const bool has_auth = FindMetadata(ctx, rpc::kAuthorizationKey, &auth);
  const bool has_secret = FindMetadata(ctx, rpc::kWorkerSecretKey, &secret);
  return ToGrpc(CheckWorker(has_auth ? &auth : nullptr, has_secret ? &secret : nullptr, service), ctx);
}

}  // namespace expertmesh::coordinator
