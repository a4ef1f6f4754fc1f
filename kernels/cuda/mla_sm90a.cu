// MLA decode with Hopper warpgroup MMA (wgmma, sm_90a only): the same
// algorithm as the mma.sync kernel in mla.cu, with the tensor cores reading
// Q, K, V and P straight from shared memory through matrix descriptors.
//
// CTA: 64 query rows of one sequence, 2 warpgroups (256 threads), 64-token
// tiles double-buffered with cp.async. Tiles are stored as 9 slabs of 64
// dims (128-byte rows, the 128B-swizzle atom of wgmma), so one copy serves
// as K (K-major B operand of S = Q K^T) and as V (MN-major B operand of
// O += P V). Warpgroup g computes S for tokens [32g, 32g+32) (m64n32k16) and
// O for dims [256g, 256g+256) (m64n256k16, 128 fp32 registers per thread);
// the row maxima and P go through shared memory between the two.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/internal.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define EM_HAVE_WGMMA 1
#endif

namespace expertmesh::kernels::cuda::internal {
namespace {

constexpr int kL = 512, kD = 576, kBM = 64, kThreads = 256;
constexpr int kQSlab = kBM * 128;             // a 64-dim slab of the Q tile (64 rows x 128 B)
constexpr int kQBytes = (kD / 64) * kQSlab;   // 73728
constexpr int kPBytes = 64 * 128;             // P: 64 rows x up to 64 tokens
// BN tokens per tile, STAGES tiles in flight: 64 x 2 or 32 x 4 (same 216 KB of tiles).
template <int BN, int STAGES>
constexpr int SmemBytes() {
  return 1024 + kQBytes + STAGES * (kD / 64) * BN * 128 + kPBytes + 2 * kBM * 4;
}
constexpr float kLog2e = 1.4426950408889634f;

struct WgArgs {
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

#ifdef EM_HAVE_WGMMA
__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Byte offset of 16-byte chunk c (0..71) of row r in a tile of `rows` rows:
// slab c/8 (64 dims, rows x 128 B), 128-byte swizzle inside the slab.
__device__ __forceinline__ uint32_t Off(int r, int c, int rows) {
  return (c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// Generic-proxy writes (cp.async, st.shared) -> visible to the tensor cores.
__device__ __forceinline__ void FenceProxyAsync() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Shared-memory matrix descriptor, 128-byte swizzle.
__device__ __forceinline__ uint64_t Desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void WgFence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void WgCommit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void WgWait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void FenceRegs(float* d) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ void WgmmaS32(float* d, uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(da), "l"(db), "r"(scale_d));
}

__device__ __forceinline__ void WgmmaS16(float* d, uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(da), "l"(db), "r"(scale_d));
}

__device__ __forceinline__ void WgmmaS64(float* d, uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(scale_d));
}

__device__ __forceinline__ void WgmmaPV(float* d, uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db), "r"(scale_d));
}
#endif  // EM_HAVE_WGMMA

