// Helpers for the coordinator tests: status assertions on grpc::Status
// (through tests/common/status_matchers.h), a temporary
// checkpoint folder holding only config.json, a fake worker that calls
// Register / Heartbeat / Sync like a real one and "generates" tokens that are
// a pure function of (prompt, seed, step), so runs can be compared, and the
// fixture that starts a CoordinatorServer on in-process channels
// (service_test.cc, auth_test.cc).
#pragma once

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "common/config.h"
#include "coordinator/server.h"
#include "coordinator/services.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/expertmesh.grpc.pb.h"
#include "proto/security.h"
#include "tests/common/status_matchers.h"

namespace expertmesh::testing_util {

// Lets ASSERT_OK / EXPECT_ERROR (status_matchers.h) take a grpc::Status: the
// codes map one to one.
inline absl::Status ToStatus(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

}  // namespace expertmesh::testing_util

namespace expertmesh::coordinator::testing {

// A fresh folder under the test's temp dir, removed at destruction.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TEST_TMPDIR");
    std::string templ = std::string(base != nullptr ? base : "/tmp") + "/em_coord_XXXXXX";
    path_ = mkdtemp(templ.data());
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Writes <dir>/config.json of the tiny preset (4 layers: 1 dense + 3 MoE, 256 experts, vocab 1024).
inline std::string WriteTinyCheckpoint(const std::string& dir) {
  ModelConfig c = *ModelConfig::Preset("tiny");
  std::ofstream(dir + "/config.json") << c.ToJson().dump(2);
  return dir;
}

// The fake model: token at `step` of a sequence.
inline int32_t FakeToken(const v1::SequenceRequest& r, int step) {
  int64_t h = static_cast<int64_t>(r.sampling().seed()) * 7919 + step * 31;
  for (int32_t t : r.tokens()) h = h * 131 + t;
  h %= 1024;
  return static_cast<int32_t>(h < 0 ? h + 1024 : h);
}

class FakeWorker {
 public:
  explicit FakeWorker(std::shared_ptr<grpc::Channel> ch) : stub_(v1::WorkerService::NewStub(ch)) {}

  // rejoin_after: > 0 registers again after the data plane of that generation failed.
  grpc::Status Register(int worker_id = -1, const std::string& host = "fakehost", int pid = -1, double timeout_s = 10,
                        int64_t rejoin_after = 0) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(static_cast<int>(timeout_s * 1000)));
    v1::RegisterRequest req;
    req.set_host(host);
    req.set_pid(pid >= 0 ? pid : 1000 + worker_id);
    req.set_worker_id(worker_id);
    req.set_rejoin_after_generation(rejoin_after);
    grpc::Status s = stub_->Register(&ctx, req, &reg_);
    if (s.ok()) {
      id_ = reg_.worker_id();
      epoch_ = reg_.epoch();
      generation_ = reg_.generation();
      host_ = host;
      pid_ = req.pid();
      held_.clear();
      stale_ = false;
    }
    return s;
  }

  grpc::Status Heartbeat(bool exiting = false, const std::vector<v1::LayerExpertLoad>& load = {},
                         v1::HeartbeatResponse* out = nullptr) {
    grpc::ClientContext ctx;
    v1::HeartbeatRequest req;
    req.set_worker_id(id_);
    req.set_host(host_);
    req.set_pid(pid_);
    req.set_active_sequences(static_cast<int32_t>(held_.size()));
    req.set_exiting(exiting);
    for (const auto& l : load) *req.add_expert_load() = l;
    v1::HeartbeatResponse resp;
    grpc::Status s = stub_->Heartbeat(&ctx, req, &resp);
    if (out != nullptr) *out = resp;
    return s;
  }

  // A SyncRequest carrying this worker's identity (id, host, pid, epoch,
  // generation) and nothing else, for tests that write their own updates.
  v1::SyncRequest NewSyncRequest() const {
    v1::SyncRequest req;
    req.set_worker_id(id_);
    req.set_host(host_);
    req.set_pid(pid_);
    req.set_epoch(epoch_);
    req.set_generation(generation_);
    return req;
  }

