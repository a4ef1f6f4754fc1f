// gRPC client verbs: submit, status, cancel, jobs, shutdown.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "coordinator/services.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/grpcpp.h"
#include "launch/flags.h"
#include "launch/prompts.h"
#include "launch/verbs.h"
#include "nlohmann/json.hpp"
#include "proto/expertmesh.grpc.pb.h"
#include "proto/security.h"

ABSL_FLAG(std::string, server, "", "the coordinator's address, host:port");
ABSL_FLAG(std::string, request_id, "",
          "client request id: a retried submit with the same id returns the same job (default: a random one)");
ABSL_FLAG(std::string, job, "", "job id (cancel)");
ABSL_FLAG(bool, detach, false, "submit: print {\"job_id\": ...} and return without waiting for the results");
ABSL_FLAG(double, rpc_timeout_s, 30, "deadline of each unary call");
ABSL_FLAG(double, retry_s, 300,
          "keep retrying while the coordinator is unreachable (e.g. restarting) for this long; 0 = no retries");
ABSL_FLAG(double, wait_s, 60,
          "shutdown: wait this long for the coordinator to exit; rebalance: for the workers to switch (0 = do not "
          "wait)");
ABSL_FLAG(bool, force, false, "rebalance: start even when the predicted gain is below the coordinator's --eplb-min-gain");
ABSL_FLAG(int32_t, limit, 20, "jobs: how many of the most recent jobs to list");

namespace expertmesh::launch {
namespace {

namespace v1 = ::expertmesh::v1;

int Fail(const char* verb, const std::string& message, int code = 1) {
  std::fprintf(stderr, "expertmesh %s: %s\n", verb, message.c_str());
  return code;
}

int FailRpc(const char* verb, const grpc::Status& s, const std::string& server) {
  std::string hint;
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE || s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    hint = absl::StrCat(" (is the coordinator running at ", server, "? with TLS, give --tls-ca)");
  } else if (s.error_code() == grpc::StatusCode::UNAUTHENTICATED ||
             s.error_code() == grpc::StatusCode::PERMISSION_DENIED) {
    hint = " (give the coordinator's client token: --auth-token-file FILE or $EXPERTMESH_API_KEY)";
  }
  return Fail(verb, absl::StrCat(coordinator::GrpcCodeName(s.error_code()), ": ", s.error_message(), hint));
}

// TLS and the bearer token of this client (read by ServerFlag).
rpc::ClientSecurity& Security() {
  static rpc::ClientSecurity security;
  return security;
}

std::shared_ptr<grpc::Channel> Connect(const std::string& server) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(256 << 20);
  args.SetMaxSendMessageSize(256 << 20);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);  // reconnect quickly after a coordinator restart
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  return rpc::MakeChannel(server, Security(), args);
}

void SetDeadline(grpc::ClientContext* ctx) {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(absl::GetFlag(FLAGS_rpc_timeout_s) * 1000)));
}

// GetClusterStatus with the --rpc-timeout-s deadline.
grpc::Status FetchStatus(v1::ClusterService::Stub* stub, v1::ClusterStatus* st) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  return stub->GetClusterStatus(&ctx, v1::GetClusterStatusRequest(), st);
}

bool Retryable(const grpc::Status& s) {
  return s.error_code() == grpc::StatusCode::UNAVAILABLE || s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
}

// Checks --server and returns it, and reads the TLS and token flags, or
// prints the error.
bool ServerFlag(const char* verb, std::string* server) {
  *server = absl::GetFlag(FLAGS_server);
  if (server->empty()) {
    Fail(verb, "--server HOST:PORT is required (the coordinator's address)", 2);
    return false;
  }
  absl::StatusOr<rpc::ClientSecurity> security = ClientSecurityFromFlags(Caller::kClient);
  if (!security.ok()) {
    Fail(verb, std::string(security.status().message()), 2);
    return false;
  }
  Security() = *std::move(security);
  return true;
}

std::string JsonOf(const google::protobuf::Message& m) {
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  o.always_print_primitive_fields = true;
  std::string out;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  return out;
}

std::string StateName(v1::JobState s) {
  std::string n = v1::JobState_Name(s);
  return n.rfind("JOB_STATE_", 0) == 0 ? n.substr(10) : n;
}

}  // namespace

