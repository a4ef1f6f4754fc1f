// Expert rebalancing on a worker: staging a pending placement in the
// background, switching between steps, and dropping stale staged placements.
#include "worker/runtime/placement_stager.h"

#include <algorithm>
#include <atomic>

#include "gtest/gtest.h"
#include "tests/worker/fake_coordinator.h"

namespace expertmesh::worker::runtime {
namespace {

using testing::FakeExpertStore;
using testing::TinyPlan;

// The experts rank `rank` of stage `stage` holds in `plan`.
std::map<int64_t, std::set<int32_t>> Held(const topology::Plan& plan, int stage, int rank) {
  std::map<int64_t, std::set<int32_t>> out;
  for (const auto& [layer, pl] : plan.stages[stage].placement) {
    out[layer] = std::set<int32_t>(pl.slots_of_rank(rank).begin(), pl.slots_of_rank(rank).end());
  }
  return out;
}

// The same plan with rank 0 and rank 1 of stage 0 swapping their experts.
topology::Plan Swapped(const topology::Plan& plan) {
  topology::Plan p = plan;
  for (auto& [layer, pl] : p.stages[0].placement) {
    std::vector<std::vector<int32_t>> ranks;
    for (int r = 0; r < pl.num_ranks(); ++r) ranks.push_back(pl.slots_of_rank(r));
    std::reverse(ranks.begin(), ranks.end());
    auto swapped = topology::ExpertPlacement::Create(pl.num_experts(), ranks);
    EXPECT_TRUE(swapped.ok()) << swapped.status();
    pl = *swapped;
  }
  return p;
}

class StagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    plan_ = TinyPlan(1, 2);
    store_ = std::make_unique<FakeExpertStore>(Held(plan_, 0, 0));
    PlacementStager::Hooks h;
    h.beat_now = [this] { ++beats_; };
    h.switched = [this] { ++switched_; };
    stager_ = std::make_unique<PlacementStager>(0, 0, 0, &plan_, 1, store_.get(), std::move(h));
  }
  // Stages `next` as version v of epoch e through a heartbeat answer and waits for the loader.
  void Stage(int64_t v, const std::string& e, const topology::Plan& next) {
    stager_->OnHeartbeat(e, /*committed=*/1, v, true, testing::ToProto(next, v, "/ckpt2"));
    ASSERT_TRUE(testing::WaitFor([&] { return stager_->loading_version() == 0; }));
    stager_->Join();
  }

  topology::Plan plan_;
  std::unique_ptr<FakeExpertStore> store_;
  std::unique_ptr<PlacementStager> stager_;
  std::atomic<int> beats_{0}, switched_{0};
};

TEST_F(StagerTest, StagesOnlyTheMissingExpertsThenSwitches) {
  const topology::Plan next = Swapped(plan_);
  Stage(2, "e1", next);
  EXPECT_EQ(stager_->staged_version(), 2);
  EXPECT_EQ(stager_->placement_version(), 1);
  EXPECT_EQ(beats_.load(), 1);  // the coordinator hears of it at once
  EXPECT_EQ(stager_->TakeError(), "");
  const auto loads = store_->loads();
  ASSERT_EQ(loads.size(), 1u);
  const auto want = Held(next, 0, 0);
  int64_t loaded = 0;
  for (const auto& [layer, ids] : loads[0]) {
    loaded += static_cast<int64_t>(ids.size());
    for (int32_t e : ids) {
      EXPECT_EQ(want.at(layer).count(e), 1u);
      EXPECT_EQ(Held(plan_, 0, 0).at(layer).count(e), 0u) << "expert " << e << " was already held";
    }
  }
  EXPECT_GT(loaded, 0);
  EXPECT_EQ(stager_->OfferVersion(1), 1);  // not committed yet
  EXPECT_EQ(stager_->OfferVersion(2), 2);  // committed and staged
  ASSERT_OK(stager_->Switch(2));
  EXPECT_EQ(stager_->placement_version(), 2);
  EXPECT_EQ(stager_->staged_version(), 0);
  EXPECT_EQ(switched_.load(), 1);
  EXPECT_EQ(plan_.ToJson(), next.ToJson());
  EXPECT_EQ(store_->held(), want);
  // Running the new version: the same pending version is not staged again.
  stager_->OnHeartbeat("e1", 2, 2, true, testing::ToProto(next, 2));
  stager_->Join();
  EXPECT_EQ(store_->loads().size(), 1u);
}

