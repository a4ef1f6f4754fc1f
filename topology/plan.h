// The plan of a cluster: which layers each pipeline stage runs and where the
// routed experts of each MoE layer live among the stage's EP ranks. The
// coordinator builds it, workers execute it, and the capacity planner
// evaluates the same type.
//
//   PlanOptions o; o.pp = 2; o.ep = 2; o.redundant_experts = 0;
//   ASSIGN_OR_RETURN(Plan plan, BuildPlan(cfg, o));
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/config.h"
#include "nlohmann/json.hpp"
#include "topology/placement.h"

namespace expertmesh::topology {

struct StagePlan {
  int64_t layer_begin = 0, layer_end = 0;  // main-model layers [begin, end)
  bool has_embedding = false, has_head = false;
  std::map<int64_t, ExpertPlacement> placement;  // by MoE layer index

  bool operator==(const StagePlan& o) const {
    return layer_begin == o.layer_begin && layer_end == o.layer_end && has_embedding == o.has_embedding &&
           has_head == o.has_head && placement == o.placement;
  }
  bool operator!=(const StagePlan& o) const { return !(*this == o); }
};

struct Plan {
  int64_t pp = 1, ep = 1, redundant_experts = 0;
  std::vector<StagePlan> stages;
  int64_t num_workers() const { return pp * ep; }
  // Workers are numbered stage-major: worker = stage * ep + ep_rank.
  int64_t WorkerId(int64_t stage, int64_t ep_rank) const { return stage * ep + ep_rank; }
  // Same shape, layers and expert placement (what ToJson would write).
  bool operator==(const Plan& o) const {
    return pp == o.pp && ep == o.ep && redundant_experts == o.redundant_experts && stages == o.stages;
  }
  bool operator!=(const Plan& o) const { return !(*this == o); }
  nlohmann::json ToJson() const;
  static absl::StatusOr<Plan> FromJson(const nlohmann::json& j);
};

struct PlanOptions {
  int64_t pp = 1, ep = 1;
  int64_t redundant_experts = 0;   // extra slots per MoE layer, for hot experts
  // Optional explicit split: layers per stage (sums to num_hidden_layers).
  std::vector<int64_t> layers_per_stage;
  // Optional observed load, tokens per expert per MoE layer (layer -> counts);
  // layers without it are treated as uniform.
  std::map<int64_t, std::vector<double>> expert_load;
  // EP ranks sharing one fast domain (NVLink node), for EPLB's hierarchical
  // policy; 0: all ranks of a stage on one node.
  int64_t ranks_per_node = 0;
};

// Relative compute of each main-model layer per token (FLOPs of its weights'
// GEMMs with top-k + shared experts for MoE layers), embedding excluded.
std::vector<double> LayerCosts(const ModelConfig& cfg);

// Splits layers into `pp` contiguous stages minimising the most expensive
// stage (the first also pays nothing for the embedding lookup; the last pays
// the lm_head), places experts per stage with EPLB (topology/eplb.h; from the
// observed load, or uniform load) when (experts + redundant) divides over the
// EP ranks — else contiguously with the extra slots round-robin — and
// validates everything.
absl::StatusOr<Plan> BuildPlan(const ModelConfig& cfg, const PlanOptions& options);

}  // namespace expertmesh::topology
