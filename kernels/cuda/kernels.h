// CUDA kernels of expertmesh: the twins of kernels/cpu/kernels.h on the GPU.
//
// A framework-free launch API in the style of DeepEP and FlashMLA: raw typed
// device pointers, element counts, strides and a stream; no CUDA type appears
// in this header (a stream is a `Stream`, i.e. a cudaStream_t passed as
// void*), so callers compile without CUDA headers. Each function takes the
// CPU twin's parameters in the CPU twin's order, then the stream (or the
// Context that owns cuBLASLt and the scratch pool). All launches are
// asynchronous on that stream; a returned error means the launch was refused
// (bad arguments, no device, cuBLASLt missing) and nothing was enqueued.
//
// Storage types: activations and weights are bf16 (`Bf16` holds the bits),
// fp8 weights are e4m3 "fn" (`Fp8`) with one fp32 dequantisation scale per
// 128x128 block, exactly as in DeepSeek-V3 checkpoints (w = q * scale_inv).
// Arithmetic and accumulation are fp32; router logits and weights are fp32.
//
//   ASSIGN_OR_RETURN(auto ctx, cuda::Context::Create(cuda::ContextOptions{}));
//   RETURN_IF_ERROR(cuda::Route(logits, bias, T, params, ids, weights, ctx->stream()));
//   RETURN_IF_ERROR(cuda::ExpertLayout(*ctx, ids, T, k, E, offsets, pos));
//   RETURN_IF_ERROR(cuda::Permute(x, T, H, pos, k, x_perm, ctx->stream()));
//
// Every kernel here is tested against its CPU twin in tests/gpu and measured
// by bench/gpu/run.sh.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cpu/kernels.h"

namespace expertmesh::kernels::cuda {

using Bf16 = uint16_t;  // bfloat16 bit pattern (device memory)
using Fp8 = uint8_t;    // float8 e4m3fn bit pattern (device memory)
using Stream = void*;   // a cudaStream_t; nullptr is the legacy default stream

// ---------------------------------------------------------------------------
// Device memory.

// A bump allocator over one cudaMalloc'd arena: Alloc is a pointer bump
// (256-byte aligned), Release(mark) frees everything allocated after Mark().
// Scratch of one step lives between a Mark and a Release. Released memory
// may still be in use by queued kernels: reuse it only from work on the same
// stream (stream order makes that safe). Not thread safe: one owner (the
// thread that drives the stream).
class DevicePool {
 public:
  static absl::StatusOr<std::unique_ptr<DevicePool>> Create(size_t bytes);
  ~DevicePool();
  DevicePool(const DevicePool&) = delete;
  DevicePool& operator=(const DevicePool&) = delete;

  // ResourceExhausted (with the sizes) when the arena is full.
  absl::StatusOr<void*> Alloc(size_t bytes);
  template <typename T>
  absl::StatusOr<T*> AllocArray(size_t n) {
    auto p = Alloc(n * sizeof(T));
    if (!p.ok()) return p.status();
    return static_cast<T*>(*p);
  }
  size_t Mark() const { return used_; }
  void Release(size_t mark) { used_ = mark < used_ ? mark : used_; }
  size_t used() const { return used_; }
  size_t capacity() const { return capacity_; }

 private:
  DevicePool(char* base, size_t capacity) : base_(base), capacity_(capacity) {}
  char* base_;
  size_t capacity_;
  size_t used_ = 0;
};

// Releases the pool to `mark` when it goes out of scope.
class PoolScope {
 public:
  explicit PoolScope(DevicePool& p) : pool_(p), mark_(p.Mark()) {}
  ~PoolScope() { pool_.Release(mark_); }

 private:
  DevicePool& pool_;
  size_t mark_;
};

// ---------------------------------------------------------------------------
// Context: the device, a stream, the scratch pool and the cuBLASLt handle
// (cuBLASLt is loaded with dlopen on first use, so binaries start and run
// their CPU paths on machines without a GPU or without cuBLAS).
struct ContextOptions {
  int device = 0;
  size_t pool_bytes = size_t{1} << 30;     // scratch arena
  size_t gemm_workspace_bytes = 32 << 20;  // cuBLASLt workspace (taken from the pool)
  Stream stream = nullptr;                 // not owned; nullptr: the legacy default stream
};

class Context {
 public:
  static absl::StatusOr<std::unique_ptr<Context>> Create(const ContextOptions& opts);
  ~Context();
  Stream stream() const { return stream_; }
  DevicePool& pool() { return *pool_; }
  // Waits for the stream; converts a pending CUDA error into a Status.
  absl::Status Synchronize();