// kOneWgS: warpgroup 0 computes S for all BN tokens and the softmax (no
// row-max exchange, one barrier less), warpgroup 1 only rescales and
// accumulates its half of O; otherwise each warpgroup computes S for half
// the tokens and the row maxima meet in shared memory.
template <int BN, int STAGES, bool kOneWgS>
__global__ void __launch_bounds__(kThreads, 1) MlaDecodeWgmmaKernel(const WgArgs a) {
#ifdef EM_HAVE_WGMMA
  constexpr int kSlab = BN * 128;               // a 64-dim slab of a KV tile
  constexpr int kTile = (kD / 64) * kSlab;
  constexpr int kNS = BN / 2;                   // S tokens per warpgroup
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = SmemAddr(smem_raw);
  uint8_t* smem = smem_raw + ((1024 - (raw & 1023)) & 1023);
  uint8_t* sQ = smem;
  uint8_t* sKV = smem + kQBytes;
  uint8_t* sP = sKV + STAGES * kTile;
  float* sStat = reinterpret_cast<float*>(sP + kPBytes);  // [2][64]

  const int rb = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31;
  const int wg = tid >> 7;                 // warpgroup: S tokens [kNS*wg, +kNS), O dims [256wg, +256)
  const int wrow = ((tid >> 5) & 3) * 16;  // the warp's 16 rows inside the 64
  const int rows_total = a.q_len * a.heads;
  const int row0 = rb * kBM;
  const int seq_len = a.seq_lens[b];
  const int ntiles_all = (seq_len + BN - 1) / BN;
  const int per_split = (ntiles_all + a.num_splits - 1) / a.num_splits;
  const int tile_begin = split * per_split;
  const int tile_end = min(ntiles_all, tile_begin + per_split);
  const int tok_end = min(seq_len, tile_end * BN);
  const int ntiles = tile_end > tile_begin ? tile_end - tile_begin : 0;

  const uint16_t* qb = a.q + static_cast<int64_t>(b) * rows_total * kD;
  const uint32_t sQa = SmemAddr(sQ), sKVa = SmemAddr(sKV), sPa = SmemAddr(sP);
  for (int i = tid; i < kBM * (kD / 8); i += kThreads) {
    const int r = i / (kD / 8), c = i % (kD / 8);
    const bool valid = row0 + r < rows_total;
    CpAsync16(sQa + Off(r, c, kBM), valid ? qb + static_cast<int64_t>(row0 + r) * kD + c * 8 : a.q, valid);
  }
  const int32_t* bt = a.block_table + static_cast<int64_t>(b) * a.max_pages;
  // Tile loads: kTpr threads per cache row, one page lookup per thread and tile.
  constexpr int kTpr = kThreads / BN;
  const int lr = tid / kTpr, lc = tid % kTpr;
  auto load_tile = [&](int tile, int buf) {
    const uint32_t dst = sKVa + buf * kTile;
    const int j = tile * BN + lr;
    const bool valid = j < tok_end;
    const uint16_t* src = a.cache;
    if (valid) src = a.cache + (static_cast<int64_t>(bt[j / a.page_size]) * a.page_size + j % a.page_size) * kD;
#pragma unroll
    for (int k = 0; k < (kD / 8) / kTpr; ++k) {
      const int c = lc + k * kTpr;
      CpAsync16(dst + Off(lr, c, BN), valid ? src + c * 8 : src, valid);
    }
  };
  // Prologue: tiles 0 .. STAGES-2 (the Q tile rides in the first group).
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < ntiles) load_tile(tile_begin + st, st);
    CpAsyncCommit();
  }

  float m[2], l[2];
  int visible[2];
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    m[ri] = -INFINITY;
    l[ri] = 0.0f;
    const int grow = row0 + wrow + ri * 8 + (lane >> 2);
    visible[ri] = min(seq_len - a.q_len + grow / a.heads + 1, tok_end);
  }
  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.0f;

  for (int it = 0; it < ntiles; ++it) {
    const int tile = tile_begin + it;
    // Keep STAGES-1 tiles in flight: issue tile it+STAGES-1 (always commit, so the count stays exact).
    if (it + STAGES - 1 < ntiles) load_tile(tile + STAGES - 1, (it + STAGES - 1) % STAGES);
    CpAsyncCommit();
    CpAsyncWait<STAGES - 1>();
    FenceProxyAsync();
    __syncthreads();
    const uint32_t sK = sKVa + (it % STAGES) * kTile;

    if constexpr (kOneWgS) {
      if (wg == 0) {
        // S[64 x BN] = Q . K^T: 36 wgmma m64n{BN}k16, all tokens of the tile.
        float s[BN / 2];
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) s[i] = 0.0f;
        FenceRegs<BN / 2>(s);
        WgFence();
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
          const uint32_t kin = (kk & 3) * 32;
          const uint64_t da = Desc(sQa + (kk >> 2) * kQSlab + kin, 16, 1024);
          const uint64_t db = Desc(sK + (kk >> 2) * kSlab + kin, 16, 1024);
          if constexpr (BN == 64) WgmmaS64(s, da, db, kk > 0);
          else WgmmaS32(s, da, db, kk > 0);
        }
        WgCommit();
        WgWait0();
        FenceRegs<BN / 2>(s);
        const int tok0 = tile * BN + (lane & 3) * 2;
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int ri = e >> 1;
            const float v = tok0 + j * 8 + (e & 1) < visible[ri] ? s[j * 4 + e] * a.scale_log2 : -INFINITY;
            s[j * 4 + e] = v;
            mx[ri] = fmaxf(mx[ri], v);
          }
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
          mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(0xffffffffu, mx[ri], 1));
          mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(0xffffffffu, mx[ri], 2));
          const float m_new = fmaxf(m[ri], mx[ri]);
          const float m_use = m_new == -INFINITY ? 0.0f : m_new;
          const float alpha = exp2f(m[ri] - m_use);
          m[ri] = m_new;
          l[ri] *= alpha;
          const int row = wrow + ri * 8 + (lane >> 2);
          if ((lane & 3) == 0) sStat[row] = alpha;  // for warpgroup 1
