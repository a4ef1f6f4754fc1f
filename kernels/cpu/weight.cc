#include "kernels/cpu/weight.h"

#include <cblas.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "common/thread_pool.h"
#include "glog/logging.h"
#include "kernels/cpu/kernels.h"

namespace expertmesh::kernels {

namespace {
constexpr int64_t kBlock = 128;  // fp8 scale block
}

Weight Weight::FromFloat(std::vector<float> values, int64_t rows, int64_t cols) {
  CHECK_EQ(static_cast<int64_t>(values.size()), rows * cols);
  auto owned = std::make_shared<std::vector<float>>(std::move(values));
  Weight w;
  w.dtype_ = DType::kF32;
  w.rows_ = rows;
  w.cols_ = cols;
  w.data_ = owned->data();
  w.storage_ = owned;
  return w;
}

Weight Weight::FromBytes(DType dtype, const void* data, int64_t rows, int64_t cols, std::vector<float> scale_inv) {
  const size_t n = static_cast<size_t>(rows * cols) * DTypeSize(dtype);
  auto owned = std::make_shared<std::vector<uint8_t>>(static_cast<const uint8_t*>(data),
                                                      static_cast<const uint8_t*>(data) + n);
  Weight w;
  w.dtype_ = dtype;
  w.rows_ = rows;
  w.cols_ = cols;
  w.data_ = owned->data();
  w.storage_ = owned;
  if (!scale_inv.empty()) {
    w.owned_scales_ = std::make_shared<const std::vector<float>>(std::move(scale_inv));
    w.scale_inv_ = w.owned_scales_->data();
  }
  CHECK(dtype != DType::kF8E4M3 || w.scale_inv_ != nullptr) << "fp8 weight without scale_inv";
  return w;
}

Weight Weight::Mapped(DType dtype, const void* data, int64_t rows, int64_t cols, std::shared_ptr<const void> keep_alive,
                      const float* scale_inv) {
  Weight w;
  w.dtype_ = dtype;
  w.rows_ = rows;
  w.cols_ = cols;
  w.data_ = data;
  w.storage_ = std::move(keep_alive);
  w.scale_inv_ = scale_inv;
  CHECK(dtype != DType::kF8E4M3 || w.scale_inv_ != nullptr) << "fp8 weight without scale_inv";
  return w;
}

size_t Weight::bytes() const {
  size_t b = static_cast<size_t>(rows_ * cols_) * DTypeSize(dtype_);
  if (dtype_ == DType::kF8E4M3) {
    b += static_cast<size_t>(((rows_ + kBlock - 1) / kBlock) * ((cols_ + kBlock - 1) / kBlock)) * sizeof(float);
  }
  return b;
}

void Weight::DequantizeRows(int64_t r0, int64_t r1, float* out) const {
  const int64_t n = (r1 - r0) * cols_;
  const uint8_t* base = static_cast<const uint8_t*>(data_) + static_cast<size_t>(r0 * cols_) * DTypeSize(dtype_);
  ConvertToFloat(dtype_, base, static_cast<size_t>(n), out);
  if (dtype_ == DType::kF8E4M3) {
    const int64_t bc = (cols_ + kBlock - 1) / kBlock;
    for (int64_t r = r0; r < r1; ++r) {
      float* o = out + (r - r0) * cols_;
      const float* s = scale_inv_ + (r / kBlock) * bc;
      for (int64_t c = 0; c < cols_; ++c) o[c] *= s[c / kBlock];
    }
  }
}

std::vector<float> Weight::ToFloat() const {
  std::vector<float> out(static_cast<size_t>(rows_ * cols_));
  DequantizeRows(0, rows_, out.data());
  return out;
}

// ---- Linear -----------------------------------------------------------------
//
// Three paths, all fp32 activations and fp32 accumulation:
//  * M <= kMicroMaxRows (decode, MoE experts with a few tokens): tiles of 4
//    rows of w; an fp32 weight is read in place, a bf16 / fp8 tile is first
//    converted to fp32 in a per-thread scratch that stays in L1 (exact: the
//    same values as DequantizeRows), then a register-blocked kernel computes
//    4 rows x (4 AVX-512 | 3 AVX2 | 1 scalar) tokens at a time as dot products
//    over K. w is read from memory once per call.
//  * larger M (prefill): blocks of rows of w (converted to fp32 scratch when
//    not fp32) times x by BLAS SGEMM (single-threaded: the pool is the only
//    set of compute threads) into the matching columns of y (ldc = N).
//  * both parallel over blocks of rows of w on the pool at the top level,
//    inline on the calling thread inside a pool task.

namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EM_X86_DISPATCH 1
#define EM_AVX2 __attribute__((target("avx2,fma")))
#define EM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#endif

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa DetectIsa() {
#ifdef EM_X86_DISPATCH
  const bool fma = __builtin_cpu_supports("fma");
  if (fma && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return Isa::kAvx512;
  }
  if (fma && __builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

std::atomic<int> g_isa{-1};

Isa CurrentIsa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(DetectIsa());
    g_isa.store(v, std::memory_order_relaxed);
  }
  return static_cast<Isa>(v);
}

constexpr int64_t kTileRows = 4;        // rows of w per register tile (and per converted tile)
constexpr int64_t kMicroMaxRows = 64;   // largest M of the register-blocked path
constexpr int64_t kMinChunkBytes = 64 << 10;  // of weight per parallel chunk
constexpr int64_t kFusedBf16MaxRows = 8;       // bf16 read in place (AVX-512) up to this M
constexpr int64_t kFusedF8MaxRows = 4;         // fp8 decoded in register (AVX-512) up to this M (one
                                               // pass over x; above, a converted tile is reused)

// ---- fp32 register-blocked kernels: y[m, r] (+)= x[m, :] . w[r, :] ----------

// Scalar: rows x M dot products, four partial sums each.
void MicroScalar(const float* x, int64_t M, int64_t K, const float* w, int64_t rows, float* y, int64_t ldy,
                 bool acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* wr = w + r * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      int64_t k = 0;
      for (; k + 4 <= K; k += 4) {
        s0 += wr[k] * xm[k];
        s1 += wr[k + 1] * xm[k + 1];
        s2 += wr[k + 2] * xm[k + 2];
        s3 += wr[k + 3] * xm[k + 3];
      }
      for (; k < K; ++k) s0 += wr[k] * xm[k];
      const float s = (s0 + s1) + (s2 + s3);
      float* o = y + m * ldy + r;
      *o = acc ? *o + s : s;
    }
  }
}

