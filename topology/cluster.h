// Cluster description for the capacity planner and the coordinator: how many
// nodes, what each node holds (devices, the intra-node fabric, NICs) and the
// efficiency factors that turn datasheet peaks into achievable rates.
//
// A "node" is one fast fabric domain: an 8-GPU NVLink/NVSwitch server, a whole
// GB200 NVL72 rack (72 GPUs on one NVLink domain), or a CPU host. Every node of
// a cluster is identical. Units are part of every key name in the YAML form
// (examples/topologies/*.yaml, documented in docs/PLANNER.md):
//
//   ASSIGN_OR_RETURN(Cluster c, LoadClusterFile("examples/topologies/h800.yaml"));
//   double nic_bytes_per_s = c.node.nics.gbits_per_s_per_direction * 1e9 / 8;
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace expertmesh::topology {

// Fractions of the peaks in DeviceSpec reached by the runtime's kernels, and
// fixed overheads. Every field is a named, documented parameter; the values
// shipped in examples/topologies/ are fitted from published measurements
// (sources per field in docs/PLANNER.md, "Efficiency parameters").
struct Efficiency {
  double gemm_fp8 = 0.60;                  // compute-bound FP8 GEMM / grouped GEMM, fraction of FP8 peak
  double gemm_bf16 = 0.70;                 // compute-bound BF16 GEMM (router, head, absorbed BMMs)
  double attention_prefill = 0.55;         // causal flash attention (BF16), fraction of BF16 peak
  double attention_decode_compute = 0.67;  // MLA decode kernel, fraction of BF16 peak when compute-bound
  double attention_decode_memory = 0.90;   // MLA decode kernel, fraction of HBM bandwidth when memory-bound
  double hbm = 0.75;                       // memory-bound GEMMs and elementwise kernels, fraction of HBM GB/s
  double kernel_overhead_us = 4.0;         // fixed cost of one kernel (launch gap, ramp-up, tail), microseconds
  double step_overhead_ms = 0.0;           // host work per forward step (scheduling, sampling), milliseconds
  int64_t comm_sms = 0;                    // SMs a throughput-mode all-to-all kernel occupies while it runs
  double gemm_fp32 = 0.5;                  // compute-bound FP32 GEMM (gemm_dtype fp32: every GEMM), fraction of FP32 peak
  // How an operation's compute and memory times combine: 1 = max(compute,
  // memory) (GPU kernels stream operands while computing); 0 = their sum
  // (single-threaded BLAS packs operands, then computes); in between: max +
  // (1 - overlap) * min.
  double memory_compute_overlap = 1.0;
  // Coefficient of variation of one process's speed on the same work as its
  // peers (0: every rank runs at the same speed). Every all-to-all waits for
  // the slowest of the EP ranks, so each stretch of compute between two of
  // them lasts the expected maximum over the ranks: mean + c(EP) x this x
  // mean (c = ExpectedMaxOfNormals). CPU hosts: fitted from concurrent copies
  // of `bench layer` (docs/PLANNER.md, "Local calibration").
  double rank_speed_cv = 0.0;
};

struct DeviceSpec {
  std::string kind;                 // e.g. "H800-SXM5", "cpu"
  int64_t count = 0;                // devices per node
  double tflops_fp8_dense = 0;      // dense (no sparsity) peak; 0: no FP8 tensor cores
  double tflops_bf16_dense = 0;     // 0: no BF16 units
  double tflops_fp32_dense = 0;
  double hbm_gib = 0;               // memory per device, GiB
  double hbm_gbytes_per_s = 0;      // memory bandwidth per device, GB/s (1e9 B/s)
  int64_t sm_count = 0;             // streaming multiprocessors (GPU) or cores (CPU)
  double runtime_reserved_gib = 0;  // memory the runtime keeps (context, allocator slack, workspaces)
  std::string gemm_dtype;           // weights/GEMM dtype the runtime uses here: fp8, bf16 or fp32
  // Which code path of the runtime runs on this device (docs/PLANNER.md,
  // "Runtime paths"): "gpu" (fused and grouped kernels, DeepEP-style
  // all-to-all with FP8 dispatch, two-micro-batch overlap) or "cpu" (OpenBLAS:
  // one SGEMM per local expert with tokens, five per head and sequence in
  // decode attention; fp32 activations, KV cache and MPI all-to-all, one
  // message per (token, destination rank); no compute/communication overlap).
  std::string runtime_path;
  // CPU hosts: cores that all devices (runtime processes) of a node share; 0:
  // every device is its own hardware. A plan with more devices on a node than
  // cores time-shares them: a stage step takes at least the CPU time of all
  // the node's processes divided by host_cores (the simulator's "shared
  // cores"; CoreShare is the even share of a core per device).
  int64_t host_cores = 0;
  Efficiency efficiency;

  // Peak dense FLOP/s for the GEMM dtype (fp8 -> fp8 peak, ...), and for BF16
  // work (attention core), falling back to the best available dtype.
  double GemmFlops() const;
  double Bf16Flops() const;
  // Bytes per weight element for gemm_dtype (fp8: 1, bf16: 2, fp32: 4).
  double WeightBytes() const;
  bool cpu_path() const { return runtime_path == "cpu"; }
  // Share of a core each device gets when `devices_on_node` devices run on a
  // node: min(1, host_cores / devices_on_node); 1 when host_cores is 0.
  double CoreShare(int64_t devices_on_node) const;
};

// The fabric between devices of one node (NVLink/NVSwitch, PCIe, or shared
// memory on a CPU host), seen from one device.
struct FabricSpec {
  std::string kind;                        // nvlink | pcie | shared_memory
  double gbytes_per_s_per_direction = 0;   // per device, each direction, GB/s
  double latency_us = 0;                   // one message
  double alltoall_efficiency = 0.85;       // fraction of the bandwidth an all-to-all kernel reaches
};

struct NicSpec {
  int64_t count = 0;                       // NICs per node (0: single-node cluster only)
  double gbits_per_s_per_direction = 0;    // per NIC, Gb/s
  double latency_us = 0;
  double alltoall_efficiency_normal = 0.87;       // throughput-mode (prefill) kernels, of line rate
  double alltoall_efficiency_low_latency = 0.79;  // low-latency (decode) kernels, of line rate
};

struct NodeSpec {
  DeviceSpec device;
  FabricSpec intra_node;
  NicSpec nics;
};

struct Cluster {
  std::string name;
  std::string description;
  int64_t nodes = 1;   // nodes available (the search goes up to this many)
  NodeSpec node;

  int64_t devices_per_node() const { return node.device.count; }
  int64_t total_devices() const { return nodes * node.device.count; }
  // NIC bandwidth available to one device, bytes/s per direction.
  double NicBytesPerSPerDevice() const;
  // Intra-node fabric bandwidth of one device, bytes/s per direction.
  double FabricBytesPerS() const;
};

// Parses a topology YAML document; `source` names it in error messages.
// Errors name the key path and the file and say what value is expected.
absl::StatusOr<Cluster> ParseClusterYaml(const std::string& text, const std::string& source);
absl::StatusOr<Cluster> LoadClusterFile(const std::string& path);
// Serialises to the same YAML format (round-trips through ParseClusterYaml).
std::string ClusterToYaml(const Cluster& c);

// Datasheet numbers of known device kinds (dense peaks, memory) and the
// default efficiency profile of their family; used by discovery and as
// documentation. Returns false for an unknown kind.
bool LookupDeviceKind(const std::string& name, DeviceSpec* out);

// Default efficiency profile of a device family: hopper, blackwell, ada,
// ampere or cpu (docs/PLANNER.md gives the source of each value).
Efficiency FamilyEfficiency(const std::string& family);

}  // namespace expertmesh::topology
