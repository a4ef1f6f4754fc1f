#include "topology/discover.h"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

#if EM_HAVE_HWLOC
#include <hwloc.h>
#endif

namespace expertmesh::topology {
namespace {

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Runs a command, returning its stdout ("" when it is missing or fails).
std::string Run(const std::string& cmd) {
  std::string out;
  FILE* p = popen((cmd + " 2>/dev/null").c_str(), "r");
  if (p == nullptr) return out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  if (pclose(p) != 0) return "";
  return out;
}

struct Host {
  int64_t cores = 1;
  double mem_gib = 0;
  double mhz = 0;
  bool avx512 = false, avx2 = false;
  std::string model;
};

Host DiscoverHost() {
  Host h;
#if EM_HAVE_HWLOC
  hwloc_topology_t topo;
  if (hwloc_topology_init(&topo) == 0 && hwloc_topology_load(topo) == 0) {
    h.cores = std::max(1, hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE));
    hwloc_obj_t root = hwloc_get_root_obj(topo);
    if (root != nullptr) h.mem_gib = static_cast<double>(root->total_memory) / 1073741824.0;
    hwloc_topology_destroy(topo);
  }
#endif
  if (h.cores <= 1) h.cores = std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
  const std::string cpuinfo = ReadFile("/proc/cpuinfo");
  for (absl::string_view line : absl::StrSplit(cpuinfo, '\n')) {
    std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(line, absl::MaxSplits(':', 1));
    const absl::string_view key = absl::StripAsciiWhitespace(kv.first);
    const absl::string_view val = absl::StripAsciiWhitespace(kv.second);
    if (key == "model name" && h.model.empty()) h.model = std::string(val);
    if (key == "cpu MHz" && h.mhz == 0) (void)absl::SimpleAtod(val, &h.mhz);
    if (key == "flags" && !h.avx2) {
      h.avx512 = absl::StrContains(val, "avx512f");
      h.avx2 = absl::StrContains(val, "avx2");
    }
  }
  if (h.mem_gib <= 0) {
    for (absl::string_view line : absl::StrSplit(ReadFile("/proc/meminfo"), '\n')) {
      if (absl::ConsumePrefix(&line, "MemTotal:")) {
        double kb = 0;
        (void)absl::SimpleAtod(absl::StripSuffix(absl::StripAsciiWhitespace(line), " kB"), &kb);
        h.mem_gib = kb / 1048576.0;
      }
    }
  }
  return h;
}

// NIC speed, Gb/s, and count: InfiniBand ports first, else physical Ethernet.
std::pair<int64_t, double> DiscoverNics() {
  namespace fs = std::filesystem;
  int64_t count = 0;
  double gbits = 0;
  std::error_code ec;
  if (fs::exists("/sys/class/infiniband", ec)) {
    for (const auto& dev : fs::directory_iterator("/sys/class/infiniband", ec)) {
      const std::string rate = ReadFile((dev.path() / "ports/1/rate").string());  // "400 Gb/sec (4X NDR)"
      double r = 0;
      if (absl::SimpleAtod(rate.substr(0, rate.find(' ')), &r) && r > 0) {
        ++count;
        gbits = std::max(gbits, r);
      }
    }
  }
  if (count > 0) return {count, gbits};
  if (fs::exists("/sys/class/net", ec)) {
    for (const auto& dev : fs::directory_iterator("/sys/class/net", ec)) {
      if (!fs::exists(dev.path() / "device", ec)) continue;  // virtual interfaces have no device
      double mbits = 0;
      if (absl::SimpleAtod(absl::StripAsciiWhitespace(ReadFile((dev.path() / "speed").string())), &mbits) &&
          mbits > 0) {
        ++count;
        gbits = std::max(gbits, mbits / 1000.0);
      }
    }
  }
  return {count, gbits};
}

}  // namespace

std::vector<std::pair<std::string, double>> ParseNvidiaSmiGpus(const std::string& text) {
  std::vector<std::pair<std::string, double>> gpus;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipWhitespace())) {
    std::vector<absl::string_view> f = absl::StrSplit(line, ',');
    if (f.size() < 2) continue;
    double mib = 0;
    if (!absl::SimpleAtod(absl::StripAsciiWhitespace(f[1]), &mib)) continue;
    gpus.emplace_back(std::string(absl::StripAsciiWhitespace(f[0])), mib);
  }
  return gpus;
}

