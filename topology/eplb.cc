#include "topology/eplb.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace expertmesh::topology {

std::vector<int64_t> BalancedPacking(const std::vector<double>& weights, int64_t num_packs) {
  const int64_t n = static_cast<int64_t>(weights.size());
  const int64_t per_pack = n / num_packs;
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  // Heaviest first; ties broken by index so the result is deterministic.
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return weights[a] > weights[b]; });
  std::vector<double> pack_weight(num_packs, 0.0);
  std::vector<int64_t> pack_items(num_packs, 0);
  std::vector<int64_t> pack_of(n, -1);
  for (int64_t item : order) {
    int64_t best = -1;
    for (int64_t p = 0; p < num_packs; ++p) {
      if (pack_items[p] >= per_pack) continue;
      if (best < 0 || pack_weight[p] < pack_weight[best]) best = p;
    }
    pack_of[item] = best;
    pack_weight[best] += weights[item];
    ++pack_items[best];
  }
  return pack_of;
}

std::vector<int64_t> ReplicateExperts(const std::vector<double>& loads, int64_t num_slots) {
  const int64_t n = static_cast<int64_t>(loads.size());
  std::vector<int64_t> count(n, 1);
  for (int64_t s = n; s < num_slots; ++s) {
    int64_t best = 0;
    for (int64_t e = 1; e < n; ++e) {
      if (loads[e] / static_cast<double>(count[e]) > loads[best] / static_cast<double>(count[best])) best = e;
    }
    ++count[best];
  }
  return count;
}

namespace {

// One layer. Experts [0, E) in groups of E / num_groups consecutive ids.
std::vector<std::vector<int32_t>> PlaceLayer(const std::vector<double>& load, int64_t num_slots, int64_t num_groups,
                                             int64_t num_nodes, int64_t num_ranks) {
  const int64_t E = static_cast<int64_t>(load.size());
  const int64_t group_size = E / num_groups;
  const int64_t slots_per_node = num_slots / num_nodes;
  const int64_t ranks_per_node = num_ranks / num_nodes;
  // Step 1: groups onto nodes.
  std::vector<double> group_load(num_groups, 0.0);
  for (int64_t e = 0; e < E; ++e) group_load[e / group_size] += load[e];
  const std::vector<int64_t> node_of_group = BalancedPacking(group_load, num_nodes);

  std::vector<std::vector<int32_t>> rank_slots(num_ranks);
  for (int64_t node = 0; node < num_nodes; ++node) {
    std::vector<int32_t> experts;
    for (int64_t g = 0; g < num_groups; ++g) {
      if (node_of_group[g] != node) continue;
      for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) experts.push_back(static_cast<int32_t>(e));
    }
    // Step 2: replicate this node's experts into its slots.
    std::vector<double> node_load;
    for (int32_t e : experts) node_load.push_back(load[e]);
    const std::vector<int64_t> count = ReplicateExperts(node_load, slots_per_node);
    // Step 3: pack replicas onto this node's ranks.
    std::vector<int32_t> replica_expert;
    std::vector<double> replica_weight;
    for (size_t i = 0; i < experts.size(); ++i) {
      for (int64_t r = 0; r < count[i]; ++r) {
        replica_expert.push_back(experts[i]);
        replica_weight.push_back(node_load[i] / static_cast<double>(count[i]));
      }
    }
    const std::vector<int64_t> rank_of = BalancedPacking(replica_weight, ranks_per_node);
    for (size_t i = 0; i < replica_expert.size(); ++i) {
      rank_slots[node * ranks_per_node + rank_of[i]].push_back(replica_expert[i]);
    }
  }
  for (auto& s : rank_slots) std::sort(s.begin(), s.end());
  return rank_slots;
}

}  // namespace

