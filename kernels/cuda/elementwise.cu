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

// Activation quantisation to fp8 with one scale per 128 tokens x 128
// channels, the layout cuBLASLt's BLK128x128_32F mode reads for the B operand
// (scale[slot * L4 + kb], L4 = K/128 rounded up to 4). Rows are split into
// groups (experts) by offsets; group g's token blocks take the slots
// floor(o_g/128) + g + mb, mb = 0, 1, ... (disjoint for any group sizes, so a
// slot is a function of the device offsets alone). One CTA of 256 threads per
// (slot, kb): thread = (row, half of 128 channels).
template <bool kSiluMul>
__global__ void QuantFp8BlocksKernel(const uint16_t* __restrict__ in, int64_t M, int64_t K,
                                     const int32_t* __restrict__ offsets, int64_t groups, int64_t L4,
                                     uint8_t* __restrict__ q, float* __restrict__ scale) {
  __shared__ float red[32];
  const int64_t slot = blockIdx.x, kb = blockIdx.y;
  int64_t g = 0, o = 0, n = M;
  if (offsets != nullptr) {
    int64_t lo = 0, hi = groups - 1;  // last group whose first slot is <= slot
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) >> 1;
      if (offsets[mid] / 128 + mid <= slot) lo = mid;
      else hi = mid - 1;
    }
    g = lo;
    o = offsets[g];
    n = offsets[g + 1] - o;
  }
  const int64_t mb = slot - (o / 128 + g);
  if (mb < 0 || mb * 128 >= n) return;  // idle slot (uniform over the block)
  const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int64_t row = o + mb * 128 + r;
  const bool valid = mb * 128 + r < n;
  float v[64];
  if (valid) {
    const int64_t c0 = kb * 128 + half * 64;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      if (kSiluMul) {  // in is [M, 2K]: gate then up
        float gf[8], uf[8];
        Unpack8(*reinterpret_cast<const uint4*>(in + row * 2 * K + c0 + c * 8), gf);
        Unpack8(*reinterpret_cast<const uint4*>(in + row * 2 * K + K + c0 + c * 8), uf);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[c * 8 + i] = Bf16Bits2F(F2Bf16Bits(Silu(gf[i]) * uf[i]));
      } else {
        Unpack8(*reinterpret_cast<const uint4*>(in + row * K + c0 + c * 8), &v[c * 8]);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < 64; ++i) v[i] = 0.0f;
  }
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 64; ++i) amax = fmaxf(amax, fabsf(v[i]));
  amax = BlockMax(amax, red);
  const float s = amax > 0.0f ? amax / kFp8Max : 1.0f;
  const float inv = 1.0f / s;
  if (valid) {
    uint8_t* dst = q + row * K + kb * 128 + half * 64;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      uint32_t w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float* f = &v[c * 16 + k * 4];
        w[k] = static_cast<uint32_t>(FToFp8(f[0] * inv)) | (static_cast<uint32_t>(FToFp8(f[1] * inv)) << 8) |
               (static_cast<uint32_t>(FToFp8(f[2] * inv)) << 16) | (static_cast<uint32_t>(FToFp8(f[3] * inv)) << 24);
      }
      *reinterpret_cast<uint4*>(dst + c * 16) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
  if (threadIdx.x == 0) scale[slot * L4 + kb] = s;
}

// row_scale[kb * N + n] = scale_inv[(n / 128) * ceil(K / 128) + kb].
__global__ void ExpandFp8ScalesKernel(const float* __restrict__ scale_inv, int64_t N, int64_t K,
                                      float* __restrict__ row_scale) {
  const int64_t kbs = K / 128, kbin = (K + 127) / 128, total = kbs * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t kb = i / N, n = i % N;
    row_scale[i] = scale_inv[(n / 128) * kbin + kb];
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

int64_t Fp8ScaleSlots(int64_t M, int64_t groups) { return M / 128 + groups + 1; }

cudaError_t QuantFp8Blocks(const Bf16* x, int64_t M, int64_t K, const int32_t* offsets, int64_t groups, Fp8* q,
                           float* scale, cudaStream_t s) {
  if (M == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(offsets != nullptr ? Fp8ScaleSlots(M, groups) : (M + 127) / 128),
                  static_cast<unsigned>(K / 128));
  QuantFp8BlocksKernel<false><<<grid, 256, 0, s>>>(x, M, K, offsets, groups, Fp8ScaleStride(K), q, scale);
  return cudaGetLastError();
}

cudaError_t SiluMulQuantFp8Blocks(const Bf16* gate_up, int64_t M, int64_t I, const int32_t* offsets, int64_t groups,
                                  Fp8* q, float* scale, cudaStream_t s) {
  if (M == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(offsets != nullptr ? Fp8ScaleSlots(M, groups) : (M + 127) / 128),
                  static_cast<unsigned>(I / 128));
  QuantFp8BlocksKernel<true><<<grid, 256, 0, s>>>(gate_up, M, I, offsets, groups, Fp8ScaleStride(I), q, scale);
  return cudaGetLastError();
}

cudaError_t ExpandFp8Scales(const float* scale_inv, int64_t N, int64_t K, float* row_scale, cudaStream_t s) {
  const int64_t n = (K / 128) * N;
  if (n == 0) return cudaSuccess;
  ExpandFp8ScalesKernel<<<GridFor(n, 256), 256, 0, s>>>(scale_inv, N, K, row_scale);
  return cudaGetLastError();
}

}  // namespace expertmesh::kernels::cuda::internal
