// MoE routing and token movement: fused group-limited router, expert-major
// layout (stable counting sort), dispatch layout, permute and weighted combine.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/internal.h"

namespace expertmesh::kernels::cuda::internal {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// One warp per token; lane holds experts e = j*32 + lane (coalesced loads).
template <int VPT>
__global__ void RouteKernel(const float* __restrict__ logits, const float* __restrict__ bias, int T, int E, int G,
                            int topk_groups, int K, bool sigmoid, bool norm, float scaling, int32_t* __restrict__ ids,
                            float* __restrict__ weights) {
  const int t = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (t >= T) return;
  const float* l = logits + static_cast<int64_t>(t) * E;
  float score[VPT], choice[VPT];
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = j * 32 + lane;
    score[j] = e < E ? l[e] : -INFINITY;
  }
  if (sigmoid) {
#pragma unroll
    for (int j = 0; j < VPT; ++j) score[j] = 1.0f / (1.0f + expf(-score[j]));
  } else {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < VPT; ++j) mx = fmaxf(mx, score[j]);
    mx = WarpMax(mx);
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      score[j] = expf(score[j] - mx);  // exp(-inf) = 0 for padding
      sum += score[j];
    }
    sum = WarpSum(sum);
#pragma unroll
    for (int j = 0; j < VPT; ++j) score[j] /= sum;
  }
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = j * 32 + lane;
    choice[j] = e < E ? score[j] + (bias != nullptr ? bias[e] : 0.0f) : -INFINITY;
  }
  if (G > 1) {
    const int per = E / G;
    float my_group_score = -INFINITY;  // lane g holds group g's score
    for (int g = 0; g < G; ++g) {
      float a = -INFINITY, b = -INFINITY;  // top-2 of the group
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        const int e = j * 32 + lane;
        if (e < E && e / per == g) {
          const float c = choice[j];
          if (c > a) {
            b = a;
            a = c;
          } else if (c > b) {
            b = c;
          }
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float oa = __shfl_xor_sync(kFull, a, o), ob = __shfl_xor_sync(kFull, b, o);
        const float na = fmaxf(a, oa);
        b = fmaxf(fminf(a, oa), fmaxf(b, ob));
        a = na;
      }
      if (lane == g) my_group_score = a + b;
    }
    // Rank of each group (descending score, lower index first on ties).
    int rank = 0;
    for (int g = 0; g < G; ++g) {
      const float v = __shfl_sync(kFull, my_group_score, g);
      if (v > my_group_score || (v == my_group_score && g < lane)) ++rank;
    }
    const unsigned keep = __ballot_sync(kFull, lane < G && rank < topk_groups);
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int e = j * 32 + lane;
      if (e < E && !((keep >> (e / per)) & 1u)) choice[j] = -INFINITY;
    }
  }
  // Top-K by repeated warp argmax (value descending, index ascending).
  unsigned taken = 0;
  int my_id = 0;
  float my_score = 0.0f, sum = 0.0f;
  for (int k = 0; k < K; ++k) {
    float bv = -INFINITY;
    int bi = INT32_MAX;
    float bs = 0.0f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int e = j * 32 + lane;
      if (e < E && !((taken >> j) & 1u) && (choice[j] > bv || (choice[j] == bv && e < bi))) {
        bv = choice[j];
        bi = e;
        bs = score[j];
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(kFull, bv, o);
      const int oi = __shfl_xor_sync(kFull, bi, o);
      const float os = __shfl_xor_sync(kFull, bs, o);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
        bs = os;
      }
    }
    if (bi != INT32_MAX && (bi & 31) == lane) taken |= 1u << (bi >> 5);
    if (lane == k) {
      my_id = bi;
      my_score = bs;
    }
    sum += bs;
  }
  const float scale = (norm && K > 1) ? scaling / (sum + 1e-20f) : scaling;
  if (lane < K) {
    ids[static_cast<int64_t>(t) * K + lane] = my_id;
    weights[static_cast<int64_t>(t) * K + lane] = my_score * scale;
  }
}

