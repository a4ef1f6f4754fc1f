#include "topology/cluster.h"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <set>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "topology/yaml_reader.h"
#include "yaml-cpp/yaml.h"

namespace expertmesh::topology {

double DeviceSpec::GemmFlops() const {
  double tf = 0;
  if (gemm_dtype == "fp8") tf = tflops_fp8_dense;
  if (gemm_dtype == "bf16" || tf <= 0) tf = tf > 0 ? tf : tflops_bf16_dense;
  if (tf <= 0) tf = tflops_fp32_dense;
  return tf * 1e12;
}

double DeviceSpec::Bf16Flops() const {
  return (tflops_bf16_dense > 0 ? tflops_bf16_dense : tflops_fp32_dense) * 1e12;
}

double DeviceSpec::WeightBytes() const {
  if (gemm_dtype == "fp8") return 1.0;
  if (gemm_dtype == "bf16") return 2.0;
  return 4.0;
}

double DeviceSpec::CoreShare(int64_t devices_on_node) const {
  if (host_cores <= 0 || devices_on_node <= host_cores) return 1.0;
  return static_cast<double>(host_cores) / static_cast<double>(devices_on_node);
}

double Cluster::NicBytesPerSPerDevice() const {
  if (node.nics.count <= 0 || node.device.count <= 0) return 0;
  return node.nics.gbits_per_s_per_direction * 1e9 / 8.0 * static_cast<double>(node.nics.count) /
         static_cast<double>(node.device.count);
}

double Cluster::FabricBytesPerS() const { return node.intra_node.gbytes_per_s_per_direction * 1e9; }

using internal::MapReader;
using internal::ParseYamlDocument;

namespace {

// Datasheet values: dense (non-sparse) tensor-core peaks, memory size as the
// driver reports it, memory bandwidth. Sources are listed in docs/PLANNER.md.
struct KnownDevice {
  const char* kind;
  double fp8, bf16, fp32, hbm_gib, hbm_gbs;
  int64_t sms;
  const char* family;
};

const KnownDevice kKnownDevices[] = {
    {"H800-SXM5", 1979, 989, 67, 79.6, 3350, 132, "hopper"},
    {"H100-SXM5", 1979, 989, 67, 79.6, 3350, 132, "hopper"},
    {"H200-SXM", 1979, 989, 67, 140.4, 4800, 132, "hopper"},
    {"B200", 4500, 2250, 75, 178.0, 8000, 148, "blackwell"},
    {"GB200", 5000, 2500, 80, 184.0, 8000, 148, "blackwell"},
    {"L40S", 733, 362, 91.6, 44.4, 864, 142, "ada"},
    {"A100-SXM4-80GB", 0, 312, 19.5, 79.2, 2039, 108, "ampere"},
};

}  // namespace

// Efficiency profiles per device family (docs/PLANNER.md explains each value).
Efficiency FamilyEfficiency(const std::string& family) {
  Efficiency e;  // hopper values are the struct defaults, fitted to DeepSeek's H800 profile
  if (family == "hopper") {
    e.step_overhead_ms = 3.0;
    e.comm_sms = 24;
  } else if (family == "blackwell") {
    e.gemm_fp8 = 0.60;
    e.step_overhead_ms = 3.0;
    e.comm_sms = 24;
  } else if (family == "ada" || family == "ampere") {
    e.gemm_fp8 = 0.55;
    e.gemm_bf16 = 0.65;
    e.attention_prefill = 0.45;
    e.attention_decode_compute = 0.45;
    e.attention_decode_memory = 0.80;
    e.hbm = 0.75;
    e.step_overhead_ms = 3.0;
    e.comm_sms = 0;
  } else if (family == "cpu") {
    e.gemm_fp8 = 0.5;
    e.gemm_bf16 = 0.5;
    e.gemm_fp32 = 0.5;
    e.attention_prefill = 0.3;
    e.attention_decode_compute = 0.3;
    e.attention_decode_memory = 0.5;
    e.hbm = 0.5;
    e.kernel_overhead_us = 2.0;
    e.step_overhead_ms = 1.0;
    e.comm_sms = 0;
    // Single-threaded OpenBLAS packs the weight panel before computing on it:
    // memory and compute time add (docs/PLANNER.md, "Local calibration").
    e.memory_compute_overlap = 0.0;
  }
  return e;
}

namespace {

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

absl::Status ParseEfficiency(MapReader& r, Efficiency* e) {
  RETURN_IF_ERROR(r.Double("gemm_fp8", false, &e->gemm_fp8));
  RETURN_IF_ERROR(r.Double("gemm_bf16", false, &e->gemm_bf16));
  RETURN_IF_ERROR(r.Double("attention_prefill", false, &e->attention_prefill));
  RETURN_IF_ERROR(r.Double("attention_decode_compute", false, &e->attention_decode_compute));
  RETURN_IF_ERROR(r.Double("attention_decode_memory", false, &e->attention_decode_memory));
  RETURN_IF_ERROR(r.Double("hbm", false, &e->hbm));
  RETURN_IF_ERROR(r.Double("kernel_overhead_us", false, &e->kernel_overhead_us));
  RETURN_IF_ERROR(r.Double("step_overhead_ms", false, &e->step_overhead_ms));
  RETURN_IF_ERROR(r.Int("comm_sms", false, &e->comm_sms));
  RETURN_IF_ERROR(r.Double("gemm_fp32", false, &e->gemm_fp32));
  RETURN_IF_ERROR(r.Double("memory_compute_overlap", false, &e->memory_compute_overlap));
  RETURN_IF_ERROR(r.Double("rank_speed_cv", false, &e->rank_speed_cv));
  for (double f : {e->gemm_fp8, e->gemm_bf16, e->gemm_fp32, e->attention_prefill, e->attention_decode_compute,
                   e->attention_decode_memory, e->hbm}) {
    if (f <= 0 || f > 1) {
      return r.Error("efficiency fractions (gemm_*, attention_*, hbm) must be in (0, 1]");
    }
  }
  if (e->memory_compute_overlap < 0 || e->memory_compute_overlap > 1) {
    return r.Error("`memory_compute_overlap` must be in [0, 1] (1: max of compute and memory time, 0: their sum)");
  }
  if (e->rank_speed_cv < 0 || e->rank_speed_cv >= 1) {
    return r.Error("`rank_speed_cv` must be in [0, 1) (coefficient of variation of a rank's speed)");
  }
  if (e->kernel_overhead_us < 0 || e->step_overhead_ms < 0) {
    return r.Error("`kernel_overhead_us` and `step_overhead_ms` must be >= 0");
  }
  return r.CheckNoUnknownKeys();
}

}  // namespace

bool LookupDeviceKind(const std::string& name, DeviceSpec* out) {
  const std::string n = Lower(name);
  const KnownDevice* best = nullptr;
  size_t best_len = 0;
  for (const auto& k : kKnownDevices) {
    // Match on the model number ("h800", "gb200", "l40s"), longest first.
    std::string key = Lower(k.kind);
    key = key.substr(0, key.find('-'));
    if (n.find(key) != std::string::npos && key.size() > best_len) {
      best = &k;
      best_len = key.size();
    }
  }
  if (best == nullptr) return false;
  DeviceSpec d;
  d.kind = best->kind;
  d.tflops_fp8_dense = best->fp8;
  d.tflops_bf16_dense = best->bf16;
  d.tflops_fp32_dense = best->fp32;
  d.hbm_gib = best->hbm_gib;
  d.hbm_gbytes_per_s = best->hbm_gbs;
  d.sm_count = best->sms;
  d.runtime_reserved_gib = 4.0;
  d.gemm_dtype = best->fp8 > 0 ? "fp8" : "bf16";
  d.efficiency = FamilyEfficiency(best->family);
  d.count = out->count;
  *out = d;
  return true;
}

absl::StatusOr<Cluster> ParseClusterYaml(const std::string& text, const std::string& source) {
  ASSIGN_OR_RETURN(const YAML::Node root, ParseYamlDocument(text, source));
  MapReader top(root, "", source);
  RETURN_IF_ERROR(top.CheckIsMap());
  Cluster c;
  RETURN_IF_ERROR(top.String("name", true, &c.name));
  RETURN_IF_ERROR(top.String("description", false, &c.description));
  RETURN_IF_ERROR(top.Int("nodes", true, &c.nodes, 1));
  ASSIGN_OR_RETURN(MapReader node, top.Child("node", true));
  RETURN_IF_ERROR(top.CheckNoUnknownKeys());

  ASSIGN_OR_RETURN(MapReader dev, node.Child("device", true));
  DeviceSpec& d = c.node.device;
  RETURN_IF_ERROR(dev.String("kind", true, &d.kind));
  RETURN_IF_ERROR(dev.Int("count", true, &d.count, 1));
  // Start from the catalogue's efficiency profile of this kind, if known.
  DeviceSpec known;
  known.count = d.count;
  if (LookupDeviceKind(d.kind, &known)) d.efficiency = known.efficiency;
  if (Lower(d.kind).find("cpu") != std::string::npos) d.efficiency = FamilyEfficiency("cpu");
  RETURN_IF_ERROR(dev.Double("tflops_fp8_dense", false, &d.tflops_fp8_dense));
  RETURN_IF_ERROR(dev.Double("tflops_bf16_dense", false, &d.tflops_bf16_dense));
  RETURN_IF_ERROR(dev.Double("tflops_fp32_dense", false, &d.tflops_fp32_dense));
  if (d.tflops_fp8_dense <= 0 && d.tflops_bf16_dense <= 0 && d.tflops_fp32_dense <= 0) {
    return dev.Error("`node.device` needs at least one of tflops_fp8_dense, tflops_bf16_dense, "
                     "tflops_fp32_dense > 0");
  }
  RETURN_IF_ERROR(dev.Double("hbm_gib", true, &d.hbm_gib, 1e-3));
  RETURN_IF_ERROR(dev.Double("hbm_gbytes_per_s", true, &d.hbm_gbytes_per_s, 1e-3));
  RETURN_IF_ERROR(dev.Int("sm_count", false, &d.sm_count, 0));
  RETURN_IF_ERROR(dev.Double("runtime_reserved_gib", false, &d.runtime_reserved_gib));
  d.gemm_dtype = d.tflops_fp8_dense > 0 ? "fp8" : (d.tflops_bf16_dense > 0 ? "bf16" : "fp32");
  RETURN_IF_ERROR(dev.String("gemm_dtype", false, &d.gemm_dtype, {"fp8", "bf16", "fp32"}));
  d.runtime_path = Lower(d.kind).find("cpu") != std::string::npos ? "cpu" : "gpu";
  RETURN_IF_ERROR(dev.String("runtime_path", false, &d.runtime_path, {"gpu", "cpu"}));
  RETURN_IF_ERROR(dev.Int("host_cores", false, &d.host_cores, 0));
  if (d.runtime_path == "cpu" && d.gemm_dtype != "fp32") {
    return dev.Error("`node.device.runtime_path: cpu` computes in fp32: set `gemm_dtype: fp32`");
  }
  if ((d.gemm_dtype == "fp8" && d.tflops_fp8_dense <= 0) || (d.gemm_dtype == "bf16" && d.tflops_bf16_dense <= 0)) {
    return dev.Error(absl::StrCat("`node.device.gemm_dtype` is ", d.gemm_dtype, " but tflops_", d.gemm_dtype,
                                  "_dense is not set"));
  }
  if (d.runtime_reserved_gib >= d.hbm_gib) {
    return dev.Error("`node.device.runtime_reserved_gib` must be smaller than hbm_gib");
  }
  ASSIGN_OR_RETURN(MapReader eff, dev.Child("efficiency", false));
  RETURN_IF_ERROR(ParseEfficiency(eff, &d.efficiency));
  RETURN_IF_ERROR(dev.CheckNoUnknownKeys());

  ASSIGN_OR_RETURN(MapReader fab, node.Child("intra_node", true));
  FabricSpec& f = c.node.intra_node;
  RETURN_IF_ERROR(fab.String("kind", true, &f.kind, {"nvlink", "pcie", "shared_memory"}));
  RETURN_IF_ERROR(fab.Double("gbytes_per_s_per_direction", true, &f.gbytes_per_s_per_direction, 1e-6));
  RETURN_IF_ERROR(fab.Double("latency_us", true, &f.latency_us));
  RETURN_IF_ERROR(fab.Double("alltoall_efficiency", false, &f.alltoall_efficiency, 1e-3));
  if (f.alltoall_efficiency > 1) return fab.Error("`node.intra_node.alltoall_efficiency` must be <= 1");
  RETURN_IF_ERROR(fab.CheckNoUnknownKeys());

  ASSIGN_OR_RETURN(MapReader nic, node.Child("nics", c.nodes > 1));
  NicSpec& n = c.node.nics;
  RETURN_IF_ERROR(nic.Int("count", c.nodes > 1, &n.count, 0));
  RETURN_IF_ERROR(nic.Double("gbits_per_s_per_direction", n.count > 0, &n.gbits_per_s_per_direction));
  RETURN_IF_ERROR(nic.Double("latency_us", n.count > 0, &n.latency_us));
  RETURN_IF_ERROR(nic.Double("alltoall_efficiency_normal", false, &n.alltoall_efficiency_normal, 1e-3));
  RETURN_IF_ERROR(nic.Double("alltoall_efficiency_low_latency", false, &n.alltoall_efficiency_low_latency, 1e-3));
  if (n.alltoall_efficiency_normal > 1 || n.alltoall_efficiency_low_latency > 1) {
    return nic.Error("`node.nics.alltoall_efficiency_*` must be <= 1");
  }
  if (c.nodes > 1 && (n.count <= 0 || n.gbits_per_s_per_direction <= 0)) {
    return nic.Error("a cluster of more than one node needs `node.nics.count` >= 1 and "
                     "`node.nics.gbits_per_s_per_direction` > 0");
  }
  RETURN_IF_ERROR(nic.CheckNoUnknownKeys());
  RETURN_IF_ERROR(node.CheckNoUnknownKeys());
  return c;
}

absl::StatusOr<Cluster> LoadClusterFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(absl::StrCat(path, ": cannot open topology file (pass --topology FILE; examples in "
                                            "examples/topologies/, or `expertmesh plan --discover` for this machine)"));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseClusterYaml(ss.str(), path);
}

