// Simulation and search: physical monotonicity, memory sizing, overlap
// schedules, plan validation messages, Pareto front and fleet sizing.
#include <set>

#include "gtest/gtest.h"
#include "tests/common/status_matchers.h"
#include "topology/search.h"
#include "topology/simulator.h"

namespace expertmesh::topology {
namespace {

const std::string kExamples = std::string(EXPERTMESH_SOURCE_DIR) + "/examples";

class SimulatorTest : public testing::Test {
 protected:
  void SetUp() override {
    cfg_ = *ModelConfig::Preset("deepseek-v3");
    auto c = LoadClusterFile(kExamples + "/topologies/h800.yaml");
    ASSERT_OK(c);
    h800_ = *c;
    w_.prompt_tokens = 4096;
    w_.output_tokens = 0;
    w_.decode_context_tokens = 4096;
  }
  Deployment Decode(int64_t nodes, double batch) {
    Deployment d;
    d.phase = Phase::kDecode;
    d.nodes = nodes;
    d.ep = nodes * 8;
    d.redundant_experts = 0;
    while ((256 + d.redundant_experts) % d.ep != 0) ++d.redundant_experts;
    d.batch_per_device = batch;
    return d;
  }
  ModelConfig cfg_;
  Cluster h800_;
  Workload w_;
};

TEST_F(SimulatorTest, DecodeScalesWithBatchAndContext) {
  auto small = Simulate(cfg_, h800_, w_, Decode(4, 16));
  auto large = Simulate(cfg_, h800_, w_, Decode(4, 64));
  ASSERT_TRUE(small.ok() && large.ok()) << small.status() << large.status();
  EXPECT_GT(large->tokens_per_s_per_device, small->tokens_per_s_per_device);
  EXPECT_GT(large->tpot_ms, small->tpot_ms);
  EXPECT_GT(large->memory_gib_per_device, small->memory_gib_per_device);
  Deployment d = Decode(4, 64);
  d.context = 16384;
  auto longer = Simulate(cfg_, h800_, w_, d);
  ASSERT_TRUE(longer.ok());
  EXPECT_GT(longer->tpot_ms, large->tpot_ms);
  EXPECT_NEAR(longer->tokens_per_s_per_node, longer->tokens_per_s_per_device * 8, 1e-6);
}

TEST_F(SimulatorTest, MemoryAndLargestBatch) {
  auto r = Simulate(cfg_, h800_, w_, Decode(16, 128));
  ASSERT_OK(r);
  // EP128, 2 experts per GPU: ~22.5 GiB of weights; KV 128 x 4096 x 70,272 B.
  EXPECT_NEAR(r->memory.weights / 1e9, 24.2, 0.5);
  EXPECT_NEAR(r->memory.kv_cache, 128.0 * 4096 * 70272, 1);
  EXPECT_TRUE(r->fits);
  EXPECT_GT(r->max_batch_per_device, 128);
  Deployment d = Decode(16, std::ceil(r->max_batch_per_device) + 8);
  auto over = Simulate(cfg_, h800_, w_, d);
  ASSERT_TRUE(over.ok());
  EXPECT_FALSE(over->fits);
  EXPECT_EQ(over->bottleneck, "memory capacity");
  // EP32 holds 9 experts per GPU: ~42.1 GB of weights (REFERENCE.md).
  Deployment p;
  p.phase = Phase::kPrefill;
  p.nodes = 4;
  p.ep = 32;
  p.redundant_experts = 32;
  p.batch_per_device = 4096;
  auto m = DeploymentMemory(cfg_, h800_, w_, p);
  ASSERT_TRUE(m.ok());
  EXPECT_NEAR(m->weights / 1e9, 42.1, 0.5);
}

TEST_F(SimulatorTest, PipelineSplitsWeights) {
  Deployment a = Decode(2, 32);
  Deployment b = a;
  b.pp = 2;
  b.ep = 8;
  b.redundant_experts = 0;
  auto ra = Simulate(cfg_, h800_, w_, a);
  auto rb = Simulate(cfg_, h800_, w_, b);
  ASSERT_TRUE(ra.ok() && rb.ok()) << ra.status() << rb.status();
  EXPECT_LT(rb->memory.weights, ra->memory.weights);
  EXPECT_EQ(rb->plan.stages.size(), 2u);
  EXPECT_NEAR(rb->tpot_ms, 2 * rb->stage_time_ms, 1e-9);
}

TEST_F(SimulatorTest, OverlapSchedules) {
  Deployment d = Decode(16, 128);
  auto two = Simulate(cfg_, h800_, w_, d);
  w_.overlap = Workload::Overlap::kFiveStage;
  auto five = Simulate(cfg_, h800_, w_, d);
  w_.overlap = Workload::Overlap::kNone;
  auto none = Simulate(cfg_, h800_, w_, d);
  ASSERT_TRUE(two.ok() && five.ok() && none.ok());
  EXPECT_LE(five->tpot_ms, two->tpot_ms);
  EXPECT_LT(two->tpot_ms, none->tpot_ms);
}

TEST_F(SimulatorTest, ImbalanceCostsThroughput) {
  Deployment d = Decode(18, 64);
  d.redundant_experts = 32;
  auto uniform = Simulate(cfg_, h800_, w_, d);
  w_.expert_load.kind = LoadDistribution::Kind::kZipf;
  w_.expert_load.zipf_exponent = 1.0;
  auto skewed = Simulate(cfg_, h800_, w_, d);
  ASSERT_TRUE(uniform.ok() && skewed.ok()) << skewed.status();
  EXPECT_NEAR(uniform->expert_imbalance, 1.125, 1e-9);  // 2 slots per rank (see EplbTest.UniformLoad)
  EXPECT_GT(skewed->expert_imbalance, uniform->expert_imbalance);
  EXPECT_LT(skewed->tokens_per_s_per_device, uniform->tokens_per_s_per_device);
}

TEST_F(SimulatorTest, DeploymentErrorsSayWhatToChange) {
  Deployment d = Decode(2, 8);
  d.ep = 12;
  absl::Status s = ValidateDeployment(d, h800_, cfg_);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("pp * ep"), std::string::npos) << s;
  d = Decode(18, 8);
  d.redundant_experts = 0;
  s = ValidateDeployment(d, h800_, cfg_);
  EXPECT_NE(s.message().find("--redundant-experts"), std::string::npos) << s;
  d = Decode(41, 8);
  s = ValidateDeployment(d, h800_, cfg_);
  EXPECT_NE(s.message().find("nodes"), std::string::npos) << s;
}

TEST_F(SimulatorTest, SingleNodeAllToAllUsesOnlyTheFabric) {
  Fanout f;
  f.nvlink_forwards = 4;
  f.copies_local_other = 7;
  const AllToAllTime t = AllToAll(cfg_, h800_, false, 8, 4096, f, 1.0);
  const double bw = 160e9 * h800_.node.intra_node.alltoall_efficiency;
  EXPECT_NEAR(t.dispatch_s, 4096 * 4 * 7392 / bw + 3e-6, 1e-9);
  EXPECT_EQ(t.dispatch_limiter, Limiter::kNvlink);
}

TEST_F(SimulatorTest, SearchFindsAParetoFrontUnderTheSlo) {
  SearchOptions o;
  o.phase = Phase::kDecode;
  o.max_nodes = 4;
  o.max_tpot_ms = 60;
  o.batches = {8, 32, 64, 128};
  auto s = SearchPlans(cfg_, h800_, w_, o);
  ASSERT_OK(s);
  ASSERT_FALSE(s->ranked.empty());
  ASSERT_FALSE(s->pareto.empty());
  for (size_t i = 1; i < s->ranked.size(); ++i) {
    EXPECT_GE(s->ranked[i - 1].tokens_per_s_per_device, s->ranked[i].tokens_per_s_per_device);
  }
  for (const auto& r : s->ranked) EXPECT_LE(r.tpot_ms, 60);
  for (size_t i = 1; i < s->pareto.size(); ++i) {
    EXPECT_GT(s->pareto[i].tpot_ms, s->pareto[i - 1].tpot_ms);
    EXPECT_GT(s->pareto[i].tokens_per_s_per_device, s->pareto[i - 1].tokens_per_s_per_device);
  }
  // No feasible plan dominates a point of the front.
  for (const auto& p : s->pareto) {
    for (const auto& r : s->ranked) {
      EXPECT_FALSE(r.tpot_ms < p.tpot_ms && r.tokens_per_s_per_device > p.tokens_per_s_per_device);
    }
  }
  EXPECT_EQ(s->pareto.back().tokens_per_s_per_device, s->ranked.front().tokens_per_s_per_device);
  EXPECT_GT(s->over_memory + s->over_slo, 0);  // 1 node cannot hold the model
}

// A "node" of gb200-nvl72.yaml is one 72-GPU NVLink domain.
class PartNodeTest : public testing::Test {
 protected:
  void SetUp() override {
    cfg_ = *ModelConfig::Preset("deepseek-v3");
    auto c = LoadClusterFile(kExamples + "/topologies/gb200-nvl72.yaml");
    ASSERT_OK(c);
    nvl72_ = *c;
    w_.prompt_tokens = 4096;
    w_.output_tokens = 0;
    w_.decode_context_tokens = 4096;
  }
  Deployment Decode(int64_t nodes, int64_t pp, int64_t ep, int64_t redundant) const {
    Deployment d;
    d.phase = Phase::kDecode;
    d.nodes = nodes;
    d.pp = pp;
    d.ep = ep;
    d.redundant_experts = redundant;
    d.batch_per_device = 32;
    return d;
  }
  ModelConfig cfg_;
  Cluster nvl72_;
  Workload w_;
};

TEST_F(PartNodeTest, Ep48InsideOneDomainStaysOnNvlink) {
  const Deployment d = Decode(1, 1, 48, 32);  // 288 slots, 6 per rank
  ASSERT_OK(ValidateDeployment(d, nvl72_, cfg_));
  auto r = Simulate(cfg_, nvl72_, w_, d);
  ASSERT_OK(r);
  EXPECT_TRUE(r->fits);
  // No copy leaves the domain: one node per token, nothing over the NICs.
  EXPECT_EQ(r->fanout.remote_nodes, 0);
  EXPECT_EQ(r->fanout.copies_remote, 0);
  EXPECT_DOUBLE_EQ(r->fanout.all_nodes, 1);
  EXPECT_GT(r->fanout.copies_local_other, 0);
  const AllToAllTime t = AllToAll(cfg_, nvl72_, true, 48, 16, r->fanout, 1.0);
  EXPECT_EQ(t.dispatch_limiter, Limiter::kNvlink);
  EXPECT_EQ(t.combine_limiter, Limiter::kNvlink);
  EXPECT_EQ(r->critical_path_ms.count(LimiterName(Limiter::kNic)), 0u);
  // Throughput counts the 48 devices used; 24 of the domain stay idle.
  EXPECT_EQ(r->devices_used_per_node, 48);
  EXPECT_EQ(r->idle_devices_per_node, 24);
  EXPECT_NEAR(r->tokens_per_s_per_node, r->tokens_per_s_per_device * 48, 1e-6);
  // Memory per device as for any EP size: 6 expert slots instead of EP72's 4.
  auto full = Simulate(cfg_, nvl72_, w_, Decode(1, 1, 72, 32));
  ASSERT_OK(full);
  EXPECT_EQ(full->idle_devices_per_node, 0);
  const ModelWeights mw = CountWeights(cfg_);
  EXPECT_NEAR(r->memory.weights - full->memory.weights,
              2.0 * static_cast<double>(cfg_.num_moe_layers()) * mw.routed_expert.Bytes(nvl72_.node.device.gemm_dtype),
              1.0);
  EXPECT_DOUBLE_EQ(r->memory.kv_cache, full->memory.kv_cache);
}

TEST_F(PartNodeTest, PartDomainAcceptedStraddlingRefused) {
  // Two stages of 32 in one domain (8 idle); a single EP group of 40.
  EXPECT_OK(ValidateDeployment(Decode(1, 2, 32, 0), nvl72_, cfg_));
  EXPECT_OK(ValidateDeployment(Decode(1, 1, 40, 24), nvl72_, cfg_));
  // Too many devices for one domain.
  absl::Status s = ValidateDeployment(Decode(1, 2, 48, 32), nvl72_, cfg_);
  EXPECT_NE(s.message().find("pp * ep"), std::string::npos) << s;
  // EP 80 across two domains straddles them unevenly.
  s = ValidateDeployment(Decode(2, 1, 80, 0), nvl72_, cfg_);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("straddles nodes"), std::string::npos) << s;
  EXPECT_NE(s.message().find("multiple of 72"), std::string::npos) << s;
  // Three stages of 48 over two domains: the middle one would straddle.
  s = ValidateDeployment(Decode(2, 3, 48, 32), nvl72_, cfg_);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("divide one node of 72"), std::string::npos) << s;
  // Whole domains stay accepted.
  EXPECT_OK(ValidateDeployment(Decode(2, 1, 144, 32), nvl72_, cfg_));
  EXPECT_OK(ValidateDeployment(Decode(2, 4, 36, 32), nvl72_, cfg_));
}

