// MLA decode attention (absorbed form) over a paged latent cache.
//
// Fast paths (kv_lora 512, rope 64): the wgmma kernel of mla_sm90a.cu on
// Hopper, else this flash-decoding kernel on bf16 tensor cores
// (mma.sync m16n8k16). A CTA of 8 warps takes 64 query rows (a row is one
// (query, head) pair: all heads of a sequence share the cache, so the heads
// are the M dimension of two GEMMs) of one sequence and walks its cache in
// 64-token tiles, double-buffered with cp.async:
//   S[64 x 64]  = Q[64 x 576] . K^T   (warp: 32 rows x 16 tokens)
//   online softmax (row max exchanged through shared memory)
//   O[64 x 512] += P[64 x 64] . V      (warp: 32 rows x 128 dims, V = latent)
// Shared memory: Q 72 KB + 2 KV tiles 144 KB + P 8 KB, rows XOR-swizzled in
// 16-byte chunks so ldmatrix is conflict free. Long caches with few CTAs are
// split along the tokens (num_splits) and merged by a second kernel.
//
// Generic path (any shape): one block per query row, CUDA cores; for the
// small test models.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/internal.h"

namespace expertmesh::kernels::cuda::internal {
namespace {

constexpr int kL = 512, kR = 64, kD = kL + kR;
constexpr int kBM = 64, kBN = 64, kThreads = 256;
constexpr int kChunks = kD / 8;          // 16-byte chunks per row (72)
constexpr int kRowBytes = kD * 2;        // 1152
constexpr int kTileBytes = kBM * kRowBytes;  // 73728 (Q tile and KV tile alike)
constexpr int kPBytes = kBM * kBN * 2;       // 8192
constexpr int kSmemBytes = 3 * kTileBytes + kPBytes + 4 * kBM * 4;  // 230400
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Byte offset of 16-byte chunk c of row r in a [rows][72 chunks] tile.
__device__ __forceinline__ uint32_t Swz(int r, int c) { return r * kRowBytes + ((c ^ (r & 7)) << 4); }
// Same for the [64][8 chunks] P tile.
__device__ __forceinline__ uint32_t SwzP(int r, int c) { return r * (kBN * 2) + ((c ^ (r & 7)) << 4); }

__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void Ldsm4(uint32_t addr, uint32_t* r) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void Ldsm4T(uint32_t addr, uint32_t* r) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void Mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

struct FastArgs {
  const uint16_t* q;
  const uint16_t* cache;
  const int32_t* block_table;
  const int32_t* seq_lens;
  uint16_t* out;
  float* o_part;
  float* lse_part;
  int batch, q_len, heads, page_size, max_pages, num_splits;
  float scale_log2;
};

__global__ void __launch_bounds__(kThreads, 1) MlaDecodeFastKernel(const FastArgs a) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* sQ = smem;
  uint8_t* sKV = smem + kTileBytes;  // two KV tiles, kTileBytes apart
  uint8_t* sP = smem + 3 * kTileBytes;
  float* sStat = reinterpret_cast<float*>(sP + kPBytes);  // [4][64]

  const int rb = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int hb = warp >> 2;  // rows hb*32 .. +32
  const int q4 = warp & 3;   // S: tokens q4*16 .. +16; PV: dims q4*128 .. +128
  const int rows_total = a.q_len * a.heads;
  const int row0 = rb * kBM;
  const int seq_len = a.seq_lens[b];

  // Token tiles of this split.
  const int ntiles_all = (seq_len + kBN - 1) / kBN;
  const int per_split = (ntiles_all + a.num_splits - 1) / a.num_splits;
  const int tile_begin = split * per_split;
  const int tile_end = min(ntiles_all, tile_begin + per_split);
  const int tok_end = min(seq_len, tile_end * kBN);

