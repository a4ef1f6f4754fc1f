// CUDA MoE kernels against the CPU: router (kernels::Route), expert-major
// layout and dispatch layout (the CPU's counting sort), permute, weighted
// combine, and the routed experts end to end against
// worker::RoutedExpertsAccumulate in bf16 and in native fp8.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "common/checkpoint.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cuda/kernels.h"
#include "tests/gpu/gpu_test_util.h"
#include "worker/moe.h"

namespace expertmesh {
namespace {

namespace cuda = kernels::cuda;
using gputest::DeviceBuffer;

std::unique_ptr<cuda::Context> MakeContext() {
  cuda::ContextOptions opts;
  opts.pool_bytes = size_t{256} << 20;
  auto ctx = cuda::Context::Create(opts);
  if (!ctx.ok()) ADD_FAILURE() << ctx.status();
  return ctx.ok() ? std::move(*ctx) : nullptr;
}

// Biased choice score of expert e for one token (what Route sorts by).
double Choice(const kernels::RouterParams& p, const float* logits, const float* bias, int64_t e) {
  double s;
  if (p.sigmoid) {
    s = 1.0 / (1.0 + std::exp(-static_cast<double>(logits[e])));
  } else {
    double mx = -1e300, sum = 0;
    for (int64_t i = 0; i < p.num_experts; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
    for (int64_t i = 0; i < p.num_experts; ++i) sum += std::exp(logits[i] - mx);
    s = std::exp(logits[e] - mx) / sum;
  }
  return s + (bias != nullptr ? bias[e] : 0.0);
}

void CheckRoute(const kernels::RouterParams& p, int64_t T, bool with_bias, const char* what) {
  auto rng = gputest::Rng();
  const int64_t E = p.num_experts, K = p.top_k;
  std::vector<float> logits = gputest::Normal(rng, T * E, 2.0f);
  std::vector<float> bias = gputest::Normal(rng, E, 0.05f);
  const float* b = with_bias ? bias.data() : nullptr;
  std::vector<int32_t> ids(T * K);
  std::vector<float> w(T * K);
  kernels::Route(logits.data(), b, T, p, ids.data(), w.data());
  DeviceBuffer<float> dl(logits), db(bias), dw(T * K);
  DeviceBuffer<int32_t> dids(T * K);
  ASSERT_OK(cuda::Route(dl.get(), with_bias ? db.get() : nullptr, T, p, dids.get(), dw.get(), nullptr));
  const auto gids = dids.Download();
  const auto gw = dw.Download();
  int64_t near_tie_tokens = 0;
  double max_w_err = 0;
  for (int64_t t = 0; t < T; ++t) {
    bool same = true;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t g = gids[t * K + k], c = ids[t * K + k];
      ASSERT_GE(g, 0);
      ASSERT_LT(g, E);
      if (g == c) continue;
      same = false;
      // Only an fp32 near-tie (1 ulp of sigmoid/exp) may swap experts.
      const double dg = Choice(p, &logits[t * E], b, g), dc = Choice(p, &logits[t * E], b, c);
      ASSERT_LE(std::fabs(dg - dc), 1e-5) << what << ": token " << t << " slot " << k << " gpu " << g << " cpu " << c;
    }
    if (!same) {
      ++near_tie_tokens;
      continue;
    }
    for (int64_t k = 0; k < K; ++k) {
      max_w_err = std::max(max_w_err, std::fabs(static_cast<double>(gw[t * K + k]) - w[t * K + k]) /
                                          std::max(1e-6, std::fabs(static_cast<double>(w[t * K + k]))));
    }
  }
  std::printf("[ error     ] %-34s ids equal on %lld/%lld tokens (rest fp32 near-ties), weights max rel %.2e\n", what,
              static_cast<long long>(T - near_tie_tokens), static_cast<long long>(T), max_w_err);
  EXPECT_LE(near_tie_tokens, T / 100);
  EXPECT_LE(max_w_err, 1e-5);
}

TEST(GpuMoe, RouteMatchesCpu) {
  EM_SKIP_WITHOUT_GPU();
  kernels::RouterParams v3;  // 256 experts, 8 groups keep 4, top-8, sigmoid, scale 2.5
  CheckRoute(v3, 2000, true, "Route V3 (grouped sigmoid)");
  CheckRoute(v3, 300, false, "Route V3 no bias");
  kernels::RouterParams soft;
  soft.num_experts = 64;
  soft.num_groups = 1;
  soft.topk_groups = 1;
  soft.top_k = 6;
  soft.sigmoid = false;
  soft.norm_topk_prob = false;
  soft.scaling = 1.0f;
  CheckRoute(soft, 500, false, "Route softmax E=64 top-6");
  kernels::RouterParams odd;
  odd.num_experts = 72;  // 3 values per lane, groups of 9 spanning lanes
  odd.num_groups = 8;
  odd.topk_groups = 3;
  odd.top_k = 5;
  CheckRoute(odd, 500, true, "Route E=72 G=8 keep 3 top-5");
}

// Expected expert-major order: pairs grouped by expert, in pair order.
void CpuLayout(const std::vector<int32_t>& ids, int64_t E, std::vector<int32_t>* offsets, std::vector<int32_t>* pos) {
  offsets->assign(E + 1, 0);
  for (int32_t e : ids)
    if (e >= 0 && e < E) ++(*offsets)[e + 1];
  for (int64_t e = 0; e < E; ++e) (*offsets)[e + 1] += (*offsets)[e];
  std::vector<int32_t> fill(offsets->begin(), offsets->end() - 1);
  pos->assign(ids.size(), -1);
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] >= 0 && ids[i] < E) (*pos)[i] = fill[ids[i]]++;
}

