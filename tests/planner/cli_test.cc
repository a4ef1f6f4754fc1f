// `expertmesh plan` end to end: --json on every shipped topology (one plan and
// a search), --csv and --plot files, and clear errors for bad input.
#include <cstdio>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace {

const std::string kSrc = EXPERTMESH_SOURCE_DIR;

// Runs a command; returns stdout and sets *rc.
std::string RunPlan(const std::string& args, int* rc) {
  const std::string cmd = std::string(EXPERTMESH_BIN) + " plan " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  const int status = pclose(p);
  *rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return out;
}

struct Case {
  const char* topology;
  const char* model;
  const char* one_plan;  // flags of a plan that fits
};

const Case kCases[] = {
    {"h800.yaml", "deepseek-v3", "--nodes 16 --ep 128 --batch-per-device 128"},
    {"h100.yaml", "deepseek-v3", "--nodes 4 --ep 32"},
    {"h200.yaml", "deepseek-v3", "--nodes 1 --ep 8 --redundant-experts 0 --batch-per-device 32"},
    {"gb200-nvl72.yaml", "deepseek-v3", "--nodes 1 --ep 72 --redundant-experts 32 --batch-per-device 64"},
    {"l40s-pcie.yaml", "deepseek-v3", "--nodes 4 --ep 32 --redundant-experts 0 --batch-per-device 8"},
    {"cpu-2core.yaml", "tiny", "--nodes 1 --ep 2 --batch-per-device 4"},
    {"cpu-local-calibrated.yaml", "small", "--nodes 1 --pp 2 --ep 2 --batch-per-device 4"},
};

TEST(PlanCliTest, EveryShippedTopologyIsCovered) {
  int shipped = 0;
  for (const auto& f : std::filesystem::directory_iterator(kSrc + "/examples/topologies")) {
    bool covered = false;
    for (const Case& c : kCases) covered |= f.path().filename() == c.topology;
    EXPECT_TRUE(covered) << f.path() << " has no CLI test case";
    ++shipped;
  }
  EXPECT_EQ(shipped, static_cast<int>(std::size(kCases)));
}

