// The whole worker (RunWorker) against a fake coordinator, on a tiny random
// checkpoint, one stage and one EP rank (no peers): it generates what the
// engine generates in one process, rejoins after a generation change, exits
// with the coordinator's reason when its place is taken, and leaves on a
// stop signal.
#include "worker/runtime/worker.h"

#include <atomic>
#include <filesystem>
#include <mutex>

#include "common/checkpoint.h"
#include "gtest/gtest.h"
#include "tests/worker/fake_coordinator.h"
#include "worker/model.h"

namespace expertmesh::worker::runtime {
namespace {

using testing::FakeCoordinator;
using testing::Greedy;
using testing::Lane;
using testing::Registered;
using testing::TinyPlan;

class WorkerTest : public testing::TinyCheckpointSuite<5> {
 protected:

  WorkerOptions Options() {
    WorkerOptions o;
    o.register_timeout = absl::Seconds(10);
    o.rejoin_timeout = absl::Seconds(10);
    o.coordinator_timeout = absl::Seconds(10);
    o.step_timeout = absl::Seconds(10);
    o.heartbeat_interval = absl::Milliseconds(20);
    return o;
  }
  void RegisterAs(int64_t generation) {
    fake_.AnswerRegister(Registered(0, 0, 0, TinyPlan(1, 1), "e1", generation, 1, Checkpoint()));
  }
  v1::HeartbeatResponse Beat(int64_t generation) {
    v1::HeartbeatResponse r;
    r.set_epoch("e1");
    r.set_generation(generation);
    r.set_placement_version(1);
    return r;
  }
  v1::SyncResponse SyncAnswer(int64_t generation) {
    v1::SyncResponse r;
    r.set_epoch("e1");
    r.set_generation(generation);
    r.set_placement_version(1);
    return r;
  }


  FakeCoordinator fake_;
};

TEST_F(WorkerTest, GeneratesWhatTheEngineGeneratesThenStopsOnShutdown) {
  RegisterAs(1);
  fake_.OnHeartbeat([this](const v1::HeartbeatRequest&) { return Beat(1); });
  Lane lane({Greedy("j/0", {5, 17, 300, 2}, 6), Greedy("j/1", {900}, 4)});
  fake_.OnSync([&](const v1::SyncRequest& req) { return lane.Answer(req, SyncAnswer(1)); });
  ASSERT_OK(RunWorker(Options(), &fake_));
  EXPECT_EQ(lane.tokens()["j/0"], Reference({5, 17, 300, 2}, 6));
  EXPECT_EQ(lane.tokens()["j/1"], Reference({900}, 4));
  EXPECT_EQ(lane.finished()["j/0"], v1::FINISH_REASON_LENGTH);
  // A run this short may end before the heartbeat thread's first beat: the
  // exiting beat is the one that must be there, with the steps and the load.
  const auto beats = fake_.heartbeats();
  ASSERT_FALSE(beats.empty());
  EXPECT_TRUE(beats.back().exiting());
  EXPECT_GT(beats.back().steps(), 0);
  int64_t routed = 0;  // the expert load went out with the heartbeats
  for (const auto& b : beats) {
    for (const auto& l : b.expert_load()) {
      for (int64_t c : l.tokens_per_expert()) routed += c;
    }
  }
  EXPECT_GT(routed, 0);
}

TEST_F(WorkerTest, GenerationChangeRebuildsAndRejoins) {
  RegisterAs(1);
  RegisterAs(2);  // the rejoin
  std::atomic<int64_t> generation{2};  // the cluster moved on before the first heartbeat
  fake_.OnHeartbeat([&](const v1::HeartbeatRequest&) { return Beat(generation.load()); });
  Lane lane({Greedy("j/0", {7, 8}, 3)});
  fake_.OnSync([&](const v1::SyncRequest& req) { return lane.Answer(req, SyncAnswer(generation.load())); });
  ASSERT_OK(RunWorker(Options(), &fake_));
  const auto regs = fake_.registers();
  ASSERT_EQ(regs.size(), 2u);
  EXPECT_EQ(regs[1].rejoin_after_generation(), 1);
  EXPECT_EQ(regs[1].worker_id(), 0);
  EXPECT_EQ(fake_.syncs().front().generation(), 1);
  EXPECT_EQ(fake_.syncs().back().generation(), 2);  // rebuilt for the new generation
  EXPECT_EQ(lane.tokens()["j/0"], Reference({7, 8}, 3));
}

TEST_F(WorkerTest, PlaceTakenOverEndsTheWorkerWithThatError) {
  RegisterAs(1);
  fake_.AnswerHeartbeat(absl::FailedPreconditionError("worker 0 was replaced by another process"));
  fake_.OnHeartbeat([this](const v1::HeartbeatRequest&) { return Beat(1); });
  fake_.OnSync([this](const v1::SyncRequest&) { return SyncAnswer(1); });
  const absl::Status s = RunWorker(Options(), &fake_);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("replaced"), std::string::npos) << s;
}

TEST_F(WorkerTest, StopSignalLeavesCleanly) {
  RegisterAs(1);
  std::atomic<int> signal{0};
  std::atomic<bool> serving{false};
  WorkerOptions o = Options();
  o.stop_signal = &signal;
  o.serving = &serving;
  fake_.OnHeartbeat([this](const v1::HeartbeatRequest&) { return Beat(1); });
  fake_.OnSync([&](const v1::SyncRequest&) {
    if (serving.load()) signal = 15;  // SIGTERM once the worker serves
    return SyncAnswer(1);
  });
  ASSERT_OK(RunWorker(o, &fake_));
  EXPECT_FALSE(serving.load());
  EXPECT_TRUE(fake_.heartbeats().back().exiting());
}

TEST_F(WorkerTest, RegistrationFailureIsReturned) {
  fake_.AnswerRegister(absl::InvalidArgumentError("worker_id 9 is outside the plan"));
  const absl::Status s = RunWorker(Options(), &fake_);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(fake_.heartbeats().empty());
}

}  // namespace
}  // namespace expertmesh::worker::runtime
