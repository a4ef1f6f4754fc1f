// Kernels of the CUDA engine (worker/cuda_engine.cc) beside kernels.h:
//   * fp32 twins of kernels that kernels.h has in bf16 only (GEMM, MLA
//     decode over the latent cache, permute, SwiGLU activation): the engine's
//     fp32 precision runs the model exactly as the CPU engine does (to fp32
//     rounding), which is how the GPU path is checked token for token;
//   * ops on the fp32 residual stream that both precisions use (embedding
//     into fp32, RMSNorm from fp32 rows to bf16/fp32 with strides and a row
//     gather, weighted combine added into fp32, adds);
//   * the latent-cache append (RMSNorm of the latent, rotary of k_pe, write
//     into a paged cache at given slots);
//   * a grouped SwiGLU expert FFN that reads the expert offsets on the device,
//     so that an MoE layer needs no host round trip and a whole decode step
//     can be captured in a CUDA graph (kernels.h's GroupedExperts takes host
//     offsets and runs one cuBLASLt GEMM pair per expert: faster for
//     prefill, not capturable).
//
// Same conventions as kernels.h: raw device pointers, element counts, a
// Stream (cudaStream_t as void*), asynchronous launches, an error status
// only when the launch was refused. Tensors are row-major; `Act` says how
// activations are stored (fp32 or bf16 bits); weights may also be fp8 e4m3
// with the checkpoint's 128x128 block scales (w = q * scale_inv[n/128][k/128]).
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/kernels.h"