  // Q tile (zero rows past the last).
  const uint16_t* qb = a.q + static_cast<int64_t>(b) * rows_total * kD;
  const uint32_t sQa = SmemAddr(sQ);
  for (int i = tid; i < kBM * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const bool valid = row0 + r < rows_total;
    const uint16_t* src = valid ? qb + static_cast<int64_t>(row0 + r) * kD + c * 8 : a.q;
    CpAsync16(sQa + Swz(r, c), src, valid);
  }
  const int32_t* bt = a.block_table + static_cast<int64_t>(b) * a.max_pages;
  // Tile loads: 4 threads per cache row, one page lookup per thread and tile.
  const int lr = tid >> 2, lc = tid & 3;
  auto load_tile = [&](int tile, int buf) {
    const uint32_t dst = SmemAddr(sKV + buf * kTileBytes);
    const int j = tile * kBN + lr;
    const bool valid = j < tok_end;
    const uint16_t* src = a.cache;
    if (valid) src = a.cache + (static_cast<int64_t>(bt[j / a.page_size]) * a.page_size + j % a.page_size) * kD;
#pragma unroll
    for (int k = 0; k < kChunks / 4; ++k) {
      const int c = lc + k * 4;
      CpAsync16(dst + Swz(lr, c), valid ? src + c * 8 : src, valid);
    }
  };
  const int ntiles = tile_end > tile_begin ? tile_end - tile_begin : 0;
  if (ntiles > 0) load_tile(tile_begin, 0);
  CpAsyncCommit();

  // Per thread: 4 rows (mi in {0,1}, h in {0,1}): row = hb*32 + mi*16 + h*8 + lane/4.
  float m[4], l[4];
  int visible[4];
#pragma unroll
  for (int ri = 0; ri < 4; ++ri) {
    m[ri] = -INFINITY;
    l[ri] = 0.0f;
    const int grow = row0 + hb * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + (lane >> 2);
    const int t = grow / a.heads;
    visible[ri] = min(seq_len - a.q_len + t + 1, tok_end);
  }
  float o[2][16][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int n = 0; n < 16; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mi][n][e] = 0.0f;

  for (int it = 0; it < ntiles; ++it) {
    const int tile = tile_begin + it;
    if (it + 1 < ntiles) {
      load_tile(tile + 1, (it + 1) & 1);
      CpAsyncCommit();
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    const uint32_t sK = SmemAddr(sKV + (it & 1) * kTileBytes);

    // S = Q . K^T: 32 rows x 16 tokens per warp, 36 k-steps of 16.
    float s[2][2][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 2; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mi][ni][e] = 0.0f;
    {
      const int arow = hb * 32 + (lane & 7) + ((lane >> 3) & 1) * 8;
      const int achunk = lane >> 4;
      const int btok = q4 * 16 + (lane >> 4) * 8 + (lane & 7);
      const int bchunk = (lane >> 3) & 1;
#pragma unroll 4
      for (int kk = 0; kk < kD / 16; ++kk) {
        uint32_t af[2][4], bf[4];
        Ldsm4(sQa + Swz(arow, kk * 2 + achunk), af[0]);
        Ldsm4(sQa + Swz(arow + 16, kk * 2 + achunk), af[1]);
        Ldsm4(sK + Swz(btok, kk * 2 + bchunk), bf);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          Mma(s[mi][0], af[mi], bf[0], bf[1]);
          Mma(s[mi][1], af[mi], bf[2], bf[3]);
        }
      }
    }
    // Scale, mask, partial row max.
    const int tok0 = tile * kBN + q4 * 16 + (lane & 3) * 2;
    float mx[4];
#pragma unroll
    for (int ri = 0; ri < 4; ++ri) mx[ri] = -INFINITY;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 2; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int ri = mi * 2 + (e >> 1);
          const int tok = tok0 + ni * 8 + (e & 1);
          const float v = tok < visible[ri] ? s[mi][ni][e] * a.scale_log2 : -INFINITY;
          s[mi][ni][e] = v;
          mx[ri] = fmaxf(mx[ri], v);
        }
#pragma unroll
    for (int ri = 0; ri < 4; ++ri) {
      mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(0xffffffffu, mx[ri], 1));
      mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(0xffffffffu, mx[ri], 2));
      if ((lane & 3) == 0) sStat[q4 * kBM + hb * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + (lane >> 2)] = mx[ri];
    }
    __syncthreads();
    float m_use[4];