int SubmitMain(int argc, char** argv) {
  const char* verb = "submit";
  ParseVerbFlags(argc, argv);
  std::string server;
  if (!ServerFlag(verb, &server)) return 2;
  const std::string prompts_path = absl::GetFlag(FLAGS_prompts);
  if (prompts_path.empty()) return Fail(verb, "--prompts FILE is required (JSON lines {\"tokens\": [ids...]})", 2);
  std::vector<int32_t> stop;
  for (const auto& s : absl::GetFlag(FLAGS_stop_token_ids)) {
    int32_t v = 0;
    if (!absl::SimpleAtoi(s, &v)) return Fail(verb, absl::StrCat("--stop_token_ids: \"", s, "\" is not an integer"), 2);
    stop.push_back(v);
  }
  auto prompts = ReadPrompts(prompts_path);
  if (!prompts.ok()) return Fail(verb, std::string(prompts.status().message()));
  v1::SubmitJobRequest req;
  std::string request_id = absl::GetFlag(FLAGS_request_id);
  if (request_id.empty()) {
    std::random_device rd;
    request_id = absl::StrFormat("submit-%08x%08x", rd(), rd());
  }
  req.set_client_request_id(request_id);
  for (size_t i = 0; i < prompts->size(); ++i) {
    v1::SequenceRequest* s = req.add_sequences();
    s->mutable_tokens()->Add((*prompts)[i].begin(), (*prompts)[i].end());
    s->set_max_new_tokens(static_cast<int32_t>(std::min<int64_t>(absl::GetFlag(FLAGS_max_new_tokens), INT32_MAX)));
    v1::SamplingParams* sp = s->mutable_sampling();
    sp->set_temperature(static_cast<float>(absl::GetFlag(FLAGS_temperature)));
    sp->set_top_k(static_cast<int32_t>(std::clamp<int64_t>(absl::GetFlag(FLAGS_top_k), -1, INT32_MAX)));
    sp->set_top_p(static_cast<float>(absl::GetFlag(FLAGS_top_p)));
    sp->set_seed(absl::GetFlag(FLAGS_seed) + i);  // one seed per sequence, as `generate` does
    s->mutable_stop_token_ids()->Add(stop.begin(), stop.end());
  }

  const absl::Time start = absl::Now();
  const absl::Time give_up = start + absl::Seconds(absl::GetFlag(FLAGS_retry_s));
  auto channel = Connect(server);
  auto stub = v1::JobService::NewStub(channel);
  absl::Duration backoff = absl::Milliseconds(200);
  auto wait_retry = [&](const grpc::Status& s) {
    if (!Retryable(s) || absl::Now() + backoff > give_up) return false;
    std::fprintf(stderr, "expertmesh submit: %s: %s; retrying\n", coordinator::GrpcCodeName(s.error_code()),
                 s.error_message().c_str());
    absl::SleepFor(backoff);
    backoff = std::min(backoff * 2, absl::Seconds(2));
    return true;
  };

  v1::SubmitJobResponse submitted;
  while (true) {
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    grpc::Status s = stub->SubmitJob(&ctx, req, &submitted);
    if (s.ok()) break;
    if (!wait_retry(s)) return FailRpc(verb, s, server);
  }
  const std::string job_id = submitted.job_id();
  if (absl::GetFlag(FLAGS_detach)) {
    std::printf("%s\n", nlohmann::json({{"job_id", job_id}}).dump().c_str());
    return 0;
  }
  std::fprintf(stderr, "expertmesh submit: job %s, %d sequences\n", job_id.c_str(), req.sequences_size());

  // Watch until the job is final; a broken stream (coordinator restart) is watched again.
  std::map<int, v1::SequenceResult> results;
  v1::JobState state = v1::JOB_STATE_QUEUED;
  backoff = absl::Milliseconds(200);
  while (true) {
    grpc::ClientContext ctx;
    v1::WatchJobRequest wr;
    wr.set_job_id(job_id);
    auto reader = stub->WatchJob(&ctx, wr);
    v1::WatchJobResponse m;
    while (reader->Read(&m)) {
      results[m.result().index()] = m.result();
      state = m.state();
      backoff = absl::Milliseconds(200);
    }
    grpc::Status s = reader->Finish();
    if (s.ok()) break;
    if (!wait_retry(s)) return FailRpc(verb, s, server);
  }
  int64_t tokens = 0;
  int cancelled = 0;
  for (int i = 0; i < req.sequences_size(); ++i) {
    auto it = results.find(i);
    if (it == results.end() || it->second.finish_reason() == v1::FINISH_REASON_CANCELLED ||
        it->second.finish_reason() == v1::FINISH_REASON_ERROR) {  // not printed as a result
      ++cancelled;
      continue;
    }
    std::vector<int32_t> toks(it->second.tokens().begin(), it->second.tokens().end());
    tokens += static_cast<int64_t>(toks.size());
    nlohmann::json j = {{"index", i}, {"tokens", toks}};
    std::printf("%s\n", j.dump().c_str());
  }
  std::fflush(stdout);
  const double secs = absl::ToDoubleSeconds(absl::Now() - start);
  std::fprintf(stderr, "submit: job %s %s: %d sequences, %lld new tokens in %.3f s (%.1f tokens/s)\n", job_id.c_str(),
               StateName(state).c_str(), req.sequences_size(), static_cast<long long>(tokens), secs,
               secs > 0 ? tokens / secs : 0.0);
  if (state != v1::JOB_STATE_SUCCEEDED) {
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    v1::GetJobRequest g;
    g.set_job_id(job_id);
    v1::Job job;
    const bool got = stub->GetJob(&ctx, g, &job).ok();
    return Fail(verb, absl::StrCat("job ", job_id, " ended ", StateName(state), " with ", cancelled,
                                   " sequences unfinished", got && !job.error().empty() ? ": " + job.error() : ""));
  }
  return 0;
}