TEST(GpuMoe, LayoutPermuteCombine) {
  EM_SKIP_WITHOUT_GPU();
  auto ctx = MakeContext();
  ASSERT_NE(ctx, nullptr);
  auto rng = gputest::Rng();
  for (int64_t T : {1, 100, 3000}) {
    const int64_t k = 8, E = 32, H = 7168 / 4, R = 8;
    // Global expert ids in [-1, 2E): those >= E or < 0 are not local.
    std::uniform_int_distribution<int32_t> ed(-1, static_cast<int32_t>(2 * E - 1));
    std::vector<int32_t> ids(T * k);
    for (auto& e : ids) e = ed(rng);
    std::vector<int32_t> offsets, pos;
    CpuLayout(ids, E, &offsets, &pos);
    DeviceBuffer<int32_t> dids(ids), doff(E + 1), dpos(T * k);
    ASSERT_OK(cuda::ExpertLayout(*ctx, dids.get(), T, k, E, doff.get(), dpos.get()));
    EXPECT_EQ(doff.Download(), offsets) << "T=" << T;
    EXPECT_EQ(dpos.Download(), pos) << "T=" << T;

    // Dispatch layout over 2E experts on R ranks (expert e on rank e % R).
    std::vector<int32_t> expert_rank(2 * E);
    for (int64_t e = 0; e < 2 * E; ++e) expert_rank[e] = static_cast<int32_t>(e % R);
    std::vector<int32_t> per_rank(R, 0), per_expert(2 * E, 0);
    std::vector<uint8_t> in_rank(T * R, 0);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = ids[t * k + j];
        if (e < 0) continue;
        ++per_expert[e];
        if (!in_rank[t * R + expert_rank[e]]) {
          in_rank[t * R + expert_rank[e]] = 1;
          ++per_rank[expert_rank[e]];
        }
      }
    }
    DeviceBuffer<int32_t> der(expert_rank), dpr(R), dpe(2 * E);
    DeviceBuffer<uint8_t> dir(T * R);
    ASSERT_OK(cuda::DispatchLayout(dids.get(), T, k, 2 * E, der.get(), R, dpr.get(), dpe.get(), dir.get(),
                                      nullptr));
    EXPECT_EQ(dpr.Download(), per_rank);
    EXPECT_EQ(dpe.Download(), per_expert);
    EXPECT_EQ(dir.Download(), in_rank);

    // Permute: every row of x_perm is the token's row, bit for bit.
    std::vector<float> x = gputest::Normal(rng, T * H);
    auto xb = gputest::ToBf16(x);
    const int64_t rows = offsets[E];
    DeviceBuffer<uint16_t> dx(xb), dxp(std::max<int64_t>(rows, 1) * H);
    ASSERT_OK(cuda::Permute(dx.get(), T, H, dpos.get(), k, dxp.get(), nullptr));
    const auto xp = dxp.Download();
    for (int64_t i = 0; i < T * k; ++i) {
      if (pos[i] < 0) continue;
      ASSERT_EQ(0, std::memcmp(&xp[pos[i] * H], &xb[(i / k) * H], H * 2)) << "pair " << i;
    }

    // Combine: y[t] = sum_j w[t,j] * out[pos[t,j]], fresh and accumulated.
    std::vector<float> out = gputest::Normal(rng, std::max<int64_t>(rows, 1) * H);
    auto ob = gputest::ToBf16(out);
    std::vector<float> w = gputest::Normal(rng, T * k, 0.3f);
    std::vector<float> y0 = gputest::Normal(rng, T * H);
    auto y0b = gputest::ToBf16(y0);
    std::vector<float> ref(T * H, 0.0f), ref_acc(T * H);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        double s = 0;
        for (int64_t j = 0; j < k; ++j)
          if (pos[t * k + j] >= 0) s += static_cast<double>(w[t * k + j]) * out[pos[t * k + j] * H + h];
        ref[t * H + h] = static_cast<float>(s);
        ref_acc[t * H + h] = static_cast<float>(s + y0[t * H + h]);
      }
    }
    DeviceBuffer<uint16_t> dout(ob), dy(T * H), dy_acc(y0b);
    DeviceBuffer<float> dw(w);
    ASSERT_OK(cuda::Combine(dout.get(), dpos.get(), dw.get(), T, k, H, dy.get(), false, nullptr));
    ASSERT_OK(cuda::Combine(dout.get(), dpos.get(), dw.get(), T, k, H, dy_acc.get(), true, nullptr));
    EM_EXPECT_CLOSE(("Combine T=" + std::to_string(T)).c_str(), gputest::FromBf16(dy.Download()), ref, 1e-2);
    EM_EXPECT_CLOSE("Combine accumulate", gputest::FromBf16(dy_acc.Download()), ref_acc, 1e-2);
  }
}