#pragma unroll
    for (int ri = 0; ri < 4; ++ri) {
      const int row = hb * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + (lane >> 2);
      float mt = fmaxf(fmaxf(sStat[row], sStat[kBM + row]), fmaxf(sStat[2 * kBM + row], sStat[3 * kBM + row]));
      const float m_new = fmaxf(m[ri], mt);
      m_use[ri] = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(m[ri] - m_use[ri]);
      m[ri] = m_new;
      l[ri] *= alpha;
      const int mi = ri >> 1, h = ri & 1;
#pragma unroll
      for (int n = 0; n < 16; ++n) {
        o[mi][n][h * 2] *= alpha;
        o[mi][n][h * 2 + 1] *= alpha;
      }
    }
    // P = exp2(S - m) -> shared (bf16), row sums.
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 2; ++ni)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int ri = mi * 2 + h;
          const float p0 = exp2f(s[mi][ni][h * 2] - m_use[ri]);
          const float p1 = exp2f(s[mi][ni][h * 2 + 1] - m_use[ri]);
          l[ri] += p0 + p1;
          const int row = hb * 32 + mi * 16 + h * 8 + (lane >> 2);
          const int col = q4 * 16 + ni * 8 + (lane & 3) * 2;
          *reinterpret_cast<uint32_t*>(sP + SwzP(row, col >> 3) + (col & 7) * 2) = Pack2(p0, p1);
        }
    __syncthreads();

    // O += P . V: 32 rows x 128 dims per warp, 4 k-steps of 16 tokens.
    {
      const uint32_t sPa = SmemAddr(sP);
      const int prow = hb * 32 + (lane & 7) + ((lane >> 3) & 1) * 8;
      const int pchunk = lane >> 4;
      const int vtok = (lane & 7) + ((lane >> 3) & 1) * 8;
      const int vchunk = q4 * 16 + (lane >> 4);
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t pf[2][4];
        Ldsm4(sPa + SwzP(prow, kk * 2 + pchunk), pf[0]);
        Ldsm4(sPa + SwzP(prow + 16, kk * 2 + pchunk), pf[1]);
#pragma unroll
        for (int np = 0; np < 8; ++np) {
          uint32_t vf[4];
          Ldsm4T(sK + Swz(kk * 16 + vtok, vchunk + np * 2), vf);
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            Mma(o[mi][2 * np], pf[mi], vf[0], vf[1]);
            Mma(o[mi][2 * np + 1], pf[mi], vf[2], vf[3]);
          }
        }
      }
    }
    __syncthreads();
  }
  CpAsyncWait<0>();  // nothing may stay in flight (ntiles == 0 leaves the Q group)

  // Row sums across the quad and the 4 warps of the row half.
#pragma unroll
  for (int ri = 0; ri < 4; ++ri) {
    l[ri] += __shfl_xor_sync(0xffffffffu, l[ri], 1);
    l[ri] += __shfl_xor_sync(0xffffffffu, l[ri], 2);
    if ((lane & 3) == 0) sStat[q4 * kBM + hb * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + (lane >> 2)] = l[ri];
  }
  __syncthreads();
#pragma unroll
  for (int ri = 0; ri < 4; ++ri) {
    const int row = hb * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + (lane >> 2);
    const float lt = sStat[row] + sStat[kBM + row] + sStat[2 * kBM + row] + sStat[3 * kBM + row];
    const int grow = row0 + row;
    if (grow >= rows_total) continue;
    const float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
    const int mi = ri >> 1, h = ri & 1;
    const int64_t orow = static_cast<int64_t>(b) * rows_total + grow;
    if (a.num_splits == 1) {
      uint16_t* dst = a.out + orow * kL + q4 * 128 + (lane & 3) * 2;
#pragma unroll
      for (int n = 0; n < 16; ++n) {
        *reinterpret_cast<uint32_t*>(dst + n * 8) = Pack2(o[mi][n][h * 2] * inv, o[mi][n][h * 2 + 1] * inv);
      }
    } else {
      const int64_t prow = static_cast<int64_t>(split) * a.batch * rows_total + orow;
      float* dst = a.o_part + prow * kL + q4 * 128 + (lane & 3) * 2;
#pragma unroll
      for (int n = 0; n < 16; ++n) {
        *reinterpret_cast<float2*>(dst + n * 8) = make_float2(o[mi][n][h * 2] * inv, o[mi][n][h * 2 + 1] * inv);
      }
      if (q4 == 0 && (lane & 3) == 0) a.lse_part[prow] = lt > 0.0f ? m[ri] + log2f(lt) : -INFINITY;
    }
  }
}