#pragma unroll
          for (int j = 0; j < 32; ++j) {
            o[j * 4 + ri * 2] *= alpha;
            o[j * 4 + ri * 2 + 1] *= alpha;
          }
#pragma unroll
          for (int j = 0; j < BN / 8; ++j) {
            const float p0 = exp2f(s[j * 4 + ri * 2] - m_use), p1 = exp2f(s[j * 4 + ri * 2 + 1] - m_use);
            l[ri] += p0 + p1;
            const int col = j * 8 + (lane & 3) * 2;
            *reinterpret_cast<uint32_t*>(sP + row * 128 + (((col >> 3) ^ (row & 7)) << 4) + (col & 7) * 2) =
                Pack2(p0, p1);
          }
        }
        FenceProxyAsync();
      }
      __syncthreads();
      if (wg == 1) {
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
          const float alpha = sStat[wrow + ri * 8 + (lane >> 2)];
#pragma unroll
          for (int j = 0; j < 32; ++j) {
            o[j * 4 + ri * 2] *= alpha;
            o[j * 4 + ri * 2 + 1] *= alpha;
          }
        }
      }
    } else {
      // S[64 x kNS] = Q . K^T over 576 dims: 36 wgmma m64n{kNS}k16 (A = Q, B = this warpgroup's K rows).
      float s[kNS / 2];
  #pragma unroll
      for (int i = 0; i < kNS / 2; ++i) s[i] = 0.0f;
      FenceRegs<kNS / 2>(s);
      WgFence();
  #pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const uint32_t kin = (kk & 3) * 32;
        const uint64_t da = Desc(sQa + (kk >> 2) * kQSlab + kin, 16, 1024);
        const uint64_t db = Desc(sK + (kk >> 2) * kSlab + wg * kNS * 128 + kin, 16, 1024);
        if constexpr (kNS == 32) WgmmaS32(s, da, db, kk > 0);
        else WgmmaS16(s, da, db, kk > 0);
      }
      WgCommit();
      WgWait0();
      FenceRegs<kNS / 2>(s);

      // Scale, mask, row max over this warpgroup's tokens, exchanged with the other.
      const int tok0 = tile * BN + wg * kNS + (lane & 3) * 2;
      float mx[2] = {-INFINITY, -INFINITY};
  #pragma unroll
      for (int j = 0; j < kNS / 8; ++j)
  #pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int ri = e >> 1;
          const int tok = tok0 + j * 8 + (e & 1);
          const float v = tok < visible[ri] ? s[j * 4 + e] * a.scale_log2 : -INFINITY;
          s[j * 4 + e] = v;
          mx[ri] = fmaxf(mx[ri], v);
        }
  #pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(0xffffffffu, mx[ri], 1));
        mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(0xffffffffu, mx[ri], 2));
        if ((lane & 3) == 0) sStat[wg * kBM + wrow + ri * 8 + (lane >> 2)] = mx[ri];
      }
      __syncthreads();
      float m_use[2];
  #pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        const int row = wrow + ri * 8 + (lane >> 2);
        const float m_new = fmaxf(m[ri], fmaxf(sStat[row], sStat[kBM + row]));
        m_use[ri] = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = exp2f(m[ri] - m_use[ri]);
        m[ri] = m_new;
        l[ri] *= alpha;
  #pragma unroll
        for (int j = 0; j < 32; ++j) {
          o[j * 4 + ri * 2] *= alpha;
          o[j * 4 + ri * 2 + 1] *= alpha;
        }
      }
      // P -> shared (bf16, K-major 128B-swizzled rows; columns [0, BN) used).
  #pragma unroll
      for (int j = 0; j < kNS / 8; ++j)
  #pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
          const float p0 = exp2f(s[j * 4 + ri * 2] - m_use[ri]);
          const float p1 = exp2f(s[j * 4 + ri * 2 + 1] - m_use[ri]);
          l[ri] += p0 + p1;
          const int row = wrow + ri * 8 + (lane >> 2);
          const int col = wg * kNS + j * 8 + (lane & 3) * 2;
          *reinterpret_cast<uint32_t*>(sP + row * 128 + (((col >> 3) ^ (row & 7)) << 4) + (col & 7) * 2) =
              Pack2(p0, p1);
        }
      FenceProxyAsync();
      __syncthreads();
    }

    // O[64 x 256] += P[64 x BN] . V[BN x dims 256wg..]: BN/16 wgmma m64n256k16, V MN-major.
    FenceRegs<128>(o);
    WgFence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      WgmmaPV(o, Desc(sPa + kk * 32, 16, 1024), Desc(sK + wg * 4 * kSlab + kk * 16 * 128, kSlab, 1024), 1);
    }
    WgCommit();
    WgWait0();
    FenceRegs<128>(o);
    __syncthreads();
  }
  CpAsyncWait<0>();

