// Memory-bound kernels: RMSNorm, SwiGLU activation, rotary, embedding,
// argmax, casts, fp8 dequantisation and fp8 activation quantisation.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/internal.h"

namespace expertmesh::kernels::cuda::internal {
namespace {

// One block per row; two passes over the row (the second hits L1/L2).
__global__ void RmsNormKernel(const uint4* __restrict__ x, int64_t chunks, const float* __restrict__ w, float eps,
                              uint4* __restrict__ y) {
  __shared__ float red[32];
  const int64_t t = blockIdx.x;
  const uint4* xr = x + t * chunks;
  float ss = 0.0f;
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    float f[8];
    Unpack8(xr[c], f);
#pragma unroll
    for (int i = 0; i < 8; ++i) ss += f[i] * f[i];
  }
  ss = BlockSum(ss, red);
  const float inv = rsqrtf(ss / static_cast<float>(chunks * 8) + eps);
  uint4* yr = y + t * chunks;
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    float f[8];
    Unpack8(xr[c], f);
    const float4 w0 = reinterpret_cast<const float4*>(w)[2 * c];
    const float4 w1 = reinterpret_cast<const float4*>(w)[2 * c + 1];
    const float ww[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = f[i] * inv * ww[i];
    yr[c] = Pack8(f);
  }
}

__device__ __forceinline__ float Silu(float g) { return g / (1.0f + __expf(-g)); }

__global__ void SiluMulRowsKernel(const uint4* __restrict__ gu, int64_t T, int64_t ic, uint4* __restrict__ out) {
  const int64_t n = T * ic;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / ic, c = i % ic;
    float g[8], u[8];
    Unpack8(gu[t * 2 * ic + c], g);
    Unpack8(gu[t * 2 * ic + ic + c], u);
#pragma unroll
    for (int j = 0; j < 8; ++j) g[j] = Silu(g[j]) * u[j];
    out[i] = Pack8(g);
  }
}

// One block per token: cos/sin of its position (in double, as the CPU does)
// into shared memory, then every vector of the token.
__global__ void RopeKernel(uint16_t* __restrict__ x, int64_t vecs, int64_t token_stride, int64_t vec_stride,
                           int64_t half, const int32_t* __restrict__ positions, const double* __restrict__ inv_freq) {
  extern __shared__ float cs[];  // [half] cos, then [half] sin
  const int64_t t = blockIdx.x;
  const double pos = static_cast<double>(positions[t]);
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    double s, c;
    sincos(pos * inv_freq[i], &s, &c);
    cs[i] = static_cast<float>(c);
    cs[half + i] = static_cast<float>(s);
  }
  __syncthreads();
  uint16_t* base = x + t * token_stride;
  for (int64_t j = threadIdx.x; j < vecs * half; j += blockDim.x) {
    const int64_t v = j / half, i = j % half;
    uint32_t* p = reinterpret_cast<uint32_t*>(base + v * vec_stride + 2 * i);
    const uint32_t w = *p;
    const float a = __uint_as_float(w << 16), b = __uint_as_float(w & 0xffff0000u);
    const float c = cs[i], s = cs[half + i];
    *p = Pack2(a * c - b * s, a * s + b * c);
  }
}

__global__ void EmbeddingKernel(const uint4* __restrict__ table, int64_t V, int64_t chunks,
                                const int32_t* __restrict__ ids, uint4* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const int32_t id = ids[t];
  const bool ok = id >= 0 && id < V;
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    out[t * chunks + c] = ok ? table[static_cast<int64_t>(id) * chunks + c] : make_uint4(0, 0, 0, 0);
  }
}

__global__ void ArgmaxRowsKernel(const float* __restrict__ logits, int64_t V, int32_t* __restrict__ out) {
  __shared__ float sv[32];
  __shared__ int64_t si[32];
  const int64_t t = blockIdx.x;
  const float* row = logits + t * V;
  float best = -INFINITY;
  int64_t bi = V;  // larger than any index
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const float v = row[i];
    if (bi == V || v > best) {  // i increases: the first of equal values stays
      best = v;
      bi = i;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > best || (ov == best && oi < bi)) {
      best = ov;
      bi = oi;
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) {
    sv[warp] = best;
    si[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    best = lane < nw ? sv[lane] : -INFINITY;
    bi = lane < nw ? si[lane] : V;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best, o);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > best || (ov == best && oi < bi)) {
        best = ov;
        bi = oi;
      }
    }
    if (lane == 0) out[t] = static_cast<int32_t>(bi < V ? bi : 0);
  }
}