#ifdef EM_X86_DISPATCH

EM_AVX2 inline float HorizontalSum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R rows of w (K apart) times C rows of x (K apart): R x C accumulators of 8.
template <int R, int C>
EM_AVX2 inline void Tile256(const float* x, int64_t K, const float* w, float* y, int64_t ldy, bool acc) {
  __m256 a[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) a[r][c] = _mm256_setzero_ps();
  }
  const int64_t K8 = K & ~int64_t{7};
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(w + r * K + k);
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const __m256 xv = _mm256_loadu_ps(x + c * K + k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) a[r][c] = _mm256_fmadd_ps(wv[r], xv, a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      float s = HorizontalSum256(a[r][c]);
      for (int64_t k = K8; k < K; ++k) s += w[r * K + k] * x[c * K + k];
      float* o = y + c * ldy + r;
      *o = acc ? *o + s : s;
    }
  }
}

template <int R>
EM_AVX2 void Rows256(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t ldy, bool acc) {
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) Tile256<R, 3>(x + m * K, K, w, y + m * ldy, ldy, acc);
  if (M - m == 2) Tile256<R, 2>(x + m * K, K, w, y + m * ldy, ldy, acc);
  if (M - m == 1) Tile256<R, 1>(x + m * K, K, w, y + m * ldy, ldy, acc);
}

EM_AVX2 void MicroAvx2(const float* x, int64_t M, int64_t K, const float* w, int64_t rows, float* y, int64_t ldy,
                       bool acc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) Rows256<4>(x, M, K, w + r * K, y + r, ldy, acc);
  for (; r < rows; ++r) Rows256<1>(x, M, K, w + r * K, y + r, ldy, acc);
}