// Merge of the splits: one block per (row, sequence); lse in log2 units.
__global__ void MlaCombineKernel(const float* __restrict__ o_part, const float* __restrict__ lse_part, int batch,
                                 int rows_total, int splits, int L, uint16_t* __restrict__ out) {
  const int row = blockIdx.x, b = blockIdx.y;
  const int64_t orow = static_cast<int64_t>(b) * rows_total + row;
  const int64_t stride = static_cast<int64_t>(batch) * rows_total;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, lse_part[s * stride + orow]);
  float wsum = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float v = lse_part[s * stride + orow];
    wsum += v == -INFINITY ? 0.0f : exp2f(v - mx);
  }
  const float inv = wsum > 0.0f ? 1.0f / wsum : 0.0f;
  for (int d = threadIdx.x; d < L; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float v = lse_part[s * stride + orow];
      if (v == -INFINITY) continue;
      acc += exp2f(v - mx) * o_part[(s * stride + orow) * L + d];
    }
    out[orow * L + d] = F2Bf16Bits(acc * inv);
  }
}

// Generic path: one block of 128 threads per (row, sequence).
constexpr int kGenThreads = 128;
constexpr int kGenMaxL = 1024;

__global__ void MlaDecodeGenericKernel(const MlaDecodeArgs a) {
  extern __shared__ float gsm[];  // q [L+R], p [128]
  __shared__ float red[32];
  const int D = static_cast<int>(a.kv_lora + a.rope), L = static_cast<int>(a.kv_lora);
  float* sq = gsm;
  float* sp = gsm + D;
  const int row = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int rows_total = static_cast<int>(a.q_len * a.heads);
  const int seq_len = a.seq_lens[b];
  const int t = row / static_cast<int>(a.heads);
  const int visible = seq_len - static_cast<int>(a.q_len) + t + 1;
  const int64_t orow = static_cast<int64_t>(b) * rows_total + row;
  for (int d = tid; d < D; d += kGenThreads) sq[d] = Bf16Bits2F(a.q[orow * D + d]);
  __syncthreads();
  const int32_t* bt = a.block_table + static_cast<int64_t>(b) * a.max_pages;
  constexpr int kMaxDims = kGenMaxL / kGenThreads;
  float acc[kMaxDims];
#pragma unroll
  for (int i = 0; i < kMaxDims; ++i) acc[i] = 0.0f;
  float m = -INFINITY, lsum = 0.0f;
  for (int j0 = 0; j0 < visible; j0 += kGenThreads) {
    const int j = j0 + tid;
    float sc = -INFINITY;
    if (j < visible) {
      const uint16_t* kv = a.kv_cache + (static_cast<int64_t>(bt[j / a.page_size]) * a.page_size + j % a.page_size) * D;
      float dot = 0.0f;
      for (int d = 0; d < D; ++d) dot += sq[d] * Bf16Bits2F(kv[d]);
      sc = dot * a.softmax_scale;
    }
    const float mt = BlockMax(sc, red);
    const float m_new = fmaxf(m, mt);
    const float alpha = m == -INFINITY ? 0.0f : expf(m - m_new);
    const float p = j < visible ? expf(sc - m_new) : 0.0f;
    __syncthreads();
    sp[tid] = p;
    const float ps = BlockSum(p, red);
    lsum = lsum * alpha + ps;
    m = m_new;
    const int n = min(kGenThreads, visible - j0);
#pragma unroll
    for (int i = 0; i < kMaxDims; ++i) {
      const int d = tid + i * kGenThreads;
      if (d >= L) break;
      float v = acc[i] * alpha;
      for (int jj = 0; jj < n; ++jj) {
        const int jt = j0 + jj;
        const uint16_t* kv =
            a.kv_cache + (static_cast<int64_t>(bt[jt / a.page_size]) * a.page_size + jt % a.page_size) * D;
        v += sp[jj] * Bf16Bits2F(kv[d]);
      }
      acc[i] = v;
    }
    __syncthreads();
  }
  const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxDims; ++i) {
    const int d = tid + i * kGenThreads;
    if (d < L) a.out[orow * L + d] = F2Bf16Bits(acc[i] * inv);
  }
}

