// Conversion between topology::Plan and the API's expertmesh.v1.Plan (and
// between topology::ExpertPlacement and v1.ExpertPlacement). Its own small
// library (em_plan_proto) beside the topology types, so that the coordinator
// (which sends the plan and journals it) and the workers (which run the plan
// they get from Register) share it without depending on each other.
//
//   v1::Plan p = PlanToProto(plan, checkpoint_dir, config_json_text, placement_version);
//   ASSIGN_OR_RETURN(topology::Plan back, PlanFromProto(p));  // back == plan
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "proto/expertmesh.pb.h"
#include "topology/placement.h"
#include "topology/plan.h"

namespace expertmesh::topology {

v1::ExpertPlacement PlacementToProto(const ExpertPlacement& placement);
// INVALID_ARGUMENT when the message is not a valid placement (an expert out
// of range or without a slot); `what` names it in the message.
absl::StatusOr<ExpertPlacement> PlacementFromProto(const v1::ExpertPlacement& proto, const std::string& what);

v1::Plan PlanToProto(const Plan& plan, const std::string& checkpoint, const std::string& model_json,
                     int64_t placement_version = 1);

// INVALID_ARGUMENT when the message is inconsistent (stage count, placements).
absl::StatusOr<Plan> PlanFromProto(const v1::Plan& proto);

}  // namespace expertmesh::topology