// 16 weights as fp32: fp32 as they are, bf16 (uint16_t) widened in register,
// fp8 e4m3 (uint8_t) decoded in register and times its block's scale.
EM_AVX512 inline __m512 Load16(const float* p, __m512) { return _mm512_loadu_ps(p); }
EM_AVX512 inline __m512 Load16(__mmask16 m, const float* p, __m512) { return _mm512_maskz_loadu_ps(m, p); }
EM_AVX512 inline __m512 Load16(const uint16_t* p, __m512) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
EM_AVX512 inline __m512 Load16(__mmask16 m, const uint16_t* p, __m512) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
// e4m3 bytes (zero-extended to 16 bits) times `scale256` (the block's scale
// times 256): the byte shifted left by 7 with its sign moved up to bit 15 is
// the fp16 of the e4m3 value times 2^-8, subnormals included (fp16 has one
// more exponent bit and the same 3 leading mantissa bits), widened exactly
// by VCVTPH2PS; times scale * 2^8 that is one rounding of value * scale, the
// same fp32 as F8E4M3ToFloat(b) * scale. 0x7f / 0xff (NaN) are set NaN.
EM_AVX512 inline __m512 F8x16(__m256i h, __m512 scale256) {
  __m256i t = _mm256_slli_epi16(h, 7);
  t = _mm256_add_epi16(t, _mm256_and_si256(t, _mm256_set1_epi16(0x4000)));  // bit 14 (the sign) to 15
  const __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(t), scale256);
  const __mmask16 nan =
      _mm256_cmpeq_epi16_mask(_mm256_and_si256(h, _mm256_set1_epi16(0x7f)), _mm256_set1_epi16(0x7f));
  return _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
}
EM_AVX512 inline __m512 Load16(const uint8_t* p, __m512 scale256) {
  return F8x16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), scale256);
}
EM_AVX512 inline __m512 Load16(__mmask16 m, const uint8_t* p, __m512 scale256) {
  return F8x16(_mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, p)), scale256);
}

// R rows of w times C rows of x: R x C accumulators of 16; the tail of K by
// masked loads. W: float, uint16_t for bf16 or uint8_t for fp8 read in place
// (the same sums in the same order as on the converted fp32 rows). fp8:
// `scales` are the R rows' block scales (one 128-row block: R divides 128 and
// tiles start at multiples of R), one per 128 columns.
template <int R, int C, typename W>
EM_AVX512 inline void Tile512(const float* x, int64_t K, const W* w, const float* scales, float* y, int64_t ldy,
                              bool acc) {
  __m512 a[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) a[r][c] = _mm512_setzero_ps();
  }
  constexpr bool kF8 = std::is_same_v<W, uint8_t>;
  const int64_t segment = kF8 ? kBlock : K;  // columns sharing one scale
  for (int64_t c0 = 0; c0 < K; c0 += segment) {
    const int64_t c1 = std::min(K, c0 + segment);
    const __m512 s = kF8 ? _mm512_set1_ps(scales[c0 / kBlock] * 256.0f) : _mm512_setzero_ps();
    int64_t k = c0;
    for (; k + 16 <= c1; k += 16) {
      __m512 wv[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) wv[r] = Load16(w + r * K + k, s);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        const __m512 xv = _mm512_loadu_ps(x + c * K + k);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) a[r][c] = _mm512_fmadd_ps(wv[r], xv, a[r][c]);
      }
    }
    if (k < c1) {  // only at the end of K (blocks are multiples of 16)
      const __mmask16 mk = static_cast<__mmask16>((1u << (c1 - k)) - 1u);
      __m512 wv[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) wv[r] = Load16(mk, w + r * K + k, s);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        const __m512 xv = _mm512_maskz_loadu_ps(mk, x + c * K + k);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) a[r][c] = _mm512_fmadd_ps(wv[r], xv, a[r][c]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const float s = _mm512_reduce_add_ps(a[r][c]);
      float* o = y + c * ldy + r;
      *o = acc ? *o + s : s;
    }
  }
}

