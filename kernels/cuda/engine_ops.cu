// Kernels behind kernels/cuda/engine_ops.h. Unlike the other .cu files of
// kernels/cuda, the launchers here return absl::Status themselves (nvcc 13
// compiles the abseil headers; one file instead of a launcher/wrapper pair).
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/engine_ops.h"

namespace expertmesh::kernels::cuda {
namespace {

// ---------------------------------------------------------------- helpers

absl::Status Launched(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return absl::OkStatus();
  const std::string msg = absl::StrCat("cuda::", what, ": CUDA error ", static_cast<int>(e), " (", cudaGetErrorName(e),
                                       ": ", cudaGetErrorString(e), ")");
  if (e == cudaErrorInvalidValue || e == cudaErrorInvalidConfiguration) return absl::InvalidArgumentError(msg);
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) return absl::FailedPreconditionError(msg);
  return absl::InternalError(msg);
}

absl::Status Bad(const char* what, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("cuda::", what, ": ", why));
}

cudaStream_t S(Stream s) { return static_cast<cudaStream_t>(s); }

unsigned Blocks(int64_t n, int threads, int64_t cap = 65535LL * 8) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > cap) b = cap;
  return static_cast<unsigned>(b);
}

__device__ __forceinline__ float Bf(uint16_t v) { return __uint_as_float(static_cast<uint32_t>(v) << 16); }
__device__ __forceinline__ uint16_t ToBf(float f) {
  __nv_bfloat16 b = __float2bfloat16_rn(f);
  return *reinterpret_cast<uint16_t*>(&b);
}