#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    l[ri] += __shfl_xor_sync(0xffffffffu, l[ri], 1);
    l[ri] += __shfl_xor_sync(0xffffffffu, l[ri], 2);
    if ((lane & 3) == 0 && (!kOneWgS || wg == 0)) sStat[wg * kBM + wrow + ri * 8 + (lane >> 2)] = l[ri];
  }
  __syncthreads();
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int row = wrow + ri * 8 + (lane >> 2);
    const float lt = kOneWgS ? sStat[row] : sStat[row] + sStat[kBM + row];
    const int grow = row0 + row;
    if (grow >= rows_total) continue;
    const float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
    const int64_t orow = static_cast<int64_t>(b) * rows_total + grow;
    if (a.num_splits == 1) {
      uint16_t* dst = a.out + orow * kL + wg * 256 + (lane & 3) * 2;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        *reinterpret_cast<uint32_t*>(dst + j * 8) = Pack2(o[j * 4 + ri * 2] * inv, o[j * 4 + ri * 2 + 1] * inv);
      }
    } else {
      const int64_t prow = static_cast<int64_t>(split) * a.batch * rows_total + orow;
      float* dst = a.o_part + prow * kL + wg * 256 + (lane & 3) * 2;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        *reinterpret_cast<float2*>(dst + j * 8) = make_float2(o[j * 4 + ri * 2] * inv, o[j * 4 + ri * 2 + 1] * inv);
      }
      if (wg == 0 && (lane & 3) == 0) a.lse_part[prow] = lt > 0.0f ? m[ri] + log2f(lt) : -INFINITY;
    }
  }
#endif  // EM_HAVE_WGMMA
}

}  // namespace

bool MlaWgmmaAvailable() {
  static const bool ok = [] {
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    cudaFuncAttributes attr;
    const bool image = cudaFuncGetAttributes(&attr, MlaDecodeWgmmaKernel<64, 2, false>) == cudaSuccess;
    cudaGetLastError();
    return image && major == 9 && minor == 0;
  }();
  return ok;
}

namespace {
template <int BN, int STAGES, bool kOneWgS>
cudaError_t Launch(const MlaDecodeArgs& a, cudaStream_t s) {
  static bool attr_set = false;
  constexpr int smem = SmemBytes<BN, STAGES>();
  if (!attr_set) {
    cudaError_t err =
        cudaFuncSetAttribute(MlaDecodeWgmmaKernel<BN, STAGES, kOneWgS>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    attr_set = true;
  }
  WgArgs w{a.q, a.kv_cache, a.block_table, a.seq_lens, a.out, a.o_part, a.lse_part,
           static_cast<int>(a.batch), static_cast<int>(a.q_len), static_cast<int>(a.heads),
           static_cast<int>(a.page_size), static_cast<int>(a.max_pages), a.num_splits, a.softmax_scale * kLog2e};
  dim3 grid(MlaRowBlocks(a.q_len, a.heads), static_cast<unsigned>(a.batch), a.num_splits);
  MlaDecodeWgmmaKernel<BN, STAGES, kOneWgS><<<grid, kThreads, smem, s>>>(w);
  return cudaGetLastError();
}
}  // namespace

cudaError_t MlaDecodeWgmma(const MlaDecodeArgs& a, cudaStream_t s) {
  // 2: 64-token tiles x 2 stages, S split over both warpgroups; 3: 32-token
  // tiles x 4 stages; 4 (and auto): 64 x 2 with S and softmax on warpgroup 0.
  switch (a.kernel) {
    case 2:
      return Launch<64, 2, false>(a, s);
    case 3:
      return Launch<32, 4, false>(a, s);
    default:
      return Launch<64, 2, true>(a, s);
  }
}

}  // namespace expertmesh::kernels::cuda::internal