  struct Impl;  // cuBLASLt handle, workspace, algorithm cache (gemm.cc)
  Impl* impl() { return impl_.get(); }

 private:
  Context() = default;
  Stream stream_ = nullptr;
  std::unique_ptr<DevicePool> pool_;
  std::unique_ptr<Impl> impl_;
};

// ---------------------------------------------------------------------------
// Elementwise and normalisation (memory bound; one pass each).

// y[T,H] = x / sqrt(mean(x^2) + eps) * w; y may alias x. H % 8 == 0.
absl::Status RmsNorm(const Bf16* x, int64_t T, int64_t H, const float* w, float eps, Bf16* y,
                     Stream stream);

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i] for the fused gate/up
// output of an expert ([T, 2I], gate first). I % 8 == 0.
absl::Status SiluMulRows(const Bf16* gate_up, int64_t T, int64_t I, Bf16* out, Stream stream);

// Rotary embedding on interleaved pairs (x[2i], x[2i+1]) with the YaRN
// inv_freq of kernels::Rope (`rope.inv_freq()`, dim/2 doubles in device
// memory). Token t's `vecs` vectors start at x + t*token_stride and are
// `vec_stride` apart; all are rotated by positions[t]. In place.
absl::Status RopeApply(Bf16* x, int64_t tokens, int64_t vecs, int64_t token_stride, int64_t vec_stride,
                       int64_t dim, const int32_t* positions, const double* inv_freq, Stream stream);

// out[t, :] = table[ids[t], :] (embedding lookup); ids outside [0, V) give zeros.
absl::Status Embedding(const Bf16* table, int64_t V, int64_t H, const int32_t* ids, int64_t T, Bf16* out,
                       Stream stream);

// out[t] = argmax(logits[t, :V]), lowest index on ties (greedy Sample).
absl::Status ArgmaxRows(const float* logits, int64_t T, int64_t V, int32_t* out, Stream stream);

// Casts: fp32 <-> bf16 (round to nearest even), n elements.
absl::Status CastF32ToBf16(const float* x, int64_t n, Bf16* y, Stream stream);
absl::Status CastBf16ToF32(const Bf16* x, int64_t n, float* y, Stream stream);

// ---------------------------------------------------------------------------
// MoE routing and token movement.

// kernels::Route on the GPU: logits [T, E] fp32, bias [E] or null, outputs
// ids [T, k] int32 and weights [T, k] fp32 in descending biased score. One
// warp per token; E <= 512, num_groups <= 32.
absl::Status Route(const float* logits, const float* bias, int64_t T, const RouterParams& p, int32_t* ids,
                   float* weights, Stream stream);

// Expert-major layout of the T*k (token, slot) pairs: pairs are grouped by
// expert, in pair order inside an expert (the order of the CPU's
// RoutedExpertsAccumulate). Outputs offsets [E+1] (rows of expert e are
// [offsets[e], offsets[e+1])) and pos [T*k], the row of each pair; ids
// outside [0, E) (experts on other ranks, -1) get pos = -1 and no row.
// Scratch from ctx.pool(); launches 3 small kernels.
absl::Status ExpertLayout(Context& ctx, const int32_t* ids, int64_t T, int64_t k, int64_t E,
                          int32_t* offsets, int32_t* pos);

// Dispatch layout for expert parallelism (DeepEP's get_dispatch_layout):
// expert_rank [E] says which rank holds each expert; outputs tokens_per_rank
// [R] (a token counts once per rank holding any of its experts),
// tokens_per_expert [E], token_in_rank [T, R] (0/1). Outputs are overwritten.
absl::Status DispatchLayout(const int32_t* ids, int64_t T, int64_t k, int64_t E, const int32_t* expert_rank,
                            int64_t R, int32_t* tokens_per_rank, int32_t* tokens_per_expert,
                            uint8_t* token_in_rank, Stream stream);