std::string ClusterToYaml(const Cluster& c) {
  const DeviceSpec& d = c.node.device;
  const Efficiency& e = d.efficiency;
  std::string s;
  absl::StrAppend(&s, "name: ", c.name, "\n");
  if (!c.description.empty()) {
    YAML::Emitter em;
    em << c.description;
    absl::StrAppend(&s, "description: ", em.c_str(), "\n");
  }
  absl::StrAppend(&s, "nodes: ", c.nodes, "\n", "node:\n", "  device:\n");
  absl::StrAppend(&s, "    kind: ", d.kind, "\n", "    count: ", d.count, "\n");
  absl::StrAppendFormat(&s, "    tflops_fp8_dense: %g\n    tflops_bf16_dense: %g\n    tflops_fp32_dense: %g\n",
                        d.tflops_fp8_dense, d.tflops_bf16_dense, d.tflops_fp32_dense);
  absl::StrAppendFormat(&s, "    hbm_gib: %g\n    hbm_gbytes_per_s: %g\n    sm_count: %d\n", d.hbm_gib,
                        d.hbm_gbytes_per_s, d.sm_count);
  absl::StrAppendFormat(&s, "    runtime_reserved_gib: %g\n    gemm_dtype: %s\n", d.runtime_reserved_gib,
                        d.gemm_dtype);
  absl::StrAppendFormat(&s, "    runtime_path: %s\n", 
                        !d.runtime_path.empty() ? d.runtime_path
                        : Lower(d.kind).find("cpu") != std::string::npos ? "cpu"
                                                                           : "gpu");
  if (d.host_cores > 0) absl::StrAppendFormat(&s, "    host_cores: %d\n", d.host_cores);
  absl::StrAppendFormat(&s,
                        "    efficiency:\n      gemm_fp8: %g\n      gemm_bf16: %g\n      attention_prefill: %g\n"
                        "      attention_decode_compute: %g\n      attention_decode_memory: %g\n      hbm: %g\n"
                        "      kernel_overhead_us: %g\n      step_overhead_ms: %g\n      comm_sms: %d\n"
                        "      gemm_fp32: %g\n      memory_compute_overlap: %g\n",
                        e.gemm_fp8, e.gemm_bf16, e.attention_prefill, e.attention_decode_compute,
                        e.attention_decode_memory, e.hbm, e.kernel_overhead_us, e.step_overhead_ms, e.comm_sms,
                        e.gemm_fp32, e.memory_compute_overlap);
  if (e.rank_speed_cv > 0) absl::StrAppendFormat(&s, "      rank_speed_cv: %g\n", e.rank_speed_cv);
  const FabricSpec& f = c.node.intra_node;
  absl::StrAppendFormat(&s,
                        "  intra_node:\n    kind: %s\n    gbytes_per_s_per_direction: %g\n    latency_us: %g\n"
                        "    alltoall_efficiency: %g\n",
                        f.kind, f.gbytes_per_s_per_direction, f.latency_us, f.alltoall_efficiency);
  const NicSpec& n = c.node.nics;
  absl::StrAppendFormat(&s,
                        "  nics:\n    count: %d\n    gbits_per_s_per_direction: %g\n    latency_us: %g\n"
                        "    alltoall_efficiency_normal: %g\n    alltoall_efficiency_low_latency: %g\n",
                        n.count, n.gbits_per_s_per_direction, n.latency_us, n.alltoall_efficiency_normal,
                        n.alltoall_efficiency_low_latency);
  return s;
}

}  // namespace expertmesh::topology