__global__ void MlaCopyRopeKernel(const uint16_t* __restrict__ q, int64_t N, int64_t heads, int64_t nope, int64_t rope,
                                  int64_t kv_lora, uint16_t* __restrict__ q_abs) {
  const int64_t n = N * heads * rope;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / rope, d = i % rope;  // r = token*heads + head
    q_abs[r * (kv_lora + rope) + kv_lora + d] = q[r * (nope + rope) + nope + d];
  }
}

}  // namespace

bool MlaFastPathSupported(int64_t kv_lora, int64_t rope) { return kv_lora == kL && rope == kR; }

int MlaRowBlocks(int64_t q_len, int64_t heads) { return static_cast<int>((q_len * heads + kBM - 1) / kBM); }

cudaError_t MlaDecode(const MlaDecodeArgs& a, cudaStream_t s) {
  if (a.batch == 0 || a.q_len * a.heads == 0) return cudaSuccess;
  const int rows_total = static_cast<int>(a.q_len * a.heads);
  if (MlaFastPathSupported(a.kv_lora, a.rope) && a.kernel != 1 && (a.kernel >= 2 || MlaWgmmaAvailable())) {
    cudaError_t err = MlaDecodeWgmma(a, s);
    if (err != cudaSuccess || a.num_splits == 1) return err;
    MlaCombineKernel<<<dim3(rows_total, static_cast<unsigned>(a.batch)), 128, 0, s>>>(
        a.o_part, a.lse_part, static_cast<int>(a.batch), rows_total, a.num_splits, kL, a.out);
    return cudaGetLastError();
  }
  if (MlaFastPathSupported(a.kv_lora, a.rope)) {
    static bool attr_set = false;
    if (!attr_set) {
      cudaError_t err =
          cudaFuncSetAttribute(MlaDecodeFastKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
      if (err != cudaSuccess) return err;
      attr_set = true;
    }
    FastArgs f{a.q, a.kv_cache, a.block_table, a.seq_lens, a.out, a.o_part, a.lse_part,
               static_cast<int>(a.batch), static_cast<int>(a.q_len), static_cast<int>(a.heads),
               static_cast<int>(a.page_size), static_cast<int>(a.max_pages), a.num_splits,
               a.softmax_scale * kLog2e};
    dim3 grid(MlaRowBlocks(a.q_len, a.heads), static_cast<unsigned>(a.batch), a.num_splits);
    MlaDecodeFastKernel<<<grid, kThreads, kSmemBytes, s>>>(f);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || a.num_splits == 1) return err;
    MlaCombineKernel<<<dim3(rows_total, static_cast<unsigned>(a.batch)), 128, 0, s>>>(
        a.o_part, a.lse_part, static_cast<int>(a.batch), rows_total, a.num_splits, kL, a.out);
    return cudaGetLastError();
  }
  const size_t smem = (a.kv_lora + a.rope + kGenThreads) * sizeof(float);
  MlaDecodeGenericKernel<<<dim3(rows_total, static_cast<unsigned>(a.batch)), kGenThreads, smem, s>>>(a);
  return cudaGetLastError();
}

cudaError_t MlaCopyRope(const Bf16* q, int64_t N, int64_t heads, int64_t nope, int64_t rope, int64_t kv_lora,
                        Bf16* q_abs, cudaStream_t s) {
  const int64_t n = N * heads * rope;
  if (n == 0) return cudaSuccess;
  MlaCopyRopeKernel<<<GridFor(n, 256), 256, 0, s>>>(q, N, heads, nope, rope, kv_lora, q_abs);
  return cudaGetLastError();
}

}  // namespace expertmesh::kernels::cuda::internal