absl::StatusOr<std::vector<ExpertPlacement>> RebalanceExperts(const std::vector<std::vector<double>>& loads,
                                                              const EplbOptions& o) {
  if (loads.empty()) return absl::InvalidArgumentError("eplb: needs the loads of at least one layer");
  const int64_t E = static_cast<int64_t>(loads[0].size());
  if (E == 0) return absl::InvalidArgumentError("eplb: a layer has no experts");
  if (o.num_ranks <= 0 || o.ranks_per_node <= 0 || o.num_groups <= 0 || o.redundant < 0) {
    return absl::InvalidArgumentError("eplb: num_ranks, ranks_per_node and num_groups must be > 0, redundant >= 0");
  }
  const int64_t slots = E + o.redundant;
  if (slots % o.num_ranks != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("eplb: ", E, " experts + ", o.redundant, " redundant = ", slots, " slots do not divide over ",
                     o.num_ranks, " EP ranks; choose --redundant-experts so that (experts + redundant) % ep == 0"));
  }
  if (E % o.num_groups != 0) {
    return absl::InvalidArgumentError(absl::StrCat("eplb: ", E, " experts do not split into ", o.num_groups, " groups"));
  }
  // Ranks of a partial node (EP smaller than a node) form one node.
  const int64_t ranks_per_node = std::min(o.ranks_per_node, o.num_ranks);
  if (o.num_ranks % ranks_per_node != 0) {
    return absl::InvalidArgumentError(absl::StrCat("eplb: ", o.num_ranks, " EP ranks are not a whole number of nodes of ",
                                                   ranks_per_node, " ranks"));
  }
  const int64_t nodes = o.num_ranks / ranks_per_node;
  bool hierarchical = o.num_groups % nodes == 0 && slots % nodes == 0;
  if (o.policy == EplbOptions::Policy::kHierarchical && !hierarchical) {
    return absl::InvalidArgumentError(absl::StrCat("eplb: the hierarchical policy needs the ", o.num_groups,
                                                   " expert groups to divide over ", nodes, " nodes"));
  }
  if (o.policy == EplbOptions::Policy::kGlobal) hierarchical = false;
  std::vector<ExpertPlacement> out;
  out.reserve(loads.size());
  for (size_t l = 0; l < loads.size(); ++l) {
    if (static_cast<int64_t>(loads[l].size()) != E) {
      return absl::InvalidArgumentError(
          absl::StrCat("eplb: layer ", l, " has ", loads[l].size(), " expert loads, layer 0 has ", E));
    }
    for (double v : loads[l]) {
      if (!(v >= 0)) return absl::InvalidArgumentError(absl::StrCat("eplb: layer ", l, " has a negative or NaN load"));
    }
    auto slots_of_rank = hierarchical ? PlaceLayer(loads[l], slots, o.num_groups, nodes, o.num_ranks)
                                      : PlaceLayer(loads[l], slots, 1, 1, o.num_ranks);
    ASSIGN_OR_RETURN(ExpertPlacement p, ExpertPlacement::Create(E, std::move(slots_of_rank)));
    out.push_back(std::move(p));
  }
  return out;
}

absl::Status PlaceExpertsWithEplb(const ModelConfig& cfg, const std::map<int64_t, std::vector<double>>& expert_load,
                                  int64_t ranks_per_node, Plan* plan) {
  EplbOptions o;
  o.num_ranks = plan->ep;
  o.ranks_per_node = std::min(ranks_per_node, plan->ep);
  o.num_groups = cfg.n_group > 0 && cfg.n_routed_experts % cfg.n_group == 0 ? cfg.n_group : 1;
  o.redundant = plan->redundant_experts;
  for (auto& stage : plan->stages) {
    for (auto& [layer, placement] : stage.placement) {
      auto it = expert_load.find(layer);
      std::vector<double> load = it != expert_load.end() ? it->second
                                                         : std::vector<double>(cfg.n_routed_experts, 1.0);
      if (static_cast<int64_t>(load.size()) != cfg.n_routed_experts) {
        return absl::InvalidArgumentError(absl::StrCat("eplb: layer ", layer, " has loads for ", load.size(),
                                                       " experts; the model has ", cfg.n_routed_experts));
      }
      ASSIGN_OR_RETURN(std::vector<ExpertPlacement> p, RebalanceExperts({load}, o));
      placement = std::move(p[0]);
    }
  }
  return absl::OkStatus();
}

std::vector<double> RankLoads(const ExpertPlacement& p, const std::vector<double>& expert_load) {
  std::vector<double> rank(p.num_ranks(), 0.0);
  for (int64_t e = 0; e < p.num_experts(); ++e) {
    const auto& reps = p.replicas(e);
    const double share = expert_load[e] / static_cast<double>(reps.size());
    for (const auto& r : reps) rank[r.first] += share;
  }
  return rank;
}

double ImbalanceFactor(const ExpertPlacement& p, const std::vector<double>& expert_load) {
  const std::vector<double> r = RankLoads(p, expert_load);
  double mx = 0, sum = 0;
  for (double v : r) {
    mx = std::max(mx, v);
    sum += v;
  }
  if (sum <= 0) return 1.0;
  return mx / (sum / static_cast<double>(r.size()));
}

}  // namespace expertmesh::topology