// Element i of an activation buffer of type `t`, as float; and the store.
__device__ __forceinline__ float LoadAct(const void* p, int64_t i, bool bf16) {
  return bf16 ? Bf(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}
__device__ __forceinline__ void StoreAct(void* p, int64_t i, float v, bool bf16) {
  if (bf16) {
    static_cast<uint16_t*>(p)[i] = ToBf(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

__device__ __forceinline__ double WarpSumD(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float WarpSumF(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float WarpMaxF(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Block-wide reductions (every thread gets the result); red holds 32 values.
__device__ double BlockSumD(double v, double* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = WarpSumD(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double t = lane < nw ? red[lane] : 0.0;
  return WarpSumD(t);
}
__device__ float BlockSumF(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = WarpSumF(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : 0.0f;
  return WarpSumF(t);
}
__device__ float BlockMaxF(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = WarpMaxF(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : -INFINITY;
  return WarpMaxF(t);
}

__device__ __forceinline__ float SiluF(float g) { return g / (1.0f + expf(-g)); }

// ---------------------------------------------------------------- embedding, norms, adds

__global__ void EmbedKernel(const void* table, bool bf16, int64_t H, const int32_t* ids, float* out) {
  const int64_t t = blockIdx.x;
  const int64_t row = static_cast<int64_t>(ids[t]) * H;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) out[t * H + i] = LoadAct(table, row + i, bf16);
}

__global__ void RowNormKernel(const RowNormArgs a, bool xb, bool yb) {
  __shared__ double red[32];
  const int64_t r = blockIdx.x;
  const int64_t src = a.rows != nullptr ? a.rows[r] : r;
  const int64_t xo = src * a.x_stride, yo = r * a.y_stride;
  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < a.H; i += blockDim.x) {
    const double v = LoadAct(a.x, xo + i, xb);
    ss += v * v;
  }
  ss = BlockSumD(ss, red);
  const float inv = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(a.H) + a.eps));
  // Every thread has read its elements before any writes (the reduction synced): y may alias x.
  for (int64_t i = threadIdx.x; i < a.H; i += blockDim.x) {
    StoreAct(a.y, yo + i, LoadAct(a.x, xo + i, xb) * inv * a.w[i], yb);
  }
}

template <typename T>
__global__ void AddIntoKernel(const T* x, int64_t n, float* y) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if constexpr (sizeof(T) == 2) {
      y[i] += Bf(x[i]);
    } else {
      y[i] += x[i];
    }
  }
}

__global__ void SiluMulF32Kernel(const float* gu, int64_t T, int64_t I, float* out) {
  const int64_t n = T * I;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / I, c = i % I;
    const float g = gu[t * 2 * I + c];
    out[i] = SiluF(g) * gu[t * 2 * I + I + c];
  }
}

// ---------------------------------------------------------------- rotary, cache append

// cos/sin of `pos` for `half` frequencies, in double as the CPU's Rope does.
__device__ void RopeTable(double pos, const double* inv_freq, int64_t half, float* cs) {
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    double s, c;
    sincos(pos * inv_freq[i], &s, &c);
    cs[i] = static_cast<float>(c);
    cs[half + i] = static_cast<float>(s);
  }
}

__global__ void RopeF32Kernel(float* x, int64_t vecs, int64_t token_stride, int64_t vec_stride, int64_t half,
                              const int32_t* positions, const double* inv_freq) {
  extern __shared__ float cs[];
  const int64_t t = blockIdx.x;
  RopeTable(static_cast<double>(positions[t]), inv_freq, half, cs);
  __syncthreads();
  float* base = x + t * token_stride;
  for (int64_t j = threadIdx.x; j < vecs * half; j += blockDim.x) {
    const int64_t v = j / half, i = j % half;
    float* p = base + v * vec_stride + 2 * i;
    const float a = p[0], b = p[1], c = cs[i], s = cs[half + i];
    p[0] = a * c - b * s;
    p[1] = a * s + b * c;
  }
}

__global__ void KvAppendKernel(const KvAppendArgs a, bool bf16) {
  extern __shared__ float cs[];  // [R/2] cos, [R/2] sin
  __shared__ double red[32];
  const int64_t t = blockIdx.x, D = a.L + a.R, half = a.R / 2;
  RopeTable(static_cast<double>(a.positions[t]), a.inv_freq, half, cs);
  const int64_t src = t * D, dst = static_cast<int64_t>(a.slots[t]) * D;
  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < a.L; i += blockDim.x) {
    const double v = LoadAct(a.kv, src + i, bf16);
    ss += v * v;
  }
  ss = BlockSumD(ss, red);  // also orders the rope table
  const float inv = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(a.L) + a.eps));
  for (int64_t i = threadIdx.x; i < a.L; i += blockDim.x) {
    StoreAct(a.cache, dst + i, LoadAct(a.kv, src + i, bf16) * inv * a.norm_w[i], bf16);
  }
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    const float x0 = LoadAct(a.kv, src + a.L + 2 * i, bf16), x1 = LoadAct(a.kv, src + a.L + 2 * i + 1, bf16);
    const float c = cs[i], s = cs[half + i];
    StoreAct(a.cache, dst + a.L + 2 * i, x0 * c - x1 * s, bf16);
    StoreAct(a.cache, dst + a.L + 2 * i + 1, x0 * s + x1 * c, bf16);
  }
}

// ---------------------------------------------------------------- fp32 GEMM

// 64x64 output tile per block of 256 threads (4x4 per thread), K in steps of
// 16 through shared memory (k-major, padded).
constexpr int kBM = 64, kBN = 64, kBK = 16;

