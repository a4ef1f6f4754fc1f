#include "worker/runtime/coordinator_client.h"

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "glog/logging.h"

namespace expertmesh::worker::runtime {

absl::Status FromGrpc(const grpc::Status& s, absl::string_view what) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), absl::StrCat(what, ": ", s.error_message()));
}

namespace {
void SetDeadline(grpc::ClientContext* ctx, absl::Duration timeout) {
  ctx->set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout));
}
}  // namespace

GrpcCoordinatorClient::GrpcCoordinatorClient(const std::string& address, const rpc::ClientSecurity& security)
    : address_(address) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, 256 << 20);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  channel_ = rpc::MakeChannel(address, security, args);
  stub_ = v1::WorkerService::NewStub(channel_);
}

absl::StatusOr<v1::RegisterResponse> GrpcCoordinatorClient::Register(const v1::RegisterRequest& req,
                                                                   absl::Time deadline) {
  absl::Status last;
  bool logged = false;
  while (absl::Now() < deadline) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(deadline));
    ctx.set_wait_for_ready(true);
    v1::RegisterResponse resp;
    grpc::Status s = stub_->Register(&ctx, req, &resp);
    if (s.ok()) return resp;
    last = FromGrpc(s, absl::StrCat("register with coordinator ", address_));
    if (s.error_code() != grpc::StatusCode::UNAVAILABLE && s.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) {
      return last;
    }
    if (!logged) {
      LOG(INFO) << "waiting for coordinator " << address_ << " (" << s.error_message() << ")";
      logged = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return absl::DeadlineExceededError(absl::StrCat("coordinator ", address_, " did not accept the registration in time: ",
                                                  last.message()));
}

absl::StatusOr<v1::HeartbeatResponse> GrpcCoordinatorClient::Heartbeat(const v1::HeartbeatRequest& req,
                                                                    absl::Duration timeout) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout);
  v1::HeartbeatResponse resp;
  grpc::Status s = stub_->Heartbeat(&ctx, req, &resp);
  if (!s.ok()) return FromGrpc(s, "heartbeat");
  return resp;
}

absl::StatusOr<v1::SyncResponse> GrpcCoordinatorClient::Sync(const v1::SyncRequest& req, absl::Duration timeout) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout);
  v1::SyncResponse resp;
  grpc::Status s = stub_->Sync(&ctx, req, &resp);
  if (!s.ok()) return FromGrpc(s, "sync");
  return resp;
}

absl::Status GrpcCoordinatorClient::StoreSet(const std::string& key, const std::string& value,
                                             absl::Duration timeout) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout);
  ctx.set_wait_for_ready(true);
  v1::StoreSetRequest req;
  req.set_key(key);
  req.set_value(value);
  v1::StoreSetResponse resp;
  return FromGrpc(stub_->StoreSet(&ctx, req, &resp), absl::StrCat("store set ", key));
}

absl::StatusOr<std::pair<bool, std::string>> GrpcCoordinatorClient::StoreGet(const std::string& key,
                                                                          absl::Duration timeout) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout);
  ctx.set_wait_for_ready(true);
  v1::StoreGetRequest req;
  req.set_key(key);
  v1::StoreGetResponse resp;
  grpc::Status s = stub_->StoreGet(&ctx, req, &resp);
  if (!s.ok()) return FromGrpc(s, absl::StrCat("store get ", key));
  return std::make_pair(resp.found(), resp.value());
}

absl::Status CoordinatorStore::Set(absl::string_view key, absl::string_view value) {
  return client_->StoreSet(std::string(key), std::string(value), absl::Seconds(30));
}

absl::StatusOr<std::string> CoordinatorStore::Get(absl::string_view key, absl::Time deadline) {
  absl::Duration backoff = absl::Milliseconds(2);
  while (true) {
    auto r = client_->StoreGet(std::string(key), std::max(absl::Seconds(1), deadline - absl::Now()));
    if (r.ok() && r->first) return r->second;
    if (absl::IsAborted(r.status())) return r.status();  // the coordinator: that generation moved on
    if (abandon_ && abandon_()) {
      return absl::AbortedError(absl::StrCat("gave up waiting for store key ", key,
                                             ": the data-plane generation moved on"));
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("store key ", key, " did not appear before the deadline",
                                                      r.ok() ? "" : absl::StrCat(" (", r.status().message(), ")")));
    }
    absl::SleepFor(backoff);
    backoff = std::min(backoff * 2, absl::Milliseconds(50));
  }
}

}  // namespace expertmesh::worker::runtime
