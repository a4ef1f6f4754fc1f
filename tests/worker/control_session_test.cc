// The worker's control session and data plane against a fake coordinator:
// registration, heartbeats and what their answers do to the data plane
// (generation moved, restarted coordinator, place taken over, leaving).
#include "worker/runtime/control_session.h"

#include <atomic>

#include "gtest/gtest.h"
#include "topology/lanes.h"
#include "tests/worker/fake_coordinator.h"
#include "worker/runtime/data_plane.h"

namespace expertmesh::worker::runtime {
namespace {

using testing::FakeCoordinator;
using testing::Registered;
using testing::RecordingCommFactory;
using testing::TinyPlan;

ControlSession::Options FastOptions() {
  ControlSession::Options o;
  o.host = "test-host";
  o.register_timeout = absl::Seconds(5);
  o.rejoin_timeout = absl::Seconds(5);
  o.heartbeat_interval = absl::Milliseconds(20);
  return o;
}

// ------------------------------------------------------------ registration

TEST(ControlSession, RegisterTakesThePlaceTheCoordinatorAssigns) {
  FakeCoordinator fake;
  const topology::Plan plan = TinyPlan(2, 2);
  fake.AnswerRegister(Registered(3, 1, 1, plan, "e1", 4));
  ControlSession::Options o = FastOptions();
  o.requested_worker_id = 3;
  ControlSession s(o, &fake);
  auto reg = s.Register();
  ASSERT_OK(reg);
  EXPECT_EQ(s.worker_id(), 3);
  EXPECT_EQ(s.stage(), 1);
  EXPECT_EQ(s.ep_rank(), 1);
  EXPECT_EQ(reg->plan.ToJson(), plan.ToJson());
  EXPECT_EQ(reg->response.epoch(), "e1");
  ASSERT_EQ(fake.registers().size(), 1u);
  EXPECT_EQ(fake.registers()[0].worker_id(), 3);
  EXPECT_EQ(fake.registers()[0].host(), "test-host");
  EXPECT_EQ(fake.registers()[0].rejoin_after_generation(), 0);
}

TEST(ControlSession, RegisterWaitsUntilAPlaceFreesUp) {
  FakeCoordinator fake;
  fake.AnswerRegister(absl::ResourceExhaustedError("every place is held"));
  fake.AnswerRegister(absl::AlreadyExistsError("worker 0 is alive"));
  fake.AnswerRegister(Registered(0, 0, 0, TinyPlan(1, 1), "e1", 1));
  ControlSession s(FastOptions(), &fake);
  ASSERT_OK(s.Register());
  EXPECT_EQ(fake.registers().size(), 3u);
}

TEST(ControlSession, RegisterFailsAtOnceOnOtherErrors) {
  FakeCoordinator fake;
  fake.AnswerRegister(absl::InvalidArgumentError("bad request"));
  ControlSession s(FastOptions(), &fake);
  auto reg = s.Register();
  EXPECT_EQ(reg.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(fake.registers().size(), 1u);
}

TEST(ControlSession, RegisterRejectsAPlaceOutsideThePlan) {
  FakeCoordinator fake;
  fake.AnswerRegister(Registered(5, 2, 0, TinyPlan(2, 1), "e1", 1));  // stage 2 of a 2-stage plan
  ControlSession s(FastOptions(), &fake);
  auto reg = s.Register();
  EXPECT_EQ(reg.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(reg.status().message().find("outside its plan"), std::string::npos) << reg.status();
}

TEST(ControlSession, RejoinRegistersAfterTheFailedGeneration) {
  FakeCoordinator fake;
  const topology::Plan plan = TinyPlan(2, 1);
  fake.AnswerRegister(Registered(1, 1, 0, plan, "e1", 1));
  fake.AnswerRegister(Registered(1, 1, 0, plan, "e1", 3));
  ControlSession s(FastOptions(), &fake);
  ASSERT_OK(s.Register());
  auto again = s.Rejoin(2);
  ASSERT_OK(again);
  ASSERT_TRUE(again->has_value());
  EXPECT_EQ((*again)->response.generation(), 3);
  ASSERT_EQ(fake.registers().size(), 2u);
  EXPECT_EQ(fake.registers()[1].worker_id(), 1);
  EXPECT_EQ(fake.registers()[1].rejoin_after_generation(), 2);
}

TEST(ControlSession, RejoinEndsQuietlyWhenTheClusterShutDownMeanwhile) {
  FakeCoordinator fake;
  fake.AnswerRegister(Registered(0, 0, 0, TinyPlan(1, 1), "e1", 1));
  fake.AnswerRegister(absl::UnavailableError("coordinator gone"));
  fake.AnswerRegister(absl::UnavailableError("coordinator gone"));
  ControlSession s(FastOptions(), &fake);
  ASSERT_OK(s.Register());
  auto failed = s.Rejoin(1);  // not shut down: an error
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable);
  *s.shutdown_flag() = true;
  auto quiet = s.Rejoin(1);
  ASSERT_OK(quiet);
  EXPECT_FALSE(quiet->has_value());
}

// ------------------------------------------------------------ heartbeats

// A session registered as worker 1 (stage 0, rank 1 of a 2x2 plan) with a
// built data plane of generation (e1, 1).
class HeartbeatTest : public ::testing::Test {
 protected:
  void SetUp() override {
    plan_ = TinyPlan(2, 2);
    fake_.AnswerRegister(Registered(1, 0, 1, plan_, "e1", 1));
    session_ = std::make_unique<ControlSession>(options_, &fake_);
    ASSERT_OK(session_->Register());
    dp_ = std::make_unique<DataPlane>(&factory_, DataPlane::Options{}, 2, 2, 1, 0, 1);
    dp_->SetGeneration("e1", 1, false);
    ASSERT_OK(dp_->Build());
  }
  void Attach() {
    ControlSession::Hooks h;
    h.report = [this](v1::HeartbeatRequest* r) { r->set_active_sequences(7); };
    h.answered = [this](const v1::HeartbeatResponse& r) { answered_.push_back(r); };
    h.running_plan = [this](topology::Plan* running) {
      *running = plan_;
      return testing::ToProto(plan_, 2);
    };
    session_->Start(dp_.get(), std::move(h));
    ASSERT_TRUE(testing::WaitFor([&] { return !fake_.heartbeats().empty(); }));  // went out at once
    session_->Stop();  // then the exiting one
  }
  v1::HeartbeatResponse Answer(const std::string& epoch, int64_t generation) {
    v1::HeartbeatResponse r;
    r.set_epoch(epoch);
    r.set_generation(generation);
    return r;
  }
  // Hooks without the thread: Beat() runs one heartbeat.
  void Hook() {
    ControlSession::Hooks h;
    h.report = [](v1::HeartbeatRequest* r) { r->set_active_sequences(7); };
    h.answered = [this](const v1::HeartbeatResponse& r) { answered_.push_back(r); };
    h.running_plan = [this](topology::Plan* running) {
      *running = plan_;
      return testing::ToProto(plan_, 2);
    };
    hooks_ = std::move(h);
  }

  ControlSession::Options options_ = FastOptions();
  FakeCoordinator fake_;
  RecordingCommFactory factory_;
  topology::Plan plan_;
  std::unique_ptr<ControlSession> session_;
  std::unique_ptr<DataPlane> dp_;
  std::vector<v1::HeartbeatResponse> answered_;
  ControlSession::Hooks hooks_;
};

TEST_F(HeartbeatTest, ThreadSendsReadyHeartbeatThenAnExitingOne) {
  fake_.OnHeartbeat([this](const v1::HeartbeatRequest&) { return Answer("e1", 1); });
  Attach();
  const auto beats = fake_.heartbeats();
  ASSERT_GE(beats.size(), 2u);
  EXPECT_FALSE(beats.front().exiting());
  EXPECT_TRUE(beats.back().exiting());
  for (const auto& b : beats) {
    EXPECT_EQ(b.worker_id(), 1);
    EXPECT_EQ(b.host(), "test-host");
    EXPECT_EQ(b.active_sequences(), 7);  // from the report hook
  }
  EXPECT_EQ(answered_.size(), beats.size());
  EXPECT_FALSE(dp_->stale());
  EXPECT_FALSE(dp_->Broken());
}

TEST_F(HeartbeatTest, BeatNowSendsAtOnce) {
  options_.heartbeat_interval = absl::Seconds(30);
  session_ = std::make_unique<ControlSession>(options_, &fake_);
  fake_.OnHeartbeat([this](const v1::HeartbeatRequest&) { return Answer("e1", 1); });
  Hook();
  session_->Start(dp_.get(), hooks_);
  ASSERT_TRUE(testing::WaitFor([&] { return fake_.heartbeats().size() == 1; }));
  session_->BeatNow();
  ASSERT_TRUE(testing::WaitFor([&] { return fake_.heartbeats().size() == 2; }, absl::Seconds(5)));
  session_->Stop();
}

TEST_F(HeartbeatTest, GenerationMovedMarksTheDataPlaneStaleAndAbortsIt) {
  Hook();
  fake_.AnswerHeartbeat(Answer("e1", 2));
  fake_.AnswerHeartbeat(Answer("e1", 2));
  session_->Start(dp_.get(), hooks_);  // sends the first heartbeat at once
  ASSERT_TRUE(testing::WaitFor([&] { return dp_->Broken(); }));
  session_->Stop();
  EXPECT_TRUE(dp_->stale());
  EXPECT_EQ(dp_->lane()->health().code(), absl::StatusCode::kAborted);
  EXPECT_NE(dp_->lane()->health().message().find("generation 2"), std::string::npos) << dp_->lane()->health();
  EXPECT_TRUE(session_->fatal().ok());
  // Rebuilt for the new generation, the data plane is fine again.
  dp_->Release();
  dp_->SetGeneration("e1", 2, /*clear_stale=*/true);
  ASSERT_OK(dp_->Build());
  EXPECT_FALSE(dp_->stale());
  EXPECT_FALSE(dp_->Broken());
}

TEST_F(HeartbeatTest, AnotherEpochIsNotAGenerationChange) {
  Hook();
  fake_.AnswerHeartbeat(Answer("e2", 5));  // a restarted coordinator: wait for re-registration
  session_->Start(dp_.get(), hooks_);
  ASSERT_TRUE(testing::WaitFor([&] { return !fake_.heartbeats().empty(); }));
  session_->Stop();
  EXPECT_FALSE(dp_->stale());
  EXPECT_FALSE(dp_->Broken());
}

TEST_F(HeartbeatTest, PlaceTakenOverIsFatal) {
  Hook();
  fake_.AnswerHeartbeat(absl::FailedPreconditionError("worker 1 was replaced"));
  session_->Start(dp_.get(), hooks_);
  ASSERT_TRUE(testing::WaitFor([&] { return !session_->fatal().ok(); }));
  session_->Stop();
  EXPECT_EQ(session_->fatal().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(session_->shutdown());
  EXPECT_TRUE(dp_->Broken());
}

TEST_F(HeartbeatTest, UnreachableCoordinatorIsRetriedNotFatal) {
  Hook();
  fake_.AnswerHeartbeat(absl::UnavailableError("connection refused"));
  fake_.AnswerHeartbeat(absl::DeadlineExceededError("slow"));
  fake_.OnHeartbeat([this](const v1::HeartbeatRequest&) { return Answer("e1", 1); });
  session_->Start(dp_.get(), hooks_);
  ASSERT_TRUE(testing::WaitFor([&] { return fake_.heartbeats().size() >= 3; }));
  session_->Stop();
  EXPECT_TRUE(session_->fatal().ok());
  EXPECT_FALSE(session_->shutdown());
  EXPECT_FALSE(dp_->Broken());
  EXPECT_GE(answered_.size(), 1u);
}

TEST_F(HeartbeatTest, RestartedCoordinatorGetsTheWorkerBackWithItsRunningPlan) {
  Hook();
  fake_.AnswerHeartbeat(absl::NotFoundError("unknown worker 1"));
  fake_.AnswerRegister(Registered(1, 0, 1, plan_, "e2", 1));
  fake_.OnHeartbeat([this](const v1::HeartbeatRequest&) { return Answer("e2", 1); });
  session_->Start(dp_.get(), hooks_);
  ASSERT_TRUE(testing::WaitFor([&] { return dp_->generation().epoch == "e2"; }));
  session_->Stop();
  const auto regs = fake_.registers();
  ASSERT_EQ(regs.size(), 2u);
  EXPECT_EQ(regs[1].worker_id(), 1);
  EXPECT_TRUE(regs[1].has_running_plan());
  EXPECT_EQ(regs[1].running_plan().placement_version(), 2);
  // Same processes, same data plane: it now answers to the new epoch.
  EXPECT_EQ(dp_->generation().generation, 1);
  EXPECT_FALSE(dp_->Broken());
  EXPECT_FALSE(session_->shutdown());
  EXPECT_EQ(factory_.specs().size(), 2u);  // nothing rebuilt
}

TEST_F(HeartbeatTest, RestartedCoordinatorWithAnotherPlanShutsTheWorkerDown) {
  Hook();
  fake_.AnswerHeartbeat(absl::NotFoundError("unknown worker 1"));
  fake_.AnswerRegister(Registered(1, 0, 1, TinyPlan(1, 4), "e2", 1));
  fake_.OnHeartbeat([this](const v1::HeartbeatRequest&) { return Answer("e2", 1); });
  session_->Start(dp_.get(), hooks_);
  ASSERT_TRUE(testing::WaitFor([&] { return session_->shutdown(); }));
  session_->Stop();
  EXPECT_EQ(dp_->generation().epoch, "e1");  // not adopted
}

TEST_F(HeartbeatTest, ShutdownFromTheCoordinator) {
  Hook();
  v1::HeartbeatResponse r = Answer("e1", 1);
  r.set_shutdown(true);
  fake_.AnswerHeartbeat(r);
  session_->Start(dp_.get(), hooks_);
  ASSERT_TRUE(testing::WaitFor([&] { return session_->shutdown(); }));
  session_->Stop();
  EXPECT_TRUE(session_->fatal().ok());
  EXPECT_FALSE(dp_->Broken());
}

TEST_F(HeartbeatTest, StopSignalLeavesAndAbortsTheDataPlane) {
  std::atomic<int> signal{0};
  std::atomic<bool> serving{false};
  options_.stop_signal = &signal;
  options_.serving = &serving;
  session_ = std::make_unique<ControlSession>(options_, &fake_);
  fake_.OnHeartbeat([this](const v1::HeartbeatRequest&) { return Answer("e1", 1); });
  Hook();
  session_->Start(dp_.get(), hooks_);
  ASSERT_TRUE(testing::WaitFor([&] { return serving.load(); }));
  EXPECT_FALSE(session_->leaving());
  signal = 15;
  ASSERT_TRUE(testing::WaitFor([&] { return session_->leaving(); }));
  session_->Stop();
  EXPECT_EQ(dp_->lane()->health().code(), absl::StatusCode::kAborted);
  EXPECT_TRUE(fake_.heartbeats().back().exiting());
}

// ------------------------------------------------------------ data plane

TEST(DataPlane, GroupsAreKeyedByEpochAndGeneration) {
  RecordingCommFactory factory;
  DataPlane::Options o;
  o.backend = "ucx";
  DataPlane dp(&factory, o, /*pp=*/2, /*ep=*/3, /*worker_id=*/4, /*stage=*/1, /*ep_rank=*/1);
  dp.SetGeneration("e7", 2, false);
  ASSERT_OK(dp.Build());
  auto specs = factory.specs();
  ASSERT_EQ(specs.size(), 2u);
  EXPECT_EQ(specs[0].name, "stage1");
  EXPECT_EQ(specs[0].key_prefix, "e7/g2/stage1");
  EXPECT_EQ(specs[0].worker_ids, (std::vector<int>{3, 4, 5}));
  EXPECT_EQ(specs[0].rank, 1);
  EXPECT_EQ(specs[1].name, "lane1");
  EXPECT_EQ(specs[1].key_prefix, "e7/g2/lane1");
  EXPECT_EQ(specs[1].worker_ids, (std::vector<int>{1, 4}));
  EXPECT_EQ(specs[1].rank, 1);
  EXPECT_EQ(specs[1].backend, "ucx");
  ASSERT_NE(dp.stage(), nullptr);
  ASSERT_NE(dp.lane(), nullptr);
  EXPECT_EQ(dp.stage_device(), nullptr);
  // A rebuild after a generation change rendezvouses under new keys.
  dp.Abort(absl::AbortedError("test"));
  dp.Release();
  EXPECT_EQ(dp.lane(), nullptr);
  dp.SetGeneration("e7", 3, true);
  ASSERT_OK(dp.Build());
  specs = factory.specs();
  ASSERT_EQ(specs.size(), 4u);
  EXPECT_EQ(specs[2].key_prefix, "e7/g3/stage1");
  EXPECT_EQ(specs[3].key_prefix, "e7/g3/lane1");
  EXPECT_FALSE(dp.Broken());
  EXPECT_EQ(dp.builds(), 2);
}

TEST(DataPlane, NcclTwinsAndSingleRankGroups) {
  RecordingCommFactory factory;
  DataPlane::Options o;
  o.nccl_twins = true;
  DataPlane dp(&factory, o, /*pp=*/3, /*ep=*/1, /*worker_id=*/2, /*stage=*/2, /*ep_rank=*/0);
  ASSERT_OK(dp.Build());
  const auto specs = factory.specs();  // ep = 1: no stage group
  ASSERT_EQ(specs.size(), 2u);
  EXPECT_EQ(specs[0].name, "lane0");
  EXPECT_EQ(specs[1].name, "lane0-nccl");
  EXPECT_EQ(specs[1].backend, "nccl");
  EXPECT_EQ(dp.stage(), nullptr);
  EXPECT_NE(dp.lane_device(), nullptr);
}

TEST(DataPlane, VacantRanksConnectOnlyTheLiveMembers) {
  RecordingCommFactory factory;
  DataPlane::Options o;
  DataPlane dp(&factory, o, /*pp=*/1, /*ep=*/4, /*worker_id=*/2, /*stage=*/0, /*ep_rank=*/2);
  dp.SetGeneration("e1", 5, false);
  dp.SetVacant({3, 1});
  ASSERT_OK(dp.Build());
  auto specs = factory.specs();
  ASSERT_EQ(specs.size(), 1u);
  EXPECT_EQ(specs[0].worker_ids, (std::vector<int>{0, 2}));
  EXPECT_EQ(specs[0].rank, 1);
  EXPECT_EQ(specs[0].key_prefix, "e1/g5/stage0");
  ASSERT_NE(dp.stage(), nullptr);
  EXPECT_EQ(dp.stage()->rank(), 2);  // the logical EP rank stays
  EXPECT_EQ(dp.stage()->size(), 4);
  dp.Abort(absl::AbortedError("test"));
  EXPECT_TRUE(dp.Broken());
  dp.Release();
  // Vacant itself, or with the NCCL device data plane: refused with the reason.
  DataPlane self(&factory, o, 1, 4, /*worker_id=*/1, 0, 1);
  self.SetVacant({1});
  EXPECT_EQ(self.Build().code(), absl::StatusCode::kFailedPrecondition);
  DataPlane::Options twins;
  twins.nccl_twins = true;
  DataPlane nccl(&factory, twins, /*pp=*/1, 2, /*worker_id=*/0, 0, 0);
  nccl.SetVacant({1});
  EXPECT_EQ(nccl.Build().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(Lanes, RePairedAroundVacantPlaces) {
  // PP2xEP2 (stage 0: workers 0, 1; stage 1: 2, 3).
  auto l = topology::ComputeLanes(2, 2, {});
  EXPECT_EQ(l.lanes, (std::vector<std::vector<int>>{{0, 2}, {1, 3}}));
  l = topology::ComputeLanes(2, 2, {1});  // lane 1 broken: 3 has no lane
  EXPECT_EQ(l.lanes, (std::vector<std::vector<int>>{{0, 2}}));
  EXPECT_EQ(l.lane_of, (std::vector<int>{0, -1, 0, -1}));
  l = topology::ComputeLanes(2, 2, {2, 1});  // no intact lane: 0 -> 3
  EXPECT_EQ(l.lanes, (std::vector<std::vector<int>>{{0, 3}}));
  l = topology::ComputeLanes(2, 2, {0, 1});  // stage 0 empty: no lane
  EXPECT_TRUE(l.lanes.empty());
  // PP3xEP3, one vacancy per stage, each in another lane: 0 (s0 r0), 4 (s1 r1), 8 (s2 r2). No rank is
  // intact; the leftovers {1, 2}, {3, 5}, {6, 7} pair in rank order into two lanes.
  l = topology::ComputeLanes(3, 3, {0, 4, 8});
  EXPECT_EQ(l.lanes, (std::vector<std::vector<int>>{{1, 3, 6}, {2, 5, 7}}));
  // pp = 1: every live rank is its own lane.
  l = topology::ComputeLanes(1, 4, {2});
  EXPECT_EQ(l.lanes, (std::vector<std::vector<int>>{{0}, {1}, {3}}));
}

TEST(DataPlane, PipelineLanesAroundVacantPlaces) {
  RecordingCommFactory factory;
  DataPlane::Options o;
  // PP2xEP2, worker 1 vacant. Worker 0: stage group of itself, lane 0 -> 2.
  DataPlane w0(&factory, o, /*pp=*/2, /*ep=*/2, /*worker_id=*/0, /*stage=*/0, /*ep_rank=*/0);
  w0.SetGeneration("e1", 2, false);
  w0.SetVacant({1});
  ASSERT_OK(w0.Build());
  auto specs = factory.specs();
  ASSERT_EQ(specs.size(), 2u);
  EXPECT_EQ(specs[0].worker_ids, (std::vector<int>{0}));
  EXPECT_EQ(specs[1].name, "lane0");
  EXPECT_EQ(specs[1].worker_ids, (std::vector<int>{0, 2}));
  EXPECT_FALSE(w0.laneless());
  EXPECT_TRUE(w0.laneless_ranks().empty());
  EXPECT_EQ(w0.lane_leader(), 0);
  // Worker 3: its stage's group {2, 3}, no lane; led by EP rank 0 (worker 2).
  DataPlane w3(&factory, o, 2, 2, /*worker_id=*/3, /*stage=*/1, /*ep_rank=*/1);
  w3.SetGeneration("e1", 2, false);
  w3.SetVacant({1});
  ASSERT_OK(w3.Build());
  specs = factory.specs();
  ASSERT_EQ(specs.size(), 3u);
  EXPECT_EQ(specs[2].name, "stage1");
  EXPECT_EQ(specs[2].worker_ids, (std::vector<int>{2, 3}));
  EXPECT_TRUE(w3.laneless());
  EXPECT_EQ(w3.lane(), nullptr);
  EXPECT_EQ(w3.laneless_ranks(), (std::vector<int>{1}));
  EXPECT_EQ(w3.lane_leader(), 0);
  // Workers 1 and 2 vacant: worker 3 is re-paired with worker 0 (lane "lane0", rank 1 = stage 1).
  w3.Release();
  w3.SetGeneration("e1", 3, true);
  w3.SetVacant({1, 2});
  ASSERT_OK(w3.Build());
  specs = factory.specs();
  ASSERT_EQ(specs.size(), 5u);
  EXPECT_EQ(specs[4].name, "lane0");
  EXPECT_EQ(specs[4].worker_ids, (std::vector<int>{0, 3}));
  EXPECT_EQ(specs[4].rank, 1);
  EXPECT_EQ(specs[4].key_prefix, "e1/g3/lane0");
  EXPECT_FALSE(w3.laneless());
  EXPECT_EQ(w3.lane_leader(), 1);
}

TEST(DataPlane, BuiltWhileTheGenerationMovedOnFailsItsFirstExchange) {
  RecordingCommFactory factory;
  DataPlane dp(&factory, DataPlane::Options{}, 2, 1, 0, 0, 0);
  dp.SetGeneration("e1", 1, false);
  EXPECT_TRUE(dp.MarkStaleIfMoved("e1", 2));
  EXPECT_FALSE(dp.MarkStaleIfMoved("e1", 2));  // once
  ASSERT_OK(dp.Build());
  EXPECT_TRUE(dp.Broken());
  EXPECT_EQ(dp.lane()->health().code(), absl::StatusCode::kAborted);
  // Neither another epoch nor our own generation is a move.
  DataPlane fresh(&factory, DataPlane::Options{}, 2, 1, 0, 0, 0);
  fresh.SetGeneration("e1", 1, false);
  EXPECT_FALSE(fresh.MarkStaleIfMoved("e2", 5));
  EXPECT_FALSE(fresh.MarkStaleIfMoved("e1", 1));
  EXPECT_FALSE(fresh.stale());
}

TEST(DataPlane, FactoryFailureIsReturned) {
  RecordingCommFactory factory;
  factory.Fail(absl::DeadlineExceededError("peer never connected"));
  DataPlane dp(&factory, DataPlane::Options{}, 2, 1, 0, 0, 0);
  EXPECT_EQ(dp.Build().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(dp.lane(), nullptr);
  EXPECT_EQ(dp.builds(), 0);
}

}  // namespace
}  // namespace expertmesh::worker::runtime
