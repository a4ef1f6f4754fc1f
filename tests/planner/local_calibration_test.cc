// The local calibration of docs/PLANNER.md ("Local calibration"): the planner,
// calibrated from `expertmesh bench` on the development host, predicts local
// `expertmesh bench serve` runs of the runtime. Recomputes the predictions
// from the committed files and checks them against the committed measurements
// (no timing here: CI machines differ):
//   examples/topologies/cpu-local-calibrated.yaml          calibrated topology
//   examples/planning/local-calibration/bench.json         the benchmarks it was fitted on
//   examples/planning/local-calibration/workload.yaml      expert load the runtime reported
//   examples/planning/local-calibration/serve-measured.json  measured runs, with their commands
#include <cmath>
#include <fstream>
#include <map>
#include <string>

#include "common/config.h"
#include "gtest/gtest.h"
#include "tests/common/status_matchers.h"
#include "topology/batch_job.h"
#include "topology/calibration.h"
#include "topology/cluster.h"
#include "topology/cost_model.h"
#include "topology/workload.h"

namespace expertmesh::topology {
namespace {

const std::string kSrc = EXPERTMESH_SOURCE_DIR;
const std::string kDir = kSrc + "/examples/planning/local-calibration";

// The goal of issue 5 for the local check.
constexpr double kBound = 0.20;

// A decode step of bench serve's shape (KV length 80: 64 prompt + half of 32 new).
Deployment Decode(int64_t pp, int64_t ep, int64_t batch_per_device) {
  Deployment d;
  d.phase = Phase::kDecode;
  d.pp = pp;
  d.ep = ep;
  d.batch_per_device = batch_per_device;
  d.context = 80;
  return d;
}

TEST(LocalCalibrationTest, ServeRunsPredictedWithinTwentyPercent) {
  auto cluster = LoadClusterFile(kSrc + "/examples/topologies/cpu-local-calibrated.yaml");
  ASSERT_OK(cluster);
  auto w = LoadWorkloadFile(kDir + "/workload.yaml");
  ASSERT_OK(w);
  auto runs = ReadBenchResults({kDir + "/serve-measured.json"});
  ASSERT_OK(runs);
  int checked = 0;
  for (const auto& m : *runs) {
    if (!m.contains("stages")) continue;
    ASSERT_TRUE(m.contains("_command")) << "every measured run names the command that produced it";
    auto cfg = ModelConfig::Preset(m["preset"].get<std::string>());
    ASSERT_TRUE(cfg.ok());
    BatchJob job;
    job.prompts = m["prompts"].get<int64_t>();
    job.prompt_len = m["prompt_len"].get<int64_t>();
    job.max_new_tokens = m.contains("max_new_tokens") ? m["max_new_tokens"].get<int64_t>()
                                                       : m["generated_tokens"].get<int64_t>() / job.prompts;
    const int64_t pp = m["pp"].get<int64_t>(), ep = m["ep"].get<int64_t>();
    int64_t red = 0;
    while ((cfg->n_routed_experts + red) % ep != 0) ++red;
    auto r = SimulateBatchJob(*cfg, *cluster, *w, 1, pp, ep, red, job);
    ASSERT_OK(r);
    const double measured = m["tokens_per_s"].get<double>();
    const double err = (r->tokens_per_s - measured) / measured;
    EXPECT_LE(std::abs(err), kBound) << m["_command"].get<std::string>() << ": predicted " << r->tokens_per_s
                                     << " generated tok/s, measured " << measured << " (" << 100 * err << "%)";
    ++checked;
  }
  EXPECT_GE(checked, 3) << "docs/PLANNER.md reports three runs";
}

TEST(LocalCalibrationTest, CommittedTopologyIsTheCalibrationOfTheCommittedBenchmarks) {
  auto base = LoadClusterFile(kSrc + "/examples/topologies/cpu-2core.yaml");
  ASSERT_OK(base);
  auto benches = ReadBenchResults({kDir + "/bench.json"});
  ASSERT_OK(benches);
  auto cal = CalibrateCpuHost(*base, *benches);
  ASSERT_OK(cal);
  auto committed = LoadClusterFile(kSrc + "/examples/topologies/cpu-local-calibrated.yaml");
  ASSERT_OK(committed);
  const DeviceSpec &a = cal->cluster.node.device, &b = committed->node.device;
  auto near = [](double x, double y) { return std::abs(x - y) <= 1e-3 * std::max(std::abs(x), std::abs(y)) + 1e-9; };
  EXPECT_TRUE(near(a.hbm_gbytes_per_s, b.hbm_gbytes_per_s)) << a.hbm_gbytes_per_s << " vs " << b.hbm_gbytes_per_s;
  EXPECT_TRUE(near(a.efficiency.gemm_fp32, b.efficiency.gemm_fp32));
  EXPECT_TRUE(near(a.efficiency.attention_prefill, b.efficiency.attention_prefill));
  EXPECT_TRUE(near(a.efficiency.kernel_overhead_us, b.efficiency.kernel_overhead_us));
  EXPECT_TRUE(near(a.efficiency.step_overhead_ms, b.efficiency.step_overhead_ms));
  EXPECT_TRUE(near(cal->cluster.node.intra_node.gbytes_per_s_per_direction,
                   committed->node.intra_node.gbytes_per_s_per_direction));
  EXPECT_EQ(b.host_cores, 2);
  EXPECT_EQ(b.runtime_path, "cpu");
  // Every fitted parameter is named with its source.
  EXPECT_GE(cal->parameters.size(), 6u);
  for (const auto& p : cal->parameters) EXPECT_FALSE(p.source.empty()) << p.key;
}

// --- the pieces the local calibration added to the model -------------------

TEST(LocalCalibrationTest, SharedCoresBoundTheStageStep) {
  auto cluster = LoadClusterFile(kSrc + "/examples/topologies/cpu-local-calibrated.yaml");
  ASSERT_OK(cluster);
  auto cfg = ModelConfig::Preset("small");
  ASSERT_TRUE(cfg.ok());
  EXPECT_DOUBLE_EQ(cluster->node.device.CoreShare(2), 1.0);
  EXPECT_DOUBLE_EQ(cluster->node.device.CoreShare(4), 0.5);
  Deployment d = Decode(/*pp=*/2, /*ep=*/2, /*batch_per_device=*/4);
  auto shared = Simulate(*cfg, *cluster, Workload{}, d);
  ASSERT_OK(shared);
  Cluster own = *cluster;
  own.node.device.host_cores = 0;  // every process on its own core
  auto alone = Simulate(*cfg, own, Workload{}, d);
  ASSERT_OK(alone);
  // 4 processes on 2 cores: a step lasts the CPU time of all of them / 2.
  ASSERT_EQ(alone->stage_times_ms.size(), 2u);
  const double cpu = 2 * (alone->stage_times_ms[0] + alone->stage_times_ms[1]);
  EXPECT_NEAR(shared->stage_time_ms, std::max(alone->stage_time_ms, cpu / 2), 1e-9);
  EXPECT_GT(shared->stage_time_ms, alone->stage_time_ms);
  EXPECT_GT(shared->critical_path_ms.count("shared cores"), 0u);
  // 2 processes on 2 cores: nothing shared.
  d.pp = 1;
  auto two = Simulate(*cfg, *cluster, Workload{}, d);
  auto two_alone = Simulate(*cfg, own, Workload{}, d);
  ASSERT_TRUE(two.ok() && two_alone.ok());
  EXPECT_DOUBLE_EQ(two->stage_time_ms, two_alone->stage_time_ms);
}

DeviceSpec Cpu() {
  DeviceSpec d;
  d.kind = "cpu";
  d.count = 2;
  d.tflops_fp32_dense = 0.1;
  d.hbm_gbytes_per_s = 5;
  d.gemm_dtype = "fp32";
  d.runtime_path = "cpu";
  d.efficiency = FamilyEfficiency("cpu");
  d.efficiency.hbm = 1;
  d.efficiency.kernel_overhead_us = 1;
  return d;
}

TEST(LocalCalibrationTest, GroupedGemmReadsOnlyTouchedExperts) {
  const DeviceCostModel dev(Cpu());
  // 128 experts with 0.5 expected tokens each: 1 - e^-0.5 of them are touched.
  const std::vector<double> per(128, 0.5);
  const OpCost g = dev.GroupedGemm("g", per, 1024, 512);
  const double touched = 128 * (1 - std::exp(-0.5));
  EXPECT_NEAR(g.kernels, touched, 1e-9);  // CPU path: one SGEMM per touched expert
  EXPECT_NEAR(g.bytes, touched * 1024 * 512 * 4 + 64 * (1024 + 512) * 4, 1);
  // The slowest of 2 ranks: mean + 0.5642 standard deviations.
  const OpCost g2 = dev.GroupedGemm("g", per, 1024, 512, 2);
  const double p = 1 - std::exp(-0.5);
  EXPECT_NEAR(g2.kernels, touched + 0.5642 * std::sqrt(128 * p * (1 - p)), 1e-6);
  // Many tokens per expert: every expert is read once, as before.
  const OpCost big = dev.GroupedGemm("g", std::vector<double>(8, 1000), 1024, 512, 8);
  EXPECT_NEAR(big.kernels, 8, 1e-6);
}

TEST(LocalCalibrationTest, RankSkewChargesTheSlowestEpRank) {
  auto cluster = LoadClusterFile(kSrc + "/examples/topologies/cpu-local-calibrated.yaml");
  ASSERT_OK(cluster);
  auto cfg = ModelConfig::Preset("small");
  ASSERT_TRUE(cfg.ok());
  Cluster even = *cluster;
  even.node.device.efficiency.rank_speed_cv = 0;
  Cluster skewed = even;
  skewed.node.device.efficiency.rank_speed_cv = 0.1;
  Deployment d = Decode(/*pp=*/1, /*ep=*/2, /*batch_per_device=*/8);
  auto a = Simulate(*cfg, even, Workload{}, d);
  auto b = Simulate(*cfg, skewed, Workload{}, d);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->breakdown_ms.count("rank_skew"), 0u);
  ASSERT_GT(b->breakdown_ms.count("rank_skew"), 0u);
  const double skew = b->breakdown_ms.at("rank_skew");
  EXPECT_NEAR(b->stage_time_ms, a->stage_time_ms + skew, 1e-9);
  // At most c(2) x cv x the compute (the experts' routing deviation is
  // already charged and adds in quadrature), at least that for the
  // non-expert compute.
  double compute = 0, experts = a->breakdown_ms.at("routed_experts");
  for (const char* k : {"attention", "dense_mlp", "router+shared_expert", "head", "embedding", "routed_experts"}) {
    if (a->breakdown_ms.count(k)) compute += a->breakdown_ms.at(k);
  }
  EXPECT_LE(skew, 0.5642 * 0.1 * compute + 1e-9);
  EXPECT_GE(skew, 0.5642 * 0.1 * (compute - experts) - 1e-9);
  // One rank: nothing to wait for.
  d.ep = 1;
  auto one = Simulate(*cfg, skewed, Workload{}, d);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->breakdown_ms.count("rank_skew"), 0u);
}