__global__ void CastF32ToBf16Kernel(const float* __restrict__ x, int64_t n, uint16_t* __restrict__ y) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = F2Bf16Bits(x[i]);
  }
}
__global__ void CastBf16ToF32Kernel(const uint16_t* __restrict__ x, int64_t n, float* __restrict__ y) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = Bf16Bits2F(x[i]);
  }
}

__device__ __forceinline__ float Fp8ToF(uint8_t v) {
  __nv_fp8_e4m3 f;
  f.__x = v;
  return static_cast<float>(f);
}
__device__ __forceinline__ uint8_t FToFp8(float v) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

__global__ void DequantFp8Kernel(const uint8_t* __restrict__ q, int64_t rows, int64_t cols,
                                 const float* __restrict__ scale_inv, int64_t br, int64_t bc,
                                 uint16_t* __restrict__ out) {
  const int64_t n = rows * cols, scols = (cols + bc - 1) / bc;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    out[i] = F2Bf16Bits(Fp8ToF(q[i]) * scale_inv[(r / br) * scols + c / bc]);
  }
}

// Group (expert) of a row by binary search over offsets [groups+1].
__device__ __forceinline__ int64_t GroupOf(const int32_t* offsets, int64_t groups, int64_t row) {
  int64_t lo = 0, hi = groups - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (offsets[mid] <= row) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// One warp per (row, 128-block): 4 values per lane, amax, scale, store.
template <bool kSiluMul>
__global__ void QuantFp8Kernel(const uint16_t* __restrict__ in, int64_t M, int64_t K,
                               const int32_t* __restrict__ offsets, int64_t groups, uint8_t* __restrict__ q,
                               float* __restrict__ scale) {
  const int64_t kb_count = K / 128;
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= M * kb_count) return;
  const int64_t m = warp / kb_count, kb = warp % kb_count;
  float v[4];
  if (kSiluMul) {  // in is [M, 2K]: gate then up
    const uint2 g = *reinterpret_cast<const uint2*>(in + m * 2 * K + kb * 128 + lane * 4);
    const uint2 u = *reinterpret_cast<const uint2*>(in + m * 2 * K + K + kb * 128 + lane * 4);
    const float gf[4] = {__uint_as_float(g.x << 16), __uint_as_float(g.x & 0xffff0000u), __uint_as_float(g.y << 16),
                         __uint_as_float(g.y & 0xffff0000u)};
    const float uf[4] = {__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                         __uint_as_float(u.y & 0xffff0000u)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // Round through bf16 so the fp8 path sees the same activation as the bf16 path.
      v[i] = Bf16Bits2F(F2Bf16Bits(Silu(gf[i]) * uf[i]));
    }
  } else {
    const uint2 g = *reinterpret_cast<const uint2*>(in + m * K + kb * 128 + lane * 4);
    v[0] = __uint_as_float(g.x << 16);
    v[1] = __uint_as_float(g.x & 0xffff0000u);
    v[2] = __uint_as_float(g.y << 16);
    v[3] = __uint_as_float(g.y & 0xffff0000u);
  }
  float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
  amax = WarpMax(amax);
  const float s = amax > 0.0f ? amax / kFp8Max : 1.0f;
  const float inv = 1.0f / s;
  const uint32_t packed = static_cast<uint32_t>(FToFp8(v[0] * inv)) | (static_cast<uint32_t>(FToFp8(v[1] * inv)) << 8) |
                          (static_cast<uint32_t>(FToFp8(v[2] * inv)) << 16) |
                          (static_cast<uint32_t>(FToFp8(v[3] * inv)) << 24);
  *reinterpret_cast<uint32_t*>(q + m * K + kb * 128 + lane * 4) = packed;
  if (lane == 0) {
    int64_t o = 0, n = M;
    if (offsets != nullptr) {
      const int64_t g = GroupOf(offsets, groups, m);
      o = offsets[g];
      n = offsets[g + 1] - o;
    }
    scale[o * kb_count + kb * n + (m - o)] = s;
  }
}

}  // namespace