template <int R, typename W>
EM_AVX512 void Rows512(const float* x, int64_t M, int64_t K, const W* w, const float* scales, float* y,
                       int64_t ldy, bool acc) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) Tile512<R, 4>(x + m * K, K, w, scales, y + m * ldy, ldy, acc);
  switch (M - m) {
    case 3: Tile512<R, 3>(x + m * K, K, w, scales, y + m * ldy, ldy, acc); break;
    case 2: Tile512<R, 2>(x + m * K, K, w, scales, y + m * ldy, ldy, acc); break;
    case 1: Tile512<R, 1>(x + m * K, K, w, scales, y + m * ldy, ldy, acc); break;
    default: break;
  }
}

// rows of w from row r0 of the matrix (fp8: `scale_inv` is the matrix's
// [rows/128, cols/128] block scales; r0 a multiple of 4).
template <typename W>
EM_AVX512 void MicroAvx512(const float* x, int64_t M, int64_t K, const W* w, int64_t rows, float* y,
                           int64_t ldy, bool acc, const float* scale_inv = nullptr, int64_t r0 = 0) {
  const int64_t bc = (K + kBlock - 1) / kBlock;
  auto scales = [&](int64_t r) { return scale_inv != nullptr ? scale_inv + ((r0 + r) / kBlock) * bc : nullptr; };
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) Rows512<4>(x, M, K, w + r * K, scales(r), y + r, ldy, acc);
  for (; r < rows; ++r) Rows512<1>(x, M, K, w + r * K, scales(r), y + r, ldy, acc);
}

// ---- conversions of one row to fp32 (exact; fp8 times its block scale) ------

EM_AVX2 void Bf16RowAvx2(const uint16_t* src, int64_t K, float* out, int64_t ahead) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (ahead > 0 && (k & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(src + k) + ahead, _MM_HINT_T0);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
    _mm256_storeu_ps(out + k, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)));
  }
  for (; k < K; ++k) out[k] = Bf16ToFloat(src[k]);
}

EM_AVX512 void Bf16RowAvx512(const uint16_t* src, int64_t K, float* out, int64_t ahead) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (ahead > 0 && (k & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(src + k) + ahead, _MM_HINT_T0);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));
    _mm512_storeu_ps(out + k, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
  }
  if (k < K) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (K - k)) - 1u);
    const __m256i v = _mm256_maskz_loadu_epi16(mk, src + k);
    _mm512_mask_storeu_ps(out + k, mk, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
  }
}

// e4m3 -> fp32 of 8 / 16 bytes zero-extended to 32 bits each: the magnitude
// bits (exponent e, mantissa m) placed in an fp32 with the exponent rebased
// (+120) are exact for normal numbers; e == 0 (subnormal, m * 2^-9) is
// fixed up as 2 * that - 2^-6; 0x7f is NaN; then the sign.
EM_AVX512 inline __m512 F8ToF32x16(__m512i b) {
  const __m512i em = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
  __m512 mag = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(em, 20), _mm512_set1_epi32(120 << 23)));
  const __mmask16 sub = _mm512_cmplt_epu32_mask(em, _mm512_set1_epi32(8));
  mag = _mm512_mask_fmsub_ps(mag, sub, _mm512_set1_ps(2.0f), _mm512_set1_ps(0.015625f));
  const __mmask16 nan = _mm512_cmpeq_epi32_mask(em, _mm512_set1_epi32(0x7f));
  mag = _mm512_mask_mov_ps(mag, nan, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
  // mag | (b << 24 & sign bit)
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(mag), _mm512_slli_epi32(b, 24),
                                                       _mm512_set1_epi32(INT32_MIN), 0xF8));
}

