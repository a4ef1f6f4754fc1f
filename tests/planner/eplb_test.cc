// EPLB: the published example, every expert placed, hot experts replicated,
// balance improved, divisibility errors.
#include <algorithm>

#include "gtest/gtest.h"
#include "tests/common/status_matchers.h"
#include "topology/eplb.h"
#include "topology/workload.h"

namespace expertmesh::topology {
namespace {

// deepseek-ai/EPLB README example: 2 layers x 12 experts, 16 slots, 4 groups,
// 2 nodes, 8 GPUs.
const std::vector<std::vector<double>> kExample = {{90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86},
                                                   {20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27}};

TEST(EplbTest, MatchesThePublishedExample) {
  EplbOptions o;
  o.num_ranks = 8;
  o.ranks_per_node = 4;
  o.num_groups = 4;
  o.redundant = 4;
  auto p = RebalanceExperts(kExample, o);
  ASSERT_OK(p);
  const ExpertPlacement& l0 = (*p)[0];
  // Groups {1, 2} (experts 3-8) on node 0 with replicas of 5 and 4; groups
  // {0, 3} on node 1 with replicas of 10 and 1 (EPLB example.png).
  EXPECT_EQ(l0.slots_of_rank(0), (std::vector<int32_t>{5, 6}));
  EXPECT_EQ(l0.slots_of_rank(1), (std::vector<int32_t>{5, 7}));
  EXPECT_EQ(l0.slots_of_rank(2), (std::vector<int32_t>{4, 8}));
  EXPECT_EQ(l0.slots_of_rank(3), (std::vector<int32_t>{3, 4}));
  std::vector<int32_t> node1;
  for (int r = 4; r < 8; ++r) {
    for (int32_t e : l0.slots_of_rank(r)) node1.push_back(e);
  }
  std::sort(node1.begin(), node1.end());
  EXPECT_EQ(node1, (std::vector<int32_t>{0, 1, 1, 2, 9, 10, 10, 11}));
}

TEST(EplbTest, EveryExpertPlacedHotExpertsReplicatedBalanced) {
  LoadDistribution z;
  z.kind = LoadDistribution::Kind::kZipf;
  z.zipf_exponent = 1.0;
  auto loads = z.Loads(4, 256);
  ASSERT_TRUE(loads.ok());
  for (auto policy : {EplbOptions::Policy::kAuto, EplbOptions::Policy::kGlobal}) {
    EplbOptions o;
    o.num_ranks = 32;
    o.ranks_per_node = 8;
    o.num_groups = 8;
    o.redundant = 32;
    o.policy = policy;
    auto p = RebalanceExperts(*loads, o);
    ASSERT_OK(p);
    for (size_t l = 0; l < loads->size(); ++l) {
      const ExpertPlacement& pl = (*p)[l];
      EXPECT_EQ(pl.num_slots(), 288);
      for (int64_t r = 0; r < 32; ++r) EXPECT_EQ(pl.slots_of_rank(r).size(), 9u);
      const auto& w = (*loads)[l];
      const int64_t hottest = std::max_element(w.begin(), w.end()) - w.begin();
      const int64_t coldest = std::min_element(w.begin(), w.end()) - w.begin();
      EXPECT_GE(pl.replicas(hottest).size(), 2u);
      EXPECT_EQ(pl.replicas(coldest).size(), 1u);
      for (int64_t e = 0; e < 256; ++e) EXPECT_GE(pl.replicas(e).size(), 1u);
      // Far better than placing experts contiguously without replicas.
      const double naive = ImbalanceFactor(ExpertPlacement::Uniform(256, 32, 0), w);
      const double eplb = ImbalanceFactor(pl, w);
      EXPECT_LT(eplb, naive);
      EXPECT_LT(eplb, 1.6) << "layer " << l;  // Zipf(1): the hottest expert alone carries 16% of the load
    }
  }
}

TEST(EplbTest, UniformLoad) {
  // EP32, 288 slots: 7 whole experts + 2 half replicas per rank, perfectly balanced.
  auto p = RebalanceExperts({std::vector<double>(256, 1.0)}, EplbOptions{32, 8, 8, 32, EplbOptions::Policy::kAuto});
  ASSERT_OK(p);
  EXPECT_NEAR(ImbalanceFactor((*p)[0], std::vector<double>(256, 1.0)), 1.0, 1e-9);
  // EP144, 2 slots per rank: 224 unreplicated experts cannot avoid pairing up on
  // 80 ranks, so the busiest rank carries 2 / (256 / 144) = 1.125 x the mean.
  p = RebalanceExperts({std::vector<double>(256, 1.0)}, EplbOptions{144, 8, 8, 32, EplbOptions::Policy::kAuto});
  ASSERT_OK(p);
  EXPECT_NEAR(ImbalanceFactor((*p)[0], std::vector<double>(256, 1.0)), 1.125, 1e-9);
}

TEST(EplbTest, Errors) {
  auto p = RebalanceExperts({std::vector<double>(256, 1.0)}, EplbOptions{144, 8, 8, 0, EplbOptions::Policy::kAuto});
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("--redundant-experts"), std::string::npos) << p.status();
  p = RebalanceExperts({std::vector<double>(256, 1.0)}, EplbOptions{144, 8, 8, 32, EplbOptions::Policy::kHierarchical});
  EXPECT_FALSE(p.ok());  // 8 groups do not divide over 18 nodes
  p = RebalanceExperts({std::vector<double>(256, 1.0), std::vector<double>(128, 1.0)},
                       EplbOptions{32, 8, 8, 32, EplbOptions::Policy::kAuto});
  EXPECT_FALSE(p.ok());
}

TEST(EplbTest, PlacesTheRuntimePlan) {
  const ModelConfig cfg = *ModelConfig::Preset("tiny");  // 256 experts, 3 MoE layers
  PlanOptions po;
  po.pp = 1;
  po.ep = 4;
  po.redundant_experts = 4;
  auto plan = BuildPlan(cfg, po);
  ASSERT_OK(plan);
  std::vector<double> hot(256, 1.0);
  hot[17] = 50;
  ASSERT_TRUE(PlaceExpertsWithEplb(cfg, {{1, hot}}, 2, &*plan).ok());
  const ExpertPlacement& l1 = plan->stages[0].placement.at(1);
  EXPECT_GE(l1.replicas(17).size(), 2u);
  EXPECT_EQ(l1.num_slots(), 260);
  EXPECT_EQ(plan->stages[0].placement.at(2).replicas(17).size(), 1u);  // no load given: uniform
  EXPECT_FALSE(PlaceExpertsWithEplb(cfg, {{1, {1.0, 2.0}}}, 2, &*plan).ok());
}

TEST(EplbTest, PackingAndReplicationPrimitives) {
  const std::vector<int64_t> pack = BalancedPacking({10, 9, 1, 1}, 2);
  EXPECT_NE(pack[0], pack[1]);  // the two heavy items split
  EXPECT_EQ(ReplicateExperts({100, 10, 30}, 6), (std::vector<int64_t>{4, 1, 1}));
}

}  // namespace
}  // namespace expertmesh::topology
