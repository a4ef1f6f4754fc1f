// Test doubles for the worker's parts: a scripted in-memory coordinator
// (CoordinatorClient), communicators that move nothing but can be aborted, a
// factory that records the groups a data plane builds, and an expert store.
#pragma once

#include <cstdlib>
#include <deque>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "common/checkpoint.h"
#include "common/config.h"
#include "gtest/gtest.h"
#include "kernels/cpu/kernels.h"
#include "tests/common/status_matchers.h"
#include "topology/plan.h"
#include "topology/plan_proto.h"
#include "worker/model.h"
#include "worker/runtime/coordinator_client.h"
#include "worker/runtime/data_plane.h"
#include "worker/runtime/placement_stager.h"
#include "worker/runtime/worker.h"

namespace expertmesh::worker::runtime::testing {

// The tiny preset with a pp x ep plan (1 dense + 3 MoE layers, 256 experts).
inline topology::Plan TinyPlan(int64_t pp, int64_t ep) {
  ModelConfig cfg = *ModelConfig::Preset("tiny");
  topology::PlanOptions o;
  o.pp = pp;
  o.ep = ep;
  return *topology::BuildPlan(cfg, o);
}

inline v1::Plan ToProto(const topology::Plan& p, int64_t version = 1, const std::string& checkpoint = "/ckpt") {
  return topology::PlanToProto(p, checkpoint, ModelConfig::Preset("tiny")->ToJson().dump(), version);
}

inline v1::RegisterResponse Registered(int worker_id, int stage, int ep_rank, const topology::Plan& plan,
                                       const std::string& epoch, int64_t generation, int64_t version = 1,
                                       const std::string& checkpoint = "/ckpt") {
  v1::RegisterResponse r;
  r.set_worker_id(worker_id);
  r.set_stage(stage);
  r.set_ep_rank(ep_rank);
  *r.mutable_plan() = ToProto(plan, version, checkpoint);
  r.set_epoch(epoch);
  r.set_generation(generation);
  return r;
}

// A coordinator in memory. Each RPC answers with the next scripted answer
// of its kind, else with its handler, else UNAVAILABLE; every request is
// recorded. Thread-safe (the worker calls from several threads).
class FakeCoordinator : public CoordinatorClient {
 public:
  const std::string& address() const override { return address_; }

  absl::StatusOr<v1::RegisterResponse> Register(const v1::RegisterRequest& req, absl::Time deadline) override {
    std::function<absl::StatusOr<v1::RegisterResponse>(const v1::RegisterRequest&)> h;
    {
      std::lock_guard<std::mutex> l(mu_);
      registers_.push_back(req);
      if (!register_script_.empty()) {
        auto r = register_script_.front();
        register_script_.pop_front();
        return r;
      }
      h = on_register_;
    }
    if (h) return h(req);
    return absl::UnavailableError("fake coordinator: no register answer");
  }
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& req, absl::Duration) override {
    std::function<absl::StatusOr<v1::HeartbeatResponse>(const v1::HeartbeatRequest&)> h;
    {
      std::lock_guard<std::mutex> l(mu_);
      heartbeats_.push_back(req);
      if (!heartbeat_script_.empty()) {
        auto r = heartbeat_script_.front();
        heartbeat_script_.pop_front();
        return r;
      }
      h = on_heartbeat_;
    }
    if (h) return h(req);
    return absl::UnavailableError("fake coordinator: no heartbeat answer");
  }
  absl::StatusOr<v1::SyncResponse> Sync(const v1::SyncRequest& req, absl::Duration) override {
    std::function<absl::StatusOr<v1::SyncResponse>(const v1::SyncRequest&)> h;
    {
      std::lock_guard<std::mutex> l(mu_);
      syncs_.push_back(req);
      if (!sync_script_.empty()) {
        auto r = sync_script_.front();
        sync_script_.pop_front();
        return r;
      }
      h = on_sync_;
    }
    if (h) return h(req);
    return absl::UnavailableError("fake coordinator: no sync answer");
  }
  absl::Status StoreSet(const std::string& key, const std::string& value, absl::Duration) override {
    std::lock_guard<std::mutex> l(mu_);
    store_[key] = value;
    return absl::OkStatus();
  }
  absl::StatusOr<std::pair<bool, std::string>> StoreGet(const std::string& key, absl::Duration) override {
    std::lock_guard<std::mutex> l(mu_);
    auto it = store_.find(key);
    if (it == store_.end()) return std::make_pair(false, std::string());
    return std::make_pair(true, it->second);
  }