__global__ void __launch_bounds__(256) GemmF32Kernel(const GemmF32Args a) {
  __shared__ float xs[kBK][kBM + 4];
  __shared__ float ws[kBK][kBN + 4];
  const int64_t b = blockIdx.z;
  const float* x = a.x + b * a.sx;
  const float* w = a.w + b * a.sw;
  float* y = a.y + b * a.sy;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int tid = threadIdx.x, tm = tid / 16, tn = tid % 16;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < a.K; k0 += kBK) {
    // x tile: 64 rows x 16 k; 4 per thread (k fastest for coalescing).
    for (int i = tid; i < kBM * kBK; i += 256) {
      const int r = i / kBK, k = i % kBK;
      const int64_t gm = m0 + r, gk = k0 + k;
      xs[k][r] = (gm < a.M && gk < a.K) ? x[gm * a.ldx + gk] : 0.0f;
    }
    if (!a.w_kn) {
      for (int i = tid; i < kBN * kBK; i += 256) {
        const int n = i / kBK, k = i % kBK;
        const int64_t gn = n0 + n, gk = k0 + k;
        ws[k][n] = (gn < a.N && gk < a.K) ? w[gn * a.ldw + gk] : 0.0f;
      }
    } else {
      for (int i = tid; i < kBN * kBK; i += 256) {
        const int k = i / kBN, n = i % kBN;
        const int64_t gn = n0 + n, gk = k0 + k;
        ws[k][n] = (gn < a.N && gk < a.K) ? w[gk * a.ldw + gn] : 0.0f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      float xv[4], wv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        xv[i] = xs[k][tm + 16 * i];
        wv[i] = ws[k][tn + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xv[i], wv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gm = m0 + tm + 16 * i;
    if (gm >= a.M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gn = n0 + tn + 16 * j;
      if (gn >= a.N) continue;
      float* p = y + gm * a.ldy + gn;
      *p = a.accumulate ? *p + acc[i][j] : acc[i][j];
    }
  }
}

__global__ void CopyRopePartKernel(const float* q, int64_t rows, int64_t nope, int64_t R, int64_t L, float* q_abs) {
  const int64_t n = rows * R;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / R, d = i % R;
    q_abs[r * (L + R) + L + d] = q[r * (nope + R) + nope + d];
  }
}

// ---------------------------------------------------------------- MLA decode, fp32

constexpr int kMlaThreads = 128;
constexpr int kMlaMaxL = 1024;

__global__ void MlaDecodeF32Kernel(const MlaDecodeF32Params a) {
  extern __shared__ float sm[];  // q [D], p [kMlaThreads]
  __shared__ float red[32];
  const int D = static_cast<int>(a.kv_lora + a.rope), L = static_cast<int>(a.kv_lora);
  float* sq = sm;
  float* sp = sm + D;
  const int row = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int rows_total = static_cast<int>(a.q_len * a.heads);
  const int seq_len = a.seq_lens[b];
  const int t = row / static_cast<int>(a.heads);
  const int visible = seq_len - static_cast<int>(a.q_len) + t + 1;
  const int64_t orow = static_cast<int64_t>(b) * rows_total + row;
  for (int d = tid; d < D; d += kMlaThreads) sq[d] = a.q[orow * D + d];
  __syncthreads();
  const int32_t* bt = a.block_table + static_cast<int64_t>(b) * a.max_pages;
  constexpr int kDims = kMlaMaxL / kMlaThreads;
  float acc[kDims];
#pragma unroll
  for (int i = 0; i < kDims; ++i) acc[i] = 0.0f;
  float m = -INFINITY, lsum = 0.0f;
  for (int j0 = 0; j0 < visible; j0 += kMlaThreads) {
    const int j = j0 + tid;
    float sc = -INFINITY;
    if (j < visible) {
      const float* kv = a.kv_cache + (static_cast<int64_t>(bt[j / a.page_size]) * a.page_size + j % a.page_size) * D;
      float dot = 0.0f;
      for (int d = 0; d < D; ++d) dot = fmaf(sq[d], kv[d], dot);
      sc = dot * a.softmax_scale;
    }
    const float mt = BlockMaxF(sc, red);
    const float m_new = fmaxf(m, mt);
    const float alpha = m == -INFINITY ? 0.0f : expf(m - m_new);
    const float p = j < visible ? expf(sc - m_new) : 0.0f;
    __syncthreads();
    sp[tid] = p;
    const float ps = BlockSumF(p, red);
    lsum = lsum * alpha + ps;
    m = m_new;
    const int n = min(kMlaThreads, visible - j0);
#pragma unroll
    for (int i = 0; i < kDims; ++i) {
      const int d = tid + i * kMlaThreads;
      if (d >= L) break;
      float v = acc[i] * alpha;
      for (int jj = 0; jj < n; ++jj) {
        const int jt = j0 + jj;
        const float* kv =
            a.kv_cache + (static_cast<int64_t>(bt[jt / a.page_size]) * a.page_size + jt % a.page_size) * D;
        v = fmaf(sp[jj], kv[d], v);
      }
      acc[i] = v;
    }
    __syncthreads();
  }
  const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
#pragma unroll
  for (int i = 0; i < kDims; ++i) {
    const int d = tid + i * kMlaThreads;
    if (d < L) a.out[orow * L + d] = acc[i] * inv;
  }
}

// ---------------------------------------------------------------- permute / combine

__global__ void PermuteF32Kernel(const float* x, int64_t H, const int32_t* pos, int k, float* x_perm) {
  const int64_t t = blockIdx.x;
  for (int j = 0; j < k; ++j) {
    const int32_t p = pos[t * k + j];
    if (p < 0) continue;
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) x_perm[static_cast<int64_t>(p) * H + i] = x[t * H + i];
  }
}