int ParseNvlinkCount(const std::string& text) {
  // Row "GPU0\tX\tNV18\t..." : the entry in GPU1's column.
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipWhitespace())) {
    if (!absl::StartsWith(line, "GPU0")) continue;  // the header row starts with whitespace
    std::vector<absl::string_view> f = absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipWhitespace());
    if (f.size() < 3 || f[0] != "GPU0") continue;
    absl::string_view cell = f[2];
    int n = 0;
    if (absl::ConsumePrefix(&cell, "NV") && absl::SimpleAtoi(cell, &n)) return n;
    return 0;
  }
  return 0;
}

absl::StatusOr<Cluster> DiscoverLocalMachine() {
  Cluster c;
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  c.name = absl::StrCat("local-", host);
  c.nodes = 1;
  const Host h = DiscoverHost();
  const auto [nic_count, nic_gbits] = DiscoverNics();
  c.node.nics.count = nic_count;
  c.node.nics.gbits_per_s_per_direction = nic_gbits;
  c.node.nics.latency_us = nic_count > 0 ? 5.0 : 0.0;
  const auto gpus = ParseNvidiaSmiGpus(Run("nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits"));
  DeviceSpec& d = c.node.device;
  if (!gpus.empty()) {
    d.count = static_cast<int64_t>(gpus.size());
    if (!LookupDeviceKind(gpus[0].first, &d)) {
      return absl::UnimplementedError(absl::StrCat(
          "found GPU \"", gpus[0].first, "\" whose peaks are not in the device table (topology/cluster.cc); write "
          "the topology by hand from examples/topologies/ with its datasheet numbers"));
    }
    d.count = static_cast<int64_t>(gpus.size());
    d.hbm_gib = gpus[0].second / 1024.0;  // what the driver reports
    const int nvlinks = ParseNvlinkCount(Run("nvidia-smi topo -m"));
    if (nvlinks > 0) {
      // NVLink4 and NVLink5 links carry 25 GB/s and 50 GB/s per direction.
      const bool nvl5 = d.kind == "B200" || d.kind == "GB200";
      c.node.intra_node = {"nvlink", nvlinks * (nvl5 ? 50.0 : 25.0), 3.0, 0.84};
    } else {
      c.node.intra_node = {"pcie", 25.0, 10.0, 0.80};  // PCIe Gen4 x16: 32 GB/s nominal, ~25 achieved
    }
    c.description = absl::StrCat("discovered: ", d.count, "x ", gpus[0].first, ", ", h.cores, " CPU cores");
    return c;
  }
  // CPU host: one device = the whole socket set running the CPU kernels.
  d.kind = "cpu";
  d.count = 1;
  const double ghz = h.mhz > 0 ? h.mhz / 1000.0 : 2.0;
  // FP32 FLOP per cycle per core: two FMA pipes x (16 lanes AVX-512 | 8 AVX2 | 4 SSE) x 2.
  const double flops_per_cycle = 2.0 * (h.avx512 ? 16 : h.avx2 ? 8 : 4) * 2.0;
  d.tflops_fp32_dense = static_cast<double>(h.cores) * ghz * flops_per_cycle / 1000.0;
  d.tflops_bf16_dense = 0;
  d.tflops_fp8_dense = 0;
  d.gemm_dtype = "fp32";
  d.runtime_path = "cpu";
  d.host_cores = h.cores;  // more runtime processes than this share the cores
  d.hbm_gib = h.mem_gib;
  // DRAM bandwidth is not discoverable without a benchmark: about 10 GB/s per
  // core is typical of a share of a server socket (measure and edit).
  d.hbm_gbytes_per_s = 10.0 * static_cast<double>(h.cores);
  d.sm_count = h.cores;
  d.runtime_reserved_gib = std::min(2.0, h.mem_gib / 4);
  d.efficiency = FamilyEfficiency("cpu");
  c.node.intra_node = {"shared_memory", d.hbm_gbytes_per_s / 2, 1.0, 0.5};
  c.description = absl::StrCat("discovered: ", h.model.empty() ? "CPU" : h.model, ", ", h.cores, " cores, ",
                               absl::StrFormat("%.1f", h.mem_gib), " GiB");
  return c;
}

}  // namespace expertmesh::topology