  // One step: reports `tokens_per_step` new tokens for every held sequence
  // (finishing those that reach max_new_tokens), then admits new ones.
  grpc::Status Step(int capacity, int tokens_per_step = 1, v1::SyncResponse* out = nullptr) {
    v1::SyncRequest req = NewSyncRequest();
    std::vector<std::string> done;
    for (auto& [seq_id, s] : held_) {
      v1::SequenceUpdate* u = req.add_updates();
      u->set_seq_id(seq_id);
      for (int k = 0; k < tokens_per_step && s.step < s.req.max_new_tokens(); ++k) {
        const int32_t t = FakeToken(s.req, s.step++);
        u->add_new_tokens(t);
        bool stop = false;
        for (int32_t x : s.req.stop_token_ids()) stop |= x == t;
        if (stop) {
          u->set_finish_reason(v1::FINISH_REASON_STOP);
          break;
        }
      }
      if (u->finish_reason() == v1::FINISH_REASON_UNSPECIFIED && s.step >= s.req.max_new_tokens()) {
        u->set_finish_reason(v1::FINISH_REASON_LENGTH);
      }
      if (u->finish_reason() != v1::FINISH_REASON_UNSPECIFIED) done.push_back(seq_id);
    }
    for (const auto& d : done) held_.erase(d);
    req.set_free_slots(std::max(0, capacity - static_cast<int>(held_.size())));
    return SyncRaw(req, out);
  }

  grpc::Status SyncRaw(const v1::SyncRequest& req, v1::SyncResponse* out = nullptr) {
    grpc::ClientContext ctx;
    v1::SyncResponse resp;
    grpc::Status s = stub_->Sync(&ctx, req, &resp);
    if (!s.ok()) return s;
    if (resp.epoch() != epoch_) {
      held_.clear();  // the coordinator restarted: drop everything
      epoch_ = resp.epoch();
    }
    if (resp.generation() != generation_) {
      held_.clear();  // a real worker rebuilds its data plane (Register with rejoin_after_generation)
      stale_ = true;
    }
    for (const auto& c : resp.cancel()) {
      held_.erase(c);
      cancelled_.push_back(c);
    }
    // A resumed sequence continues after the tokens generated before (a real worker prefills them).
    for (const auto& a : resp.assign()) held_[a.seq_id()] = Held{a.request(), a.resume_tokens_size()};
    if (out != nullptr) *out = resp;
    return s;
  }

  int id() const { return id_; }
  const std::string& host() const { return host_; }
  int pid() const { return pid_; }
  void set_id(int id) { id_ = id; }
  const std::string& epoch() const { return epoch_; }
  int64_t generation() const { return generation_; }
  void set_generation(int64_t g) { generation_ = g; }
  bool stale() const { return stale_; }  // a Sync answered another generation
  void set_epoch(const std::string& e) { epoch_ = e; }
  const v1::RegisterResponse& registration() const { return reg_; }
  size_t held() const { return held_.size(); }
  bool holds(const std::string& seq_id) const { return held_.count(seq_id) > 0; }
  const std::vector<std::string>& cancelled() const { return cancelled_; }
  v1::WorkerService::Stub* stub() { return stub_.get(); }

 private:
  struct Held {
    v1::SequenceRequest req;
    int step = 0;
  };
  std::unique_ptr<v1::WorkerService::Stub> stub_;
  v1::RegisterResponse reg_;
  int id_ = -1;
  std::string epoch_;
  int64_t generation_ = 0;
  std::string host_;
  int pid_ = 0;
  bool stale_ = false;
  std::map<std::string, Held> held_;
  std::vector<std::string> cancelled_;
};

// What callers present: empty strings are a coordinator without access
// control (every channel below is then the same open one).
struct Credentials {
  std::string client_token;   // CoordinatorOptions::client_auth_token, a client's bearer token
  std::string cluster_secret;  // CoordinatorOptions::cluster_secret, the workers' secret
};