__global__ void CombineAddKernel(const void* out_perm, bool bf16, const int32_t* pos, const float* weights, int k,
                                 int64_t H, float* y) {
  const int64_t t = blockIdx.x;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int32_t p = pos[t * k + j];
      if (p < 0) continue;
      acc += weights[t * k + j] * LoadAct(out_perm, static_cast<int64_t>(p) * H + i, bf16);
    }
    y[t * H + i] += acc;
  }
}

__global__ void GatherRowsKernel(const void* x, bool bf16, int64_t H, const int32_t* idx, void* out) {
  const int64_t j = blockIdx.x, src = static_cast<int64_t>(idx[j]) * H;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    if (bf16) {
      static_cast<uint16_t*>(out)[j * H + i] = static_cast<const uint16_t*>(x)[src + i];
    } else {
      static_cast<float*>(out)[j * H + i] = static_cast<const float*>(x)[src + i];
    }
  }
}

__global__ void AddRecordRowsKernel(const float* rows, int64_t H, const int32_t* start, const int32_t* rec, float* y) {
  const int64_t t = blockIdx.x;
  const int32_t b = start[t], e = start[t + 1];
  if (b == e) return;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    float acc = 0.0f;
    for (int32_t r = b; r < e; ++r) acc += rows[static_cast<int64_t>(rec[r]) * H + i];
    y[t * H + i] += acc;
  }
}

// ---------------------------------------------------------------- grouped SwiGLU FFN (device offsets)

constexpr int kFfnWarps = 8;  // warps per block
constexpr int kFfnCols = 2;   // output columns per warp
constexpr int kFfnRows = 8;   // rows per pass

// 8 consecutive values of a weight row (k % 8 == 0) as floats.
template <WType W>
__device__ __forceinline__ void LoadW8(const void* base, int64_t row, int64_t K, int64_t k, const float* scale,
                                       int64_t scale_cols, float* f) {
  if constexpr (W == WType::kF32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + row * K + k);
    const float4 u = p[0], v = p[1];
    f[0] = u.x, f[1] = u.y, f[2] = u.z, f[3] = u.w, f[4] = v.x, f[5] = v.y, f[6] = v.z, f[7] = v.w;
  } else if constexpr (W == WType::kBf16) {
    const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + row * K + k);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else {
    const uint2 u = *reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(base) + row * K + k);
    const float s = scale[(row / 128) * scale_cols + k / 128];
    const uint32_t w[2] = {u.x, u.y};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const __nv_fp8_storage_t q = static_cast<__nv_fp8_storage_t>((w[i / 4] >> (8 * (i % 4))) & 0xffu);
      const __half_raw h = __nv_cvt_fp8_to_halfraw(q, __NV_E4M3);
      f[i] = __half2float(__half(h)) * s;
    }
  }
}

