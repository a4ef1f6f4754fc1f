// Conversion between topology::Plan and the API's expertmesh.v1.Plan. Its own
// small library (em_plan_proto) so that workers can read the plan they get
// from Register without linking the coordinator.
//
//   v1::Plan p = PlanToProto(plan, checkpoint_dir, config_json_text, placement_version);
//   ASSIGN_OR_RETURN(topology::Plan back, PlanFromProto(p));
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "proto/expertmesh.pb.h"
#include "topology/plan.h"

namespace expertmesh::coordinator {

v1::Plan PlanToProto(const topology::Plan& plan, const std::string& checkpoint, const std::string& model_json,
                     int64_t placement_version = 1);

// INVALID_ARGUMENT when the message is inconsistent (stage count, placement JSON).
absl::StatusOr<topology::Plan> PlanFromProto(const v1::Plan& proto);

}  // namespace expertmesh::coordinator
