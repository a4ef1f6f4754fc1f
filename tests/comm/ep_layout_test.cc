// EpLayout (worker/ep_layout.h): the host-side routing -> per-rank layout
// that both expert exchanges use. Every case is checked against an
// independent recount from ExpertPlacement::Replica (CheckLayout), plus the
// facts the case is about.
#include "worker/ep_layout.h"

#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "topology/placement.h"

namespace expertmesh {
namespace {

using worker::EpEntry;
using worker::EpLayout;

struct Routes {
  int64_t T = 0, K = 0;
  std::vector<int32_t> ids;
  std::vector<float> w;
};

Routes RandomRoutes(int64_t T, int64_t K, int64_t E, uint64_t seed) {
  Routes r{T, K, {}, {}};
  std::mt19937_64 rng(seed);
  for (int64_t t = 0; t < T; ++t) {
    std::set<int32_t> used;
    while (static_cast<int64_t>(used.size()) < K) {
      const int32_t e = static_cast<int32_t>(rng() % E);
      if (!used.insert(e).second) continue;
      r.ids.push_back(e);
      r.w.push_back(static_cast<float>(rng() % 1000) / 1000.0f + 0.001f);
    }
  }
  return r;
}

// Rebuilds the layout's facts from the placement alone and compares.
void CheckLayout(const topology::ExpertPlacement& pl, const Routes& r, const EpLayout& l) {
  const int P = static_cast<int>(pl.num_ranks());
  const int64_t T = r.T, K = r.K;
  ASSERT_EQ(l.num_ranks(), P);
  ASSERT_EQ(l.T, T);
  ASSERT_EQ(l.top_k, K);
  // Per token: the destination ranks, each with its (slot, expert, weight) entries in k order.
  struct Want {
    std::vector<int32_t> slot, expert;
    std::vector<float> weight;
  };
  std::vector<std::map<int, Want>> want(static_cast<size_t>(T));
  std::vector<int64_t> count(static_cast<size_t>(P), 0), experts(static_cast<size_t>(pl.num_experts()), 0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int32_t e = r.ids[t * K + k];
      const auto [rank, slot] = pl.Replica(e, t);
      Want& wt = want[t][rank];
      wt.slot.push_back(slot);
      wt.expert.push_back(e);
      wt.weight.push_back(r.w[t * K + k]);
      ++experts[e];
    }
    for (const auto& [rank, unused] : want[t]) ++count[rank];
  }
  EXPECT_EQ(l.send_count, count);
  EXPECT_EQ(l.expert_count, experts);
  ASSERT_EQ(static_cast<int>(l.send_start.size()), P + 1);
  EXPECT_EQ(l.send_start[0], 0);
  for (int p = 0; p < P; ++p) EXPECT_EQ(l.send_start[p + 1] - l.send_start[p], count[p]);
  const int64_t ns = l.num_sent();
  ASSERT_EQ(static_cast<int64_t>(l.send_token.size()), ns);
  ASSERT_EQ(static_cast<int64_t>(l.entries.size()), ns * K);
  ASSERT_EQ(static_cast<int64_t>(l.entry_expert.size()), ns * K);
  ASSERT_EQ(static_cast<int64_t>(l.token_start.size()), T + 1);
  ASSERT_EQ(static_cast<int64_t>(l.token_record.size()), ns);
  // Send order: grouped by destination, tokens strictly ascending inside.
  for (int p = 0; p < P; ++p) {
    for (int64_t j = l.send_start[p] + 1; j < l.send_start[p + 1]; ++j) {
      EXPECT_LT(l.send_token[j - 1], l.send_token[j]) << "rank " << p << " record " << j;
    }
  }
  // Each token's records: one per destination, in destination order, with that rank's entries.
  for (int64_t t = 0; t < T; ++t) {
    ASSERT_EQ(l.token_start[t + 1] - l.token_start[t], static_cast<int32_t>(want[t].size())) << "token " << t;
    auto it = want[t].begin();
    for (int32_t i = l.token_start[t]; i < l.token_start[t + 1]; ++i, ++it) {
      const int32_t j = l.token_record[i];
      EXPECT_EQ(l.send_token[j], t);
      EXPECT_GE(j, l.send_start[it->first]);
      EXPECT_LT(j, l.send_start[it->first + 1]) << "token " << t << " record " << j << " not for rank " << it->first;
      const Want& wt = it->second;
      for (int64_t m = 0; m < K; ++m) {
        const EpEntry& en = l.entries[j * K + m];
        if (m < static_cast<int64_t>(wt.slot.size())) {
          EXPECT_EQ(en.slot, wt.slot[m]);
          EXPECT_EQ(en.weight, wt.weight[m]);
          EXPECT_EQ(l.entry_expert[j * K + m], wt.expert[m]);
        } else {
          EXPECT_EQ(en.slot, -1);
          EXPECT_EQ(en.weight, 0.0f);
          EXPECT_EQ(l.entry_expert[j * K + m], -1);
        }
      }
    }
  }
}

absl::Status Build(const topology::ExpertPlacement& pl, const Routes& r, EpLayout* l) {
  return worker::BuildEpLayout(pl, r.ids.data(), r.w.data(), r.T, r.K, l);
}

TEST(EpLayout, RandomRoutingOverFourRanks) {
  const auto pl = topology::ExpertPlacement::Uniform(64, 4);
  const Routes r = RandomRoutes(37, 8, 64, 1);
  EpLayout l;
  ASSERT_TRUE(Build(pl, r, &l).ok());
  CheckLayout(pl, r, l);
  // A token goes once to each rank holding any of its experts: never more records than (token, rank) pairs.
  EXPECT_LE(l.num_sent(), 37 * 4);
  EXPECT_GE(l.num_sent(), 37);
}

TEST(EpLayout, ZeroTokens) {
  const auto pl = topology::ExpertPlacement::Uniform(16, 4);
  EpLayout l;
  ASSERT_TRUE(worker::BuildEpLayout(pl, nullptr, nullptr, 0, 4, &l).ok());
  CheckLayout(pl, Routes{0, 4, {}, {}}, l);
  EXPECT_EQ(l.num_sent(), 0);
  EXPECT_EQ(l.send_count, std::vector<int64_t>(4, 0));
  // The peers may still send to this rank.
  l.recv_count = {3, 0, 2, 0};
  EXPECT_EQ(l.SetRecvCounts(1, "test").code(), absl::StatusCode::kOk);
  EXPECT_EQ(l.num_received(), 5);
  EXPECT_EQ(l.recv_start, (std::vector<int64_t>{0, 3, 3, 5, 5}));
}

TEST(EpLayout, AllTokensToOneExpert) {
  const auto pl = topology::ExpertPlacement::Uniform(16, 4);  // expert 9 on rank 2
  Routes r{20, 1, std::vector<int32_t>(20, 9), std::vector<float>(20, 1.0f)};
  EpLayout l;
  ASSERT_TRUE(Build(pl, r, &l).ok());
  CheckLayout(pl, r, l);
  EXPECT_EQ(l.send_count, (std::vector<int64_t>{0, 0, 20, 0}));
  EXPECT_EQ(l.expert_count[9], 20);
  for (int64_t j = 0; j < 20; ++j) EXPECT_EQ(l.send_token[j], j);
}

TEST(EpLayout, AllExpertsOfATokenOnOneRankMakeOneRecord) {
  const auto pl = topology::ExpertPlacement::Uniform(16, 4);  // experts 0-3 on rank 0
  Routes r{3, 4, {0, 1, 2, 3, 3, 2, 1, 0, 1, 0, 3, 2}, {}};
  for (int i = 0; i < 12; ++i) r.w.push_back(0.1f * static_cast<float>(i + 1));
  EpLayout l;
  ASSERT_TRUE(Build(pl, r, &l).ok());
  CheckLayout(pl, r, l);
  EXPECT_EQ(l.send_count, (std::vector<int64_t>{3, 0, 0, 0}));
  // Entries keep the router's k order: token 1 lists experts 3, 2, 1, 0 (slots 3..0).
  EXPECT_EQ(l.entries[4].slot, 3);
  EXPECT_EQ(l.entries[7].slot, 0);
}

TEST(EpLayout, RedundantReplicasShareTheLoad) {
  // 8 experts, 16 slots on 2 ranks: every expert on both ranks.
  const auto pl = topology::ExpertPlacement::Uniform(8, 2, 8);
  for (int e = 0; e < 8; ++e) ASSERT_EQ(pl.replicas(e).size(), 2u) << e;
  Routes r{10, 1, std::vector<int32_t>(10, 5), std::vector<float>(10, 1.0f)};
  EpLayout l;
  ASSERT_TRUE(Build(pl, r, &l).ok());
  CheckLayout(pl, r, l);
  EXPECT_EQ(l.send_count, (std::vector<int64_t>{5, 5}));  // (token + expert) % 2 alternates the replica
  const Routes rr = RandomRoutes(50, 4, 8, 7);
  ASSERT_TRUE(Build(pl, rr, &l).ok());  // the same layout object, reused
  CheckLayout(pl, rr, l);
}

TEST(EpLayout, RanksWithoutExperts) {
  auto pl = topology::ExpertPlacement::Create(4, {{0, 1}, {}, {2, 3}, {}});
  ASSERT_TRUE(pl.ok()) << pl.status();
  const Routes r = RandomRoutes(25, 2, 4, 3);
  EpLayout l;
  ASSERT_TRUE(Build(*pl, r, &l).ok());
  CheckLayout(*pl, r, l);
  EXPECT_EQ(l.send_count[1], 0);
  EXPECT_EQ(l.send_count[3], 0);
  EXPECT_GT(l.send_count[0] + l.send_count[2], 0);
}

TEST(EpLayout, RejectsBadRoutes) {
  const auto pl = topology::ExpertPlacement::Uniform(16, 2);
  EpLayout l;
  Routes r{2, 2, {1, 2, 3, 16}, {0.5f, 0.5f, 0.5f, 0.5f}};
  absl::Status s = Build(pl, r, &l);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("token 1"), std::string::npos) << s;
  EXPECT_NE(std::string(s.message()).find("expert 16"), std::string::npos) << s;
  r.ids[3] = -1;
  EXPECT_EQ(Build(pl, r, &l).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(worker::BuildEpLayout(pl, nullptr, nullptr, 1, 2, &l).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(worker::BuildEpLayout(pl, nullptr, nullptr, 0, 0, &l).code(), absl::StatusCode::kInvalidArgument);
}

TEST(EpLayout, ReceiveCountsAndByteLayouts) {
  const auto pl = topology::ExpertPlacement::Uniform(16, 3);
  const Routes r = RandomRoutes(11, 4, 16, 5);
  EpLayout l;
  ASSERT_TRUE(Build(pl, r, &l).ok());
  const int me = 1;
  l.recv_count = {2, l.send_count[me], 0};
  ASSERT_TRUE(l.SetRecvCounts(me, "test").ok());
  const comm::AllToAllVLayout d = l.DispatchBytes(10), c = l.CombineBytes(4);
  for (int p = 0; p < 3; ++p) {
    EXPECT_EQ(d.send_bytes[p], static_cast<size_t>(l.send_count[p] * 10));
    EXPECT_EQ(d.send_offsets[p], static_cast<size_t>(l.send_start[p] * 10));
    EXPECT_EQ(d.recv_bytes[p], static_cast<size_t>(l.recv_count[p] * 10));
    EXPECT_EQ(d.recv_offsets[p], static_cast<size_t>(l.recv_start[p] * 10));
    // The combine is the dispatch reversed.
    EXPECT_EQ(c.send_bytes[p], static_cast<size_t>(l.recv_count[p] * 4));
    EXPECT_EQ(c.send_offsets[p], static_cast<size_t>(l.recv_start[p] * 4));
    EXPECT_EQ(c.recv_bytes[p], static_cast<size_t>(l.send_count[p] * 4));
    EXPECT_EQ(c.recv_offsets[p], static_cast<size_t>(l.send_start[p] * 4));
  }
  // This rank announcing to itself another count than it sends, or a negative count: kInternal.
  l.recv_count = {2, l.send_count[me] + 1, 0};
  absl::Status s = l.SetRecvCounts(me, "test");
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_NE(std::string(s.message()).find("rank 1"), std::string::npos) << s;
  l.recv_count = {-1, l.send_count[me], 0};
  EXPECT_EQ(l.SetRecvCounts(me, "test").code(), absl::StatusCode::kInternal);
  l.recv_count = {0, 0};
  EXPECT_EQ(l.SetRecvCounts(me, "test").code(), absl::StatusCode::kInternal);
}

}  // namespace
}  // namespace expertmesh