  // Scripting.
  void AnswerRegister(absl::StatusOr<v1::RegisterResponse> r) {
    std::lock_guard<std::mutex> l(mu_);
    register_script_.push_back(std::move(r));
  }
  void AnswerHeartbeat(absl::StatusOr<v1::HeartbeatResponse> r) {
    std::lock_guard<std::mutex> l(mu_);
    heartbeat_script_.push_back(std::move(r));
  }
  void AnswerSync(absl::StatusOr<v1::SyncResponse> r) {
    std::lock_guard<std::mutex> l(mu_);
    sync_script_.push_back(std::move(r));
  }
  void OnRegister(std::function<absl::StatusOr<v1::RegisterResponse>(const v1::RegisterRequest&)> h) {
    std::lock_guard<std::mutex> l(mu_);
    on_register_ = std::move(h);
  }
  void OnHeartbeat(std::function<absl::StatusOr<v1::HeartbeatResponse>(const v1::HeartbeatRequest&)> h) {
    std::lock_guard<std::mutex> l(mu_);
    on_heartbeat_ = std::move(h);
  }
  void OnSync(std::function<absl::StatusOr<v1::SyncResponse>(const v1::SyncRequest&)> h) {
    std::lock_guard<std::mutex> l(mu_);
    on_sync_ = std::move(h);
  }

  // What the worker sent.
  std::vector<v1::RegisterRequest> registers() const {
    std::lock_guard<std::mutex> l(mu_);
    return registers_;
  }
  std::vector<v1::HeartbeatRequest> heartbeats() const {
    std::lock_guard<std::mutex> l(mu_);
    return heartbeats_;
  }
  std::vector<v1::SyncRequest> syncs() const {
    std::lock_guard<std::mutex> l(mu_);
    return syncs_;
  }

 private:
  const std::string address_ = "fake:0";
  mutable std::mutex mu_;
  std::deque<absl::StatusOr<v1::RegisterResponse>> register_script_;
  std::deque<absl::StatusOr<v1::HeartbeatResponse>> heartbeat_script_;
  std::deque<absl::StatusOr<v1::SyncResponse>> sync_script_;
  std::function<absl::StatusOr<v1::RegisterResponse>(const v1::RegisterRequest&)> on_register_;
  std::function<absl::StatusOr<v1::HeartbeatResponse>(const v1::HeartbeatRequest&)> on_heartbeat_;
  std::function<absl::StatusOr<v1::SyncResponse>(const v1::SyncRequest&)> on_sync_;
  std::vector<v1::RegisterRequest> registers_;
  std::vector<v1::HeartbeatRequest> heartbeats_;
  std::vector<v1::SyncRequest> syncs_;
  std::map<std::string, std::string> store_;
};

// A communicator whose remote transfers complete at once (nothing moves);
// Abort breaks it like a real one.
class NullCommunicator : public comm::Communicator {
 public:
  NullCommunicator(int rank, int size) : Communicator(rank, size) {}
  absl::string_view backend() const override { return "null"; }
  comm::Caps caps() const override { return {true, false, false}; }

 protected:
  absl::Status RunRemote(const comm::Batch&, absl::Time, const RecvDoneFn*) override {
    if (aborted()) return abort_status();
    return absl::OkStatus();
  }
};

// Records every group it creates.
class RecordingCommFactory : public CommFactory {
 public:
  absl::StatusOr<std::unique_ptr<comm::Communicator>> Create(const GroupSpec& spec) override {
    std::lock_guard<std::mutex> l(mu_);
    specs_.push_back(spec);
    if (!fail_.ok()) return fail_;
    return std::unique_ptr<comm::Communicator>(
        new NullCommunicator(spec.rank, static_cast<int>(spec.worker_ids.size())));
  }
  std::vector<GroupSpec> specs() const {
    std::lock_guard<std::mutex> l(mu_);
    return specs_;
  }
  void Fail(absl::Status s) {
    std::lock_guard<std::mutex> l(mu_);
    fail_ = std::move(s);
  }