constexpr int kLayoutChunk = 1024;  // pairs per block in the layout kernels (= threads of the assign kernel)

__device__ __forceinline__ bool ValidExpert(int32_t e, int64_t E) { return e >= 0 && e < E; }

// counts[b][e]: pairs of chunk b routed to expert e.
__global__ void LayoutCountKernel(const int32_t* __restrict__ ids, int64_t pairs, int E, int32_t* __restrict__ counts) {
  extern __shared__ int32_t sc[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) sc[e] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kLayoutChunk;
  for (int64_t i = begin + threadIdx.x; i < begin + kLayoutChunk && i < pairs; i += blockDim.x) {
    const int32_t e = ids[i];
    if (ValidExpert(e, E)) atomicAdd(&sc[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[static_cast<int64_t>(blockIdx.x) * E + e] = sc[e];
}

// One block: counts[b][e] becomes the first row of chunk b's pairs of expert
// e; offsets[e] the first row of expert e (exclusive scan), offsets[E] total.
__global__ void LayoutScanKernel(int32_t* __restrict__ counts, int nblocks, int E, int32_t* __restrict__ offsets) {
  extern __shared__ int32_t tot[];  // [E]
  __shared__ int32_t warp_sums[32];
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int32_t run = 0;
    for (int b = 0; b < nblocks; ++b) {
      const int32_t c = counts[static_cast<int64_t>(b) * E + e];
      counts[static_cast<int64_t>(b) * E + e] = run;
      run += c;
    }
    tot[e] = run;
  }
  __syncthreads();
  // Exclusive scan of tot over experts, blockDim.x at a time.
  int32_t carry = 0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int base = 0; base < E; base += blockDim.x) {
    const int e = base + threadIdx.x;
    const int32_t v = e < E ? tot[e] : 0;
    int32_t x = v;  // inclusive warp scan
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t y = __shfl_up_sync(kFull, x, o);
      if (lane >= o) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    int32_t wprefix = 0;
    for (int w = 0; w < warp; ++w) wprefix += warp_sums[w];
    int32_t total = 0;
    for (int w = 0; w < nw; ++w) total += warp_sums[w];
    if (e < E) offsets[e] = carry + wprefix + x - v;
    carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) offsets[E] = carry;
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int32_t o = offsets[e];
    for (int b = 0; b < nblocks; ++b) counts[static_cast<int64_t>(b) * E + e] += o;
  }
}

// One thread per pair (kLayoutChunk threads per block): stable rank inside
// the block from warp match + per-warp counts, plus the block's base row.
__global__ void __launch_bounds__(kLayoutChunk) LayoutAssignKernel(const int32_t* __restrict__ ids, int64_t pairs,
                                                                   int E, const int32_t* __restrict__ base,
                                                                   int32_t* __restrict__ pos) {
  extern __shared__ int32_t wc[];  // [32 warps][E]
  const int nw = kLayoutChunk / 32;
  for (int i = threadIdx.x; i < nw * E; i += blockDim.x) wc[i] = 0;
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kLayoutChunk + threadIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int32_t e = i < pairs ? ids[i] : -2;
  const bool valid = i < pairs && ValidExpert(e, E);
  if (!valid) e = -1 - (i >= pairs);  // any invalid value; never written
  const unsigned peers = __match_any_sync(kFull, e);
  const int rank = __popc(peers & ((1u << lane) - 1u));
  if (valid && rank == 0) wc[warp * E + e] = __popc(peers);
  __syncthreads();
  for (int x = threadIdx.x; x < E; x += blockDim.x) {
    int32_t run = 0;
    for (int w = 0; w < nw; ++w) {
      const int32_t c = wc[w * E + x];
      wc[w * E + x] = run;
      run += c;
    }
  }
  __syncthreads();
  if (i < pairs) pos[i] = valid ? base[static_cast<int64_t>(blockIdx.x) * E + e] + wc[warp * E + e] + rank : -1;
}