TEST(LocalCalibrationTest, RankSpeedSpreadFromConcurrentCopies) {
  auto base = LoadClusterFile(kSrc + "/examples/topologies/cpu-2core.yaml");
  ASSERT_OK(base);
  auto benches = ReadBenchResults({kDir + "/bench.json"});
  ASSERT_OK(benches);
  // The pooled relative spread of the small preset's concurrent copies.
  double sum = 0;
  int n = 0;
  std::map<int64_t, std::vector<std::pair<double, double>>> copies;  // tokens -> (moe, mla) per copy
  for (const auto& j : *benches) {
    if (!j.contains("moe_layer_s") || j.value("preset", std::string()) != "small") continue;
    copies[j["tokens"].get<int64_t>()].push_back({j["moe_layer_s"].get<double>(), j["mla_layer_s"].get<double>()});
  }
  for (const auto& [t, v] : copies) {
    if (v.size() < 2) continue;
    for (int which = 0; which < 2; ++which) {
      double mean = 0, var = 0;
      for (const auto& c : v) mean += which == 0 ? c.first : c.second;
      mean /= v.size();
      for (const auto& c : v) var += std::pow((which == 0 ? c.first : c.second) - mean, 2);
      var /= v.size() - 1;
      sum += var / (mean * mean);
      ++n;
    }
  }
  ASSERT_GT(n, 0);
  auto cal = CalibrateCpuHost(*base, *benches);
  ASSERT_OK(cal);
  EXPECT_NEAR(cal->cluster.node.device.efficiency.rank_speed_cv, std::sqrt(sum / n), 1e-12);
}