// x_perm[pos[t*k + j]] = x[t] for every pair with pos >= 0 (one read of each
// token, k writes). H % 8 == 0.
absl::Status Permute(const Bf16* x, int64_t T, int64_t H, const int32_t* pos, int64_t k, Bf16* x_perm,
                     Stream stream);

// Weighted combine (unpermute): y[t] = sum_j weights[t,j] * out_perm[pos[t,j]]
// over pairs with pos >= 0, accumulated in fp32; with accumulate, y[t] += that.
absl::Status Combine(const Bf16* out_perm, const int32_t* pos, const float* weights, int64_t T, int64_t k,
                     int64_t H, Bf16* y, bool accumulate, Stream stream);

// ---------------------------------------------------------------------------
// GEMMs (cuBLASLt, fp32 accumulation).

enum class OutType { kBf16, kF32 };

// y[M,N] = x[M,K] . w[N,K]^T (kernels::Linear); y is bf16 or fp32 per
// out_type; with accumulate, y += x . w^T.
absl::Status Linear(Context& ctx, const Bf16* x, int64_t M, int64_t K, const Bf16* w, int64_t N, void* y,
                    OutType out_type, bool accumulate = false);

// Native fp8 GEMMs (tensor cores, cuBLASLt block scaling; Hopper's cuBLASLt
// takes per-row 1x128 scales on the A operand and 128x128 blocks on B):
//   weights are A: the checkpoint's 128x128 scale_inv [ceil(N/128), ceil(K/128)]
//     expanded once at load by ExpandFp8Scales into row scales [K/128][N]
//     (exact: the rows of a block share its scale);
//   activations are B: quantised on the fly to e4m3 with one scale per 128
//     tokens x 128 channels (amax / 448), a coarser grain than DeepSeek's
//     1x128 activation tiles, forced by that operand assignment (see
//     docs/PERFORMANCE.md).
// K % 128 == 0 and N % 16 == 0. y is bf16.
absl::Status ExpandFp8Scales(const float* scale_inv, int64_t N, int64_t K, float* row_scale, Stream stream);
absl::Status LinearFp8(Context& ctx, const Bf16* x, int64_t M, int64_t K, const Fp8* w, const float* w_row_scale,
                       int64_t N, Bf16* y);
// The two halves of LinearFp8, for producers that already hold fp8 tokens:
// x_scale has Fp8ActScaleFloats(M, K) floats, [ceil(M/128)][L4] with
// L4 = K/128 rounded up to a multiple of 4 (scale of token block mb, channel
// block kb at mb * L4 + kb).
int64_t Fp8ActScaleFloats(int64_t M, int64_t K);
absl::Status QuantizeActivationsFp8(const Bf16* x, int64_t M, int64_t K, Fp8* xq, float* x_scale, Stream stream);
absl::Status LinearFp8Prequantized(Context& ctx, const Fp8* xq, const float* x_scale, int64_t M, int64_t K,
                                   const Fp8* w, const float* w_row_scale, int64_t N, Bf16* y);

// Dequantises an fp8 block-scaled [rows, cols] weight to bf16 (the load-time
// path): out = q * scale_inv[r / br][c / bc].
absl::Status DequantFp8Blocks(const Fp8* q, int64_t rows, int64_t cols, const float* scale_inv, int64_t br,
                              int64_t bc, Bf16* out, Stream stream);