__device__ __forceinline__ void LoadX8(const void* x, int64_t off, bool bf16, float* f) {
  if (bf16) {
    const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(x) + off);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(x) + off);
    const float4 u = p[0], v = p[1];
    f[0] = u.x, f[1] = u.y, f[2] = u.z, f[3] = u.w, f[4] = v.x, f[5] = v.y, f[6] = v.z, f[7] = v.w;
  }
}

// swiglu: out[r, c] = silu(x_r . w[c]) * (x_r . w[N + c]) with N = columns (I);
// else:   out[r, c] = x_r . w[c].   K = inputs per row.
template <WType W, bool kSwiglu>
__global__ void __launch_bounds__(kFfnWarps * 32)
    GroupedFfnKernel(const GroupedFfnArgs a, const void* in, void* out, int64_t N, int64_t K) {
  const int e = blockIdx.y;
  const int32_t r0 = a.offsets[e], r1 = a.offsets[e + 1];
  if (r1 <= r0) return;
  const void* w = kSwiglu ? a.gate_up[e] : a.down[e];
  const float* scale = nullptr;
  if constexpr (W == WType::kFp8) scale = kSwiglu ? a.gate_up_scale[e] : a.down_scale[e];
  const int64_t scale_cols = (K + 127) / 128;
  const bool xb = a.act == Act::kBf16;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int cc = 0; cc < kFfnCols; ++cc) {
    const int64_t c = (static_cast<int64_t>(blockIdx.x) * kFfnWarps + warp) * kFfnCols + cc;
    if (c >= N) break;
    for (int32_t rb = r0; rb < r1; rb += kFfnRows) {
      const int nr = min(kFfnRows, r1 - rb);
      float g[kFfnRows], u[kFfnRows];
#pragma unroll
      for (int i = 0; i < kFfnRows; ++i) g[i] = u[i] = 0.0f;
      for (int64_t k = static_cast<int64_t>(lane) * 8; k < K; k += 32 * 8) {
        float wg[8], wu[8];
        LoadW8<W>(w, c, K, k, scale, scale_cols, wg);
        if constexpr (kSwiglu) LoadW8<W>(w, N + c, K, k, scale, scale_cols, wu);
#pragma unroll
        for (int i = 0; i < kFfnRows; ++i) {
          if (i >= nr) break;
          float xv[8];
          LoadX8(in, static_cast<int64_t>(rb + i) * K + k, xb, xv);
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            g[i] = fmaf(xv[q], wg[q], g[i]);
            if constexpr (kSwiglu) u[i] = fmaf(xv[q], wu[q], u[i]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kFfnRows; ++i) {
        if (i >= nr) break;
        const float gs = WarpSumF(g[i]);
        float v = gs;
        if constexpr (kSwiglu) v = SiluF(gs) * WarpSumF(u[i]);
        if (lane == 0) StoreAct(out, static_cast<int64_t>(rb + i) * N + c, v, xb);
      }
    }
  }
}

template <WType W>
absl::Status LaunchGroupedFfn(const GroupedFfnArgs& a, cudaStream_t s) {
  const int64_t per_block = kFfnWarps * kFfnCols;
  dim3 g1(static_cast<unsigned>((a.I + per_block - 1) / per_block), static_cast<unsigned>(a.num_experts));
  GroupedFfnKernel<W, true><<<g1, kFfnWarps * 32, 0, s>>>(a, a.x_perm, a.act_buf, a.I, a.H);
  absl::Status st = Launched("GroupedSwiGluFfn (gate/up)");
  if (!st.ok()) return st;
  dim3 g2(static_cast<unsigned>((a.H + per_block - 1) / per_block), static_cast<unsigned>(a.num_experts));
  GroupedFfnKernel<W, false><<<g2, kFfnWarps * 32, 0, s>>>(a, a.act_buf, a.out_perm, a.H, a.I);
  return Launched("GroupedSwiGluFfn (down)");
}

}  // namespace