TEST(LocalCalibrationTest, CpuTimesAddComputeAndMemory) {
  const DeviceSpec d = Cpu();  // memory_compute_overlap 0 in the CPU family
  const DeviceCostModel dev(d);
  const OpCost g = dev.Gemm("g", 64, 1024, 1024, true);
  const double tc = g.flops / (0.1e12 * d.efficiency.gemm_fp32), tm = g.bytes / 5e9;
  EXPECT_NEAR(g.seconds, tc + tm + 1e-6, 1e-12);
  EXPECT_NEAR(ExpectedMaxOfNormals(4), 1.0294, 1e-4);
  EXPECT_NEAR(ExpectedMaxOfNormals(100), 2.5076, 0.01);
}

TEST(LocalCalibrationTest, JobIsPrefillPassPlusDecodePasses) {
  auto cluster = LoadClusterFile(kSrc + "/examples/topologies/cpu-local-calibrated.yaml");
  ASSERT_OK(cluster);
  auto cfg = ModelConfig::Preset("small");
  ASSERT_TRUE(cfg.ok());
  BatchJob job{16, 64, 32};
  auto r = SimulateBatchJob(*cfg, *cluster, Workload{}, 1, 2, 2, 0, job);
  ASSERT_OK(r);
  EXPECT_EQ(r->sequences_per_lane, 8);
  EXPECT_EQ(r->sequences_per_micro_batch, 4);
  EXPECT_DOUBLE_EQ(r->core_share, 0.5);  // 4 processes on 2 cores
  EXPECT_NEAR(r->wall_s,
              2 * r->prefill_step.stage_time_ms / 1e3 + 31 * 2 * r->decode_step.stage_time_ms / 1e3 + 0.020, 1e-9);
  EXPECT_NEAR(r->tokens_per_s, 16 * 32 / r->wall_s, 1e-9);
  EXPECT_EQ(r->decode_step.deployment.context, 64 + 16);
}

TEST(LocalCalibrationTest, ExpertLoadFromStatusJson) {
  const std::string path = testing::TempDir() + "/status.json";
  {
    std::ofstream f(path);
    f << R"({"plan": {}, "expert_load": [{"layer": 2, "tokens_per_expert": ["3", "1"]},
                                          {"layer": 1, "tokens_per_expert": ["0", "4"]}]})";
  }
  auto layers = LoadExpertLoadJson(path);
  ASSERT_OK(layers);
  ASSERT_EQ(layers->size(), 2u);
  EXPECT_EQ((*layers)[0], (std::vector<double>{0, 4}));  // layer order
  EXPECT_EQ((*layers)[1], (std::vector<double>{3, 1}));
}

}  // namespace
}  // namespace expertmesh::topology