int StatusMain(int argc, char** argv) {
  const char* verb = "status";
  ParseVerbFlags(argc, argv);
  std::string server;
  if (!ServerFlag(verb, &server)) return 2;
  auto stub = v1::ClusterService::NewStub(Connect(server));
  v1::ClusterStatus st;
  grpc::Status s = FetchStatus(stub.get(), &st);
  if (!s.ok()) return FailRpc(verb, s, server);
  if (absl::GetFlag(FLAGS_json)) {
    std::printf("%s\n", JsonOf(st).c_str());
    return 0;
  }
  const v1::Plan& p = st.plan();
  std::printf("cluster %s: %s, plan pp=%d ep=%d redundant_experts=%d, %d sequences queued, %d running\n",
              server.c_str(), st.serving() ? "SERVING" : "NOT SERVING", p.pp(), p.ep(), p.redundant_experts(),
              st.queued_sequences(), st.running_sequences());
  std::printf("checkpoint %s\n", p.checkpoint().c_str());
  std::printf("data-plane generation %lld, %lld workers lost since the coordinator started\n",
              static_cast<long long>(st.generation()), static_cast<long long>(st.workers_lost()));
  const v1::RebalanceStatus& rb = st.rebalance();
  std::printf("expert placement version %lld, %lld rebalances%s; imbalance since then %.3f over %lld routed tokens "
              "per MoE layer%s\n",
              static_cast<long long>(rb.placement_version()), static_cast<long long>(rb.rebalances()),
              rb.rebalances() > 0 ? absl::StrFormat(" (last %.3f -> %.3f)", rb.imbalance_before(),
                                                    rb.imbalance_after()).c_str() : "",
              rb.window_imbalance(), static_cast<long long>(rb.window_tokens()),
              rb.interval_s() > 0 ? absl::StrFormat(", automatic every %g s", rb.interval_s()).c_str() : "");
  if (rb.pending_version() > 0) {
    std::printf("placement version %lld pending: %d of %d workers loaded it\n",
                static_cast<long long>(rb.pending_version()), rb.workers_staged(), st.workers_size());
  }
  if (!rb.last_error().empty()) std::printf("last rebalance problem: %s\n", rb.last_error().c_str());
  for (const auto& sp : p.stages()) {
    std::string moe;
    if (!sp.placement().empty()) {
      int lo = INT32_MAX, hi = -1;
      for (const auto& [layer, placement] : sp.placement()) {
        lo = std::min(lo, layer);
        hi = std::max(hi, layer);
      }
      std::string slots;  // of the first MoE layer
      for (const auto& r : sp.placement().at(lo).ranks()) {
        slots += absl::StrCat(slots.empty() ? "" : "/", r.slot_experts_size());
      }
      moe = absl::StrCat(", MoE layers ", lo, "..", hi, " (expert slots per rank ", slots, ")");
    }
    std::printf("stage %d: layers [%d, %d)%s%s%s\n", sp.stage(), sp.layer_begin(), sp.layer_end(),
                sp.has_embedding() ? " +embedding" : "", sp.has_head() ? " +head" : "", moe.c_str());
  }
  std::printf("\n%-6s %-5s %-4s %-28s %-10s %-14s %-7s %-9s %s\n", "worker", "stage", "rank", "host:pid", "health",
              "heartbeat", "active", "steps", "tokens");
  const int64_t now = absl::ToUnixMillis(absl::Now());
  for (const auto& w : st.workers()) {
    std::string health = v1::WorkerHealth_Name(w.health());
    health = health.rfind("WORKER_HEALTH_", 0) == 0 ? health.substr(14) : health;
    if (w.health() == v1::WORKER_HEALTH_UNSPECIFIED) health = "-";
    const std::string hb = w.last_heartbeat_unix_ms() > 0
                               ? absl::StrFormat("%.1f s ago", (now - w.last_heartbeat_unix_ms()) / 1000.0)
                               : std::string("-");
    const std::string who = w.host().empty() ? std::string("(not registered)") : absl::StrCat(w.host(), ":", w.pid());
    std::printf("%-6d %-5d %-4d %-28s %-10s %-14s %-7d %-9lld %lld\n", w.worker_id(), w.stage(), w.ep_rank(),
                who.c_str(), health.c_str(), hb.c_str(), w.active_sequences(), static_cast<long long>(w.steps()),
                static_cast<long long>(w.tokens_processed()));
  }
  std::printf("\nexpert load (routed tokens since start):\n");
  for (const auto& l : st.expert_load()) {
    int64_t total = 0, hot = 0;
    int hot_e = 0;
    for (int e = 0; e < l.tokens_per_expert_size(); ++e) {
      total += l.tokens_per_expert(e);
      if (l.tokens_per_expert(e) > hot) {
        hot = l.tokens_per_expert(e);
        hot_e = e;
      }
    }
    const double mean = l.tokens_per_expert_size() > 0 ? static_cast<double>(total) / l.tokens_per_expert_size() : 0;
    if (total == 0) {
      std::printf("  layer %-3d no tokens yet\n", l.layer());
    } else {
      std::printf("  layer %-3d %lld tokens, hottest expert %d (%lld), max/mean %.2f\n", l.layer(),
                  static_cast<long long>(total), hot_e, static_cast<long long>(hot), hot / mean);
    }
  }
  return 0;
}

