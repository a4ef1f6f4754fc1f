// Single-process tests of the communicator layer and the dispatch engine:
// the Communicator base (validation, self transfers), FileStore bootstrap
// with threads, the fast fp8 conversion, and the expert-parallel MoE layer
// on a one-rank communicator.
#include <cmath>
#include <cstring>
#include <map>
#include <thread>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "tests/comm/bodies.h"
#include "tests/comm/comm_test_util.h"
#include "topology/placement.h"
#include "worker/comm/bootstrap.h"
#include "worker/comm/communicator.h"
#include "worker/dispatch.h"
#include "worker/model.h"

namespace expertmesh {
namespace {

using comm::Batch;
using comm::MemoryKind;

// A one-rank communicator: the base class handles every self transfer, so
// RunRemote is only reached by device-memory batches.
class LoopbackCommunicator : public comm::Communicator {
 public:
  explicit LoopbackCommunicator(bool host = true) : Communicator(0, 1), host_(host) {}
  absl::string_view backend() const override { return "loopback"; }
  comm::Caps caps() const override {
    comm::Caps c;
    c.host_memory = host_;
    c.device_memory = !host_;
    return c;
  }

 protected:
  absl::Status RunRemote(const Batch&, absl::Time, const RecvDoneFn*) override {
    return absl::InternalError("loopback has no remote peers");
  }

