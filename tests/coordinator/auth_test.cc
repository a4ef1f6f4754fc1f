// Access control of the coordinator (coordinator/auth.h) and the validation of
// what workers report, through in-process channels: an outsider without
// credentials, a client presenting its token where a worker's secret is
// needed, forged Sync tokens and forged heartbeats are all refused.
#include <algorithm>
#include <chrono>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "coordinator/auth.h"
#include "coordinator/metrics.h"
#include "coordinator/server.h"
#include "google/protobuf/descriptor.h"
#include "grpcpp/generic/generic_stub.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "proto/security.h"
#include "tests/coordinator/health.grpc.pb.h"
#include "tests/coordinator/test_util.h"

namespace expertmesh::coordinator {
namespace {

using testing::FakeToken;
using testing::FakeWorker;
using testing::TempDir;

constexpr char kToken[] = "client-token-0123456789abcdef";
constexpr char kSecret[] = "cluster-secret-0123456789abcdef";

// Who calls, with which metadata.
struct Caller {
  const char* name;
  std::vector<std::pair<std::string, std::string>> metadata;
};
const Caller kOutsider{"outsider", {}};
const Caller kClient{"client token", {{"authorization", absl::StrCat("Bearer ", kToken)}}};
const Caller kWrongClient{"wrong client token", {{"authorization", "Bearer not-the-token-0123456789"}}};
const Caller kWorker{"cluster secret", {{"x-expertmesh-worker-secret", kSecret}}};
const Caller kWrongWorker{"wrong cluster secret", {{"x-expertmesh-worker-secret", "not-the-secret-0123456789"}}};

// Calls `method` ("/pkg.Service/Method") with an empty request and `caller`'s
// metadata; any method, unary or server-streaming, answers a status.
grpc::Status CallRaw(const std::shared_ptr<grpc::Channel>& channel, const std::string& method, const Caller& caller) {
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  for (const auto& [k, v] : caller.metadata) ctx.AddMetadata(k, v);
  grpc::Slice empty("");
  grpc::ByteBuffer request(&empty, 1);
  auto call = stub.PrepareUnaryCall(&ctx, method, request, &cq);
  call->StartCall();
  grpc::ByteBuffer response;
  grpc::Status status;
  call->Finish(&response, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  EXPECT_TRUE(cq.Next(&tag, &ok));
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  return status;
}

// Every method of a service, as "/expertmesh.v1.X/Method".
std::vector<std::string> Methods(const std::string& service) {
  const auto* d = google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(service);
  EXPECT_NE(d, nullptr) << service;
  std::vector<std::string> out;
  for (int i = 0; d != nullptr && i < d->method_count(); ++i) {
    out.push_back(absl::StrCat("/", service, "/", d->method(i)->name()));
  }
  return out;
}

class AuthTest : public testing::CoordinatorFixture {
 protected:
  AuthTest() : CoordinatorFixture({kToken, kSecret}) {}

  std::string Submit(int n, int max_new) {
    v1::SubmitJobRequest r;
    for (int i = 0; i < n; ++i) {
      v1::SequenceRequest* s = r.add_sequences();
      s->add_tokens(10 + i);
      s->set_max_new_tokens(max_new);
      s->mutable_sampling()->set_seed(static_cast<uint64_t>(i));
    }
    grpc::ClientContext ctx;
    v1::SubmitJobResponse resp;
    EXPECT_OK(jobs_->SubmitJob(&ctx, r, &resp));
    return resp.job_id();
  }
};

TEST_F(AuthTest, WorkerServiceNeedsTheClusterSecretAndAClientTokenIsNotEnough) {
  Start(Options(1, 2));
  const std::vector<std::string> methods = Methods("expertmesh.v1.WorkerService");
  // Register, Heartbeat, Sync, StoreSet, StoreGet: a new RPC must be added here (and checked by the service).
  ASSERT_EQ(methods.size(), 5u);
  for (const std::string& m : methods) {
    SCOPED_TRACE(m);
    EXPECT_ERROR(CallRaw(raw_, m, kOutsider), absl::StatusCode::kUnauthenticated, "missing cluster secret");
    EXPECT_ERROR(CallRaw(raw_, m, kClient), absl::StatusCode::kPermissionDenied,
                 "a client token does not grant worker calls");
    EXPECT_ERROR(CallRaw(raw_, m, kWrongWorker), absl::StatusCode::kPermissionDenied, "wrong cluster secret");
  }
  // Nothing the outsider sent took effect: no worker registered, nothing stored.
  const v1::ClusterStatus st = Status();
  for (const auto& w : st.workers()) EXPECT_TRUE(w.host().empty()) << w.ShortDebugString();
  FakeWorker fw(worker_);
  v1::StoreGetRequest g;
  g.set_key("x");
  v1::StoreGetResponse gr;
  grpc::ClientContext ctx;
  ASSERT_OK(fw.stub()->StoreGet(&ctx, g, &gr));
  EXPECT_FALSE(gr.found());
}

TEST_F(AuthTest, ClientServicesNeedTheClientTokenAndTheClusterSecretIsNotEnough) {
  Start(Options(1, 1));
  std::vector<std::string> methods = Methods("expertmesh.v1.JobService");
  const std::vector<std::string> cluster = Methods("expertmesh.v1.ClusterService");
  ASSERT_EQ(methods.size(), 5u);  // SubmitJob, GetJob, WatchJob, CancelJob, ListJobs
  ASSERT_EQ(cluster.size(), 3u);  // GetClusterStatus, Shutdown, RebalanceExperts
  methods.insert(methods.end(), cluster.begin(), cluster.end());
  for (const std::string& m : methods) {
    SCOPED_TRACE(m);
    EXPECT_ERROR(CallRaw(raw_, m, kOutsider), absl::StatusCode::kUnauthenticated,
                 "missing bearer token (--auth-token-file");
    EXPECT_ERROR(CallRaw(raw_, m, kWorker), absl::StatusCode::kPermissionDenied,
                 "the cluster secret does not grant client calls");
    EXPECT_ERROR(CallRaw(raw_, m, kWrongClient), absl::StatusCode::kPermissionDenied, "wrong bearer token");
  }
  // The refused Shutdown did nothing; with the token it works.
  EXPECT_FALSE(server_->coordinator()->WaitForShutdown(absl::ZeroDuration()));
  grpc::ClientContext ctx;
  v1::ShutdownResponse r;
  ASSERT_OK(cluster_->Shutdown(&ctx, v1::ShutdownRequest(), &r));
}

TEST_F(AuthTest, HealthStaysOpen) {
  Start(Options(1, 1));
  auto stub = grpc::health::v1::Health::NewStub(raw_);
  grpc::ClientContext ctx;
  grpc::health::v1::HealthCheckRequest req;
  grpc::health::v1::HealthCheckResponse resp;
  ASSERT_OK(stub->Check(&ctx, req, &resp));
  EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::NOT_SERVING);  // no workers yet
}

TEST_F(AuthTest, AuthenticatedClusterServesAJob) {
  Start(Options(1, 2));
  auto w = RegisterAll(2);
  const std::string id = Submit(6, 3);
  RunUntilFinal(w, 2, id);
  const v1::Job j = GetJob(id);
  ASSERT_EQ(j.state(), v1::JOB_STATE_SUCCEEDED);
  ASSERT_EQ(j.results_size(), 6);
}

TEST_F(AuthTest, SyncWithTokensOutsideTheVocabularyIsRefused) {
  Start(Options(1, 1));
  auto w = RegisterAll(1);
  const std::string id = Submit(1, 3);
  ASSERT_OK(w[0]->Heartbeat());
  ASSERT_OK(w[0]->Step(4));  // takes the sequence
  const std::string seq = id + "/0";
  ASSERT_TRUE(w[0]->holds(seq));
  for (int32_t bad : {99999, -5, 1024}) {
    v1::SyncRequest req = w[0]->NewSyncRequest();
    v1::SequenceUpdate* u = req.add_updates();
    u->set_seq_id(seq);
    u->add_new_tokens(7);
    u->add_new_tokens(bad);
    u->add_new_tokens(8);
    u->set_finish_reason(v1::FINISH_REASON_LENGTH);
    grpc::ClientContext ctx;
    v1::SyncResponse resp;
    EXPECT_ERROR(w[0]->stub()->Sync(&ctx, req, &resp), absl::StatusCode::kInvalidArgument,
                 absl::StrCat("updates[0] (seq ", seq, ").new_tokens[1]: ", bad, " is out of range [0, 1024)"));
  }
  // Nothing of the refused updates was taken: the job runs on and ends with the worker's real tokens.
  v1::Job j = GetJob(id);
  EXPECT_EQ(j.state(), v1::JOB_STATE_RUNNING);
  RunUntilFinal(w, 1, id);
  j = GetJob(id);
  ASSERT_EQ(j.state(), v1::JOB_STATE_SUCCEEDED);
  ASSERT_EQ(j.results_size(), 1);
  ASSERT_EQ(j.results(0).tokens_size(), 3);
  v1::SequenceRequest r;
  r.add_tokens(10);
  r.set_max_new_tokens(3);
  r.mutable_sampling()->set_seed(0);
  for (int k = 0; k < 3; ++k) EXPECT_EQ(j.results(0).tokens(k), FakeToken(r, k));
}

TEST_F(AuthTest, UpdatesForAnotherWorkersSequenceAreIgnored) {
  Start(Options(1, 2));
  auto w = RegisterAll(2);
  const std::string id = Submit(2, 3);
  for (auto& x : w) ASSERT_OK(x->Heartbeat());
  ASSERT_OK(w[0]->Step(1));
  ASSERT_OK(w[1]->Step(1));
  const std::string theirs = w[1]->holds(id + "/0") ? id + "/0" : id + "/1";
  ASSERT_TRUE(w[1]->holds(theirs));
  // Worker 0 claims worker 1's sequence is done (or gives it back): ignored.
  for (v1::FinishReason reason : {v1::FINISH_REASON_STOP, v1::FINISH_REASON_CANCELLED}) {
    v1::SyncRequest req = w[0]->NewSyncRequest();
    v1::SequenceUpdate* u = req.add_updates();
    u->set_seq_id(theirs);
    u->add_new_tokens(5);
    u->set_finish_reason(reason);
    grpc::ClientContext ctx;
    v1::SyncResponse resp;
    ASSERT_OK(w[0]->stub()->Sync(&ctx, req, &resp));
    EXPECT_EQ(resp.assign_size(), 0);
  }
  RunUntilFinal(w, 2, id);
  const v1::Job j = GetJob(id);
  ASSERT_EQ(j.state(), v1::JOB_STATE_SUCCEEDED);
  for (const auto& r : j.results()) EXPECT_EQ(r.tokens_size(), 3) << r.ShortDebugString();
}

TEST_F(AuthTest, ForgedHeartbeatsAreRefusedAndCannotKeepALostWorkerReady) {
  Start(Options(1, 2));
  auto w = RegisterAll(2);
  for (auto& x : w) ASSERT_OK(x->Heartbeat());
  const v1::ClusterStatus before = Status();
  ASSERT_TRUE(before.serving());
  auto forge = [&](const std::string& host, int pid, bool exiting) {
    v1::HeartbeatRequest hb;
    hb.set_worker_id(1);
    hb.set_host(host);
    hb.set_pid(pid);
    hb.set_exiting(exiting);
    grpc::ClientContext ctx;
    v1::HeartbeatResponse resp;
    return w[0]->stub()->Heartbeat(&ctx, hb, &resp);  // with the cluster secret, yet not worker 1's process
  };
  // RegisterAll sorts by id; which registration won place 1 (pid 100 or 101) depends on scheduling.
  const std::string held_by = absl::StrCat("is now held by fakehost:", w[1]->pid());
  EXPECT_ERROR(forge("evilhost", 101, false), absl::StatusCode::kFailedPrecondition, held_by);
  EXPECT_ERROR(forge("fakehost", 4242, false), absl::StatusCode::kFailedPrecondition, "not by fakehost:4242");
  EXPECT_ERROR(forge("", 0, false), absl::StatusCode::kFailedPrecondition, "a sender without host and pid");
  // A forged "exiting" beat forces no new generation.
  EXPECT_ERROR(forge("", 0, true), absl::StatusCode::kFailedPrecondition, "");
  EXPECT_ERROR(forge("evilhost", 7, true), absl::StatusCode::kFailedPrecondition, "");
  // Sync is tied to the registered process too: another pid (a stale process
  // of worker 1) or no sender is refused before any update or assignment.
  for (const auto& [host, pid] : std::vector<std::pair<std::string, int>>{{"fakehost", 4242}, {"", 0}}) {
    v1::SyncRequest sr;
    sr.set_worker_id(1);
    sr.set_host(host);
    sr.set_pid(pid);
    sr.set_epoch(w[1]->epoch());
    sr.set_generation(w[1]->generation());
    sr.set_free_slots(4);
    grpc::ClientContext ctx;
    v1::SyncResponse resp;
    EXPECT_ERROR(w[0]->stub()->Sync(&ctx, sr, &resp), absl::StatusCode::kFailedPrecondition, held_by);
  }
  v1::ClusterStatus st = Status();
  EXPECT_EQ(st.generation(), before.generation());
  EXPECT_EQ(st.workers(1).health(), v1::WORKER_HEALTH_READY);
  EXPECT_TRUE(st.serving());
  // Worker 1 dies; forged beats go on; it still turns MISSING after the timeout (1 s).
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < until && Status().workers(1).health() != v1::WORKER_HEALTH_MISSING) {
    ASSERT_OK(w[0]->Heartbeat());
    EXPECT_FALSE(forge("", 0, false).ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  st = Status();
  EXPECT_EQ(st.workers(1).health(), v1::WORKER_HEALTH_MISSING);
  EXPECT_FALSE(st.serving());
}

TEST_F(AuthTest, MetricsHonourTheClientToken) {
  CoordinatorOptions o = Options(1, 1);
  o.metrics_listen = "127.0.0.1:0";
  Start(o);
  httplib::Client http("127.0.0.1", server_->metrics_port());
  http.set_read_timeout(5, 0);
  auto r = http.Get("/metrics");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);
  EXPECT_NE(r->body.find("missing bearer token"), std::string::npos) << r->body;
  r = http.Get("/metrics", {{"Authorization", "Bearer wrong-token-0123456789"}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);  // HTTP follows OpenAI: a wrong key is 401 too
  EXPECT_NE(r->body.find("wrong bearer token"), std::string::npos) << r->body;
  r = http.Get("/metrics", {{"Authorization", absl::StrCat("Bearer ", kToken)}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_NE(r->body.find("expertmesh_"), std::string::npos);
}

TEST_F(AuthTest, WithoutCredentialsEverythingIsOpenAsBefore) {
  CoordinatorOptions o = Options(1, 1);
  o.client_auth_token.clear();
  o.cluster_secret.clear();
  Start(o);
  EXPECT_OK(CallRaw(raw_, "/expertmesh.v1.ClusterService/GetClusterStatus", kOutsider));
  // Past the (absent) credential check: the empty key is the request's fault.
  EXPECT_ERROR(CallRaw(raw_, "/expertmesh.v1.WorkerService/StoreGet", kOutsider), absl::StatusCode::kInvalidArgument,
               "key: empty");
}

TEST(AuthenticatorTest, ChecksAndMessages) {
  const Authenticator a(kToken, kSecret);
  const std::string bearer = absl::StrCat("Bearer ", kToken), secret = kSecret, basic = "Basic abc";
  EXPECT_OK(a.CheckClient(&bearer, nullptr, "S.M"));
  EXPECT_OK(a.CheckWorker(nullptr, &secret, "S.M"));
  EXPECT_ERROR(a.CheckClient(&basic, nullptr, "S.M"), absl::StatusCode::kUnauthenticated, "S.M: the authorization");
  const std::string prefix = bearer.substr(0, bearer.size() - 1), longer = bearer + "x";
  EXPECT_ERROR(a.CheckClient(&prefix, nullptr, "S.M"), absl::StatusCode::kPermissionDenied, "wrong bearer token");
  EXPECT_ERROR(a.CheckClient(&longer, nullptr, "S.M"), absl::StatusCode::kPermissionDenied, "wrong bearer token");
  EXPECT_ERROR(a.CheckWorker(&bearer, nullptr, "S.M"), absl::StatusCode::kPermissionDenied, "client token");
  const Authenticator open("", "");
  EXPECT_OK(open.CheckClient(nullptr, nullptr, "S.M"));
  EXPECT_OK(open.CheckWorker(nullptr, nullptr, "S.M"));
}

TEST(SecurityTest, SecretsAndComparison) {
  EXPECT_TRUE(rpc::ConstantTimeEquals("abc", "abc"));
  EXPECT_FALSE(rpc::ConstantTimeEquals("abc", "abd"));
  EXPECT_FALSE(rpc::ConstantTimeEquals("abc", "ab"));
  EXPECT_FALSE(rpc::ConstantTimeEquals("ab", "abc"));
  EXPECT_FALSE(rpc::ConstantTimeEquals("", "a"));
  auto a = rpc::RandomSecret(), b = rpc::RandomSecret();
  ASSERT_OK(a.status());
  ASSERT_OK(b.status());
  EXPECT_EQ(a->size(), 64u);
  EXPECT_NE(*a, *b);
  EXPECT_OK(rpc::CheckSecret(*a, "x"));
  TempDir dir;
  const std::string f = dir.path() + "/token";
  std::ofstream(f) << "  " << *a << "\n";
  auto read = rpc::ReadSecretFile(f, "--auth-token-file");
  ASSERT_OK(read.status());
  EXPECT_EQ(*read, *a);
  std::ofstream(f) << "short\n";
  EXPECT_ERROR(rpc::ReadSecretFile(f, "--auth-token-file").status(), absl::StatusCode::kInvalidArgument,
               "at least 16");
  std::ofstream(f) << "has a space inside it\n";
  EXPECT_ERROR(rpc::ReadSecretFile(f, "--auth-token-file").status(), absl::StatusCode::kInvalidArgument,
               "printable ASCII");
  EXPECT_ERROR(rpc::ReadSecretFile(dir.path() + "/none", "--cluster-secret-file").status(),
               absl::StatusCode::kInvalidArgument, "--cluster-secret-file");
  EXPECT_ERROR(rpc::ReadPemFile(f, "--tls-ca").status(), absl::StatusCode::kInvalidArgument, "not a PEM file");
}

}  // namespace
}  // namespace expertmesh::coordinator