int CancelMain(int argc, char** argv) {
  const char* verb = "cancel";
  ParseVerbFlags(argc, argv);
  std::string server;
  if (!ServerFlag(verb, &server)) return 2;
  const std::string job_id = absl::GetFlag(FLAGS_job);
  if (job_id.empty()) return Fail(verb, "--job ID is required", 2);
  auto stub = v1::JobService::NewStub(Connect(server));
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  v1::CancelJobRequest req;
  req.set_job_id(job_id);
  v1::Job job;
  grpc::Status s = stub->CancelJob(&ctx, req, &job);
  if (!s.ok()) return FailRpc(verb, s, server);
  std::printf("%s\n", nlohmann::json({{"job_id", job.job_id()},
                                      {"state", StateName(job.state())},
                                      {"num_sequences", job.num_sequences()},
                                      {"num_finished", job.num_finished()}})
                          .dump()
                          .c_str());
  return 0;
}

int JobsMain(int argc, char** argv) {
  const char* verb = "jobs";
  ParseVerbFlags(argc, argv);
  std::string server;
  if (!ServerFlag(verb, &server)) return 2;
  auto stub = v1::JobService::NewStub(Connect(server));
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  v1::ListJobsRequest req;
  req.set_limit(absl::GetFlag(FLAGS_limit));
  v1::ListJobsResponse resp;
  grpc::Status s = stub->ListJobs(&ctx, req, &resp);
  if (!s.ok()) return FailRpc(verb, s, server);
  if (absl::GetFlag(FLAGS_json)) {
    std::printf("%s\n", JsonOf(resp).c_str());
    return 0;
  }
  std::printf("%-12s %-10s %-9s %-10s %s\n", "job", "state", "finished", "tokens", "request id");
  for (const auto& j : resp.jobs()) {
    std::printf("%-12s %-10s %4d/%-4d %-10lld %s\n", j.job_id().c_str(), StateName(j.state()).c_str(), j.num_finished(),
                j.num_sequences(), static_cast<long long>(j.generated_tokens()), j.client_request_id().c_str());
  }
  return 0;
}