// One warp per token.
__global__ void DispatchLayoutKernel(const int32_t* __restrict__ ids, int T, int k, int E,
                                     const int32_t* __restrict__ expert_rank, int R, int32_t* __restrict__ per_rank,
                                     int32_t* __restrict__ per_expert, uint8_t* __restrict__ in_rank) {
  const int t = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (t >= T) return;
  uint8_t* row = in_rank + static_cast<int64_t>(t) * R;
  for (int r = lane; r < R; r += 32) row[r] = 0;
  __syncwarp();
  int32_t rank = -1;
  if (lane < k) {
    const int32_t e = ids[static_cast<int64_t>(t) * k + lane];
    if (e >= 0 && e < E) {
      atomicAdd(&per_expert[e], 1);
      rank = expert_rank[e];
      if (rank < 0 || rank >= R) rank = -1;
    }
  }
  const unsigned peers = __match_any_sync(kFull, rank);
  if (rank >= 0 && (peers & ((1u << lane) - 1u)) == 0) {
    row[rank] = 1;
    atomicAdd(&per_rank[rank], 1);
  }
}

constexpr int kMaxK = 32;

// One block per token: read the row once, write it to each of its rows.
__global__ void PermuteKernel(const uint4* __restrict__ x, int64_t chunks, const int32_t* __restrict__ pos, int k,
                              uint4* __restrict__ x_perm) {
  __shared__ int32_t sp[kMaxK];
  const int64_t t = blockIdx.x;
  if (threadIdx.x < k) sp[threadIdx.x] = pos[t * k + threadIdx.x];
  __syncthreads();
  constexpr int U = 4;
  const uint4* xr = x + t * chunks;
  for (int64_t c0 = threadIdx.x; c0 < chunks; c0 += static_cast<int64_t>(blockDim.x) * U) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + static_cast<int64_t>(u) * blockDim.x;
      if (c < chunks) v[u] = xr[c];
    }
    for (int j = 0; j < k; ++j) {
      const int32_t p = sp[j];
      if (p < 0) continue;
      uint4* dst = x_perm + static_cast<int64_t>(p) * chunks;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + static_cast<int64_t>(u) * blockDim.x;
        if (c < chunks) dst[c] = v[u];
      }
    }
  }
}

// One block per token: gather its k rows, weight, sum in fp32.
__global__ void CombineKernel(const uint4* __restrict__ out_perm, int64_t chunks, const int32_t* __restrict__ pos,
                              const float* __restrict__ weights, int k, uint4* __restrict__ y, bool accumulate) {
  __shared__ int32_t sp[kMaxK];
  __shared__ float sw[kMaxK];
  const int64_t t = blockIdx.x;
  if (threadIdx.x < k) {
    sp[threadIdx.x] = pos[t * k + threadIdx.x];
    sw[threadIdx.x] = weights[t * k + threadIdx.x];
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (accumulate) Unpack8(y[t * chunks + c], acc);
#pragma unroll 4
    for (int j = 0; j < k; ++j) {
      const int32_t p = sp[j];
      if (p < 0) continue;
      float f[8];
      Unpack8(out_perm[static_cast<int64_t>(p) * chunks + c], f);
      const float w = sw[j];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += w * f[i];
    }
    y[t * chunks + c] = Pack8(acc);
  }
}

}  // namespace

cudaError_t Route(const float* logits, const float* bias, int64_t T, int64_t E, int64_t G, int64_t topk_groups,
                  int64_t K, bool sigmoid, bool norm, float scaling, int32_t* ids, float* weights, cudaStream_t s) {
  if (T == 0) return cudaSuccess;
  const unsigned blocks = GridFor(T * 32, 256, INT32_MAX);
  const int vpt = static_cast<int>((E + 31) / 32);
#define EM_ROUTE(V)                                                                                             \
  RouteKernel<V><<<blocks, 256, 0, s>>>(logits, bias, static_cast<int>(T), static_cast<int>(E),              \
                                        static_cast<int>(G), static_cast<int>(topk_groups), static_cast<int>(K), \
                                        sigmoid, norm, scaling, ids, weights)
  if (vpt <= 1) EM_ROUTE(1);
  else if (vpt <= 2) EM_ROUTE(2);
  else if (vpt <= 4) EM_ROUTE(4);
  else if (vpt <= 8) EM_ROUTE(8);
  else EM_ROUTE(16);
#undef EM_ROUTE
  return cudaGetLastError();
}