// ---------------------------------------------------------------- launchers

absl::Status EmbedRowsF32(const void* table, Act table_type, int64_t H, const int32_t* ids, int64_t T, float* out,
                          Stream stream) {
  if (T == 0) return absl::OkStatus();
  if (H <= 0) return Bad("EmbedRowsF32", "H must be positive");
  EmbedKernel<<<static_cast<unsigned>(T), 128, 0, S(stream)>>>(table, table_type == Act::kBf16, H, ids, out);
  return Launched("EmbedRowsF32");
}

absl::Status RowRmsNorm(const RowNormArgs& a, Stream stream) {
  if (a.n == 0) return absl::OkStatus();
  if (a.H <= 0 || a.n < 0) return Bad("RowRmsNorm", "H > 0, n >= 0");
  RowNormKernel<<<static_cast<unsigned>(a.n), 128, 0, S(stream)>>>(a, a.x_type == Act::kBf16, a.y_type == Act::kBf16);
  return Launched("RowRmsNorm");
}

absl::Status KvAppend(const KvAppendArgs& a, Stream stream) {
  if (a.T == 0) return absl::OkStatus();
  if (a.L <= 0 || a.R < 0 || a.R % 2 != 0) return Bad("KvAppend", "L > 0 and an even R >= 0");
  KvAppendKernel<<<static_cast<unsigned>(a.T), 128, a.R * sizeof(float), S(stream)>>>(a, a.type == Act::kBf16);
  return Launched("KvAppend");
}

absl::Status RopeApplyF32(float* x, int64_t tokens, int64_t vecs, int64_t token_stride, int64_t vec_stride, int64_t dim,
                          const int32_t* positions, const double* inv_freq, Stream stream) {
  if (tokens == 0 || vecs == 0) return absl::OkStatus();
  if (dim <= 0 || dim % 2 != 0) return Bad("RopeApplyF32", "dim must be even and positive");
  const int64_t half = dim / 2;
  RopeF32Kernel<<<static_cast<unsigned>(tokens), 128, 2 * half * sizeof(float), S(stream)>>>(
      x, vecs, token_stride, vec_stride, half, positions, inv_freq);
  return Launched("RopeApplyF32");
}

absl::Status GemmF32(const GemmF32Args& a, Stream stream) {
  if (a.M == 0 || a.N == 0 || a.batch == 0) return absl::OkStatus();
  if (a.M < 0 || a.N < 0 || a.K < 0 || a.batch < 0) return Bad("GemmF32", "negative size");
  if (a.batch > 65535 || (a.M + kBM - 1) / kBM > 65535) return Bad("GemmF32", "batch or M too large for one grid");
  dim3 grid(static_cast<unsigned>((a.N + kBN - 1) / kBN), static_cast<unsigned>((a.M + kBM - 1) / kBM),
            static_cast<unsigned>(a.batch));
  GemmF32Kernel<<<grid, 256, 0, S(stream)>>>(a);
  return Launched("GemmF32");
}

absl::Status CopyRopePartF32(const float* q, int64_t rows, int64_t nope, int64_t R, int64_t L, float* q_abs,
                             Stream stream) {
  if (rows * R == 0) return absl::OkStatus();
  CopyRopePartKernel<<<Blocks(rows * R, 256), 256, 0, S(stream)>>>(q, rows, nope, R, L, q_abs);
  return Launched("CopyRopePartF32");
}

absl::Status MlaDecodeF32(const MlaDecodeF32Params& p, Stream stream) {
  if (p.batch == 0 || p.q_len * p.heads == 0) return absl::OkStatus();
  if (p.kv_lora <= 0 || p.kv_lora > kMlaMaxL)
    return Bad("MlaDecodeF32", absl::StrCat("kv_lora in [1, 1024]: ", p.kv_lora));
  if (p.page_size <= 0 || p.max_pages <= 0) return Bad("MlaDecodeF32", "page_size and max_pages must be positive");
  const size_t smem = (p.kv_lora + p.rope + kMlaThreads) * sizeof(float);
  dim3 grid(static_cast<unsigned>(p.q_len * p.heads), static_cast<unsigned>(p.batch));
  MlaDecodeF32Kernel<<<grid, kMlaThreads, smem, S(stream)>>>(p);
  return Launched("MlaDecodeF32");
}