EM_AVX512 void F8RowAvx512(const uint8_t* src, int64_t K, const float* scales, float* out, int64_t ahead) {
  for (int64_t c0 = 0; c0 < K; c0 += kBlock) {
    const __m512 s = _mm512_set1_ps(scales[c0 / kBlock]);
    const int64_t c1 = std::min(K, c0 + kBlock);
    int64_t k = c0;
    for (; k + 16 <= c1; k += 16) {
      if (ahead > 0 && (k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(src + k) + ahead, _MM_HINT_T0);
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k)));
      _mm512_storeu_ps(out + k, _mm512_mul_ps(F8ToF32x16(b), s));
    }
    if (k < c1) {
      const __mmask16 mk = static_cast<__mmask16>((1u << (c1 - k)) - 1u);
      const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, src + k));
      _mm512_mask_storeu_ps(out + k, mk, _mm512_mul_ps(F8ToF32x16(b), s));
    }
  }
}

EM_AVX2 inline __m256 F8ToF32x8(__m256i b) {
  const __m256i em = _mm256_and_si256(b, _mm256_set1_epi32(0x7f));
  const __m256 mag = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(em, 20), _mm256_set1_epi32(120 << 23)));
  const __m256 sub = _mm256_fmsub_ps(mag, _mm256_set1_ps(2.0f), _mm256_set1_ps(0.015625f));
  const __m256 is_sub = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), em));
  const __m256 is_nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(em, _mm256_set1_epi32(0x7f)));
  __m256 v = _mm256_blendv_ps(mag, sub, is_sub);
  v = _mm256_blendv_ps(v, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), is_nan);
  const __m256i sign = _mm256_and_si256(_mm256_slli_epi32(b, 24), _mm256_set1_epi32(INT32_MIN));
  return _mm256_or_ps(v, _mm256_castsi256_ps(sign));
}

EM_AVX2 void F8RowAvx2(const uint8_t* src, int64_t K, const float* scales, float* out, int64_t ahead) {
  for (int64_t c0 = 0; c0 < K; c0 += kBlock) {
    const float sc = scales[c0 / kBlock];
    const __m256 s = _mm256_set1_ps(sc);
    const int64_t c1 = std::min(K, c0 + kBlock);
    int64_t k = c0;
    for (; k + 8 <= c1; k += 8) {
      if (ahead > 0 && (k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(src + k) + ahead, _MM_HINT_T0);
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + k)));
      _mm256_storeu_ps(out + k, _mm256_mul_ps(F8ToF32x8(b), s));
    }
    for (; k < c1; ++k) out[k] = F8E4M3ToFloat(src[k]) * sc;
  }
}

#endif  // EM_X86_DISPATCH

void Bf16RowScalar(const uint16_t* src, int64_t K, float* out) {
  for (int64_t k = 0; k < K; ++k) out[k] = Bf16ToFloat(src[k]);
}

void F8RowScalar(const uint8_t* src, int64_t K, const float* scales, float* out) {
  for (int64_t k = 0; k < K; ++k) out[k] = F8E4M3ToFloat(src[k]) * scales[k / kBlock];
}

void Micro(Isa isa, const float* x, int64_t M, int64_t K, const float* w, int64_t rows, float* y, int64_t ldy,
           bool acc) {
#ifdef EM_X86_DISPATCH
  if (isa == Isa::kAvx512) return MicroAvx512<float>(x, M, K, w, rows, y, ldy, acc);
  if (isa == Isa::kAvx2) return MicroAvx2(x, M, K, w, rows, y, ldy, acc);
#endif
  MicroScalar(x, M, K, w, rows, y, ldy, acc);
}

