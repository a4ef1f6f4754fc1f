// Calibration of a CPU host's topology from `expertmesh bench` results on that
// host (docs/PLANNER.md, "Local calibration"). Every fitted value is a named
// parameter of the topology format; each comes from one measurement, with the
// cost model of cost_model.h inverted on that measurement's shape:
//
//   kernel_overhead_us      bench layer --preset tiny --tokens 1: the tiny
//                           layer's weights stay in cache, so its time is its
//                           BLAS calls x overhead + compute
//   hbm_gbytes_per_s        bench layer --preset small at a decode-sized token
//                           count (few rows per expert): the MoE layer streams
//                           the weights of the experts it touches
//   gemm_fp32               bench layer --preset small at a prefill-sized token
//                           count: the MoE layer's per-expert SGEMMs
//   attention_prefill       the MLA layer of that same run (causal prefill)
//   rank_speed_cv           the spread of the concurrent copies of that
//                           preset's runs (identical work on the same host at
//                           once, as the EP ranks of a stage): pooled standard
//                           deviation over mean of their MoE and MLA times
//   intra_node.*            bench moe-alltoall (MPI, 2 ranks) at two token
//                           counts: latency and bandwidth of dispatch + combine
//   step_overhead_ms        (optional) one `bench serve` run, marked as the
//                           calibration run: host work per stage step
//
// A `bench moe-alltoall` run wrapped with "busy_processes" (measured while
// that many busy processes shared the cores) is reported as a note: the
// worst case of a rank waiting for a descheduled peer, which the model does
// not charge.
//
// The two bandwidth/efficiency pairs are solved together (fixed point): the
// decode-sized MoE time depends mostly on the bandwidth, the prefill-sized one
// mostly on the GEMM efficiency.
//
//   ASSIGN_OR_RETURN(auto benches, ReadBenchResults({"calibration.json"}));
//   ASSIGN_OR_RETURN(Calibration cal, CalibrateCpuHost(base_cluster, benches));
//   std::cout << cal.Yaml();
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "topology/cluster.h"

namespace expertmesh::topology {

// Bench results found in files: JSON objects, arrays or JSON lines, possibly
// wrapped ({"command": ..., "result": {...}}); every object that looks like
// the output of `bench layer` (moe_layer_s), `bench moe-alltoall`
// (dispatch_s) or `bench serve` (tokens_per_s + stages) is returned, with the
// command that produced it in "_command" when the wrapper names one.
absl::StatusOr<std::vector<nlohmann::json>> ReadBenchResults(const std::vector<std::string>& paths);

struct CalibratedParameter {
  std::string key;     // YAML key path, e.g. node.device.hbm_gbytes_per_s
  double value = 0;
  std::string source;  // which measurement, and how
};

struct CalibrationCheck {
  std::string what;    // a measurement not used by any fit, predicted by the calibrated model
  double measured = 0, predicted = 0;
};

struct Calibration {
  Cluster cluster;
  std::vector<CalibratedParameter> parameters;
  std::vector<CalibrationCheck> checks;
  std::vector<std::string> notes;  // measurements reported, not fitted (e.g. waits the model leaves out)
  // The calibrated topology: a comment block with the fitted parameters and
  // their sources, then the YAML of ClusterToYaml.
  std::string Yaml() const;
};

// `base` must be a CPU-path device (runtime_path cpu, gemm_dtype fp32); its
// datasheet peak (tflops_fp32_dense per core) is kept and the efficiencies are
// fitted relative to it. Results of `bench layer` are averaged per (preset,
// tokens) (run one copy per core at once, as the serving processes do).
absl::StatusOr<Calibration> CalibrateCpuHost(const Cluster& base, const std::vector<nlohmann::json>& benches);

}  // namespace expertmesh::topology
