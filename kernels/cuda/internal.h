// Launchers behind kernels/cuda/kernels.h. Private to kernels/cuda: the .cu
// files define them (CUDA only, no abseil, so nvcc never parses abseil), the
// .cc wrappers validate arguments, call them and turn cudaError_t into
// absl::Status. Each launcher enqueues on `s` and returns the launch error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace expertmesh::kernels::cuda::internal {

using Bf16 = uint16_t;
using Fp8 = uint8_t;

// elementwise.cu
cudaError_t RmsNorm(const Bf16* x, int64_t T, int64_t H, const float* w, float eps, Bf16* y, cudaStream_t s);
cudaError_t SiluMulRows(const Bf16* gate_up, int64_t T, int64_t I, Bf16* out, cudaStream_t s);
cudaError_t RopeApply(Bf16* x, int64_t tokens, int64_t vecs, int64_t token_stride, int64_t vec_stride, int64_t dim,
                      const int32_t* positions, const double* inv_freq, cudaStream_t s);
cudaError_t Embedding(const Bf16* table, int64_t V, int64_t H, const int32_t* ids, int64_t T, Bf16* out,
                      cudaStream_t s);
cudaError_t ArgmaxRows(const float* logits, int64_t T, int64_t V, int32_t* out, cudaStream_t s);
cudaError_t CastF32ToBf16(const float* x, int64_t n, Bf16* y, cudaStream_t s);
cudaError_t CastBf16ToF32(const Bf16* x, int64_t n, float* y, cudaStream_t s);
cudaError_t DequantFp8Blocks(const Fp8* q, int64_t rows, int64_t cols, const float* scale_inv, int64_t br,
                             int64_t bc, Bf16* out, cudaStream_t s);

// fp8 activations for cuBLASLt block scaling (B operand, BLK128x128_32F):
// one fp32 scale per 128 tokens x 128 channels. Rows are split into groups
// (experts) by offsets [groups+1] (device, int32; null: one group of M rows).
// Group g's token block mb has scale row floor(o_g/128) + g + mb, i.e. its
// scales are scale + (o_g/128 + g) * L4 as [blocks][L4], L4 = Fp8ScaleStride(K).
// Buffers hold Fp8ScaleSlots(M, groups) * L4 floats. K % 128 == 0.
inline int64_t Fp8ScaleStride(int64_t K) { return (K / 128 + 3) / 4 * 4; }
int64_t Fp8ScaleSlots(int64_t M, int64_t groups);
cudaError_t QuantFp8Blocks(const Bf16* x, int64_t M, int64_t K, const int32_t* offsets, int64_t groups, Fp8* q,
                           float* scale, cudaStream_t s);
// The same for silu(gate) * up of a fused [M, 2I] gate/up output (K = I).
cudaError_t SiluMulQuantFp8Blocks(const Bf16* gate_up, int64_t M, int64_t I, const int32_t* offsets, int64_t groups,
                                  Fp8* q, float* scale, cudaStream_t s);
// Weight scales for the A operand (VEC128_32F): row_scale[kb * N + n] =
// scale_inv[n / 128][kb] (exact: every row of a 128x128 block shares its scale).
cudaError_t ExpandFp8Scales(const float* scale_inv, int64_t N, int64_t K, float* row_scale, cudaStream_t s);

// moe.cu
cudaError_t Route(const float* logits, const float* bias, int64_t T, int64_t E, int64_t G, int64_t topk_groups,
                  int64_t K, bool sigmoid, bool norm, float scaling, int32_t* ids, float* weights, cudaStream_t s);
// Scratch for ExpertLayout: ExpertLayoutScratchInts(T*k, E) int32s.
int64_t ExpertLayoutScratchInts(int64_t pairs, int64_t E);
cudaError_t ExpertLayout(const int32_t* ids, int64_t pairs, int64_t E, int32_t* scratch, int32_t* offsets,
                         int32_t* pos, cudaStream_t s);
cudaError_t DispatchLayout(const int32_t* ids, int64_t T, int64_t k, int64_t E, const int32_t* expert_rank, int64_t R,
                           int32_t* tokens_per_rank, int32_t* tokens_per_expert, uint8_t* token_in_rank,
                           cudaStream_t s);
cudaError_t Permute(const Bf16* x, int64_t T, int64_t H, const int32_t* pos, int64_t k, Bf16* x_perm,
                    cudaStream_t s);
cudaError_t Combine(const Bf16* out_perm, const int32_t* pos, const float* weights, int64_t T, int64_t k, int64_t H,
                    Bf16* y, bool accumulate, cudaStream_t s);

// mla.cu
struct MlaDecodeArgs {
  const Bf16* q;
  const Bf16* kv_cache;
  const int32_t* block_table;
  const int32_t* seq_lens;
  Bf16* out;
  int64_t batch, q_len, heads, kv_lora, rope, page_size, max_pages;
  float softmax_scale;
  int num_splits;
  int kernel;       // 0: best available, 1: mma.sync (mla.cu), 2-4: wgmma variants (mla_sm90a.cu)
  float* o_part;    // [num_splits, batch, q_len*heads, kv_lora] when num_splits > 1
  float* lse_part;  // [num_splits, batch, q_len*heads]
};
bool MlaFastPathSupported(int64_t kv_lora, int64_t rope);
int MlaRowBlocks(int64_t q_len, int64_t heads);  // CTAs per sequence along rows (fast path)
cudaError_t MlaDecode(const MlaDecodeArgs& a, cudaStream_t s);
// mla_sm90a.cu: the wgmma kernel (built for sm_90a only; available on CC 9.0).
bool MlaWgmmaAvailable();
cudaError_t MlaDecodeWgmma(const MlaDecodeArgs& a, cudaStream_t s);
cudaError_t MlaCopyRope(const Bf16* q, int64_t N, int64_t heads, int64_t nope, int64_t rope, int64_t kv_lora,
                        Bf16* q_abs, cudaStream_t s);

}  // namespace expertmesh::kernels::cuda::internal