// Rows [r0, r1) of w as fp32 into out (r1 - r0 rows of K), the same values as
// Weight::DequantizeRows. With `prefetch_to` > r1, the rows up to it are
// prefetched (one tile ahead while this one converts).
void ConvertRows(Isa isa, const Weight& w, int64_t r0, int64_t r1, float* out, int64_t prefetch_to = 0) {
  const int64_t K = w.cols();
  // Bytes from a row to the same place in the row (r1 - r0) rows later.
  const int64_t ahead =
      prefetch_to >= r1 + (r1 - r0) ? (r1 - r0) * K * static_cast<int64_t>(DTypeSize(w.dtype())) : 0;
  if (w.dtype() == DType::kBF16) {
    const uint16_t* src = static_cast<const uint16_t*>(w.data());
    for (int64_t r = r0; r < r1; ++r) {
      float* o = out + (r - r0) * K;
#ifdef EM_X86_DISPATCH
      if (isa == Isa::kAvx512) {
        Bf16RowAvx512(src + r * K, K, o, ahead);
        continue;
      }
      if (isa == Isa::kAvx2) {
        Bf16RowAvx2(src + r * K, K, o, ahead);
        continue;
      }
#endif
      Bf16RowScalar(src + r * K, K, o);
    }
    return;
  }
  if (w.dtype() == DType::kF8E4M3) {
    const uint8_t* src = static_cast<const uint8_t*>(w.data());
    const int64_t bc = (K + kBlock - 1) / kBlock;
    for (int64_t r = r0; r < r1; ++r) {
      float* o = out + (r - r0) * K;
      const float* scales = w.scale_inv() + (r / kBlock) * bc;
#ifdef EM_X86_DISPATCH
      if (isa == Isa::kAvx512) {
        F8RowAvx512(src + r * K, K, scales, o, ahead);
        continue;
      }
      if (isa == Isa::kAvx2) {
        F8RowAvx2(src + r * K, K, scales, o, ahead);
        continue;
      }
#endif
      F8RowScalar(src + r * K, K, scales, o);
    }
    return;
  }
  w.DequantizeRows(r0, r1, out);  // f16, f32
}

float* Scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// y[:, r0:r1] (+)= x . w[r0:r1]^T by the register-blocked kernel, on this thread.
void MicroRows(Isa isa, const float* x, int64_t M, int64_t K, const Weight& w, int64_t r0, int64_t r1, float* y,
               int64_t ldy, bool acc) {
  if (w.dtype() == DType::kF32) {
    Micro(isa, x, M, K, w.f32() + r0 * K, r1 - r0, y + r0, ldy, acc);
    return;
  }
#ifdef EM_X86_DISPATCH
  // Decode-sized M on AVX-512: bf16 widened in register (no scratch), the
  // same sums as below.
  if (w.dtype() == DType::kBF16 && isa == Isa::kAvx512 && M <= kFusedBf16MaxRows) {
    MicroAvx512<uint16_t>(x, M, K, static_cast<const uint16_t*>(w.data()) + r0 * K, r1 - r0, y + r0, ldy, acc);
    return;
  }
  // fp8 decoded in register (no scratch) up to kFusedF8MaxRows: the same
  // weights and sums as below.
  if (w.dtype() == DType::kF8E4M3 && isa == Isa::kAvx512 && M <= kFusedF8MaxRows && r0 % kTileRows == 0) {
    MicroAvx512<uint8_t>(x, M, K, static_cast<const uint8_t*>(w.data()) + r0 * K, r1 - r0, y + r0, ldy, acc,
                         w.scale_inv(), r0);
    return;
  }
#endif
  float* tile = Scratch(static_cast<size_t>(kTileRows * K));
  for (int64_t r = r0; r < r1; r += kTileRows) {
    const int64_t e = std::min(r1, r + kTileRows);
    ConvertRows(isa, w, r, e, tile, r1);
    Micro(isa, x, M, K, tile, e - r, y + r, ldy, acc);
  }
}

// y[:, r0:r1] (+)= x . w[r0:r1]^T by SGEMM, converting blocks of at most
// `block` rows.
void GemmRows(Isa isa, const float* x, int64_t M, int64_t K, const Weight& w, int64_t r0, int64_t r1, float* y,
              int64_t ldy, bool acc, int64_t block) {
  for (int64_t r = r0; r < r1; r += block) {
    const int64_t e = std::min(r1, r + block);
    const float* wb;
    if (w.dtype() == DType::kF32) {
      wb = w.f32() + r * K;
    } else {
      float* s = Scratch(static_cast<size_t>((e - r) * K));
      ConvertRows(isa, w, r, e, s);
      wb = s;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(e - r),
                static_cast<int>(K), 1.0f, x, static_cast<int>(K), wb, static_cast<int>(K), acc ? 1.0f : 0.0f,
                y + r, static_cast<int>(ldy));
  }
}

