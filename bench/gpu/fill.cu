#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "bench/gpu/fill.h"

namespace expertmesh::bench {
namespace {

__device__ __forceinline__ float U01(uint64_t i, uint64_t seed) {
  uint64_t x = i * 0x9e3779b97f4a7c15ull + seed;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  x ^= x >> 31;
  return static_cast<float>(x >> 40) * (1.0f / 16777216.0f);
}

template <typename F>
__global__ void FillKernel(int64_t n, F f) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    f(i);
  }
}

template <typename F>
void Launch(int64_t n, F f) {
  if (n > 0) FillKernel<<<4096, 256>>>(n, f);
}

}  // namespace

void FillUniformBf16(uint16_t* x, int64_t n, uint64_t seed, float lo, float hi) {
  Launch(n, [=] __device__(int64_t i) {
    __nv_bfloat16 b = __float2bfloat16_rn(lo + (hi - lo) * U01(i, seed));
    x[i] = *reinterpret_cast<uint16_t*>(&b);
  });
}

void FillUniformF32(float* x, int64_t n, uint64_t seed, float lo, float hi) {
  Launch(n, [=] __device__(int64_t i) { x[i] = lo + (hi - lo) * U01(i, seed); });
}

void FillUniformFp8(uint8_t* x, int64_t n, uint64_t seed, float max_abs) {
  Launch(n, [=] __device__(int64_t i) {
    const float v = max_abs * (2.0f * U01(i, seed) - 1.0f);
    x[i] = static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
  });
}

}  // namespace expertmesh::bench