// A CoordinatorServer on the tiny preset's config.json, reached through
// in-process channels: raw_ presents nothing, client_ the client token,
// worker_ the cluster secret; jobs_ and cluster_ are the client's stubs,
// the fake workers of RegisterAll use worker_.
class CoordinatorFixture : public ::testing::Test {
 protected:
  explicit CoordinatorFixture(Credentials credentials = {}) : credentials_(std::move(credentials)) {}

  CoordinatorOptions Options(int pp, int ep) {
    CoordinatorOptions o;
    o.checkpoint = WriteTinyCheckpoint(dir_.path());
    o.pp = pp;
    o.ep = ep;
    o.heartbeat_timeout_s = 1.0;  // short, yet safe on a loaded CI machine
    o.monitor_interval_s = 0.05;
    o.register_timeout_s = 10;
    o.shutdown_timeout_s = 5;
    o.client_auth_token = credentials_.client_token;
    o.cluster_secret = credentials_.cluster_secret;
    return o;
  }

  // Starts (or, after Stop, restarts) the server and opens the channels.
  void Start(const CoordinatorOptions& o) {
    auto s = CoordinatorServer::Start(o);
    ASSERT_OK(s.status());
    server_ = *std::move(s);
    raw_ = server_->InProcessChannel();
    rpc::ClientSecurity client;
    client.bearer_token = credentials_.client_token;
    client_ = server_->InProcessChannel(client);
    rpc::ClientSecurity worker;
    worker.worker_secret = credentials_.cluster_secret;
    worker_ = server_->InProcessChannel(worker);
    jobs_ = v1::JobService::NewStub(client_);
    cluster_ = v1::ClusterService::NewStub(client_);
  }

  // Registers n fake workers concurrently (Register blocks until all are
  // in), worker i first so that it gets place i unless `ids` asks for others.
  std::vector<std::unique_ptr<FakeWorker>> RegisterAll(int n, const std::vector<int>& ids = {}) {
    std::vector<std::unique_ptr<FakeWorker>> w;
    std::vector<std::thread> threads;
    std::vector<grpc::Status> st(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) w.push_back(std::make_unique<FakeWorker>(worker_));
    for (int i = 0; i < n; ++i) {
      threads.emplace_back([&, i] { st[i] = w[i]->Register(ids.empty() ? -1 : ids[i], "fakehost", 100 + i); });
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    for (auto& t : threads) t.join();
    for (int i = 0; i < n; ++i) EXPECT_OK(st[i]);
    std::sort(w.begin(), w.end(), [](const auto& a, const auto& b) { return a->id() < b->id(); });
    return w;
  }

  v1::Job GetJob(const std::string& id) {
    grpc::ClientContext ctx;
    v1::GetJobRequest req;
    req.set_job_id(id);
    v1::Job j;
    EXPECT_OK(jobs_->GetJob(&ctx, req, &j));
    return j;
  }

  v1::ClusterStatus Status() {
    grpc::ClientContext ctx;
    v1::ClusterStatus st;
    EXPECT_OK(cluster_->GetClusterStatus(&ctx, v1::GetClusterStatusRequest(), &st));
    return st;
  }

  // Steps the stage-0 workers (heartbeating all) until the job is final.
  void RunUntilFinal(std::vector<std::unique_ptr<FakeWorker>>& w, int ep, const std::string& job_id,
                     int capacity = 4) {
    for (int iter = 0; iter < 500; ++iter) {
      for (auto& x : w) ASSERT_OK(x->Heartbeat());
      for (int i = 0; i < ep; ++i) ASSERT_OK(w[i]->Step(capacity));
      const v1::JobState s = GetJob(job_id).state();
      if (s == v1::JOB_STATE_SUCCEEDED || s == v1::JOB_STATE_FAILED || s == v1::JOB_STATE_CANCELLED) return;
    }
    FAIL() << "job " << job_id << " did not finish";
  }

  const Credentials credentials_;
  TempDir dir_;
  std::unique_ptr<CoordinatorServer> server_;
  std::shared_ptr<grpc::Channel> raw_, client_, worker_;
  std::unique_ptr<v1::JobService::Stub> jobs_;
  std::unique_ptr<v1::ClusterService::Stub> cluster_;
};

}  // namespace expertmesh::coordinator::testing