absl::Status PermuteF32(const float* x, int64_t T, int64_t H, const int32_t* pos, int64_t k, float* x_perm,
                        Stream stream) {
  if (T == 0) return absl::OkStatus();
  PermuteF32Kernel<<<static_cast<unsigned>(T), 128, 0, S(stream)>>>(x, H, pos, static_cast<int>(k), x_perm);
  return Launched("PermuteF32");
}

absl::Status CombineAddF32(const void* out_perm, Act type, const int32_t* pos, const float* weights, int64_t T,
                           int64_t k, int64_t H, float* y, Stream stream) {
  if (T == 0) return absl::OkStatus();
  CombineAddKernel<<<static_cast<unsigned>(T), 128, 0, S(stream)>>>(out_perm, type == Act::kBf16, pos, weights,
                                                                    static_cast<int>(k), H, y);
  return Launched("CombineAddF32");
}

absl::Status AddInto(const void* x, Act type, int64_t n, float* y, Stream stream) {
  if (n == 0) return absl::OkStatus();
  if (type == Act::kBf16) {
    AddIntoKernel<uint16_t><<<Blocks(n, 256), 256, 0, S(stream)>>>(static_cast<const uint16_t*>(x), n, y);
  } else {
    AddIntoKernel<float><<<Blocks(n, 256), 256, 0, S(stream)>>>(static_cast<const float*>(x), n, y);
  }
  return Launched("AddInto");
}

absl::Status SiluMulRowsF32(const float* gu, int64_t T, int64_t I, float* out, Stream stream) {
  if (T * I == 0) return absl::OkStatus();
  SiluMulF32Kernel<<<Blocks(T * I, 256), 256, 0, S(stream)>>>(gu, T, I, out);
  return Launched("SiluMulRowsF32");
}

absl::Status GatherRows(const void* x, Act type, int64_t H, const int32_t* idx, int64_t n, void* out, Stream stream) {
  if (n == 0) return absl::OkStatus();
  GatherRowsKernel<<<static_cast<unsigned>(n), 128, 0, S(stream)>>>(x, type == Act::kBf16, H, idx, out);
  return Launched("GatherRows");
}

absl::Status AddRecordRows(const float* rows, int64_t H, const int32_t* start, const int32_t* rec, int64_t T, float* y,
                           Stream stream) {
  if (T == 0) return absl::OkStatus();
  AddRecordRowsKernel<<<static_cast<unsigned>(T), 128, 0, S(stream)>>>(rows, H, start, rec, y);
  return Launched("AddRecordRows");
}

absl::Status GroupedSwiGluFfn(const GroupedFfnArgs& a, Stream stream) {
  if (a.num_experts <= 0 || a.num_experts > 65535) return Bad("GroupedSwiGluFfn", "num_experts in [1, 65535]");
  if (a.H <= 0 || a.I <= 0 || a.H % 8 != 0 || a.I % 8 != 0) {
    return Bad("GroupedSwiGluFfn", absl::StrCat("H and I must be positive multiples of 8 (H=", a.H, " I=", a.I, ")"));
  }
  if (a.max_rows == 0) return absl::OkStatus();
  switch (a.w_type) {
    case WType::kF32:
      return LaunchGroupedFfn<WType::kF32>(a, S(stream));
    case WType::kBf16:
      return LaunchGroupedFfn<WType::kBf16>(a, S(stream));
    case WType::kFp8:
      return LaunchGroupedFfn<WType::kFp8>(a, S(stream));
  }
  return Bad("GroupedSwiGluFfn", "unknown weight type");
}

}  // namespace expertmesh::kernels::cuda