namespace expertmesh::kernels::cuda {

enum class Act { kF32, kBf16 };
enum class WType { kF32, kBf16, kFp8 };

inline int64_t ActBytes(Act a) { return a == Act::kF32 ? 4 : 2; }

// out[t, :] = table[ids[t], :] as fp32 (table fp32 or bf16). ids are
// validated on the host.
absl::Status EmbedRowsF32(const void* table, Act table_type, int64_t H, const int32_t* ids, int64_t T, float* out,
                          Stream stream);

// y[r] = x[rows[r]] / sqrt(mean(x^2) + eps) * w for r < n (rows null: r),
// x rows x_stride elements apart (type x_type), y rows y_stride apart
// (type y_type); the mean accumulates in double as the CPU kernel does.
// y may alias x when rows is null and the strides match.
struct RowNormArgs {
  const void* x = nullptr;
  Act x_type = Act::kF32;
  int64_t x_stride = 0;
  const int32_t* rows = nullptr;
  int64_t n = 0;
  int64_t H = 0;
  const float* w = nullptr;
  float eps = 1e-6f;
  void* y = nullptr;
  Act y_type = Act::kF32;
  int64_t y_stride = 0;
};
absl::Status RowRmsNorm(const RowNormArgs& a, Stream stream);

// The latent-cache append of MLA for T new tokens: kv [T, L + R] is the
// kv_a projection (type `type`); for each token t the normalised latent
// (RMSNorm with norm_w) and the rotated k_pe (YaRN inv_freq, position
// positions[t]) are written to cache row slots[t] of a cache
// [pages * page_size, L + R] of the same type (the layout of MlaDecodeParams).
struct KvAppendArgs {
  const void* kv = nullptr;
  Act type = Act::kF32;
  int64_t T = 0, L = 0, R = 0;
  const float* norm_w = nullptr;
  float eps = 1e-6f;
  const int32_t* positions = nullptr;
  const int32_t* slots = nullptr;
  const double* inv_freq = nullptr;  // [R / 2]
  void* cache = nullptr;
};
absl::Status KvAppend(const KvAppendArgs& a, Stream stream);

// fp32 rotary on interleaved pairs, the twin of kernels.h's RopeApply.
absl::Status RopeApplyF32(float* x, int64_t tokens, int64_t vecs, int64_t token_stride, int64_t vec_stride, int64_t dim,
                          const int32_t* positions, const double* inv_freq, Stream stream);

// fp32 GEMM (CUDA cores, fp32 accumulation, no TF32), strided batches:
//   y[b] (=, or += with accumulate) x[b] . op(w[b])
// x[b]: [M, K] rows ldx apart; w[b]: [N, K] rows ldw apart (w_kn false:
// y = x . w^T, a linear layer) or [K, N] (w_kn true: y = x . w); y[b]: [M, N]
// rows ldy apart; batch b's matrices start b * s{x,w,y} elements later.
struct GemmF32Args {
  const float* x = nullptr;
  int64_t ldx = 0, sx = 0;
  const float* w = nullptr;
  int64_t ldw = 0, sw = 0;
  bool w_kn = false;
  float* y = nullptr;
  int64_t ldy = 0, sy = 0;
  int64_t M = 0, N = 0, K = 0, batch = 1;
  bool accumulate = false;
};
absl::Status GemmF32(const GemmF32Args& a, Stream stream);

// q_abs[r, L + d] = q[r, nope + d] for d < R (rows r = token * heads + head,
// q rows nope + R apart, q_abs rows L + R apart): the rope part of the
// absorbed query (fp32).
absl::Status CopyRopePartF32(const float* q, int64_t rows, int64_t nope, int64_t R, int64_t L, float* q_abs,
                             Stream stream);

// MLA decode (absorbed form) over an fp32 paged latent cache: the fp32 twin
// of kernels.h's MlaDecode (same parameters and semantics, fp32 q, cache and
// out); one block per (query row, sequence), CUDA cores.
struct MlaDecodeF32Params {
  const float* q = nullptr;              // [batch, q_len, heads, kv_lora + rope]
  const float* kv_cache = nullptr;       // [pages, page_size, kv_lora + rope]
  const int32_t* block_table = nullptr;  // [batch, max_pages]
  const int32_t* seq_lens = nullptr;     // [batch]
  float* out = nullptr;                  // [batch, q_len, heads, kv_lora]
  int64_t batch = 0, q_len = 1, heads = 0, kv_lora = 0, rope = 0, page_size = 64, max_pages = 0;
  float softmax_scale = 0.0f;
};
absl::Status MlaDecodeF32(const MlaDecodeF32Params& p, Stream stream);

// x_perm[pos[t*k + j]] = x[t] (pos >= 0); fp32 twin of kernels.h's Permute.
absl::Status PermuteF32(const float* x, int64_t T, int64_t H, const int32_t* pos, int64_t k, float* x_perm,
                        Stream stream);

// y[t] += sum_j weights[t, j] * out_perm[pos[t, j]] (pos >= 0), the sum taken
// in j order in fp32 and then added to the fp32 row y[t].
absl::Status CombineAddF32(const void* out_perm, Act type, const int32_t* pos, const float* weights, int64_t T,
                           int64_t k, int64_t H, float* y, Stream stream);

// y[i] += x[i] for n values (x fp32 or bf16, y fp32).
absl::Status AddInto(const void* x, Act type, int64_t n, float* y, Stream stream);

// out[t, i] = silu(gu[t, i]) * gu[t, I + i] in fp32 (the twin of SiluMulRows).
absl::Status SiluMulRowsF32(const float* gu, int64_t T, int64_t I, float* out, Stream stream);

// Routed SwiGLU experts over an expert-major permuted buffer, offsets read on
// the device (no host round trip; capturable in a CUDA graph):
//   act[r]      = silu(x_perm[r] . gate_e^T) * (x_perm[r] . up_e^T)
//   out_perm[r] = act[r] . down_e^T          for rows r of expert e.
// One warp per output column and expert; rows in chunks of 8, so each
// weight row is read once per 8 rows of its expert: a GEMV-like kernel for
// decode-sized batches. Expert weights are device arrays of device pointers
// (null for experts that are not on this device: they must have no rows).
// H % 8 == 0 and I % 8 == 0. x_perm, act and out_perm have type `act`.
struct GroupedFfnArgs {
  int64_t num_experts = 0, H = 0, I = 0;
  WType w_type = WType::kBf16;
  const void* const* gate_up = nullptr;         // [E] -> [2I, H] (gate rows first)
  const void* const* down = nullptr;            // [E] -> [H, I]
  const float* const* gate_up_scale = nullptr;  // fp8: [E] -> [ceil(2I/128), ceil(H/128)]
  const float* const* down_scale = nullptr;     // fp8: [E] -> [ceil(H/128), ceil(I/128)]
  const int32_t* offsets = nullptr;             // [E + 1], device
  int64_t max_rows = 0;                         // bound on offsets[E] (grid sizing)
  Act act = Act::kBf16;
  const void* x_perm = nullptr;  // [rows, H]
  void* act_buf = nullptr;       // [rows, I] scratch
  void* out_perm = nullptr;      // [rows, H]
};
absl::Status GroupedSwiGluFfn(const GroupedFfnArgs& a, Stream stream);

// Expert-parallel exchange (worker/cuda_ep.cc):
// out[j] = x[idx[j]] for j < n (rows of H values of type `type`).
absl::Status GatherRows(const void* x, Act type, int64_t H, const int32_t* idx, int64_t n, void* out, Stream stream);
// y[t] += sum of rows[rec[i]] for i in [start[t], start[t+1]) in that order
// (rows fp32 [*, H], start [T + 1], y fp32 [T, H]).
absl::Status AddRecordRows(const float* rows, int64_t H, const int32_t* start, const int32_t* rec, int64_t T, float* y,
                           Stream stream);

}  // namespace expertmesh::kernels::cuda