cudaError_t RmsNorm(const Bf16* x, int64_t T, int64_t H, const float* w, float eps, Bf16* y, cudaStream_t s) {
  if (T == 0) return cudaSuccess;
  const int64_t chunks = H / 8;
  const int threads = chunks >= 256 ? 256 : (chunks >= 128 ? 128 : 64);
  RmsNormKernel<<<static_cast<unsigned>(T), threads, 0, s>>>(reinterpret_cast<const uint4*>(x), chunks, w, eps,
                                                              reinterpret_cast<uint4*>(y));
  return cudaGetLastError();
}

cudaError_t SiluMulRows(const Bf16* gate_up, int64_t T, int64_t I, Bf16* out, cudaStream_t s) {
  const int64_t n = T * (I / 8);
  if (n == 0) return cudaSuccess;
  SiluMulRowsKernel<<<GridFor(n, 256), 256, 0, s>>>(reinterpret_cast<const uint4*>(gate_up), T, I / 8,
                                                     reinterpret_cast<uint4*>(out));
  return cudaGetLastError();
}

cudaError_t RopeApply(Bf16* x, int64_t tokens, int64_t vecs, int64_t token_stride, int64_t vec_stride, int64_t dim,
                      const int32_t* positions, const double* inv_freq, cudaStream_t s) {
  if (tokens == 0 || vecs == 0) return cudaSuccess;
  const int64_t half = dim / 2;
  RopeKernel<<<static_cast<unsigned>(tokens), 128, 2 * half * sizeof(float), s>>>(x, vecs, token_stride, vec_stride,
                                                                                  half, positions, inv_freq);
  return cudaGetLastError();
}

cudaError_t Embedding(const Bf16* table, int64_t V, int64_t H, const int32_t* ids, int64_t T, Bf16* out,
                      cudaStream_t s) {
  if (T == 0) return cudaSuccess;
  EmbeddingKernel<<<static_cast<unsigned>(T), 128, 0, s>>>(reinterpret_cast<const uint4*>(table), V, H / 8, ids,
                                                           reinterpret_cast<uint4*>(out));
  return cudaGetLastError();
}

cudaError_t ArgmaxRows(const float* logits, int64_t T, int64_t V, int32_t* out, cudaStream_t s) {
  if (T == 0) return cudaSuccess;
  ArgmaxRowsKernel<<<static_cast<unsigned>(T), 512, 0, s>>>(logits, V, out);
  return cudaGetLastError();
}

cudaError_t CastF32ToBf16(const float* x, int64_t n, Bf16* y, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  CastF32ToBf16Kernel<<<GridFor(n, 256), 256, 0, s>>>(x, n, y);
  return cudaGetLastError();
}
cudaError_t CastBf16ToF32(const Bf16* x, int64_t n, float* y, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  CastBf16ToF32Kernel<<<GridFor(n, 256), 256, 0, s>>>(x, n, y);
  return cudaGetLastError();
}

cudaError_t DequantFp8Blocks(const Fp8* q, int64_t rows, int64_t cols, const float* scale_inv, int64_t br,
                             int64_t bc, Bf16* out, cudaStream_t s) {
  const int64_t n = rows * cols;
  if (n == 0) return cudaSuccess;
  DequantFp8Kernel<<<GridFor(n, 256), 256, 0, s>>>(q, rows, cols, scale_inv, br, bc, out);
  return cudaGetLastError();
}

cudaError_t QuantFp8Rows(const Bf16* x, int64_t M, int64_t K, const int32_t* offsets, int64_t groups, Fp8* q,
                         float* scale, cudaStream_t s) {
  const int64_t warps = M * (K / 128);
  if (warps == 0) return cudaSuccess;
  QuantFp8Kernel<false><<<GridFor(warps * 32, 256, INT32_MAX), 256, 0, s>>>(x, M, K, offsets, groups, q, scale);
  return cudaGetLastError();
}

cudaError_t SiluMulQuantFp8Rows(const Bf16* gate_up, int64_t M, int64_t I, const int32_t* offsets, int64_t groups,
                                Fp8* q, float* scale, cudaStream_t s) {
  const int64_t warps = M * (I / 128);
  if (warps == 0) return cudaSuccess;
  QuantFp8Kernel<true><<<GridFor(warps * 32, 256, INT32_MAX), 256, 0, s>>>(gate_up, M, I, offsets, groups, q, scale);
  return cudaGetLastError();
}

}  // namespace expertmesh::kernels::cuda::internal