// Routed experts over an expert-major permuted buffer (ExpertLayout +
// Permute): for each local expert e with rows [offsets[e], offsets[e+1]):
//   out_perm[rows] = down_e(silu(x . gate_e^T) * (x . up_e^T)).
// Weights are per expert device pointers (gate_up [2I, H] gate rows first,
// down [H, I]) in bf16, or fp8 with expanded scales (see LinearFp8) when fp8
// is set; fp8 activations are quantised per expert (blocks never straddle
// two experts). The
// offsets are host values (copy ExpertLayout's offsets back first): one
// cuBLASLt GEMM pair per non-empty expert plus one activation kernel. The fp8
// path also reads them on the device: pass ExpertLayout's device offsets as
// device_offsets, or null to have them uploaded (a pageable copy, which
// waits for the stream).
struct GroupedExpertWeights {
  int64_t num_experts = 0;
  int64_t hidden = 0;        // H
  int64_t inter = 0;         // I (moe_intermediate_size)
  bool fp8 = false;
  std::vector<const void*> gate_up;           // [E] -> [2I, H] bf16 or fp8
  std::vector<const void*> down;              // [E] -> [H, I]
  std::vector<const float*> gate_up_scale;    // fp8 only: [E] -> ExpandFp8Scales rows [H/128][2I]
  std::vector<const float*> down_scale;       // fp8 only: [E] -> ExpandFp8Scales rows [I/128][H]
};
absl::Status GroupedExperts(Context& ctx, const GroupedExpertWeights& w, const Bf16* x_perm,
                            const int64_t* host_offsets, Bf16* out_perm,
                            const int32_t* device_offsets = nullptr);

// ---------------------------------------------------------------------------
// Multi-head latent attention, absorbed form (decode), over a paged latent
// cache. The three steps of kernels::MlaAbsorbed:
//   1. MlaAbsorbQuery: q_abs[n, h, :L] = q_nope[n, h] . W_uk[h], q_abs[n, h, L:] = q_pe[n, h]
//   2. MlaDecode:      o_lat[n, h] = softmax(q_abs . [latent, k_pe]^T * scale) . latent
//   3. MlaProjectOut:  out[n, h] = o_lat[n, h] . W_uv[h]^T

// q [N, heads, nope + rope]; w_kv_b [heads * (nope + v), L] (per head nope
// rows of W_uk then v rows of W_uv); q_abs [N, heads, L + rope].
absl::Status MlaAbsorbQuery(Context& ctx, const MlaShape& s, const Bf16* q, int64_t N, const Bf16* w_kv_b,
                            Bf16* q_abs);
// o_lat [N, heads, L]; out [N, heads, v].
absl::Status MlaProjectOut(Context& ctx, const MlaShape& s, const Bf16* o_lat, int64_t N, const Bf16* w_kv_b,
                           Bf16* out);

struct MlaDecodeParams {
  const Bf16* q = nullptr;            // [batch, q_len, heads, kv_lora + rope] absorbed queries
  const Bf16* kv_cache = nullptr;     // [num_pages, page_size, kv_lora + rope]: latent, then rotated k_pe
  const int32_t* block_table = nullptr;  // [batch, max_pages] page ids of each sequence, in order
  const int32_t* seq_lens = nullptr;  // [batch] cached tokens, the q_len new ones included
  Bf16* out = nullptr;                // [batch, q_len, heads, kv_lora] latent attention output
  int64_t batch = 0;
  int64_t q_len = 1;                  // queries per sequence; query j sees tokens [0, len - q_len + j]
  int64_t heads = 0;
  int64_t kv_lora = 512;              // L
  int64_t rope = 64;                  // qk_rope_head_dim
  int64_t page_size = 64;             // tokens per page
  int64_t max_pages = 0;              // columns of block_table
  float softmax_scale = 0.0f;         // MlaShape::softmax_scale
  int num_splits = 0;                 // KV splits per (sequence, row block); 0: chosen from the SM count
  int kernel = 0;                     // 0: best available (4 on Hopper, else 1); 1: mma.sync; wgmma
                                      // (sm_90a): 2: 64-token tiles x 2 stages, S split over both
                                      // warpgroups, 3: 32-token tiles x 4 stages, 4: as 2 with S and
                                      // softmax on one warpgroup
};
// kv_lora 512 / rope 64 (DeepSeek-V3): tensor-core flash decoding, 64 query
// rows x 64 tokens per tile, with wgmma on Hopper (sm_90a build) or mma.sync
// elsewhere; a simple CUDA-core kernel for other shapes (small test models).
absl::Status MlaDecode(Context& ctx, const MlaDecodeParams& p);

}  // namespace expertmesh::kernels::cuda
