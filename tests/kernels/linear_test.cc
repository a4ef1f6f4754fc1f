// kernels::Linear on fp32 / bf16 / fp8 (128 x 128 block-scaled) weights
// against a naive double-precision product with the dequantised weight, for
// every instruction set this CPU has (scalar, AVX2, AVX-512), at the top level
// (parallel over the pool) and inside pool tasks (single-threaded), M from 0
// to 300 (register-blocked and SGEMM paths), K and N not multiples of 8 / 16
// / 128 (partial fp8 blocks), with and without accumulate.
//
// Tolerance: |y - ref| <= 1e-5 * sqrt(K) * sum_k |x_k w_k| + 1e-30 (fp32
// sums in another order than the reference's; the conversion of the weight
// to fp32 is exact, which ExactConversion checks bit for bit).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/thread_pool.h"
#include "gtest/gtest.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cpu/weight.h"

namespace expertmesh::kernels {
namespace {

// E4M3 "fn" from its definition (bias 7, exponent 0 subnormal, S.1111.111 NaN).
double E4M3(int code) {
  const int s = code >> 7, e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return NAN;
  const double v = e == 0 ? m / 8.0 * std::ldexp(1.0, -6) : (1 + m / 8.0) * std::ldexp(1.0, e - 7);
  return s ? -v : v;
}

std::vector<std::string> Isas() {
  std::vector<std::string> out;
  for (const char* isa : {"scalar", "avx2", "avx512"}) {
    if (SetLinearIsa(isa)) out.push_back(isa);
  }
  SetLinearIsa("auto");
  return out;
}

Weight RandomWeight(DType t, int64_t N, int64_t K, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  if (t == DType::kF32) {
    std::vector<float> v(static_cast<size_t>(N * K));
    for (auto& f : v) f = u(rng);
    return Weight::FromFloat(std::move(v), N, K);
  }
  if (t == DType::kBF16) {
    std::vector<uint16_t> v(static_cast<size_t>(N * K));
    for (auto& b : v) b = FloatToBf16(u(rng));
    return Weight::FromBytes(t, v.data(), N, K);
  }
  std::vector<uint8_t> v(static_cast<size_t>(N * K));
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& b : v) {
    do {
      b = static_cast<uint8_t>(byte(rng));
    } while ((b & 0x7f) == 0x7f);  // no NaN
  }
  std::vector<float> scales(static_cast<size_t>(((N + 127) / 128) * ((K + 127) / 128)));
  std::uniform_real_distribution<float> s(0.001f, 0.02f);
  for (auto& f : scales) f = s(rng);
  return Weight::FromBytes(t, v.data(), N, K, std::move(scales));
}

// y0 is the output before the call (accumulate adds to it).
void ExpectClose(const std::vector<float>& x, int64_t M, int64_t K, const std::vector<float>& wf, int64_t N,
                 const std::vector<float>& y0, const std::vector<float>& y, bool acc, const std::string& what) {
  int bad = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double ref = acc ? y0[static_cast<size_t>(m * N + n)] : 0.0, mag = std::fabs(ref);
      for (int64_t k = 0; k < K; ++k) {
        const double p = static_cast<double>(x[static_cast<size_t>(m * K + k)]) * wf[static_cast<size_t>(n * K + k)];
        ref += p;
        mag += std::fabs(p);
      }
      const double got = y[static_cast<size_t>(m * N + n)];
      const double tol = 1e-5 * std::sqrt(static_cast<double>(K)) * mag + 1e-30;
      if (!(std::fabs(got - ref) <= tol) && ++bad <= 5) {
        ADD_FAILURE() << what << " y[" << m << "," << n << "] = " << got << " vs " << ref << " (tol " << tol << ")";
      }
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

TEST(Linear, MatchesDoubleReference) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{133, 301}, {260, 17}, {37, 129}, {9, 1000}};
  for (const std::string& isa : Isas()) {
    ASSERT_TRUE(SetLinearIsa(isa));
    for (DType t : {DType::kF32, DType::kBF16, DType::kF8E4M3}) {
      for (auto [N, K] : shapes) {
        const Weight w = RandomWeight(t, N, K, rng);
        const std::vector<float> wf = w.ToFloat();
        for (int64_t M : {0, 1, 2, 3, 7, 8, 16, 17, 64, 300}) {
          if (M == 300 && K == 1000) continue;  // keeps the double reference short
          std::vector<float> x(static_cast<size_t>(M * K));
          for (auto& f : x) f = u(rng);
          for (bool acc : {false, true}) {
            for (bool in_task : {false, true}) {
              std::vector<float> y0(static_cast<size_t>(M * N));
              for (auto& f : y0) f = u(rng);
              std::vector<float> y = y0;
              if (in_task) {
                // Two tasks, each its own Linear (single-threaded, own scratch).
                std::vector<float> y2 = y0;
                ThreadPool::Default().ParallelFor(2, 1, [&](int64_t b, int64_t, int) {
                  Linear(x.data(), M, K, w, b == 0 ? y.data() : y2.data(), acc);
                });
                ASSERT_EQ(y, y2);
              } else {
                Linear(x.data(), M, K, w, y.data(), acc);
              }
              ExpectClose(x, M, K, wf, N, y0, y, acc,
                          isa + " " + DTypeName(t) + " M=" + std::to_string(M) + " N=" + std::to_string(N) +
                              " K=" + std::to_string(K) + (acc ? " acc" : "") + (in_task ? " in task" : ""));
              if (t == DType::kF32 && !acc) {
                // The raw-pointer overloads take the same kernels.
                std::vector<float> y3(static_cast<size_t>(M * N), 5.0f);
                Linear(x.data(), M, K, wf.data(), N, y3.data());
                ExpectClose(x, M, K, wf, N, y0, y3, false, "float* " + isa);
                if (M <= kLinearFewRowsMax) {
                  std::vector<float> y4(static_cast<size_t>(M * N), 5.0f);
                  LinearFewRows(x.data(), M, K, wf.data(), N, y4.data());
                  EXPECT_EQ(y4, y3) << "LinearFewRows " << isa;
                }
              }
            }
          }
        }
      }
    }
  }
  SetLinearIsa("auto");
}

