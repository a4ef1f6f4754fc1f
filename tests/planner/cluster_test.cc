// Topology and workload files: the shipped examples parse, malformed files
// fail with messages that name the key and the file, discovery round-trips.
#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"
#include "tests/common/status_matchers.h"
#include "topology/cluster.h"
#include "topology/discover.h"
#include "topology/workload.h"

namespace expertmesh::topology {
namespace {

const std::string kExamples = std::string(EXPERTMESH_SOURCE_DIR) + "/examples";

std::string Valid() {
  return R"(name: t
nodes: 2
node:
  device:
    kind: H800-SXM5
    count: 8
    tflops_fp8_dense: 1979
    tflops_bf16_dense: 989
    hbm_gib: 79.6
    hbm_gbytes_per_s: 3350
  intra_node:
    kind: nvlink
    gbytes_per_s_per_direction: 160
    latency_us: 3
  nics:
    count: 8
    gbits_per_s_per_direction: 400
    latency_us: 5
)";
}

std::string Replace(std::string s, const std::string& from, const std::string& to) {
  const size_t p = s.find(from);
  if (p != std::string::npos) s.replace(p, from.size(), to);
  return s;
}

TEST(ClusterTest, ShippedTopologiesParse) {
  int n = 0;
  for (const auto& f : std::filesystem::directory_iterator(kExamples + "/topologies")) {
    auto c = LoadClusterFile(f.path().string());
    ASSERT_OK(c);
    EXPECT_GE(c->nodes, 1);
    EXPECT_GT(c->node.device.GemmFlops(), 0);
    EXPECT_GT(c->FabricBytesPerS(), 0);
    ++n;
  }
  EXPECT_GE(n, 6);
}

TEST(ClusterTest, ValidDocumentAndUnits) {
  auto c = ParseClusterYaml(Valid(), "mem.yaml");
  ASSERT_OK(c);
  EXPECT_DOUBLE_EQ(c->NicBytesPerSPerDevice(), 50e9);  // 400 Gb/s per GPU = 50 GB/s
  EXPECT_DOUBLE_EQ(c->FabricBytesPerS(), 160e9);
  EXPECT_EQ(c->node.device.gemm_dtype, "fp8");
  // Efficiency defaults come from the device family table (Hopper).
  EXPECT_EQ(c->node.device.efficiency.comm_sms, 24);
}

TEST(ClusterTest, MissingKeyNamesKeyAndFile) {
  auto c = ParseClusterYaml(Replace(Valid(), "    hbm_gib: 79.6\n", ""), "x/h.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("x/h.yaml"), std::string::npos) << c.status();
  EXPECT_NE(c.status().message().find("node.device.hbm_gib"), std::string::npos) << c.status();
}

TEST(ClusterTest, UnknownKeyIsATypo) {
  auto c = ParseClusterYaml(Replace(Valid(), "hbm_gib: 79.6", "hbm_gb: 79.6\n    hbm_gib: 79.6"), "t.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("unknown key `node.device.hbm_gb`"), std::string::npos) << c.status();
}

TEST(ClusterTest, WrongTypeAndRange) {
  auto c = ParseClusterYaml(Replace(Valid(), "latency_us: 3", "latency_us: fast"), "t.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("`node.intra_node.latency_us` must be a number"), std::string::npos)
      << c.status();
  c = ParseClusterYaml(Replace(Valid(), "count: 8", "count: 0"), "t.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("node.device.count"), std::string::npos) << c.status();
  c = ParseClusterYaml(Replace(Valid(), "kind: nvlink", "kind: infinifabric"), "t.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("expected one of: nvlink, pcie, shared_memory"), std::string::npos);
}

TEST(ClusterTest, BadYamlAndMissingNics) {
  auto c = ParseClusterYaml("name: [unclosed", "bad.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("bad.yaml: not valid YAML"), std::string::npos) << c.status();
  const std::string no_nics = Valid().substr(0, Valid().find("  nics:"));
  c = ParseClusterYaml(no_nics, "n.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("node.nics"), std::string::npos) << c.status();
  EXPECT_TRUE(ParseClusterYaml(Replace(no_nics, "nodes: 2", "nodes: 1"), "n.yaml").ok());
  EXPECT_FALSE(LoadClusterFile("/nonexistent/topology.yaml").ok());
}

TEST(ClusterTest, YamlRoundTrip) {
  auto c = LoadClusterFile(kExamples + "/topologies/h800.yaml");
  ASSERT_OK(c);
  auto again = ParseClusterYaml(ClusterToYaml(*c), "roundtrip");
  ASSERT_OK(again) << ClusterToYaml(*c);
  EXPECT_EQ(again->node.device.kind, c->node.device.kind);
  EXPECT_DOUBLE_EQ(again->node.device.efficiency.gemm_fp8, c->node.device.efficiency.gemm_fp8);
  EXPECT_DOUBLE_EQ(again->node.nics.alltoall_efficiency_normal, c->node.nics.alltoall_efficiency_normal);
}

TEST(DiscoverTest, LocalMachineIsAValidTopology) {
  auto c = DiscoverLocalMachine();
  ASSERT_OK(c);
  EXPECT_GE(c->node.device.count, 1);
  auto again = ParseClusterYaml(ClusterToYaml(*c), "discovered");
  ASSERT_OK(again) << ClusterToYaml(*c);
}

TEST(DiscoverTest, NvidiaSmiParsers) {
  const auto gpus = ParseNvidiaSmiGpus("NVIDIA H100 80GB HBM3, 81559\nNVIDIA H100 80GB HBM3, 81559\n");
  ASSERT_EQ(gpus.size(), 2u);
  EXPECT_EQ(gpus[0].first, "NVIDIA H100 80GB HBM3");
  EXPECT_DOUBLE_EQ(gpus[0].second, 81559);
  DeviceSpec d;
  ASSERT_TRUE(LookupDeviceKind(gpus[0].first, &d));
  EXPECT_EQ(d.kind, "H100-SXM5");
  EXPECT_EQ(ParseNvlinkCount("\tGPU0\tGPU1\tCPU Affinity\nGPU0\t X \tNV18\t0-51\nGPU1\tNV18\t X \t0-51\n"), 18);
  EXPECT_EQ(ParseNvlinkCount("\tGPU0\tGPU1\nGPU0\t X \tPIX\nGPU1\tPIX\t X \n"), 0);
  EXPECT_EQ(ParseNvlinkCount("\tGPU0\nGPU0\t X \n"), 0);
  // Verbatim from a one-GPU H100 machine (with the terminal underline codes).
  EXPECT_EQ(ParseNvlinkCount("\t\x1b[4mGPU0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
                             "GPU0\t X \t0-15\t0\t\tN/A\n\nLegend:\n\n  X    = Self\n"),
            0);
}

TEST(WorkloadTest, ShippedWorkloadsParse) {
  for (const auto& f : std::filesystem::directory_iterator(kExamples + "/workloads")) {
    if (f.path().extension() != ".yaml") continue;
    auto w = LoadWorkloadFile(f.path().string());
    ASSERT_OK(w);
    auto loads = w->expert_load.Loads(58, 256);
    ASSERT_OK(loads) << f.path();
    double sum = 0;
    for (double v : (*loads)[0]) sum += v;
    EXPECT_NEAR(sum, 1.0, 1e-9);
  }
}

TEST(WorkloadTest, ErrorsNameKeyAndFile) {
  auto w = ParseWorkloadYaml("name: w\nprompt_tokens: 10\noutput_tokens: 1\ncache_hit_rate: 1.5\n", "w.yaml", "");
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("w.yaml"), std::string::npos);
  EXPECT_NE(w.status().message().find("cache_hit_rate"), std::string::npos) << w.status();
  w = ParseWorkloadYaml("name: w\nprompt_tokens: 10\noutput_tokens: 1\nexpert_load: {distribution: file}\n", "w.yaml",
                        "");
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("expert_load.file"), std::string::npos) << w.status();
}

TEST(WorkloadTest, ExpertLoadFile) {
  const std::string path = testing::TempDir() + "/loads.json";
  std::ofstream(path) << R"({"layers": [[1, 2, 3, 2], [4, 0, 0, 4]]})";
  auto w = ParseWorkloadYaml("name: w\nprompt_tokens: 10\noutput_tokens: 1\nexpert_load: {distribution: file, file: "
                             "loads.json}\n",
                             "w.yaml", testing::TempDir());
  ASSERT_OK(w);
  auto loads = w->expert_load.Loads(2, 4);
  ASSERT_OK(loads);
  EXPECT_DOUBLE_EQ((*loads)[0][2], 3.0 / 8.0);
  EXPECT_DOUBLE_EQ((*loads)[1][0], 0.5);
  EXPECT_FALSE(w->expert_load.Loads(3, 4).ok());   // layer count mismatch
  EXPECT_FALSE(w->expert_load.Loads(2, 8).ok());   // expert count mismatch
  std::ofstream(path) << R"({"layers": [[1, -2]]})";
  EXPECT_FALSE(LoadExpertLoadJson(path).ok());
  std::ofstream(path) << R"({"experts": []})";
  auto bad = LoadExpertLoadJson(path);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("{\"layers\""), std::string::npos);
}

}  // namespace
}  // namespace expertmesh::topology