TEST(PlanCliTest, OnePlanJsonOnEveryTopology) {
  for (const Case& c : kCases) {
    int rc = 0;
    const std::string out = RunPlan(std::string("--model ") + c.model + " --topology " + kSrc + "/examples/topologies/" +
                                    c.topology + " --phase decode " + c.one_plan + " --json",
                                &rc);
    ASSERT_EQ(rc, 0) << c.topology << ":\n" << out;
    const nlohmann::json j = nlohmann::json::parse(out, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << out;
    for (const char* k : {"tokens_per_s_per_node", "tokens_per_s_per_device", "tpot_ms", "memory_gib_per_device",
                          "bottleneck"}) {
      EXPECT_TRUE(j.contains(k)) << c.topology << " lacks " << k;
    }
    EXPECT_GT(j["tokens_per_s_per_device"].get<double>(), 0) << c.topology;
    EXPECT_TRUE(j["fits"].get<bool>()) << c.topology;
  }
}

TEST(PlanCliTest, SearchJsonOnEveryTopology) {
  for (const Case& c : kCases) {
    int rc = 0;
    const std::string out = RunPlan(std::string("--model ") + c.model + " --topology " + kSrc + "/examples/topologies/" +
                                    c.topology + " --phase prefill --max-nodes 4 --json",
                                &rc);
    ASSERT_EQ(rc, 0) << c.topology << ":\n" << out;
    const nlohmann::json j = nlohmann::json::parse(out, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << out;
    EXPECT_TRUE(j.contains("ttft_ms")) << c.topology;
    EXPECT_TRUE(j.contains("tokens_per_s_per_node")) << c.topology;
    ASSERT_TRUE(j.contains("prefill")) << c.topology;
    EXPECT_FALSE(j["prefill"]["pareto"].empty()) << c.topology;
  }
}

TEST(PlanCliTest, SearchWritesCsvPlotAndSizesTheFleet) {
  const std::string dir = testing::TempDir();
  int rc = 0;
  const std::string out =
      RunPlan("--topology " + kSrc + "/examples/topologies/h800.yaml --workload " + kSrc +
              "/examples/workloads/deepseek-production-day.yaml --phase both --max-nodes 18 --csv " + dir +
              "/plans.csv --plot " + dir + "/plans.svg",
          &rc);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("Pareto front"), std::string::npos) << out;
  EXPECT_NE(out.find("fleet for"), std::string::npos) << out;
  std::ifstream svg(dir + "/plans.svg");
  std::stringstream s;
  s << svg.rdbuf();
  EXPECT_NE(s.str().find("<svg"), std::string::npos);
  EXPECT_NE(s.str().find("Pareto front"), std::string::npos);
  std::ifstream csv(dir + "/plans.csv");
  std::string header;
  std::getline(csv, header);
  EXPECT_EQ(header.rfind("phase,nodes,pp,ep", 0), 0u) << header;
}

TEST(PlanCliTest, ErrorsAreClear) {
  int rc = 0;
  std::string out = RunPlan("--topology /nonexistent.yaml", &rc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("cannot open topology file"), std::string::npos) << out;
  out = RunPlan("--topology " + kSrc + "/examples/topologies/h800.yaml --nodes 2 --ep 12", &rc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("pp * ep"), std::string::npos) << out;
  out = RunPlan("", &rc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("--topology FILE is required"), std::string::npos) << out;
}

// A 48-GPU EP group inside one 72-GPU NVL72 domain: a plan with no NIC
// traffic and 24 idle devices; 80 GPUs over two domains are refused.
TEST(PlanCliTest, PartOfAnNvl72Domain) {
  const std::string topo = " --model deepseek-v3 --topology " + kSrc + "/examples/topologies/gb200-nvl72.yaml";
  int rc = 0;
  std::string out = RunPlan(topo + " --phase decode --nodes 1 --ep 48 --json", &rc);
  ASSERT_EQ(rc, 0) << out;
  const nlohmann::json j = nlohmann::json::parse(out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << out;
  EXPECT_EQ(j["plan"]["ep"], 48);
  EXPECT_EQ(j["plan"]["redundant_experts"], 32);
  EXPECT_TRUE(j["fits"].get<bool>());
  EXPECT_GT(j["tokens_per_s_per_device"].get<double>(), 0);
  EXPECT_EQ(j["fanout"]["remote_nodes"].get<double>(), 0);
  EXPECT_EQ(j["fanout"]["copies_remote"].get<double>(), 0);
  EXPECT_EQ(j["devices_used_per_node"], 48);
  EXPECT_EQ(j["idle_devices_per_node"], 24);
  EXPECT_NEAR(j["tokens_per_s_per_node"].get<double>(), 48 * j["tokens_per_s_per_device"].get<double>(), 1e-6);
  out = RunPlan(topo + " --phase decode --nodes 1 --ep 48", &rc);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("uses 48 of the node's 72 devices (24 idle"), std::string::npos) << out;
  out = RunPlan(topo + " --phase decode --nodes 2 --ep 80", &rc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("--ep 80: an EP group larger than one node straddles nodes"), std::string::npos) << out;
}

TEST(PlanCliTest, JobPredictionAgainstAMeasuredRun) {
  const std::string dir = kSrc + "/examples/planning/local-calibration";
  int rc = 0;
  const std::string out = RunPlan("--topology " + kSrc + "/examples/topologies/cpu-local-calibrated.yaml --workload " +
                                      dir + "/workload.yaml --measured " + dir + "/serve-measured.json --pp 2 --ep 2 --json",
                                  &rc);
  ASSERT_EQ(rc, 0) << out;
  const nlohmann::json j = nlohmann::json::parse(out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << out;
  EXPECT_EQ(j["phase"], "job");
  EXPECT_EQ(j["pp"], 2);
  EXPECT_EQ(j["ep"], 2);
  EXPECT_EQ(j["job"]["prompts"], 16);
  for (const char* k : {"tokens_per_s", "wall_s", "tokens_per_s_per_node", "tokens_per_s_per_device", "tpot_ms",
                        "memory_gib_per_device", "bottleneck", "measured", "relative_error"}) {
    EXPECT_TRUE(j.contains(k)) << k << " missing:\n" << out;
  }
  EXPECT_LE(std::abs(j["relative_error"].get<double>()), 0.20) << out;
  // The same job from flags, as text.
  const std::string text = RunPlan("--model small --topology " + kSrc +
                                       "/examples/topologies/cpu-local-calibrated.yaml --phase job --pp 1 --ep 2 "
                                       "--num-prompts 16 --prompt-len 64 --max-new-tokens 32",
                                   &rc);
  ASSERT_EQ(rc, 0) << text;
  EXPECT_NE(text.find("generated tokens/s"), std::string::npos) << text;
}

TEST(PlanCliTest, CalibrateFromBenchResults) {
  int rc = 0;
  const std::string out = RunPlan("--topology " + kSrc + "/examples/topologies/cpu-2core.yaml --calibrate-from " + kSrc +
                                      "/examples/planning/local-calibration/bench.json",
                                  &rc);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("Fitted parameters"), std::string::npos) << out;
  EXPECT_NE(out.find("node.device.efficiency.gemm_fp32 = "), std::string::npos) << out;
  EXPECT_NE(out.find("host_cores: 2"), std::string::npos) << out;
  const std::string bad = RunPlan("--topology " + kSrc + "/examples/topologies/h800.yaml --calibrate-from " + kSrc +
                                      "/examples/planning/local-calibration/bench.json",
                                  &rc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(bad.find("CPU"), std::string::npos) << bad;
}

TEST(PlanCliTest, DiscoverPrintsATopology) {
  int rc = 0;
  const std::string out = RunPlan("--discover", &rc);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("node:"), std::string::npos) << out;
  EXPECT_NE(out.find("hbm_gbytes_per_s"), std::string::npos) << out;
}

}  // namespace