int64_t RoundUp(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

void LinearImpl(const float* x, int64_t M, int64_t K, const Weight& w, float* y, bool acc, bool parallel) {
  const int64_t N = w.rows();
  if (M <= 0 || N <= 0) return;
  if (K == 0) {
    if (!acc) std::fill(y, y + M * N, 0.0f);
    return;
  }
  const Isa isa = CurrentIsa();
  ThreadPool& pool = ThreadPool::Default();
  const int64_t threads = parallel && !ThreadPool::InTask() ? pool.num_threads() : 1;
  const int64_t row_bytes = K * static_cast<int64_t>(DTypeSize(w.dtype()));
  if (M <= kMicroMaxRows) {
    if (threads == 1) {
      MicroRows(isa, x, M, K, w, 0, N, y, N, acc);
      return;
    }
    const int64_t grain = RoundUp(
        std::max((kMinChunkBytes + row_bytes - 1) / row_bytes, (N + 4 * threads - 1) / (4 * threads)), kTileRows);
    pool.ParallelFor(N, grain, [&](int64_t b, int64_t e, int) { MicroRows(isa, x, M, K, w, b, e, y, N, acc); });
    return;
  }
  // SGEMM on blocks of rows: at most ~4 MB of converted fp32 per block, and
  // at least two blocks per thread at the top level.
  int64_t block = N;
  if (w.dtype() != DType::kF32) block = std::max<int64_t>(16, (int64_t{4} << 20) / (K * 4));
  if (threads > 1) block = std::min(block, std::max<int64_t>(16, RoundUp((N + 2 * threads - 1) / (2 * threads), 16)));
  if (threads == 1) {
    GemmRows(isa, x, M, K, w, 0, N, y, N, acc, block);
    return;
  }
  const int64_t blocks = (N + block - 1) / block;
  pool.ParallelFor(blocks, 1, [&](int64_t b, int64_t e, int) {
    GemmRows(isa, x, M, K, w, b * block, std::min(N, e * block), y, N, acc, block);
  });
}

}  // namespace

void Linear(const float* x, int64_t M, int64_t K, const Weight& w, float* y, bool accumulate) {
  CHECK_EQ(K, w.cols());
  LinearImpl(x, M, K, w, y, accumulate, /*parallel=*/true);
}

void LinearReference(const float* x, int64_t M, int64_t K, const Weight& w, float* y, bool accumulate) {
  CHECK_EQ(K, w.cols());
  const int64_t N = w.rows();
  if (M <= 0 || N <= 0) return;
  constexpr int64_t kRows = 256;
  std::vector<float> block(static_cast<size_t>(std::min(kRows, N) * K));
  for (int64_t r0 = 0; r0 < N; r0 += kRows) {
    const int64_t r1 = std::min(N, r0 + kRows);
    const float* wb = w.f32() != nullptr ? w.f32() + r0 * K : block.data();
    if (w.f32() == nullptr) w.DequantizeRows(r0, r1, block.data());
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(r1 - r0),
                static_cast<int>(K), 1.0f, x, static_cast<int>(K), wb, static_cast<int>(K),
                accumulate ? 1.0f : 0.0f, y + r0, static_cast<int>(N));
  }
}

bool SetLinearIsa(const std::string& name) {
  const Isa have = DetectIsa();
  Isa want;
  if (name == "auto") {
    want = have;
  } else if (name == "scalar") {
    want = Isa::kScalar;
  } else if (name == "avx2") {
    want = Isa::kAvx2;
  } else if (name == "avx512") {
    want = Isa::kAvx512;
  } else {
    return false;
  }
  if (static_cast<int>(want) > static_cast<int>(have)) return false;
  g_isa.store(static_cast<int>(want));
  return true;
}

std::string LinearIsa() {
  switch (CurrentIsa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

void LinearFewRows(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y) {
  LinearImpl(x, M, K, Weight::Mapped(DType::kF32, w, N, K, nullptr), y, false, /*parallel=*/false);
}

}  // namespace expertmesh::kernels