int64_t ExpertLayoutScratchInts(int64_t pairs, int64_t E) {
  const int64_t nblocks = (pairs + kLayoutChunk - 1) / kLayoutChunk;
  return (nblocks > 0 ? nblocks : 1) * E;
}

cudaError_t ExpertLayout(const int32_t* ids, int64_t pairs, int64_t E, int32_t* scratch, int32_t* offsets,
                         int32_t* pos, cudaStream_t s) {
  const int nblocks = static_cast<int>((pairs + kLayoutChunk - 1) / kLayoutChunk);
  const int e = static_cast<int>(E);
  if (nblocks == 0) return cudaMemsetAsync(offsets, 0, (E + 1) * sizeof(int32_t), s);
  const size_t assign_smem = static_cast<size_t>(kLayoutChunk / 32) * E * sizeof(int32_t);
  if (assign_smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(LayoutAssignKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(assign_smem));
    if (err != cudaSuccess) return err;
  }
  LayoutCountKernel<<<nblocks, 256, E * sizeof(int32_t), s>>>(ids, pairs, e, scratch);
  LayoutScanKernel<<<1, 1024, E * sizeof(int32_t), s>>>(scratch, nblocks, e, offsets);
  LayoutAssignKernel<<<nblocks, kLayoutChunk, assign_smem, s>>>(ids, pairs, e, scratch, pos);
  return cudaGetLastError();
}

cudaError_t DispatchLayout(const int32_t* ids, int64_t T, int64_t k, int64_t E, const int32_t* expert_rank, int64_t R,
                           int32_t* tokens_per_rank, int32_t* tokens_per_expert, uint8_t* token_in_rank,
                           cudaStream_t s) {
  cudaError_t err = cudaMemsetAsync(tokens_per_rank, 0, R * sizeof(int32_t), s);
  if (err == cudaSuccess) err = cudaMemsetAsync(tokens_per_expert, 0, E * sizeof(int32_t), s);
  if (err != cudaSuccess || T == 0) return err;
  DispatchLayoutKernel<<<GridFor(T * 32, 256, INT32_MAX), 256, 0, s>>>(
      ids, static_cast<int>(T), static_cast<int>(k), static_cast<int>(E), expert_rank, static_cast<int>(R),
      tokens_per_rank, tokens_per_expert, token_in_rank);
  return cudaGetLastError();
}

cudaError_t Permute(const Bf16* x, int64_t T, int64_t H, const int32_t* pos, int64_t k, Bf16* x_perm,
                    cudaStream_t s) {
  if (T == 0) return cudaSuccess;
  PermuteKernel<<<static_cast<unsigned>(T), 128, 0, s>>>(reinterpret_cast<const uint4*>(x), H / 8, pos,
                                                         static_cast<int>(k), reinterpret_cast<uint4*>(x_perm));
  return cudaGetLastError();
}

cudaError_t Combine(const Bf16* out_perm, const int32_t* pos, const float* weights, int64_t T, int64_t k, int64_t H,
                    Bf16* y, bool accumulate, cudaStream_t s) {
  if (T == 0) return cudaSuccess;
  CombineKernel<<<static_cast<unsigned>(T), 128, 0, s>>>(reinterpret_cast<const uint4*>(out_perm), H / 8, pos, weights,
                                                         static_cast<int>(k), reinterpret_cast<uint4*>(y), accumulate);
  return cudaGetLastError();
}

}  // namespace expertmesh::kernels::cuda::internal