 private:
  mutable std::mutex mu_;
  std::vector<GroupSpec> specs_;
  absl::Status fail_;
};

// Experts as ids only (empty weights); counts what it was asked to do.
class FakeExpertStore : public ExpertStore {
 public:
  explicit FakeExpertStore(std::map<int64_t, std::set<int32_t>> held) : held_(std::move(held)) {}
  absl::Status CanStage() const override { return can_stage_; }
  std::vector<int32_t> LoadedExperts(int64_t layer) const override {
    std::lock_guard<std::mutex> l(mu_);
    auto it = held_.find(layer);
    if (it == held_.end()) return {};
    return std::vector<int32_t>(it->second.begin(), it->second.end());
  }
  absl::StatusOr<ExpertSet> LoadExperts(const std::string& dir,
                                        const std::map<int64_t, std::vector<int32_t>>& need) override {
    std::lock_guard<std::mutex> l(mu_);
    load_dirs_.push_back(dir);
    loads_.push_back(need);
    if (!load_error_.ok()) return load_error_;
    ExpertSet out;
    for (const auto& [layer, ids] : need) {
      for (int32_t e : ids) out[layer][e];
    }
    return out;
  }
  absl::Status ReplaceExperts(ExpertSet experts, const std::map<int64_t, std::set<int32_t>>& keep) override {
    std::lock_guard<std::mutex> l(mu_);
    for (const auto& [layer, ids] : experts) {
      for (const auto& [e, w] : ids) held_[layer].insert(e);
    }
    for (const auto& [layer, k] : keep) {
      std::set<int32_t> kept;
      for (int32_t e : held_[layer]) {
        if (k.count(e) != 0) kept.insert(e);
      }
      held_[layer] = kept;
    }
    ++replaces_;
    return absl::OkStatus();
  }

  absl::Status can_stage_;
  absl::Status load_error_;
  std::map<int64_t, std::set<int32_t>> held() const {
    std::lock_guard<std::mutex> l(mu_);
    return held_;
  }
  std::vector<std::map<int64_t, std::vector<int32_t>>> loads() const {
    std::lock_guard<std::mutex> l(mu_);
    return loads_;
  }
  int replaces() const {
    std::lock_guard<std::mutex> l(mu_);
    return replaces_;
  }

 private:
  mutable std::mutex mu_;
  std::map<int64_t, std::set<int32_t>> held_;
  std::vector<std::string> load_dirs_;
  std::vector<std::map<int64_t, std::vector<int32_t>>> loads_;
  int replaces_ = 0;
};

// Sync: assigns `assign` once, collects the tokens, says shutdown once every
// sequence has finished.
class Lane {
 public:
  explicit Lane(std::vector<v1::SequenceAssignment> assign) : assign_(std::move(assign)) {}
  v1::SyncResponse Answer(const v1::SyncRequest& req, v1::SyncResponse r) {
    std::lock_guard<std::mutex> l(mu_);
    for (const auto& u : req.updates()) {
      for (int32_t t : u.new_tokens()) tokens_[u.seq_id()].push_back(t);
      if (u.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) finished_[u.seq_id()] = u.finish_reason();
    }
    if (!sent_ && r.generation() == req.generation()) {
      for (const auto& a : assign_) *r.add_assign() = a;
      sent_ = true;
    }
    if (sent_ && finished_.size() == assign_.size()) r.set_shutdown(true);
    return r;
  }
  std::map<std::string, std::vector<int32_t>> tokens() {
    std::lock_guard<std::mutex> l(mu_);
    return tokens_;
  }
  std::map<std::string, v1::FinishReason> finished() {
    std::lock_guard<std::mutex> l(mu_);
    return finished_;
  }

 private:
  std::mutex mu_;
  std::vector<v1::SequenceAssignment> assign_;
  bool sent_ = false;
  std::map<std::string, std::vector<int32_t>> tokens_;
  std::map<std::string, v1::FinishReason> finished_;
};

inline v1::SequenceAssignment Greedy(const std::string& id, const std::vector<int32_t>& prompt, int n) {
  v1::SequenceAssignment a;
  a.set_seq_id(id);
  for (int32_t t : prompt) a.mutable_request()->add_tokens(t);
  a.mutable_request()->set_max_new_tokens(n);
  return a;
}