TEST_F(StagerTest, StagedPlacementStaysWhilePendingOrCommitted) {
  Stage(2, "e1", Swapped(plan_));
  stager_->OnHeartbeat("e1", 1, 2, false, v1::Plan());  // still pending
  EXPECT_EQ(stager_->staged_version(), 2);
  stager_->OnHeartbeat("e1", 2, 0, false, v1::Plan());  // committed
  EXPECT_EQ(stager_->staged_version(), 2);
}

TEST_F(StagerTest, StagedPlacementTheCoordinatorDroppedIsUnloaded) {
  Stage(2, "e1", Swapped(plan_));
  stager_->OnHeartbeat("e1", 1, 0, false, v1::Plan());  // neither pending nor committed
  EXPECT_EQ(stager_->staged_version(), 0);
  EXPECT_EQ(stager_->Switch(2).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(stager_->placement_version(), 1);
  EXPECT_EQ(store_->replaces(), 0);
}

TEST_F(StagerTest, StagedPlacementOfARestartedCoordinatorIsDropped) {
  Stage(2, "e1", Swapped(plan_));
  // The restarted coordinator (epoch e2) happens to have a pending version 2 too.
  stager_->OnHeartbeat("e2", 1, 2, true, testing::ToProto(Swapped(plan_), 2));
  EXPECT_EQ(stager_->staged_version(), 0);
  // The next answer stages e2's version 2 afresh.
  Stage(2, "e2", Swapped(plan_));
  EXPECT_EQ(stager_->staged_version(), 2);
  EXPECT_EQ(store_->loads().size(), 2u);
}

TEST_F(StagerTest, SwitchToAVersionNotStagedFails) {
  const absl::Status s = stager_->Switch(3);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_NE(s.message().find("staged 0"), std::string::npos) << s;
  EXPECT_EQ(switched_.load(), 0);
}

TEST_F(StagerTest, LoadFailureIsReportedOnce) {
  store_->load_error_ = absl::NotFoundError("shard file missing");
  Stage(2, "e1", Swapped(plan_));
  EXPECT_EQ(stager_->staged_version(), 0);
  EXPECT_EQ(stager_->TakeError(), "shard file missing");
  EXPECT_EQ(stager_->TakeError(), "");
  EXPECT_EQ(beats_.load(), 1);
}

TEST_F(StagerTest, EngineThatCannotStageSaysWhy) {
  store_->can_stage_ = absl::UnimplementedError("experts live on the GPU");
  stager_->OnHeartbeat("e1", 1, 2, true, testing::ToProto(Swapped(plan_), 2));
  stager_->Join();
  EXPECT_EQ(stager_->TakeError(), "experts live on the GPU");
  EXPECT_TRUE(store_->loads().empty());
  EXPECT_EQ(stager_->staged_version(), 0);
}

TEST_F(StagerTest, PendingPlanOfAnotherShapeIsRefused) {
  stager_->OnHeartbeat("e1", 1, 2, true, testing::ToProto(TinyPlan(2, 2), 2));
  stager_->Join();
  EXPECT_NE(stager_->TakeError().find("other stages or MoE layers"), std::string::npos);
  EXPECT_TRUE(store_->loads().empty());
}

TEST_F(StagerTest, RunningPlanForReRegistration) {
  Stage(2, "e1", Swapped(plan_));
  ASSERT_OK(stager_->Switch(2));
  topology::Plan running;
  const v1::Plan p = stager_->RunningPlanProto(testing::ToProto(TinyPlan(1, 2), 1, "/ckpt"), &running);
  EXPECT_EQ(p.placement_version(), 2);
  EXPECT_EQ(p.checkpoint(), "/ckpt");
  EXPECT_TRUE(running == Swapped(TinyPlan(1, 2)));
}

}  // namespace
}  // namespace expertmesh::worker::runtime
