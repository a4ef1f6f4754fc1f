// kernels/cuda/engine_ops.h against the CPU kernels on fresh random data
// (seed printed; EM_TEST_SEED replays it). Skips with one line without a GPU.
//
// Tolerances (relative L2 error against the CPU in fp32 on the same inputs):
//   fp32 math .................................... 1e-5
//   fp8 weights, fp32 activations ................ 1e-5 (the CPU side uses the
//                                                  same dequantised weights)
//   bf16 activations / weights ................... 2e-2 (rounded inputs and
//                                                  outputs, 2^-9 each)
//   moves, gathers, adds ......................... exact
#include "kernels/cuda/engine_ops.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "common/checkpoint.h"
#include "common/config.h"
#include "common/dtype.h"
#include "kernels/cpu/kernels.h"
#include "tests/common/status_matchers.h"
#include "worker/cuda_engine.h"
#include "worker/moe.h"

namespace expertmesh::kernels::cuda {
namespace {

#define EM_SKIP_WITHOUT_CUDA()                    \
  do {                                            \
    std::string em_why_;                          \
    if (!worker::CudaEngineAvailable(&em_why_)) { \
      GTEST_SKIP() << em_why_;                    \
    }                                             \
  } while (0)

uint64_t Seed() {
  static uint64_t seed = [] {
    const char* e = std::getenv("EM_TEST_SEED");
    const uint64_t s = e != nullptr ? std::strtoull(e, nullptr, 10) : std::random_device{}();
    std::printf("[ engine ops ] random seed %llu (EM_TEST_SEED replays it)\n", static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

std::vector<float> Randn(std::mt19937_64& rng, size_t n, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

std::vector<float> RoundBf16(std::vector<float> v) {
  for (auto& x : v) x = Bf16ToFloat(FloatToBf16(x));
  return v;
}

double RelErr(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(got[i])) return INFINITY;
    num += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// A device buffer, poisoned with NaN bytes when created (unwritten outputs fail).
struct Dev {
  void* p = nullptr;
  size_t bytes = 0;
  explicit Dev(size_t n) : bytes(std::max<size_t>(n, 4)) {
    EXPECT_EQ(cudaMalloc(&p, bytes), cudaSuccess);
    cudaMemset(p, 0xff, bytes);
  }
  template <typename T>
  explicit Dev(const std::vector<T>& v) : Dev(v.size() * sizeof(T)) {
    cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  ~Dev() { cudaFree(p); }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p);
  }
  template <typename T>
  std::vector<T> get(size_t n) const {
    std::vector<T> v(n);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }
};

std::vector<uint16_t> ToBf16Bits(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = FloatToBf16(v[i]);
  return b;
}
std::vector<float> FromBf16Bits(const std::vector<uint16_t>& b) {
  std::vector<float> v(b.size());
  for (size_t i = 0; i < b.size(); ++i) v[i] = Bf16ToFloat(b[i]);
  return v;
}

TEST(EngineOps, GemmF32MatchesLinear) {
  EM_SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(Seed() + 1);
  for (auto [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{1, 80, 160}, {37, 1024, 96}, {130, 65, 24}}) {
    for (bool kn : {false, true}) {
      for (bool acc : {false, true}) {
        const auto x = Randn(rng, M * K), w = Randn(rng, N * K), y0 = Randn(rng, M * N);
        std::vector<float> wt = w;  // [N, K] as given, or its transpose [K, N]
        if (kn) {
          for (int64_t n = 0; n < N; ++n) {
            for (int64_t k = 0; k < K; ++k) wt[k * N + n] = w[n * K + k];
          }
        }
        std::vector<float> want = y0;
        kernels::Linear(x.data(), M, K, w.data(), N, want.data(), acc);
        Dev dx(x), dw(wt), dy(y0);
        GemmF32Args a;
        a.x = dx.as<float>();
        a.ldx = K;
        a.w = dw.as<float>();
        a.ldw = kn ? N : K;
        a.w_kn = kn;
        a.y = dy.as<float>();
        a.ldy = N;
        a.M = M;
        a.N = N;
        a.K = K;
        a.accumulate = acc;
        ASSERT_OK(GemmF32(a, nullptr));
        EXPECT_LE(RelErr(dy.get<float>(M * N), want), 1e-5) << M << "x" << N << "x" << K << " kn=" << kn;
      }
    }
  }
}

// MLA decode over a paged fp32 cache (pages shuffled) vs the CPU's absorbed form.
TEST(EngineOps, MlaDecodeF32MatchesAbsorbed) {
  EM_SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(Seed() + 2);
  const ModelConfig cfg = *ModelConfig::Preset("tiny");
  const kernels::MlaShape s = kernels::MlaShape::FromConfig(cfg);
  const int64_t H = s.heads, L = s.kv_lora, R = s.rope, dn = s.nope, dv = s.v, D = L + R, P = 16;
  const std::vector<int64_t> lens = {1, 17, 40};
  const int64_t q_len = 1, B = static_cast<int64_t>(lens.size()), MP = 3;
  const auto w_kv_b = Randn(rng, H * (dn + dv) * L, 0.1f);
  std::vector<int32_t> table(B * MP);
  for (int64_t i = 0; i < B * MP; ++i) table[i] = static_cast<int32_t>((i * 5 + 3) % (B * MP));  // a permutation
  std::vector<float> cache(B * MP * P * D, 0.0f), q_abs(B * q_len * H * D), want(B * H * dv);
  std::vector<int32_t> seq_lens;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t S = lens[b];
    seq_lens.push_back(static_cast<int32_t>(S));
    const auto lat = Randn(rng, S * L), kpe = Randn(rng, S * R), q = Randn(rng, H * (dn + R));
    for (int64_t j = 0; j < S; ++j) {
      float* row = cache.data() + (table[b * MP + j / P] * P + j % P) * D;
      std::copy(lat.begin() + j * L, lat.begin() + (j + 1) * L, row);
      std::copy(kpe.begin() + j * R, kpe.begin() + (j + 1) * R, row + L);
    }
    // The absorbed query on the host: q_abs[h] = [q_nope[h] . W_uk[h], q_pe[h]].
    for (int64_t h = 0; h < H; ++h) {
      float* qa = q_abs.data() + (b * H + h) * D;
      for (int64_t l = 0; l < L; ++l) {
        double acc = 0;
        for (int64_t i = 0; i < dn; ++i) acc += q[h * (dn + R) + i] * w_kv_b[(h * (dn + dv) + i) * L + l];
        qa[l] = static_cast<float>(acc);
      }
      for (int64_t i = 0; i < R; ++i) qa[L + i] = q[h * (dn + R) + dn + i];
    }
    std::vector<float> scratch(H * (2 * L + S));
    kernels::MlaAbsorbed(s, q.data(), 1, lat.data(), kpe.data(), S, w_kv_b.data(), want.data() + b * H * dv,
                         scratch.data());
  }
  Dev dq(q_abs), dc(cache), dt(table), dl(seq_lens), dout(B * H * L * 4);
  MlaDecodeF32Params p;
  p.q = dq.as<float>();
  p.kv_cache = dc.as<float>();
  p.block_table = dt.as<int32_t>();
  p.seq_lens = dl.as<int32_t>();
  p.out = dout.as<float>();
  p.batch = B;
  p.q_len = q_len;
  p.heads = H;
  p.kv_lora = L;
  p.rope = R;
  p.page_size = P;
  p.max_pages = MP;
  p.softmax_scale = s.softmax_scale;
  ASSERT_OK(MlaDecodeF32(p, nullptr));
  const auto o_lat = dout.get<float>(B * H * L);
  std::vector<float> got(B * H * dv);  // out[h] = o_lat[h] . W_uv[h]^T on the host
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t v = 0; v < dv; ++v) {
        double acc = 0;
        for (int64_t l = 0; l < L; ++l) acc += o_lat[(b * H + h) * L + l] * w_kv_b[(h * (dn + dv) + dn + v) * L + l];
        got[(b * H + h) * dv + v] = static_cast<float>(acc);
      }
    }
  }
  EXPECT_LE(RelErr(got, want), 1e-5);
}

TEST(EngineOps, KvAppendNormsAndRotates) {
  EM_SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(Seed() + 3);
  const ModelConfig cfg = *ModelConfig::Preset("tiny");
  const kernels::Rope rope(cfg);
  const int64_t L = cfg.kv_lora_rank, R = cfg.qk_rope_head_dim, D = L + R, T = 5, rows = 64;
  const auto kv = Randn(rng, T * D), w = Randn(rng, L);
  const std::vector<int32_t> pos = {0, 7, 129, 4000, 33}, slots = {9, 0, 63, 12, 40};
  for (Act act : {Act::kF32, Act::kBf16}) {
    const bool bf = act == Act::kBf16;
    const std::vector<float> in = bf ? RoundBf16(kv) : kv;
    std::vector<float> want(rows * D, 0.0f);
    for (int64_t t = 0; t < T; ++t) {
      float* row = want.data() + slots[t] * D;
      kernels::RmsNorm(in.data() + t * D, 1, L, w.data(), 1e-6f, row);
      std::copy(in.begin() + t * D + L, in.begin() + (t + 1) * D, row + L);
      rope.Apply(row + L, 1, R, pos[t]);
    }
    Dev dkv(bf ? rows * D * 2 : rows * D * 4), dw(w), dp(pos), ds(slots), dc(rows * D * (bf ? 2 : 4));
    if (bf) {
      cudaMemcpy(dkv.p, ToBf16Bits(in).data(), T * D * 2, cudaMemcpyHostToDevice);
    } else {
      cudaMemcpy(dkv.p, in.data(), T * D * 4, cudaMemcpyHostToDevice);
    }
    cudaMemset(dc.p, 0, dc.bytes);
    Dev freq(rope.inv_freq());
    KvAppendArgs a;
    a.kv = dkv.p;
    a.type = act;
    a.T = T;
    a.L = L;
    a.R = R;
    a.norm_w = dw.as<float>();
    a.positions = dp.as<int32_t>();
    a.slots = ds.as<int32_t>();
    a.inv_freq = freq.as<double>();
    a.cache = dc.p;
    ASSERT_OK(KvAppend(a, nullptr));
    const std::vector<float> got = bf ? FromBf16Bits(dc.get<uint16_t>(rows * D)) : dc.get<float>(rows * D);
    EXPECT_LE(RelErr(got, want), bf ? 1e-2 : 1e-6) << (bf ? "bf16" : "fp32");
  }
}

TEST(EngineOps, RowNormGatherStridesAndTypes) {
  EM_SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(Seed() + 4);
  const int64_t H = 160, xs = 176, ys = 168, n = 3;
  const auto x = Randn(rng, 7 * xs, 3.0f), w = Randn(rng, H);
  const std::vector<int32_t> rows = {6, 0, 3};
  std::vector<float> want(n * ys, 0.0f);
  for (int64_t r = 0; r < n; ++r)
    kernels::RmsNorm(x.data() + rows[r] * xs, 1, H, w.data(), 1e-6f, want.data() + r * ys);
  Dev dx(x), dw(w), dr(rows), dy(n * ys * 4);
  cudaMemset(dy.p, 0, dy.bytes);
  for (Act yt : {Act::kF32, Act::kBf16}) {
    RowNormArgs a;
    a.x = dx.p;
    a.x_type = Act::kF32;
    a.x_stride = xs;
    a.rows = dr.as<int32_t>();
    a.n = n;
    a.H = H;
    a.w = dw.as<float>();
    a.y = dy.p;
    a.y_type = yt;
    a.y_stride = ys;
    ASSERT_OK(RowRmsNorm(a, nullptr));
    std::vector<float> got = yt == Act::kF32 ? dy.get<float>(n * ys) : FromBf16Bits(dy.get<uint16_t>(n * ys));
    for (int64_t r = 0; r < n; ++r) std::fill(got.begin() + r * ys + H, got.begin() + (r + 1) * ys, 0.0f);
    EXPECT_LE(RelErr(got, want), yt == Act::kF32 ? 1e-6 : 1e-2);
  }
}

// Grouped SwiGLU experts with device offsets vs the CPU's RunExpert.
TEST(EngineOps, GroupedSwiGluFfnMatchesRunExpert) {
  EM_SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(Seed() + 5);
  const int64_t E = 5, H = 256, I = 128;
  const std::vector<int32_t> offsets = {0, 3, 3, 12, 13, 20};  // expert 1 empty, expert 2 with 9 rows (two passes of 8)
  const int64_t rows = offsets[E];
  struct CpuExpert {
    std::vector<float> gate_up, down;
  };
  std::vector<CpuExpert> cpu(E);
  std::vector<std::vector<uint8_t>> q_gu(E), q_d(E);
  std::vector<std::vector<float>> s_gu(E), s_d(E);
  for (int64_t e = 0; e < E; ++e) {
    // fp8 block-quantised weights; the CPU uses their exact dequantisation.
    const auto gu = Randn(rng, 2 * I * H, 0.06f), d = Randn(rng, H * I, 0.08f);
    QuantizeFp8Blocks(gu.data(), 2 * I, H, 128, 128, &q_gu[e], &s_gu[e]);
    QuantizeFp8Blocks(d.data(), H, I, 128, 128, &q_d[e], &s_d[e]);
    auto deq = [](const std::vector<uint8_t>& q, const std::vector<float>& s, int64_t r, int64_t c) {
      std::vector<float> v(r * c);
      for (int64_t i = 0; i < r; ++i) {
        for (int64_t j = 0; j < c; ++j)
          v[i * c + j] = F8E4M3ToFloat(q[i * c + j]) * s[(i / 128) * ((c + 127) / 128) + j / 128];
      }
      return v;
    };
    cpu[e].gate_up = deq(q_gu[e], s_gu[e], 2 * I, H);
    cpu[e].down = deq(q_d[e], s_d[e], H, I);
  }
  const auto x = Randn(rng, rows * H);
  for (WType wt : {WType::kF32, WType::kBf16, WType::kFp8}) {
    for (Act act : {Act::kF32, Act::kBf16}) {
      const bool bw = wt == WType::kBf16, ba = act == Act::kBf16;
      // The CPU on the inputs the GPU sees (weights / activations rounded as stored).
      std::vector<float> want(rows * H), xin = ba ? RoundBf16(x) : x;
      std::vector<std::unique_ptr<Dev>> keep;
      std::vector<const void*> p_gu(E), p_d(E);
      std::vector<const float*> p_sgu(E, nullptr), p_sd(E, nullptr);
      for (int64_t e = 0; e < E; ++e) {
        CpuExpert ew = cpu[e];
        if (bw) {
          ew.gate_up = RoundBf16(ew.gate_up);
          ew.down = RoundBf16(ew.down);
        }
        const int64_t n = offsets[e + 1] - offsets[e];
        std::vector<float> scratch(std::max<int64_t>(n, 1) * 3 * I);
        worker::RunExpert(worker::ExpertWeights::FromFloat(ew.gate_up, ew.down, H, I), H, I, xin.data() + offsets[e] * H,
                          n, want.data() + offsets[e] * H, scratch.data());
        if (wt == WType::kFp8) {
          keep.push_back(std::make_unique<Dev>(q_gu[e]));
          p_gu[e] = keep.back()->p;
          keep.push_back(std::make_unique<Dev>(q_d[e]));
          p_d[e] = keep.back()->p;
          keep.push_back(std::make_unique<Dev>(s_gu[e]));
          p_sgu[e] = keep.back()->as<float>();
          keep.push_back(std::make_unique<Dev>(s_d[e]));
          p_sd[e] = keep.back()->as<float>();
        } else if (bw) {
          keep.push_back(std::make_unique<Dev>(ToBf16Bits(ew.gate_up)));
          p_gu[e] = keep.back()->p;
          keep.push_back(std::make_unique<Dev>(ToBf16Bits(ew.down)));
          p_d[e] = keep.back()->p;
        } else {
          keep.push_back(std::make_unique<Dev>(ew.gate_up));
          p_gu[e] = keep.back()->p;
          keep.push_back(std::make_unique<Dev>(ew.down));
          p_d[e] = keep.back()->p;
        }
      }
      if (ba) want = RoundBf16(want);
      Dev d_gu(p_gu), d_d(p_d), d_sgu(p_sgu), d_sd(p_sd), d_off(offsets);
      Dev dx(ba ? rows * H * 2 : rows * H * 4), dact(rows * I * 4), dout(rows * H * 4);
      if (ba) {
        cudaMemcpy(dx.p, ToBf16Bits(xin).data(), rows * H * 2, cudaMemcpyHostToDevice);
      } else {
        cudaMemcpy(dx.p, xin.data(), rows * H * 4, cudaMemcpyHostToDevice);
      }
      GroupedFfnArgs a;
      a.num_experts = E;
      a.H = H;
      a.I = I;
      a.w_type = wt;
      a.gate_up = d_gu.as<const void*>();
      a.down = d_d.as<const void*>();
      a.gate_up_scale = d_sgu.as<const float*>();
      a.down_scale = d_sd.as<const float*>();
      a.offsets = d_off.as<int32_t>();
      a.max_rows = rows;
      a.act = act;
      a.x_perm = dx.p;
      a.act_buf = dact.p;
      a.out_perm = dout.p;
      ASSERT_OK(GroupedSwiGluFfn(a, nullptr));
      const std::vector<float> got = ba ? FromBf16Bits(dout.get<uint16_t>(rows * H)) : dout.get<float>(rows * H);
      const double tol = ba || bw ? 2e-2 : 1e-5;
      EXPECT_LE(RelErr(got, want), tol) << "weights " << static_cast<int>(wt) << " activations "
                                        << (ba ? "bf16" : "fp32");
    }
  }
}

TEST(EngineOps, MovesGathersAndAdds) {
  EM_SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(Seed() + 6);
  const int64_t T = 4, k = 3, H = 24, V = 10;
  const auto x = Randn(rng, T * H), table = Randn(rng, V * H), rowsv = Randn(rng, 6 * H), y0 = Randn(rng, T * H);
  const std::vector<int32_t> pos = {4, -1, 0, 1, 7, 2, -1, -1, 3, 5, 6, 8}, ids = {9, 0, 3, 3};
  const std::vector<float> wts = {0.5f, 1.0f, 0.25f, 2.0f, -1.0f, 0.125f, 1.0f, 1.0f, 3.0f, 0.5f, 0.5f, 0.5f};
  // Permute, then CombineAdd back with the weights.
  Dev dx(x), dp(pos), dperm(9 * H * 4), dw(wts), dy(y0);
  ASSERT_OK(PermuteF32(dx.as<float>(), T, H, dp.as<int32_t>(), k, dperm.as<float>(), nullptr));
  const auto perm = dperm.get<float>(9 * H);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      if (pos[t * k + j] < 0) continue;
      for (int64_t h = 0; h < H; ++h) ASSERT_EQ(perm[pos[t * k + j] * H + h], x[t * H + h]);
    }
  }
  ASSERT_OK(CombineAddF32(dperm.p, Act::kF32, dp.as<int32_t>(), dw.as<float>(), T, k, H, dy.as<float>(), nullptr));
  const auto y = dy.get<float>(T * H);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      float acc = 0;
      for (int64_t j = 0; j < k; ++j) {
        if (pos[t * k + j] >= 0) acc += wts[t * k + j] * x[t * H + h];
      }
      ASSERT_NEAR(y[t * H + h], y0[t * H + h] + acc, 1e-5f);
    }
  }
  // Embedding into fp32, gather, per-token record sums.
  Dev dt(table), di(ids), de(T * H * 4);
  ASSERT_OK(EmbedRowsF32(dt.p, Act::kF32, H, di.as<int32_t>(), T, de.as<float>(), nullptr));
  const auto emb = de.get<float>(T * H);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) ASSERT_EQ(emb[t * H + h], table[ids[t] * H + h]);
  }
  Dev dg(T * H * 4);
  ASSERT_OK(GatherRows(dt.p, Act::kF32, H, di.as<int32_t>(), T, dg.p, nullptr));
  EXPECT_EQ(dg.get<float>(T * H), emb);
  const std::vector<int32_t> start = {0, 2, 2, 5, 6}, rec = {5, 0, 1, 3, 2, 4};
  Dev dr(rowsv), dst(start), drec(rec), dy2(y0);
  ASSERT_OK(AddRecordRows(dr.as<float>(), H, dst.as<int32_t>(), drec.as<int32_t>(), T, dy2.as<float>(), nullptr));
  const auto y2 = dy2.get<float>(T * H);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      float acc = 0;
      for (int32_t r = start[t]; r < start[t + 1]; ++r) acc += rowsv[rec[r] * H + h];
      ASSERT_NEAR(y2[t * H + h], y0[t * H + h] + acc, 1e-5f);
    }
  }
  Dev da(x), dsum(y0);
  ASSERT_OK(AddInto(da.p, Act::kF32, T * H, dsum.as<float>(), nullptr));
  const auto s = dsum.get<float>(T * H);
  for (int64_t i = 0; i < T * H; ++i) ASSERT_EQ(s[i], y0[i] + x[i]);
}

}  // namespace
}  // namespace expertmesh::kernels::cuda