// Polls `cond` until it holds or `timeout` passes.
inline bool WaitFor(const std::function<bool()>& cond, absl::Duration timeout = absl::Seconds(10)) {
  const absl::Time end = absl::Now() + timeout;
  while (absl::Now() < end) {
    if (cond()) return true;
    absl::SleepFor(absl::Milliseconds(2));
  }
  return cond();
}

// A test suite that shares one tiny random checkpoint (seed kSeed), generated
// once into a temporary folder ($TEST_TMPDIR or /tmp) and removed at the end.
template <uint64_t kSeed>
class TinyCheckpointSuite : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const char* base = std::getenv("TEST_TMPDIR");
    std::string templ = std::string(base != nullptr ? base : "/tmp") + "/em_worker_XXXXXX";
    dir_ = new std::string(mkdtemp(templ.data()));
    GenerateOptions g;
    g.out_dir = *dir_ + "/ckpt";
    g.seed = kSeed;
    ASSERT_TRUE(GenerateCheckpoint(*ModelConfig::Preset("tiny"), g).ok());
  }
  static void TearDownTestSuite() {
    std::filesystem::remove_all(*dir_);
    delete dir_;
    dir_ = nullptr;
  }
  static std::string Checkpoint() { return *dir_ + "/ckpt"; }
  // The greedy continuation of `prompt` by the engine on the whole model.
  static std::vector<int32_t> Reference(const std::vector<int32_t>& prompt, int n) {
    auto shard = ModelShard::Load(Checkpoint(), ShardFilter{});
    EXPECT_TRUE(shard.ok()) << shard.status();
    Engine engine(shard->get());
    SequenceCache cache = engine.NewCache();
    std::vector<int32_t> out, next = prompt;
    std::vector<float> logits;
    const int64_t V = (*shard)->config().vocab_size;
    for (int step = 0; step < n; ++step) {
      EXPECT_TRUE(engine.Forward({{&cache, next.data(), static_cast<int64_t>(next.size())}}, &logits).ok());
      kernels::SamplingParams sp{0.0f, 0, 1.0f, 0};
      out.push_back(kernels::Sample(logits.data(), V, sp, step));
      next = {out.back()};
    }
    return out;
  }

 private:
  static inline std::string* dir_ = nullptr;
};

// Runs workers 0..num_workers-1 as RunWorker threads over a real UCX data
// plane against `fake` until it shuts the cluster down, and expects each to
// end OK. Heartbeats and Syncs are answered for epoch "e1", `generation` and
// placement version 1; a stage-0 worker's Sync by its lane, lanes[worker_id].
// The caller scripts Register (the plan, and a rejoin's generation).
inline void RunThreadedWorkers(FakeCoordinator* fake, int num_workers, const std::vector<Lane*>& lanes,
                               int64_t generation = 1) {
  fake->OnHeartbeat([generation](const v1::HeartbeatRequest&) {
    v1::HeartbeatResponse r;
    r.set_epoch("e1");
    r.set_generation(generation);
    r.set_placement_version(1);
    return r;
  });
  fake->OnSync([&lanes, generation](const v1::SyncRequest& req) {
    v1::SyncResponse r;
    r.set_epoch("e1");
    r.set_generation(generation);
    r.set_placement_version(1);
    return lanes.at(static_cast<size_t>(req.worker_id()))->Answer(req, r);
  });
  std::vector<absl::Status> results(static_cast<size_t>(num_workers));
  std::vector<std::thread> threads;
  for (int w = 0; w < num_workers; ++w) {
    threads.emplace_back([&, w] {
      WorkerOptions o;
      o.backend = "ucx";
      o.requested_worker_id = w;
      o.register_timeout = absl::Seconds(60);
      o.rejoin_timeout = absl::Seconds(60);
      o.step_timeout = absl::Seconds(60);
      o.heartbeat_interval = absl::Milliseconds(50);
      results[static_cast<size_t>(w)] = RunWorker(o, fake);
    });
  }
  for (auto& t : threads) t.join();
  for (int w = 0; w < num_workers; ++w) {
    EXPECT_TRUE(results[static_cast<size_t>(w)].ok()) << "worker " << w << ": " << results[static_cast<size_t>(w)];
  }
}

}  // namespace expertmesh::worker::runtime::testing
