#include "topology/plan_proto.h"

#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace expertmesh::topology {

v1::ExpertPlacement PlacementToProto(const ExpertPlacement& placement) {
  v1::ExpertPlacement p;
  p.set_num_experts(static_cast<int32_t>(placement.num_experts()));
  for (int64_t r = 0; r < placement.num_ranks(); ++r) {
    const std::vector<int32_t>& slots = placement.slots_of_rank(r);
    p.add_ranks()->mutable_slot_experts()->Add(slots.begin(), slots.end());
  }
  return p;
}

absl::StatusOr<ExpertPlacement> PlacementFromProto(const v1::ExpertPlacement& proto, const std::string& what) {
  std::vector<std::vector<int32_t>> slots;
  slots.reserve(static_cast<size_t>(proto.ranks_size()));
  for (const v1::ExpertPlacement::Rank& r : proto.ranks())
    slots.emplace_back(r.slot_experts().begin(), r.slot_experts().end());
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::Create(proto.num_experts(), std::move(slots));
  if (!p.ok()) return absl::InvalidArgumentError(absl::StrCat(what, ": ", p.status().message()));
  return p;
}

v1::Plan PlanToProto(const Plan& plan, const std::string& checkpoint, const std::string& model_json,
                     int64_t placement_version) {
  v1::Plan p;
  p.set_placement_version(placement_version);
  p.set_pp(static_cast<int32_t>(plan.pp));
  p.set_ep(static_cast<int32_t>(plan.ep));
  p.set_redundant_experts(static_cast<int32_t>(plan.redundant_experts));
  p.set_checkpoint(checkpoint);
  p.set_model_json(model_json);
  for (size_t s = 0; s < plan.stages.size(); ++s) {
    const StagePlan& st = plan.stages[s];
    v1::StagePlan* sp = p.add_stages();
    sp->set_stage(static_cast<int32_t>(s));
    sp->set_layer_begin(static_cast<int32_t>(st.layer_begin));
    sp->set_layer_end(static_cast<int32_t>(st.layer_end));
    sp->set_has_embedding(st.has_embedding);
    sp->set_has_head(st.has_head);
    for (const auto& [layer, placement] : st.placement) {
      (*sp->mutable_placement())[static_cast<int32_t>(layer)] = PlacementToProto(placement);
    }
  }
  return p;
}

absl::StatusOr<Plan> PlanFromProto(const v1::Plan& proto) {
  if (proto.pp() < 1 || proto.ep() < 1 || proto.stages_size() != proto.pp()) {
    return absl::InvalidArgumentError(
        absl::StrCat("plan: pp ", proto.pp(), ", ep ", proto.ep(), " with ", proto.stages_size(), " stages"));
  }
  Plan plan;
  plan.pp = proto.pp();
  plan.ep = proto.ep();
  plan.redundant_experts = proto.redundant_experts();
  for (int s = 0; s < proto.stages_size(); ++s) {
    const v1::StagePlan& sp = proto.stages(s);
    StagePlan st;
    st.layer_begin = sp.layer_begin();
    st.layer_end = sp.layer_end();
    st.has_embedding = sp.has_embedding();
    st.has_head = sp.has_head();
    for (const auto& [layer, placement] : sp.placement()) {
      absl::StatusOr<ExpertPlacement> p =
          PlacementFromProto(placement, absl::StrCat("plan: stages[", s, "].placement[", layer, "]"));
      if (!p.ok()) return p.status();
      st.placement[layer] = *std::move(p);
    }
    plan.stages.push_back(std::move(st));
  }
  return plan;
}

}  // namespace expertmesh::topology