// The routed experts end to end: Route, layout, permute, grouped experts,
// combine on the GPU against worker::RoutedExpertsAccumulate on the CPU.
void RunMoe(bool fp8) {
  auto ctx = MakeContext();
  ASSERT_NE(ctx, nullptr);
  auto rng = gputest::Rng();
  const int64_t T = 61, H = 1024, I = 512, E = 16, K = 4;
  worker::MoeWeights mw;
  mw.hidden = H;
  mw.expert_inter = I;
  mw.router_params.num_experts = E;
  mw.router_params.num_groups = 4;
  mw.router_params.topk_groups = 2;
  mw.router_params.top_k = K;
  mw.experts.resize(E);
  cuda::GroupedExpertWeights gw;
  gw.num_experts = E;
  gw.hidden = H;
  gw.inter = I;
  gw.fp8 = fp8;
  std::vector<std::unique_ptr<DeviceBuffer<uint16_t>>> bf;
  std::vector<std::unique_ptr<DeviceBuffer<uint8_t>>> q8;
  std::vector<std::unique_ptr<DeviceBuffer<float>>> sc;
  for (int64_t e = 0; e < E; ++e) {
    std::vector<float> gate_up = gputest::Normal(rng, 2 * I * H, 0.03f), down = gputest::Normal(rng, H * I, 0.03f);
    for (auto* m : {&gate_up, &down}) {
      const int64_t rows = m == &gate_up ? 2 * I : H, cols = m == &gate_up ? H : I;
      if (fp8) {  // the CPU gets the dequantised weights
        std::vector<uint8_t> q;
        std::vector<float> s;
        QuantizeFp8Blocks(m->data(), rows, cols, 128, 128, &q, &s);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c)
            (*m)[r * cols + c] = F8E4M3ToFloat(q[r * cols + c]) * s[(r / 128) * (cols / 128) + c / 128];
        q8.push_back(std::make_unique<DeviceBuffer<uint8_t>>(q));
        sc.push_back(std::make_unique<DeviceBuffer<float>>(s));
        // Load time: the checkpoint's 128x128 scales -> per-row scales.
        sc.push_back(std::make_unique<DeviceBuffer<float>>(static_cast<size_t>(cols / 128 * rows)));
        ASSERT_OK(cuda::ExpandFp8Scales(sc[sc.size() - 2]->get(), rows, cols, sc.back()->get(), nullptr));
        (m == &gate_up ? gw.gate_up : gw.down).push_back(q8.back()->get());
        (m == &gate_up ? gw.gate_up_scale : gw.down_scale).push_back(sc.back()->get());
      } else {
        auto b = gputest::ToBf16(*m);
        bf.push_back(std::make_unique<DeviceBuffer<uint16_t>>(b));
        (m == &gate_up ? gw.gate_up : gw.down).push_back(bf.back()->get());
      }
    }
    mw.experts[e] = worker::ExpertWeights::FromFloat(gate_up, down, H, I);
  }
  // Skewed logits: uneven expert loads, some experts empty or with odd counts.
  std::vector<float> logits = gputest::Normal(rng, T * E, 2.0f);
  for (int64_t t = 0; t < T; ++t) logits[t * E + 3] += 3.0f;
  for (int64_t t = 0; t < T; ++t) logits[t * E + 11] -= 8.0f;
  std::vector<float> x = gputest::Normal(rng, T * H);
  auto xb = gputest::ToBf16(x);
  std::vector<int32_t> ids(T * K);
  std::vector<float> wts(T * K);
  kernels::Route(logits.data(), nullptr, T, mw.router_params, ids.data(), wts.data());
  std::vector<float> ref(T * H, 0.0f);
  worker::RoutedExpertsAccumulate(mw, x.data(), T, ids.data(), wts.data(), K, ref.data());

  DeviceBuffer<float> dl(logits), dwts(T * K);
  DeviceBuffer<int32_t> dids(T * K), doff(E + 1), dpos(T * K);
  DeviceBuffer<uint16_t> dx(xb), dxp(T * K * H), dop(T * K * H), dy(T * H);
  ASSERT_OK(cuda::Route(dl.get(), nullptr, T, mw.router_params, dids.get(), dwts.get(), ctx->stream()));
  ASSERT_OK(cuda::ExpertLayout(*ctx, dids.get(), T, K, E, doff.get(), dpos.get()));
  ASSERT_OK(cuda::Permute(dx.get(), T, H, dpos.get(), K, dxp.get(), ctx->stream()));
  const auto off32 = doff.Download();
  std::vector<int64_t> off(off32.begin(), off32.end());
  ASSERT_OK(cuda::GroupedExperts(*ctx, gw, dxp.get(), off.data(), dop.get()));
  ASSERT_OK(cuda::Combine(dop.get(), dpos.get(), dwts.get(), T, K, H, dy.get(), false, ctx->stream()));
  ASSERT_OK(ctx->Synchronize());
  // Offsets read on the device (ExpertLayout's) give the same rows as uploaded ones.
  DeviceBuffer<uint16_t> dop2(T * K * H);
  ASSERT_OK(cuda::GroupedExperts(*ctx, gw, dxp.get(), off.data(), dop2.get(), doff.get()));
  const auto rows_a = dop.Download(), rows_b = dop2.Download();
  EXPECT_EQ(0, std::memcmp(rows_a.data(), rows_b.data(), off[E] * H * 2)) << "device offsets change the result";
  std::string counts;
  for (int64_t e = 0; e < E; ++e) counts += std::to_string(off[e + 1] - off[e]) + " ";
  std::printf("[ info      ] rows per expert: %s\n", counts.c_str());
  EM_EXPECT_CLOSE(fp8 ? "MoE routed experts fp8 (e2e)" : "MoE routed experts bf16 (e2e)",
                  gputest::FromBf16(dy.Download()), ref, fp8 ? 1e-1 : 2e-2);
}

TEST(GpuMoe, RoutedExpertsBf16MatchCpu) {
  EM_SKIP_WITHOUT_GPU();
  RunMoe(false);
}

TEST(GpuMoe, RoutedExpertsFp8MatchCpu) {
  EM_SKIP_WITHOUT_GPU();
  RunMoe(true);
}

}  // namespace
}  // namespace expertmesh
