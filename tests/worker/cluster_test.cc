// Several RunWorker instances in one process (threads) against one fake
// coordinator, over a real UCX data plane bootstrapped through the fake's
// key-value store: a 2-stage pipeline and a 2-rank expert-parallel stage
// generate what the engine generates on the whole model.
#include <algorithm>
#include <atomic>
#include <filesystem>
#include <thread>

#include "common/checkpoint.h"
#include "gtest/gtest.h"
#include "tests/worker/fake_coordinator.h"
#include "worker/comm/registry.h"
#include "worker/model.h"
#include "worker/runtime/worker.h"

namespace expertmesh::worker::runtime {
namespace {

using testing::FakeCoordinator;
using testing::Greedy;
using testing::Lane;
using testing::Registered;
using testing::TinyPlan;

class ClusterTest : public testing::TinyCheckpointSuite<8> {
 protected:
  void SetUp() override {
    const auto b = comm::AvailableBackends();
    if (std::find(b.begin(), b.end(), "ucx") == b.end()) GTEST_SKIP() << "built without UCX";
  }


  // Runs the pp x ep workers of `plan` until the coordinator shuts the
  // cluster down; lanes[r]: what stage 0 of lane r is given.
  void RunCluster(const topology::Plan& plan, std::vector<Lane*> lanes) {
    fake_.OnRegister([&](const v1::RegisterRequest& req) -> absl::StatusOr<v1::RegisterResponse> {
      const int id = req.worker_id();
      return Registered(id, static_cast<int>(id / plan.ep), static_cast<int>(id % plan.ep), plan, "e1", 1, 1,
                        Checkpoint());
    });
    testing::RunThreadedWorkers(&fake_, plan.num_workers(), lanes);
  }

  FakeCoordinator fake_;
};

TEST_F(ClusterTest, TwoStagePipelineGeneratesWhatTheEngineGenerates) {
  Lane lane({Greedy("j/0", {3, 99, 512}, 5), Greedy("j/1", {1000, 1}, 4), Greedy("j/2", {42}, 3)});
  RunCluster(TinyPlan(2, 1), {&lane});
  EXPECT_EQ(lane.tokens()["j/0"], Reference({3, 99, 512}, 5));
  EXPECT_EQ(lane.tokens()["j/1"], Reference({1000, 1}, 4));
  EXPECT_EQ(lane.tokens()["j/2"], Reference({42}, 3));
}

TEST_F(ClusterTest, ExpertParallelStageGeneratesWhatTheEngineGenerates) {
  Lane lane0({Greedy("a/0", {5, 6, 7}, 4)});
  Lane lane1({Greedy("b/0", {700}, 5), Greedy("b/1", {8, 9}, 2)});
  RunCluster(TinyPlan(1, 2), {&lane0, &lane1});
  EXPECT_EQ(lane0.tokens()["a/0"], Reference({5, 6, 7}, 4));
  EXPECT_EQ(lane1.tokens()["b/0"], Reference({700}, 5));
  EXPECT_EQ(lane1.tokens()["b/1"], Reference({8, 9}, 2));
}

// A fake coordinator whose store answers garbage for every key of
// generation 1, as an outsider who wrote there would make it (issue 15).
class GarbageStoreCoordinator : public FakeCoordinator {
 public:
  absl::StatusOr<std::pair<bool, std::string>> StoreGet(const std::string& key, absl::Duration t) override {
    if (key.find("/g1/") != std::string::npos) {
      garbage_reads_++;
      return std::make_pair(true, std::string("\x01\x02 not an address \xff\xfe"));
    }
    return FakeCoordinator::StoreGet(key, t);
  }
  std::atomic<int> garbage_reads_{0};
};

TEST_F(ClusterTest, GarbageBootstrapBytesMakeTheWorkersRejoinNotCrash) {
  // Both workers of a 2-stage pipeline read garbage for their peer's UCX
  // address in generation 1: DATA_LOSS (no UCX call with it), they register
  // again with rejoin_after_generation = 1, build generation 2 and serve.
  GarbageStoreCoordinator fake;
  const topology::Plan plan = TinyPlan(2, 1);
  Lane lane({Greedy("j/0", {3, 99, 512}, 4)});
  fake.OnRegister([&](const v1::RegisterRequest& req) -> absl::StatusOr<v1::RegisterResponse> {
    const int id = req.worker_id();
    return Registered(id, id, 0, plan, "e1", req.rejoin_after_generation() > 0 ? 2 : 1, 1, Checkpoint());
  });
  testing::RunThreadedWorkers(&fake, 2, {&lane, nullptr}, /*generation=*/2);
  EXPECT_GE(fake.garbage_reads_.load(), 2);
  int rejoins = 0;
  for (const auto& r : fake.registers()) rejoins += r.rejoin_after_generation() == 1 ? 1 : 0;
  EXPECT_EQ(rejoins, 2);
  EXPECT_EQ(lane.tokens()["j/0"], Reference({3, 99, 512}, 4));
}

}  // namespace
}  // namespace expertmesh::worker::runtime
