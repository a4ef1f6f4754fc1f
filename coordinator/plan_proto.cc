#include "coordinator/plan_proto.h"

#include "absl/strings/str_cat.h"

namespace expertmesh::coordinator {

v1::Plan PlanToProto(const topology::Plan& plan, const std::string& checkpoint, const std::string& model_json,
                     int64_t placement_version) {
  v1::Plan p;
  p.set_placement_version(placement_version);
  p.set_pp(static_cast<int32_t>(plan.pp));
  p.set_ep(static_cast<int32_t>(plan.ep));
  p.set_redundant_experts(static_cast<int32_t>(plan.redundant_experts));
  p.set_checkpoint(checkpoint);
  p.set_model_json(model_json);
  for (size_t s = 0; s < plan.stages.size(); ++s) {
    const topology::StagePlan& st = plan.stages[s];
    v1::StagePlan* sp = p.add_stages();
    sp->set_stage(static_cast<int32_t>(s));
    sp->set_layer_begin(static_cast<int32_t>(st.layer_begin));
    sp->set_layer_end(static_cast<int32_t>(st.layer_end));
    sp->set_has_embedding(st.has_embedding);
    sp->set_has_head(st.has_head);
    for (const auto& [layer, placement] : st.placement) {
      (*sp->mutable_placement_json())[static_cast<int32_t>(layer)] = placement.ToJson().dump();
    }
  }
  return p;
}

absl::StatusOr<topology::Plan> PlanFromProto(const v1::Plan& proto) {
  if (proto.pp() < 1 || proto.ep() < 1 || proto.stages_size() != proto.pp()) {
    return absl::InvalidArgumentError(absl::StrCat("plan: pp ", proto.pp(), ", ep ", proto.ep(), " with ",
                                                   proto.stages_size(), " stages"));
  }
  topology::Plan plan;
  plan.pp = proto.pp();
  plan.ep = proto.ep();
  plan.redundant_experts = proto.redundant_experts();
  for (int s = 0; s < proto.stages_size(); ++s) {
    const v1::StagePlan& sp = proto.stages(s);
    topology::StagePlan st;
    st.layer_begin = sp.layer_begin();
    st.layer_end = sp.layer_end();
    st.has_embedding = sp.has_embedding();
    st.has_head = sp.has_head();
    for (const auto& [layer, text] : sp.placement_json()) {
      nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
      if (j.is_discarded()) {
        return absl::InvalidArgumentError(absl::StrCat("plan: stages[", s, "].placement_json[", layer, "] is not JSON"));
      }
      auto placement = topology::ExpertPlacement::FromJson(j);
      if (!placement.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("plan: stages[", s, "].placement_json[", layer,
                                                       "]: ", placement.status().message()));
      }
      st.placement[layer] = *std::move(placement);
    }
    plan.stages.push_back(std::move(st));
  }
  return plan;
}

}  // namespace expertmesh::coordinator