// The bf16 / fp8 kernels convert exactly: the same values as Linear on the
// dequantised fp32 weight, bit for bit (same kernel after the conversion),
// and an identity x returns every fp8 code times its block scale.
TEST(Linear, ExactConversion) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (const std::string& isa : Isas()) {
    ASSERT_TRUE(SetLinearIsa(isa));
    for (DType t : {DType::kBF16, DType::kF8E4M3}) {
      const int64_t N = 150, K = 259;
      const Weight w = RandomWeight(t, N, K, rng);
      const Weight wf = Weight::FromFloat(w.ToFloat(), N, K);
      for (int64_t M : {1, 5, 64}) {
        std::vector<float> x(static_cast<size_t>(M * K));
        for (auto& f : x) f = u(rng);
        std::vector<float> a(static_cast<size_t>(M * N)), b(a.size());
        Linear(x.data(), M, K, w, a.data());
        Linear(x.data(), M, K, wf, b.data());
        EXPECT_EQ(a, b) << isa << " " << DTypeName(t) << " M=" << M;
      }
    }
    // All 254 non-NaN fp8 codes in each row (rotated per row; NaN codes
    // become 0, as 0 * NaN would spread them), 130 rows (2 row blocks of
    // scales), 256 columns (2 column blocks).
    const int64_t N = 130, K = 256;
    auto code_at = [](int64_t r, int64_t c) {
      const int code = static_cast<int>((c + r) & 255);
      return (code & 0x7f) == 0x7f ? 0 : code;
    };
    std::vector<uint8_t> codes(static_cast<size_t>(N * K));
    for (int64_t r = 0; r < N; ++r) {
      for (int64_t c = 0; c < K; ++c) codes[static_cast<size_t>(r * K + c)] = static_cast<uint8_t>(code_at(r, c));
    }
    const std::vector<float> scales = {0.5f, 3.0f, 0.01171875f, 1.0f};
    const Weight w = Weight::FromBytes(DType::kF8E4M3, codes.data(), N, K, scales);
    for (int64_t M : {int64_t{64}, K}) {  // register-blocked and SGEMM paths
      std::vector<float> x(static_cast<size_t>(M * K), 0.0f);
      for (int64_t m = 0; m < M; ++m) x[static_cast<size_t>(m * K + m)] = 1.0f;
      std::vector<float> y(static_cast<size_t>(M * N));
      Linear(x.data(), M, K, w, y.data());
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = 0; n < N; ++n) {
          const int code = code_at(n, m);
          const double want = E4M3(code) * scales[static_cast<size_t>((n / 128) * 2 + m / 128)];
          EXPECT_EQ(y[static_cast<size_t>(m * N + n)], static_cast<float>(want)) << isa << " code " << code;
        }
      }
    }
    // The same codes through the decode-sized path (fp8 decoded in register
    // on AVX-512): 4 one-hot rows at a time over every column.
    for (int64_t c0 = 0; c0 < K; c0 += 4) {
      const int64_t M = 4;
      std::vector<float> x(static_cast<size_t>(M * K), 0.0f);
      for (int64_t m = 0; m < M; ++m) x[static_cast<size_t>(m * K + c0 + m)] = 1.0f;
      std::vector<float> y(static_cast<size_t>(M * N));
      Linear(x.data(), M, K, w, y.data());
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = 0; n < N; ++n) {
          const int64_t c = c0 + m;
          const int code = code_at(n, c);
          const double want = E4M3(code) * scales[static_cast<size_t>((n / 128) * 2 + c / 128)];
          EXPECT_EQ(y[static_cast<size_t>(m * N + n)], static_cast<float>(want)) << isa << " M=4 code " << code;
        }
      }
    }
    // NaN codes decode as NaN.
    for (uint8_t nan_code : {uint8_t{0x7f}, uint8_t{0xff}}) {
      const std::vector<uint8_t> row(20, nan_code);
      const Weight wn = Weight::FromBytes(DType::kF8E4M3, row.data(), 1, 20, {1.0f});
      const std::vector<float> x(20, 1.0f);
      float y = 0;
      Linear(x.data(), 1, 20, wn, &y);
      EXPECT_TRUE(std::isnan(y)) << isa;
    }
  }
  SetLinearIsa("auto");
}

TEST(Linear, IsaNames) {
  EXPECT_TRUE(SetLinearIsa("scalar"));
  EXPECT_EQ(LinearIsa(), "scalar");
  EXPECT_FALSE(SetLinearIsa("sse9"));
  EXPECT_EQ(LinearIsa(), "scalar");
  EXPECT_TRUE(SetLinearIsa("auto"));
}

}  // namespace
}  // namespace expertmesh::kernels
