// The planner on the dense R1-Distill models (Qwen2, Llama presets at their
// real shapes) on H100 and H200 nodes: no experts (EP ranks are data-parallel
// lanes, no all-to-all), weights and K/V cache sized from the configs,
// throughput and latency ordered by model size, and a search that finds plans.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/common/status_matchers.h"
#include "topology/cost_model.h"
#include "topology/search.h"
#include "topology/simulator.h"

namespace expertmesh::topology {
namespace {

const std::string kExamples = std::string(EXPERTMESH_SOURCE_DIR) + "/examples";
const std::vector<std::string> kDistills = {"r1-distill-qwen-1.5b", "r1-distill-qwen-7b",  "r1-distill-llama-8b",
                                            "r1-distill-qwen-14b",  "r1-distill-qwen-32b", "r1-distill-llama-70b"};

class DensePlannerTest : public testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    auto c = LoadClusterFile(kExamples + "/topologies/" + GetParam() + ".yaml");
    ASSERT_OK(c);
    cluster_ = *c;
    w_.prompt_tokens = 2048;
    w_.output_tokens = 2048;
    w_.decode_context_tokens = 4096;
  }
  static Deployment Decode(int64_t pp, int64_t ep, double batch) {
    Deployment d;
    d.phase = Phase::kDecode;
    d.pp = pp;
    d.ep = ep;
    d.batch_per_device = batch;
    d.context = 4096;
    return d;
  }
  Cluster cluster_;
  Workload w_;
};

// The fewest pipeline stages (of 1, 2, 4, 8; 8 / pp data-parallel lanes)
// with which 16 sequences of 4096 tokens per device fit in memory: bf16
// weights (2 B per parameter) over pp stages plus their K/V cache.
// H100 (79.6 GiB): 32B needs 2 stages (65.5 GB + 17 GB of K/V), 70B 4
// (2 stages: 70.6 GB + 21.5 GB); H200 (140.4 GiB): 70B needs 2.
int64_t ExpectedStages(const std::string& topology, const std::string& model) {
  if (model == "r1-distill-llama-70b") return topology == "h100" ? 4 : 2;
  if (model == "r1-distill-qwen-32b") return topology == "h100" ? 2 : 1;
  return 1;
}

TEST_P(DensePlannerTest, EveryDistillSizeIsPlanned) {
  double prev_tpot = 0, prev_weights = 0;
  for (const std::string& name : kDistills) {
    SCOPED_TRACE(name);
    auto cfg = ModelConfig::Preset(name);
    ASSERT_OK(cfg);
    int64_t pp = 0;
    SimResult r;
    for (int64_t p : {1, 2, 4, 8}) {
      auto s = Simulate(*cfg, cluster_, w_, Decode(p, 8 / p, 16));
      ASSERT_OK(s);
      if (s->fits) {
        pp = p;
        r = *s;
        break;
      }
    }
    ASSERT_EQ(pp, ExpectedStages(GetParam(), name));
    PlanOptions po;
    po.pp = pp;
    po.ep = 8 / pp;
    auto plan = BuildPlan(*cfg, po);
    ASSERT_OK(plan);
    int64_t most = 0, fewest = cfg->num_hidden_layers;  // layers of a stage
    for (const auto& st : plan->stages) {
      most = std::max(most, st.layer_end - st.layer_begin);
      fewest = std::min(fewest, st.layer_end - st.layer_begin);
    }
    // Weights: 2 bytes per parameter (no fp8 tensors), the largest stage's share.
    EXPECT_NEAR(r.memory.weights / (2.0 * cfg->ParameterCount() / pp), 1.0, 0.08);
    // K/V cache: pp groups x 16 sequences x 4096 tokens x 2 x kv_heads x head_dim x 2 B (bf16) per layer of
    // the stage with the most weight bytes.
    const double layers = r.memory.kv_cache / (16.0 * pp * 4096 * 2 * cfg->kv_dim() * 2);
    EXPECT_EQ(layers, std::round(layers));
    EXPECT_GE(layers, fewest);
    EXPECT_LE(layers, most);
    EXPECT_EQ(r.memory.comm_buffers, 0);  // no all-to-all
    EXPECT_EQ(r.dispatch_us, 0);
    EXPECT_GE(r.max_batch_per_device, 16);
    EXPECT_GT(r.tokens_per_s_per_device, 0);
    // Decode reads every weight once per step: bigger models are slower per token.
    if (pp == 1) {
      EXPECT_GT(r.tpot_ms, prev_tpot);
      EXPECT_GT(r.memory.weights, prev_weights);
      prev_tpot = r.tpot_ms;
      prev_weights = r.memory.weights;
    }
    Deployment pf = Decode(pp, 8 / pp, 4096);
    pf.phase = Phase::kPrefill;
    pf.context = 2048;
    auto p = Simulate(*cfg, cluster_, w_, pf);
    ASSERT_OK(p);
    EXPECT_GT(p->ttft_ms, 0);
  }
}

TEST_P(DensePlannerTest, SeventyBillionWeights) {
  auto cfg = ModelConfig::Preset("r1-distill-llama-70b");
  ASSERT_OK(cfg);
  auto r = Simulate(*cfg, cluster_, w_, Decode(1, 1, 1));
  ASSERT_OK(r);
  EXPECT_NEAR(r->memory.weights / 1e9, 141.1, 1.0);  // bf16
  if (GetParam() == "h100") EXPECT_FALSE(r->fits);
}

TEST_P(DensePlannerTest, SearchFindsDataParallelPlans) {
  auto cfg = ModelConfig::Preset("r1-distill-llama-8b");
  ASSERT_OK(cfg);
  SearchOptions o;
  o.phase = Phase::kDecode;
  o.max_nodes = 1;
  o.batches = {8, 64};
  o.pps = {1, 2};
  auto s = SearchPlans(*cfg, cluster_, w_, o);
  ASSERT_OK(s);
  ASSERT_FALSE(s->ranked.empty());
  for (const SimResult& r : s->all) EXPECT_EQ(r.deployment.redundant_experts, 0);
}

TEST(DensePlanner, PlanHasNoPlacementsAndTakesAnyEp) {
  auto cfg = ModelConfig::Preset("r1-distill-qwen-7b");
  ASSERT_OK(cfg);
  PlanOptions o;
  o.pp = 4;
  o.ep = 3;  // lanes need not divide anything: no experts
  auto p = BuildPlan(*cfg, o);
  ASSERT_OK(p);
  ASSERT_EQ(p->stages.size(), 4u);
  for (const auto& st : p->stages) EXPECT_TRUE(st.placement.empty());
  EXPECT_EQ(p->stages[0].layer_begin, 0);
  EXPECT_EQ(p->stages[3].layer_end, 28);
  EXPECT_EQ(KvBytesPerTokenLayer(*cfg, "bf16"), 2 * 2 * 4 * 128);
  EXPECT_EQ(KvBytesPerTokenLayer(*cfg, "fp8"), 2 * 4 * 128);
}

INSTANTIATE_TEST_SUITE_P(Topologies, DensePlannerTest, testing::Values("h100", "h200"));

}  // namespace
}  // namespace expertmesh::topology
