// topology::Plan <-> expertmesh.v1.Plan (topology/plan_proto.h): round trips
// of the plans the coordinator builds and of hand-made placements (redundant
// replicas, ranks without experts, uneven stages), operator==, and the
// errors for malformed messages. The replay of journals that hold the plan as
// JSON (before it became a message) is in tests/coordinator/rebalance_test.cc.
#include "topology/plan_proto.h"

#include <string>
#include <vector>

#include "common/config.h"
#include "gtest/gtest.h"
#include "tests/common/status_matchers.h"
#include "topology/placement.h"
#include "topology/plan.h"

namespace expertmesh::topology {
namespace {

Plan Build(int pp, int ep, int redundant, std::vector<int64_t> layers_per_stage = {}) {
  PlanOptions o;
  o.pp = pp;
  o.ep = ep;
  o.redundant_experts = redundant;
  o.layers_per_stage = std::move(layers_per_stage);
  absl::StatusOr<Plan> plan = BuildPlan(*ModelConfig::Preset("tiny"), o);
  EXPECT_OK(plan);
  return plan.ok() ? *std::move(plan) : Plan();
}

// PlanToProto, then PlanFromProto; also through the wire bytes.
void ExpectRoundTrip(const Plan& plan) {
  const v1::Plan p = PlanToProto(plan, "/ckpt", "{\"model_type\": \"deepseek_v3\"}", 7);
  EXPECT_EQ(p.placement_version(), 7);
  EXPECT_EQ(p.checkpoint(), "/ckpt");
  ASSERT_EQ(p.stages_size(), plan.pp);
  ASSERT_OK_AND_ASSIGN(Plan back, PlanFromProto(p));
  EXPECT_TRUE(back == plan);
  EXPECT_EQ(back.ToJson(), plan.ToJson());  // the same as the JSON encoding it replaces
  v1::Plan wire;
  ASSERT_TRUE(wire.ParseFromString(p.SerializeAsString()));
  ASSERT_OK_AND_ASSIGN(Plan from_wire, PlanFromProto(wire));
  EXPECT_TRUE(from_wire == plan);
}

TEST(PlanProtoTest, BuiltPlansRoundTrip) {
  ExpectRoundTrip(Build(1, 1, 0));
  ExpectRoundTrip(Build(2, 2, 0));
  ExpectRoundTrip(Build(2, 2, 4));                      // redundant replicas
  ExpectRoundTrip(Build(2, 4, 32, /*layers=*/{1, 3}));  // uneven stages: the first without MoE layers
  const Plan uneven = Build(2, 4, 32, {1, 3});
  EXPECT_TRUE(uneven.stages[0].placement.empty());
  EXPECT_EQ(uneven.stages[1].placement.size(), 3u);
}

TEST(PlanProtoTest, ReplicasAndRanksWithoutExpertsRoundTrip) {
  // Rank 2 of 4 holds no slot; experts 0 and 5 have replicas (one on the same rank twice).
  ASSERT_OK_AND_ASSIGN(ExpertPlacement pl, ExpertPlacement::Create(8, {{0, 1, 2, 0}, {3, 4, 5}, {}, {6, 7, 5}}));
  const v1::ExpertPlacement p = PlacementToProto(pl);
  EXPECT_EQ(p.num_experts(), 8);
  ASSERT_EQ(p.ranks_size(), 4);
  EXPECT_EQ(p.ranks(2).slot_experts_size(), 0);
  EXPECT_EQ(p.ranks(0).slot_experts_size(), 4);
  ASSERT_OK_AND_ASSIGN(ExpertPlacement back, PlacementFromProto(p, "layer 1"));
  EXPECT_TRUE(back == pl);
  EXPECT_EQ(back.num_slots(), 10);
  EXPECT_EQ(back.replicas(5).size(), 2u);
  EXPECT_TRUE(back.slots_of_rank(2).empty());

  Plan plan;
  plan.pp = 2;
  plan.ep = 4;
  plan.redundant_experts = 2;
  plan.stages.resize(2);
  plan.stages[0].layer_end = 3;
  plan.stages[0].has_embedding = true;
  plan.stages[1].layer_begin = 3;
  plan.stages[1].layer_end = 4;
  plan.stages[1].has_head = true;
  plan.stages[0].placement[1] = pl;
  plan.stages[0].placement[2] = ExpertPlacement::Uniform(8, 4, 2);
  plan.stages[1].placement[3] = pl;
  ExpectRoundTrip(plan);
}

TEST(PlanProtoTest, EqualityComparesEveryField) {
  const Plan a = Build(2, 2, 4);
  Plan b = a;
  EXPECT_TRUE(a == b);
  b.stages[1].has_head = false;
  EXPECT_TRUE(a != b);
  b = a;
  b.redundant_experts = 0;
  EXPECT_TRUE(a != b);
  b = a;
  ExpertPlacement& p = b.stages[1].placement.begin()->second;
  ASSERT_OK_AND_ASSIGN(ExpertPlacement swapped,
                       ExpertPlacement::Create(p.num_experts(), {p.slots_of_rank(1), p.slots_of_rank(0)}));
  EXPECT_TRUE(swapped != p);
  p = swapped;
  EXPECT_TRUE(a != b);  // same shape, other placement
}

TEST(PlanProtoTest, MalformedMessagesAreInvalidArguments) {
  v1::Plan p = PlanToProto(Build(2, 2, 0), "/ckpt", "{}");
  v1::Plan bad = p;
  bad.set_pp(3);
  EXPECT_ERROR(PlanFromProto(bad), absl::StatusCode::kInvalidArgument, "pp 3");
  bad = p;
  ASSERT_FALSE(bad.stages(1).placement().empty());
  v1::ExpertPlacement& pl = bad.mutable_stages(1)->mutable_placement()->begin()->second;
  pl.mutable_ranks(0)->set_slot_experts(0, 9999);  // out of range
  EXPECT_ERROR(PlanFromProto(bad), absl::StatusCode::kInvalidArgument, "plan: stages[1].placement[");
  bad = p;
  bad.mutable_stages(1)->mutable_placement()->begin()->second.clear_ranks();  // no expert has a slot
  EXPECT_ERROR(PlanFromProto(bad), absl::StatusCode::kInvalidArgument, "plan: stages[1].placement[");
}

}  // namespace
}  // namespace expertmesh::topology
