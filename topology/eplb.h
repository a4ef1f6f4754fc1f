// Expert-parallel load balancer (EPLB): turns observed per-expert loads into
// expert placements with redundant replicas, the algorithm of DeepSeek's EPLB
// (github.com/deepseek-ai/EPLB, described in /work/shared/REFERENCE.md):
//
//  * hierarchical policy (when the expert groups divide evenly over nodes):
//    1. pack expert groups onto nodes so node loads balance (each node gets
//       num_groups / num_nodes groups) - group-limited routing then keeps a
//       token's experts on few nodes;
//    2. inside each node, give the node's share of redundant slots to the
//       experts with the highest load per replica;
//    3. pack the node's replicas (weight = expert load / replica count) onto
//       its ranks, every rank getting the same number of slots;
//  * global policy (otherwise): the same with one group and one node.
//
// Both packing steps are greedy longest-processing-time with a cardinality
// limit; replication is highest-averages apportionment. Stateless: a new
// placement is computed from scratch from the loads.
//
//   EplbOptions o{.num_ranks = 32, .ranks_per_node = 8, .num_groups = 8, .redundant = 32};
//   ASSIGN_OR_RETURN(auto placements, RebalanceExperts(loads, o));   // one per layer
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "absl/status/statusor.h"
#include "common/config.h"
#include "topology/plan.h"
#include "topology/placement.h"

namespace expertmesh::topology {

struct EplbOptions {
  int64_t num_ranks = 1;       // EP ranks of the stage
  int64_t ranks_per_node = 1;  // ranks sharing one fast (NVLink) domain
  int64_t num_groups = 1;      // expert groups of group-limited routing (n_group)
  int64_t redundant = 0;       // extra slots per layer; (experts + redundant) % num_ranks == 0
  // "auto": hierarchical when groups divide over nodes, else global.
  enum class Policy { kAuto, kHierarchical, kGlobal } policy = Policy::kAuto;
};

// loads[layer][expert]: a load statistic (token counts) per logical expert;
// returns one placement per layer. Errors say which divisibility failed.
absl::StatusOr<std::vector<ExpertPlacement>> RebalanceExperts(const std::vector<std::vector<double>>& loads,
                                                              const EplbOptions& options);

// Replaces every MoE layer's placement in `plan` (from BuildPlan) with EPLB's,
// from observed loads (MoE layer index -> tokens per expert, as in
// PlanOptions::expert_load; layers without loads are treated as uniform).
// `ranks_per_node`: EP ranks sharing one NVLink domain.
absl::Status PlaceExpertsWithEplb(const ModelConfig& cfg, const std::map<int64_t, std::vector<double>>& expert_load,
                                  int64_t ranks_per_node, Plan* plan);

// Expected load of each rank when expert e's load splits evenly over its replicas.
std::vector<double> RankLoads(const ExpertPlacement& p, const std::vector<double>& expert_load);

// max / mean of RankLoads (1 = perfectly balanced). DeepSeek's "balancedness" is the inverse.
double ImbalanceFactor(const ExpertPlacement& p, const std::vector<double>& expert_load);

// Greedy balanced packing with equal cardinality: items (weights) into
// num_packs packs of exactly weights.size() / num_packs items each, heaviest
// first into the lightest non-full pack. Returns the pack of each item.
std::vector<int64_t> BalancedPacking(const std::vector<double>& weights, int64_t num_packs);

// Replica counts for `num_slots` slots over experts with the given loads:
// one each, then every extra slot to the expert with the largest load per replica.
std::vector<int64_t> ReplicateExperts(const std::vector<double>& loads, int64_t num_slots);

}  // namespace expertmesh::topology