TEST_F(PartNodeTest, SearchEnumeratesPartDomainEpSizes) {
  EXPECT_EQ(PartNodeEpSizes(72, 256), (std::vector<int64_t>{16, 32, 48, 64}));
  EXPECT_TRUE(PartNodeEpSizes(8, 256).empty());  // 8-device nodes: the divisors only, as before
  SearchOptions o;
  o.phase = Phase::kDecode;
  o.max_nodes = 1;
  o.pps = {1};
  o.batches = {32};
  auto s = SearchPlans(cfg_, nvl72_, w_, o);
  ASSERT_OK(s);
  std::set<int64_t> eps;
  for (const auto& r : s->all) {
    eps.insert(r.deployment.ep);
    EXPECT_EQ(r.fanout.copies_remote, 0) << r.deployment.ToString();
    EXPECT_EQ(r.idle_devices_per_node, 72 - r.deployment.ep) << r.deployment.ToString();
  }
  for (int64_t ep : {8, 16, 24, 32, 36, 48, 64, 72}) EXPECT_EQ(eps.count(ep), 1u) << "ep " << ep;
}

TEST(FleetTest, NodesFromDailyVolume) {
  SimResult p, d;
  p.tokens_per_s_per_node = 73700;
  p.deployment.nodes = 4;
  d.tokens_per_s_per_node = 14800;
  d.deployment.nodes = 18;
  const Fleet f = SizeFleet(608e9, 168e9, &p, &d);
  // 7.04M / 73.7k = 95.5 and 1.94M / 14.8k = 131.4: 226.9 (DeepSeek: 226.75).
  EXPECT_NEAR(f.prefill_nodes, 95.48, 0.01);
  EXPECT_NEAR(f.decode_nodes, 131.38, 0.01);
  EXPECT_NEAR(f.total_nodes, 226.87, 0.02);
  EXPECT_EQ(f.prefill_units, 24);
  EXPECT_EQ(f.decode_units, 8);
  EXPECT_EQ(f.total_nodes_whole_units, 24 * 4 + 8 * 18);
}

}  // namespace
}  // namespace expertmesh::topology