 private:
  bool host_;
};

absl::Time Soon() { return absl::Now() + absl::Seconds(5); }

TEST(CommBase, ValidatesBatches) {
  LoopbackCommunicator c;
  std::vector<char> a(8, 'x'), b(8, 0);
  Batch bad_peer;
  bad_peer.Send(1, a.data(), 8);
  EXPECT_EQ(c.Run(bad_peer, Soon()).code(), absl::StatusCode::kInvalidArgument);
  Batch null_buf;
  null_buf.Recv(0, nullptr, 8);
  EXPECT_EQ(c.Run(null_buf, Soon()).code(), absl::StatusCode::kInvalidArgument);
  Batch unmatched;
  unmatched.Recv(0, b.data(), 8);
  EXPECT_EQ(c.Run(unmatched, Soon()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(c.health().ok()) << "malformed batches must not break the communicator";
  Batch ok;
  ok.Send(0, a.data(), 8);
  ok.Recv(0, b.data(), 8);
  ASSERT_TRUE(c.Run(ok, Soon()).ok());
  EXPECT_EQ(std::string(b.data(), 8), "xxxxxxxx");
}

TEST(CommBase, RefusesMemoryItCannotMove) {
  LoopbackCommunicator device_only(/*host=*/false);
  std::vector<char> a(8), b(8);
  Batch host;
  host.Send(0, a.data(), 8);
  host.Recv(0, b.data(), 8);
  const absl::Status s = device_only.Run(host, Soon());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("device memory only"), std::string::npos) << s;
}

TEST(CommBase, SharedBodiesOnOneRank) {
  // The one-rank paths of the multi-rank bodies run here too.
  LoopbackCommunicator c1, c2, c3;
  comm_bodies::BatchOrderingAndCollectives(&c1);
  comm_bodies::SizeMismatchIsAnError(&c2);
  comm_bodies::AbortFromAnotherThread(&c3);
}

TEST(Bootstrap, FileStoreAllGatherAcrossThreads) {
  const std::string dir = testing_util::MakeTempDir("em-store-test");
  constexpr int kRanks = 4;
  std::vector<std::vector<std::string>> got(kRanks);
  std::vector<absl::Status> st(kRanks);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r) {
    threads.emplace_back([&, r] {
      comm::FileStore store(dir);
      comm::StoreBootstrap boot(&store, "t", r, kRanks);
      for (int round = 0; round < 2; ++round) {
        auto all = boot.AllGather(std::string(static_cast<size_t>(r + 1), static_cast<char>('a' + r + round)),
                                  absl::Now() + absl::Seconds(10));
        if (!all.ok()) {
          st[r] = all.status();
          return;
        }
        got[r] = *all;
      }
      auto b = boot.Broadcast(2, r == 2 ? "root" : "ignored", absl::Now() + absl::Seconds(10));
      if (!b.ok() || *b != "root") st[r] = absl::InternalError("broadcast");
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < kRanks; ++r) {
    ASSERT_OK(st[r]);
    ASSERT_EQ(got[r].size(), static_cast<size_t>(kRanks));
    for (int p = 0; p < kRanks; ++p) {
      EXPECT_EQ(got[r][p], std::string(static_cast<size_t>(p + 1), static_cast<char>('a' + p + 1)));
    }
  }
  testing_util::RemoveTree(dir);
}

TEST(Bootstrap, FramedValuesRoundTripAndDamageIsDataLoss) {
  const std::string payload("\x00\x01ucx-address\xff", 15);
  const std::string framed = comm::FrameBootstrapValue(payload);
  ASSERT_EQ(framed.size(), payload.size() + 12);
  auto back = comm::UnframeBootstrapValue(framed);
  ASSERT_OK(back.status());
  EXPECT_EQ(*back, payload);
  // Every single flipped byte, a cut, an extension and raw garbage are refused.
  for (size_t i = 0; i < framed.size(); ++i) {
    std::string bad = framed;
    bad[i] ^= 0x5a;
    EXPECT_EQ(comm::UnframeBootstrapValue(bad).status().code(), absl::StatusCode::kDataLoss) << "byte " << i;
  }
  EXPECT_EQ(comm::UnframeBootstrapValue(framed.substr(0, framed.size() - 1)).status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(comm::UnframeBootstrapValue(framed + "x").status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(comm::UnframeBootstrapValue("garbage garbage garbage").status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(comm::UnframeBootstrapValue("").status().code(), absl::StatusCode::kDataLoss);
}

TEST(Bootstrap, GarbageInTheStoreIsDataLossNamingTheRank) {
  // Issue 15: garbage written to the key-value store in place of a peer's
  // UCX address must be an error for the reader, never bytes given to UCX.
  const std::string dir = testing_util::MakeTempDir("em-store-test");
  comm::FileStore store(dir);
  ASSERT_OK(store.Set("t/0/1", "\x13\x37 not a ucx address"));
  comm::StoreBootstrap boot(&store, "t", 0, 2);
  auto all = boot.AllGather("mine", absl::Now() + absl::Seconds(5));
  EXPECT_EQ(all.status().code(), absl::StatusCode::kDataLoss) << all.status();
  EXPECT_NE(all.status().message().find("the bytes of rank 1 are damaged"), absl::string_view::npos)
      << all.status();
  testing_util::RemoveTree(dir);
}

TEST(Bootstrap, MissingRankHitsDeadline) {
  const std::string dir = testing_util::MakeTempDir("em-store-test");
  comm::FileStore store(dir);
  comm::StoreBootstrap boot(&store, "t", 0, 3);
  const auto t0 = absl::Now();
  auto all = boot.AllGather("x", absl::Now() + absl::Milliseconds(200));
  EXPECT_EQ(all.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(std::string(all.status().message()).find("rank(s) 1,2"), std::string::npos) << all.status();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(2));
  testing_util::RemoveTree(dir);
}

TEST(Fp8, FastConversionMatchesReference) {
  // A sweep over the float bit patterns (and the special values) against
  // common/dtype's FloatToF8E4M3.
  int64_t checked = 0;
  for (uint64_t bits = 0; bits <= 0xffffffffull; bits += 251) {
    const uint32_t b = static_cast<uint32_t>(bits);
    float f;
    std::memcpy(&f, &b, 4);
    if (std::isnan(f)) continue;
    ASSERT_EQ(worker::FastFloatToF8E4M3(f), FloatToF8E4M3(f)) << "f=" << f << " bits=" << std::hex << b;
    ++checked;
  }
  for (float f : {0.0f, -0.0f, 448.0f, -448.0f, 464.0f, 1e30f, 1.0f / 512, 1.5f / 512, 2.5f / 512, 1.0f / 64,
                  0.0625f * 1.0625f, 0.0625f * 1.03125f, 1.09375f, 240.0f, 17.5f}) {
    EXPECT_EQ(worker::FastFloatToF8E4M3(f), FloatToF8E4M3(f)) << f;
  }
  EXPECT_GT(checked, 10000000);
}

TEST(Fp8, BlockQuantiserMatchesScalarRecipe) {
  // The 8-lane quantiser gives the scalar recipe's codes: values across the
  // whole range, subnormals, zeros, a partial block of 37.
  std::vector<float> x = testing_util::RandomVector(128 * 6 + 37, 3);
  for (size_t i = 0; i < x.size(); ++i) x[i] *= std::ldexp(1.0f, static_cast<int>(i % 41) - 20);
  for (size_t i = 0; i < 40; ++i) x[i * 7] = 0.0f;
  std::vector<uint8_t> q(x.size());
  std::vector<float> scales(x.size() / 128 + 1);
  worker::QuantizeFp8Blocks(x.data(), static_cast<int64_t>(x.size()), q.data(), scales.data());
  for (size_t b = 0; b * 128 < x.size(); ++b) {
    float amax = 0;
    for (size_t i = b * 128; i < std::min(x.size(), b * 128 + 128); ++i) amax = std::max(amax, std::fabs(x[i]));
    ASSERT_EQ(scales[b], amax / kF8E4M3Max);
    const float inv = amax > 0 ? kF8E4M3Max / amax : 0.0f;
    for (size_t i = b * 128; i < std::min(x.size(), b * 128 + 128); ++i) {
      ASSERT_EQ(q[i], FloatToF8E4M3(x[i] * inv)) << "value " << i << " = " << x[i];
    }
  }
}

TEST(Fp8, BlockQuantisationError) {
  // 160 values = one full and one partial block of 128.
  const std::vector<float> x = testing_util::RandomVector(160 * 50, 7);
  std::vector<uint8_t> q(x.size());
  std::vector<float> scales(x.size() / 128 + 2), back(x.size());
  for (size_t r = 0; r < 50; ++r) {
    worker::QuantizeFp8Blocks(x.data() + r * 160, 160, q.data() + r * 160, scales.data());
    worker::DequantizeFp8Blocks(q.data() + r * 160, scales.data(), 160, back.data() + r * 160);
  }
  const double err = testing_util::RelativeError(back.data(), x.data(), static_cast<int64_t>(x.size()));
  EXPECT_LT(err, 0.05);
  EXPECT_GT(err, 0.005);
  std::printf("fp8 e4m3 + per-128 scale: relative RMS error of N(0,1) values = %.4f\n", err);
}

TEST(Dispatch, OneRankLayerEqualsLocal) {
  const worker::MoeWeights& w = testing_util::TinyMoeWeights();
  LoopbackCommunicator c;
  const auto pl = topology::ExpertPlacement::Uniform(w.router_params.num_experts, 1, 16);
  worker::DispatchOptions o;
  o.hidden = w.hidden;
  o.top_k = w.router_params.top_k;
  worker::ExpertParallelMoe moe(&c, &pl, &w, o);
  const int64_t T = 50, H = w.hidden;
  const std::vector<float> x = testing_util::RandomVector(T * H, 11);
  std::vector<float> y(T * H), ref(T * H);
  ASSERT_TRUE(moe.Forward(x.data(), T, y.data()).ok());
  worker::MoeForwardLocal(w, x.data(), T, ref.data());
  EXPECT_LT(testing_util::RelativeError(y.data(), ref.data(), T * H), 1e-5);
  EXPECT_EQ(moe.dispatcher().num_sent_records(), T);  // one rank: one record per token
  EXPECT_EQ(moe.dispatcher().num_records(), T);
}

TEST(Dispatch, ForwardRoutedAddsTheRoutedPart) {
  const worker::MoeWeights& w = testing_util::TinyMoeWeights();
  LoopbackCommunicator c;
  const auto pl = topology::ExpertPlacement::Uniform(w.router_params.num_experts, 1, 16);
  worker::DispatchOptions o;
  o.hidden = w.hidden;
  o.top_k = w.router_params.top_k;
  worker::ExpertParallelMoe moe(&c, &pl, &w, o);
  const int64_t T = 23, H = w.hidden, K = o.top_k;
  const std::vector<float> x = testing_util::RandomVector(T * H, 12);
  std::vector<int32_t> ids;
  std::vector<float> wts;
  worker::RouteTokens(w, x.data(), T, &ids, &wts);
  std::vector<float> y(T * H, 1.0f), ref(T * H, 1.0f);
  ASSERT_TRUE(moe.ForwardRouted(x.data(), T, ids.data(), wts.data(), y.data()).ok());
  worker::RoutedExpertsAccumulate(w, x.data(), T, ids.data(), wts.data(), K, ref.data());  // no shared expert
  EXPECT_LT(testing_util::RelativeError(y.data(), ref.data(), T * H), 1e-5);
  // Zero tokens: nothing to add, still one exchange.
  ASSERT_TRUE(moe.ForwardRouted(nullptr, 0, nullptr, nullptr, nullptr).ok());
}

// The CPU engine routes each MoE layer once and hands the routes to its
// exchange: over a one-rank CpuEpExchange it computes what it computes
// alone (to the combine's summation order), and observes the same routes.
TEST(Dispatch, EngineOverCpuEpExchangeEqualsLocalEngine) {
  auto cfg = ModelConfig::Preset("tiny");
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  auto shard = worker::ModelShard::Random(*cfg, ShardFilter{}, 5);
  ASSERT_TRUE(shard.ok()) << shard.status();
  std::map<int64_t, topology::ExpertPlacement> placements;
  for (int64_t l = 0; l < cfg->num_hidden_layers; ++l) {
    if (cfg->IsMoeLayer(l)) placements[l] = topology::ExpertPlacement::Uniform(cfg->n_routed_experts, 1, 8);
  }
  LoopbackCommunicator c;
  worker::CpuEpExchange ex(shard->get(), nullptr, &placements, worker::DispatchOptions{});
  worker::Engine local(shard->get()), ep(shard->get());
  ep.SetExpertExchange(&ex);
  std::map<int64_t, std::vector<int32_t>> seen_local, seen_ep;
  auto observer = [](std::map<int64_t, std::vector<int32_t>>* seen) {
    return [seen](int64_t layer, const int32_t* ids, int64_t n) {
      auto& v = (*seen)[layer];
      v.insert(v.end(), ids, ids + n);
    };
  };
  local.SetRouteObserver(observer(&seen_local));
  ep.SetRouteObserver(observer(&seen_ep));
  std::vector<int32_t> prompt = {5, 17, 3, 99, 41, 8, 250};
  worker::SequenceCache ca = local.NewCache(), cb = ep.NewCache();
  std::vector<float> la, lb;
  ASSERT_TRUE(local.Forward({{&ca, prompt.data(), 7}}, &la).ok());
  // No communicator yet: the exchange refuses the step.
  EXPECT_EQ(ep.Forward({{&cb, prompt.data(), 7}}, &lb).code(), absl::StatusCode::kFailedPrecondition);
  cb = ep.NewCache();
  seen_ep.clear();
  ex.Reset(&c);
  ASSERT_TRUE(ep.Forward({{&cb, prompt.data(), 7}}, &lb).ok());
  ASSERT_EQ(la.size(), lb.size());
  EXPECT_LT(testing_util::RelativeError(lb.data(), la.data(), static_cast<int64_t>(la.size())), 1e-4);
  EXPECT_EQ(seen_ep.size(), placements.size());
  for (const auto& [layer, ids] : seen_ep) {
    EXPECT_EQ(static_cast<int64_t>(ids.size()), 7 * cfg->num_experts_per_tok) << "layer " << layer << " routed once";
  }
  EXPECT_GT(ex.times().dispatch + ex.times().combine, 0.0);
}

TEST(Dispatch, RejectsBadInput) {
  const worker::MoeWeights& w = testing_util::TinyMoeWeights();
  LoopbackCommunicator c;
  worker::DispatchOptions o;
  o.hidden = w.hidden;
  o.top_k = 2;
  const auto two_ranks = topology::ExpertPlacement::Uniform(256, 2);
  worker::EpDispatcher d2(&c, &two_ranks, o);
  std::vector<float> x(w.hidden, 1.0f), wt = {0.5f, 0.5f};
  std::vector<int32_t> ids = {3, 4};
  EXPECT_EQ(d2.Dispatch(x.data(), 1, ids.data(), wt.data()).code(), absl::StatusCode::kInvalidArgument);
  const auto one_rank = topology::ExpertPlacement::Uniform(256, 1);
  worker::EpDispatcher d1(&c, &one_rank, o);
  ids = {3, 300};
  const absl::Status s = d1.Dispatch(x.data(), 1, ids.data(), wt.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("expert 300"), std::string::npos) << s;
  // Weights that lack an expert the placement puts here: refused before any exchange.
  worker::MoeWeights partial = w;
  partial.experts[5] = worker::ExpertWeights();
  worker::DispatchOptions lo;
  lo.hidden = w.hidden;
  lo.top_k = w.router_params.top_k;
  worker::ExpertParallelMoe moe(&c, &one_rank, &partial, lo);
  std::vector<float> y(w.hidden);
  EXPECT_EQ(moe.Forward(x.data(), 1, y.data()).code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace expertmesh
