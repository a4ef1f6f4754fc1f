// VacantRankCommunicator: a logical group of 4 with rank 1 vacant, over an
// in-process group of the 3 live ranks (threads).
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "worker/comm/inproc_communicator.h"
#include "worker/comm/vacant_communicator.h"

namespace expertmesh::comm {
namespace {

std::vector<std::unique_ptr<VacantRankCommunicator>> Group(const std::vector<int>& live, int size) {
  std::vector<std::unique_ptr<Communicator>> inner = CreateInprocGroup(static_cast<int>(live.size()));
  std::vector<std::unique_ptr<VacantRankCommunicator>> out;
  for (auto& c : inner) {
    auto v = VacantRankCommunicator::Create(std::move(c), live, size);
    EXPECT_TRUE(v.ok()) << v.status();
    out.push_back(std::move(*v));
  }
  return out;
}

template <typename Fn>
void Threads(std::vector<std::unique_ptr<VacantRankCommunicator>>& comms, Fn fn) {
  std::vector<std::thread> t;
  for (auto& c : comms) t.emplace_back([&c, &fn] { fn(c.get()); });
  for (auto& x : t) x.join();
}

TEST(VacantRankCommunicator, RejectsBadLiveLists) {
  EXPECT_FALSE(VacantRankCommunicator::Create(nullptr, {0}, 2).ok());
  auto two = [] { return CreateInprocGroup(2); };
  EXPECT_FALSE(VacantRankCommunicator::Create(std::move(two()[0]), {0}, 4).ok());        // 1 live for 2 ranks
  EXPECT_FALSE(VacantRankCommunicator::Create(std::move(two()[0]), {2, 1}, 4).ok());     // not increasing
  EXPECT_FALSE(VacantRankCommunicator::Create(std::move(two()[0]), {0, 4}, 4).ok());     // outside
  auto ok = VacantRankCommunicator::Create(std::move(two()[1]), {0, 3}, 4);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)->rank(), 3);
  EXPECT_EQ((*ok)->size(), 4);
  EXPECT_EQ((*ok)->VacantRanks(), (std::vector<int>{1, 2}));
}

TEST(VacantRankCommunicator, CollectivesSkipTheVacantRank) {
  const std::vector<int> live = {0, 2, 3};
  auto comms = Group(live, 4);
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  Threads(comms, [&](VacantRankCommunicator* c) {
    const int me = c->rank();
    EXPECT_TRUE(c->vacant(1));
    EXPECT_FALSE(c->vacant(me));
    // All-gather: the vacant block reads zeros.
    int32_t mine[2] = {me + 10, me + 20};
    std::vector<int32_t> all(8, -1);
    ASSERT_TRUE(c->AllGather(mine, all.data(), sizeof(mine), MemoryKind::kHost, deadline).ok());
    for (int r = 0; r < 4; ++r) {
      EXPECT_EQ(all[2 * r], r == 1 ? 0 : r + 10);
      EXPECT_EQ(all[2 * r + 1], r == 1 ? 0 : r + 20);
    }
    // Fixed all-to-all of counts: from the vacant rank 0.
    std::vector<int64_t> send(4), recv(4, -1);
    for (int p = 0; p < 4; ++p) send[p] = p == 1 ? 0 : 100 * me + p;
    ASSERT_TRUE(c->AllToAll(send.data(), recv.data(), sizeof(int64_t), MemoryKind::kHost, deadline).ok());
    for (int p = 0; p < 4; ++p) EXPECT_EQ(recv[p], p == 1 ? 0 : 100 * p + me) << "from " << p;
    // All-to-all-v: p + 1 bytes of value (me, p) to each live p, none to the vacant one.
    AllToAllVLayout l;
    std::vector<char> sbuf, rbuf(16, 0);
    size_t roff = 0;
    for (int p = 0; p < 4; ++p) {
      const size_t n = p == 1 ? 0 : static_cast<size_t>(me + 1);  // rank me sends me+1 bytes
      l.send_offsets.push_back(sbuf.size());
      l.send_bytes.push_back(p == 1 ? 0 : static_cast<size_t>(p + 1));
      sbuf.insert(sbuf.end(), l.send_bytes.back(), static_cast<char>(16 * me + p));
      l.recv_offsets.push_back(roff);
      l.recv_bytes.push_back(n);
      roff += n;
    }
    rbuf.resize(roff);
    ASSERT_TRUE(c->AllToAllV(sbuf.data(), rbuf.data(), l, MemoryKind::kHost, deadline).ok());
    for (int p = 0; p < 4; ++p) {
      for (size_t i = 0; i < l.recv_bytes[p]; ++i) EXPECT_EQ(rbuf[l.recv_offsets[p] + i], 16 * p + me);
    }
    // Broadcast from logical rank 2, and a barrier.
    int64_t v = me == 2 ? 4242 : 0;
    ASSERT_TRUE(c->Broadcast(2, &v, sizeof(v), MemoryKind::kHost, deadline).ok());
    EXPECT_EQ(v, 4242);
    ASSERT_TRUE(c->Barrier(deadline).ok());
    // Point to point between logical ranks 0 and 3.
    if (me == 0 || me == 3) {
      const int peer = 3 - me;
      int32_t out = me, in = -1;
      Batch b;
      b.Send(peer, &out, sizeof(out));
      b.Recv(peer, &in, sizeof(in));
      ASSERT_TRUE(c->Run(b, deadline).ok());
      EXPECT_EQ(in, peer);
    }
  });
}

TEST(VacantRankCommunicator, AbortReachesTheInnerCommunicator) {
  auto comms = Group({0, 1}, 3);
  comms[0]->Abort(absl::AbortedError("test"));
  EXPECT_EQ(comms[0]->inner()->health().code(), absl::StatusCode::kAborted);
  int32_t x = 0;
  Batch b;
  b.Recv(1, &x, sizeof(x));
  EXPECT_EQ(comms[0]->Run(b, absl::Now() + absl::Seconds(5)).code(), absl::StatusCode::kAborted);
}

}  // namespace
}  // namespace expertmesh::comm