int RebalanceMain(int argc, char** argv) {
  const char* verb = "rebalance";
  ParseVerbFlags(argc, argv);
  std::string server;
  if (!ServerFlag(verb, &server)) return 2;
  auto stub = v1::ClusterService::NewStub(Connect(server));
  v1::RebalanceExpertsResponse r;
  {
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    v1::RebalanceExpertsRequest req;
    req.set_force(absl::GetFlag(FLAGS_force));
    grpc::Status s = stub->RebalanceExperts(&ctx, req, &r);
    if (!s.ok()) return FailRpc(verb, s, server);
  }
  auto print = [&](const std::string& outcome, int64_t version) {
    std::printf("%s\n", nlohmann::json({{"outcome", outcome},
                                        {"reason", r.reason()},
                                        {"placement_version", version},
                                        {"imbalance_before", r.imbalance_before()},
                                        {"imbalance_after", r.imbalance_after()},
                                        {"experts_to_load", r.experts_to_load()}})
                            .dump()
                            .c_str());
  };
  if (!r.started()) {
    print("unchanged", 0);
    return 0;
  }
  const double wait_s = absl::GetFlag(FLAGS_wait_s);
  if (wait_s <= 0) {
    print("pending", r.pending_version());
    return 0;
  }
  std::fprintf(stderr, "rebalance: placement version %lld: imbalance %.3f -> %.3f; waiting for the workers to load "
               "%lld experts\n", static_cast<long long>(r.pending_version()), r.imbalance_before(),
               r.imbalance_after(), static_cast<long long>(r.experts_to_load()));
  const absl::Time until = absl::Now() + absl::Seconds(wait_s);
  while (absl::Now() < until) {
    v1::ClusterStatus st;
    grpc::Status s = FetchStatus(stub.get(), &st);
    if (!s.ok()) return FailRpc(verb, s, server);
    const v1::RebalanceStatus& rb = st.rebalance();
    if (rb.placement_version() >= r.pending_version()) {
      print("committed", rb.placement_version());
      return 0;
    }
    if (rb.pending_version() != r.pending_version()) {
      return Fail(verb, absl::StrCat("placement version ", r.pending_version(), " was dropped: ", rb.last_error()));
    }
    absl::SleepFor(absl::Milliseconds(200));
  }
  return Fail(verb, absl::StrCat("placement version ", r.pending_version(), " still pending after ", wait_s,
                                 " s (see `expertmesh status`)"));
}

int ShutdownMain(int argc, char** argv) {
  const char* verb = "shutdown";
  ParseVerbFlags(argc, argv);
  std::string server;
  if (!ServerFlag(verb, &server)) return 2;
  auto channel = Connect(server);
  auto stub = v1::ClusterService::NewStub(channel);
  {
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    v1::ShutdownResponse r;
    grpc::Status s = stub->Shutdown(&ctx, v1::ShutdownRequest(), &r);
    if (!s.ok()) return FailRpc(verb, s, server);
  }
  const double wait_s = absl::GetFlag(FLAGS_wait_s);
  if (wait_s <= 0) {
    std::printf("shutdown requested\n");
    return 0;
  }
  const absl::Time until = absl::Now() + absl::Seconds(wait_s);
  while (absl::Now() < until) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    v1::ClusterStatus st;
    grpc::Status s = stub->GetClusterStatus(&ctx, v1::GetClusterStatusRequest(), &st);
    if (s.error_code() == grpc::StatusCode::UNAVAILABLE) {
      std::printf("the coordinator at %s has shut down\n", server.c_str());
      return 0;
    }
    absl::SleepFor(absl::Milliseconds(200));
  }
  return Fail(verb, absl::StrCat("shutdown requested, but the coordinator still answers after ", wait_s, " s"));
}

}  // namespace expertmesh::launch
