// Plan search and fleet sizing. Enumerates deployments of one phase on a
// cluster (node counts, pipeline depth, EP size, redundant experts, batch),
// simulates each, keeps those that fit in memory and meet the SLOs, ranks them
// by tokens/s per device, and extracts the Pareto front of throughput per
// device against latency (TTFT for prefill, TPOT for decode).
//
//   SearchOptions o{.phase = Phase::kDecode, .max_tpot_ms = 50};
//   ASSIGN_OR_RETURN(SearchResult s, SearchPlans(cfg, cluster, workload, o));
//   Fleet f = SizeFleet(workload, best_prefill, best_decode);
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "topology/simulator.h"

namespace expertmesh::topology {

struct SearchOptions {
  Phase phase = Phase::kDecode;
  int64_t max_nodes = 0;          // 0: the topology's node count
  double max_ttft_ms = 0;         // 0: no limit
  double max_tpot_ms = 0;
  std::vector<double> batches;    // empty: a default ladder per phase
  std::vector<int64_t> pps;       // empty: 1, 2, 4, 8 where they divide the devices
  int64_t context = 0;            // 0: from the workload
};

struct SearchResult {
  std::vector<SimResult> ranked;  // feasible plans, best tokens/s per device first
  std::vector<SimResult> pareto;  // Pareto front, by increasing latency
  std::vector<SimResult> all;     // every evaluated plan that fits in memory (for plots)
  int64_t evaluated = 0, over_memory = 0, over_slo = 0;
};

absl::StatusOr<SearchResult> SearchPlans(const ModelConfig& cfg, const Cluster& cluster, const Workload& w,
                                         const SearchOptions& options);

// EP sizes of a one-node plan that use part of a node without dividing it,
// which the search adds to the node's divisors: multiples of 8 below
// `devices_per_node` over which the routed experts, or the experts plus 32
// redundant slots, divide (DeepSeek-V3 on a 72-device NVL72 domain: 16, 32,
// 48, 64; with the divisors 8, 24, 36, 72 the search covers
// 8, 16, 24, 32, 36, 48, 64, 72). None for 8-device nodes.
std::vector<int64_t> PartNodeEpSizes(int64_t devices_per_node, int64_t routed_experts);

// Latency of a result in its phase: TTFT (prefill) or TPOT (decode), ms.
double LatencyMs(const SimResult& r);

// Indices of the Pareto-optimal results: no other result has both lower or
// equal latency and higher or equal throughput per device (one strictly).
std::vector<size_t> ParetoFront(const std::vector<SimResult>& results);

// Nodes needed to serve a daily token volume at the per-node rates of the
// chosen prefill and decode plans (disaggregated: prefill nodes take the
// input tokens, decode nodes the output tokens). Node-equivalents are the
// average busy nodes; `*_units` round up to whole deployments of the plans.
struct Fleet {
  double input_tokens_per_s = 0, output_tokens_per_s = 0;
  double prefill_nodes = 0, decode_nodes = 0, total_nodes = 0;
  int64_t prefill_units = 0, decode_units = 0, total_nodes_whole_units = 0;
};
Fleet SizeFleet(double daily_input_tokens, double daily_output_tokens, const SimResult* prefill,
                const SimResult* decode);

}  // namespace expertmesh::topology
