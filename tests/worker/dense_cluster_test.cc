// The dense architectures served by a cluster: RunWorker instances in one
// process (threads) against one fake coordinator, over a real UCX data plane.
// A 2-stage pipeline of tiny Qwen2 and of tiny Llama, and a stage of 2 EP
// ranks (data-parallel lanes: no experts, so no MoE exchange), generate the
// tokens of the single-process engine on the whole model.
#include <algorithm>
#include <filesystem>
#include <string>
#include <thread>

#include "common/checkpoint.h"
#include "gtest/gtest.h"
#include "tests/worker/fake_coordinator.h"
#include "topology/plan.h"
#include "topology/plan_proto.h"
#include "worker/comm/registry.h"
#include "worker/model.h"
#include "worker/runtime/worker.h"

namespace expertmesh::worker::runtime {
namespace {

using testing::FakeCoordinator;
using testing::Greedy;
using testing::Lane;

class DenseClusterTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    const auto b = comm::AvailableBackends();
    if (std::find(b.begin(), b.end(), "ucx") == b.end()) GTEST_SKIP() << "built without UCX";
    const char* base = std::getenv("TEST_TMPDIR");
    std::string templ = std::string(base != nullptr ? base : "/tmp") + "/em_dense_XXXXXX";
    dir_ = mkdtemp(templ.data());
    auto cfg = ModelConfig::Preset(GetParam());
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    cfg_ = *cfg;
    GenerateOptions g;
    g.out_dir = dir_ + "/ckpt";
    g.seed = 13;
    g.dtype = "bf16";
    ASSERT_TRUE(GenerateCheckpoint(cfg_, g).ok());
  }
  void TearDown() override {
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  topology::Plan MakePlan(int64_t pp, int64_t ep) {
    topology::PlanOptions o;
    o.pp = pp;
    o.ep = ep;
    auto p = topology::BuildPlan(cfg_, o);
    EXPECT_TRUE(p.ok()) << p.status();
    return *p;
  }

  // The greedy continuation of `prompt` by the engine on the whole model.
  std::vector<int32_t> Reference(const std::vector<int32_t>& prompt, int n) {
    auto shard = ModelShard::Load(dir_ + "/ckpt", ShardFilter{});
    EXPECT_TRUE(shard.ok()) << shard.status();
    Engine engine(shard->get());
    SequenceCache cache = engine.NewCache();
    std::vector<int32_t> out, next = prompt;
    std::vector<float> logits;
    for (int step = 0; step < n; ++step) {
      EXPECT_TRUE(engine.Forward({{&cache, next.data(), static_cast<int64_t>(next.size())}}, &logits).ok());
      kernels::SamplingParams sp{0.0f, 0, 1.0f, 0};
      out.push_back(kernels::Sample(logits.data(), cfg_.vocab_size, sp, step));
      next = {out.back()};
    }
    return out;
  }

  void RunCluster(const topology::Plan& plan, std::vector<Lane*> lanes) {
    const std::string ckpt = dir_ + "/ckpt", config = cfg_.ToJson().dump();
    fake_.OnRegister([&](const v1::RegisterRequest& req) -> absl::StatusOr<v1::RegisterResponse> {
      const int id = req.worker_id();
      v1::RegisterResponse r = testing::Registered(id, static_cast<int>(id / plan.ep), static_cast<int>(id % plan.ep),
                                                   plan, "e1", 1, 1, ckpt);
      *r.mutable_plan() = topology::PlanToProto(plan, ckpt, config, 1);
      return r;
    });
    testing::RunThreadedWorkers(&fake_, plan.num_workers(), lanes);
  }

  std::string dir_;
  ModelConfig cfg_;
  FakeCoordinator fake_;
};

TEST_P(DenseClusterTest, TwoStagePipelineGeneratesWhatTheEngineGenerates) {
  const topology::Plan plan = MakePlan(2, 1);
  ASSERT_EQ(plan.stages.size(), 2u);
  EXPECT_TRUE(plan.stages[0].placement.empty());  // no MoE layers, no experts to place
  Lane lane({Greedy("j/0", {3, 99, 512, 7, 8, 9, 10}, 5), Greedy("j/1", {1000, 1}, 4), Greedy("j/2", {42}, 3)});
  RunCluster(plan, {&lane});
  EXPECT_EQ(lane.tokens()["j/0"], Reference({3, 99, 512, 7, 8, 9, 10}, 5));
  EXPECT_EQ(lane.tokens()["j/1"], Reference({1000, 1}, 4));
  EXPECT_EQ(lane.tokens()["j/2"], Reference({42}, 3));
}

TEST_P(DenseClusterTest, EpRanksAreDataParallelLanes) {
  const topology::Plan plan = MakePlan(1, 2);
  Lane lane0({Greedy("a/0", {5, 6, 7}, 4)});
  Lane lane1({Greedy("b/0", {700}, 5), Greedy("b/1", {8, 9}, 2)});
  RunCluster(plan, {&lane0, &lane1});
  EXPECT_EQ(lane0.tokens()["a/0"], Reference({5, 6, 7}, 4));
  EXPECT_EQ(lane1.tokens()["b/0"], Reference({700}, 5));
  EXPECT_EQ(lane1.tokens()["b/1"], Reference({8, 9}, 2));
}

INSTANTIATE_TEST_SUITE_P(Archs, DenseClusterTest, ::testing::Values("tiny-qwen2", "tiny-llama"),
                         [](const auto& info) { return std::string(info.param == std::string("tiny-qwen2") ? "Qwen2" : "Llama"); });

}  // namespace
}  // namespace expertmesh::worker::runtime
