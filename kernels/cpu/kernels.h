// CPU kernels of expertmesh: the math of DeepSeek-V3 in fp32, GEMMs through
// BLAS (OpenBLAS). Plain functions on raw row-major pointers; outputs come
// first after the inputs they depend on, sizes are element counts.
// The CUDA twins in kernels/cuda take the same parameters and are tested
// against these.
#pragma once

#include <cstdint>
#include <vector>

#include "common/config.h"

namespace expertmesh::kernels {

// y[M,N] = x[M,K] . w[N,K]^T (a linear layer with PyTorch's [out, in] weight);
// with accumulate, y += x . w^T. The kernels of Linear on a kernels::Weight
// (weight.h) on this fp32 weight, without a copy: for M <= 64 register-blocked
// dot products streaming w once (AVX-512 / AVX2+FMA / scalar, chosen at run
// time), above that BLAS SGEMM on blocks of rows of w; parallel over rows of
// w on the thread pool at the top level, single-threaded inside a pool task.
void Linear(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y,
            bool accumulate = false);

// y[M,N] = x[M,K] . w[N,K]^T (no accumulate), always single-threaded (the
// calling thread only, even at the top level), for a few rows M such as the
// ~17 tokens an MoE expert sees in a batch: w is streamed once, never packed
// as BLAS SGEMM would. Same values as Linear (the same kernels).
// kLinearFewRowsMax: the largest M for which it is meant (the register-blocked
// kernels serve M <= 64; see docs/PERFORMANCE.md).
constexpr int64_t kLinearFewRowsMax = 48;
void LinearFewRows(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y);

// y[T,H] = x / sqrt(mean(x^2) + eps) * w. y may alias x.
void RmsNorm(const float* x, int64_t T, int64_t H, const float* w, float eps, float* y);

// out[i] = silu(gate[i]) * up[i]; out may alias gate.
void SiluMul(const float* gate, const float* up, int64_t n, float* out);

// SwiGLU feed-forward for T tokens: y[T,H] = down(silu(x.Wg^T) * (x.Wu^T)).
// wg, wu: [I,H]; wd: [H,I]; scratch: at least 2*T*I floats. y is overwritten.
void SwiGlu(const float* x, int64_t T, int64_t H, int64_t I, const float* wg, const float* wu,
            const float* wd, float* y, float* scratch);

// Rotary embedding with YaRN-corrected frequencies, applied to interleaved
// pairs (x[2i], x[2i+1]) as DeepSeek-V3 does.
class Rope {
 public:
  explicit Rope(const ModelConfig& cfg);
  // Rotates `n` vectors of `dim` (= qk_rope_head_dim) floats spaced `stride`
  // apart, all at position `pos`, in place.
  void Apply(float* x, int64_t n, int64_t stride, int64_t pos) const;
  const std::vector<double>& inv_freq() const { return inv_freq_; }

 private:
  int64_t dim_;
  std::vector<double> inv_freq_;
};

// Rotary embedding of the dense architectures (HF Qwen2 / Llama
// `rotate_half`): over the whole head, dimension i pairs with i + dim/2;
// inv_freq[i] = theta^(-2i/dim), corrected by Llama-3.1's `llama3` scaling
// when cfg.rope_scaling.type says so (wavelengths above
// original/low_freq_factor divided by factor, below original/high_freq_factor
// kept, smoothly blended between).
class HalfRope {
 public:
  explicit HalfRope(const ModelConfig& cfg);
  // Rotates `n` vectors of `dim` (= attn_head_dim) floats spaced `stride`
  // apart, all at position `pos`, in place.
  void Apply(float* x, int64_t n, int64_t stride, int64_t pos) const;
  const std::vector<double>& inv_freq() const { return inv_freq_; }

 private:
  int64_t dim_;
  std::vector<double> inv_freq_;
};

// Grouped-query attention over one sequence's K/V cache (causal).
//   q: [Tq, heads, dim] (rotated); k, v: [S, kv_heads, dim] (k rotated); the
//   query heads h of group h / (heads / kv_heads) share a KV head; the j-th
//   query sits at position S - Tq + j and attends to positions [0, S - Tq + j].
//   out: [Tq, heads, dim]; scratch: at least GqaScratch(s, Tq, S) floats.
//   Per KV head two GEMMs (scores = Q . K^T, then P . V) through Linear.
struct GqaShape {
  int64_t heads, kv_heads, dim;
  float softmax_scale;
  static GqaShape FromConfig(const ModelConfig& cfg);
};
void GqaAttention(const GqaShape& s, const float* q, int64_t Tq, const float* k, const float* v, int64_t S,
                  float* out, float* scratch);
inline int64_t GqaScratch(const GqaShape& s, int64_t Tq, int64_t S) {
  const int64_t R = Tq * (s.heads / s.kv_heads);
  return 2 * S * s.dim + R * s.dim + R * S;
}

// Group-limited top-k routing (DeepSeek-V3 noaux_tc):
// scores = sigmoid(logits); choice on scores + bias: group score = sum of the
// group's top-2, keep topk_group groups, top-k experts inside them; weights
// are the raw scores of the chosen experts, normalised to sum 1 when
// norm_topk_prob, times routed_scaling_factor. Ties go to the lower index.
struct RouterParams {
  int64_t num_experts = 256;
  int64_t num_groups = 8;
  int64_t topk_groups = 4;
  int64_t top_k = 8;
  bool sigmoid = true;          // false: softmax scores
  bool norm_topk_prob = true;
  float scaling = 2.5f;
  static RouterParams FromConfig(const ModelConfig& cfg);
};
// logits: [T, E] (x . gate^T); bias: [E] or null. Outputs ids [T, k] (int32)
// and weights [T, k], in descending order of the biased score.
void Route(const float* logits, const float* bias, int64_t T, const RouterParams& p, int32_t* ids,
           float* weights);

// Multi-head latent attention over a latent cache.
//   latent[S, kv_lora] (normalised c_kv) and k_pe[S, rope] (rotated) of one
//   sequence; w_kv_b: [heads * (nope + v), kv_lora] (per head: nope rows of
//   W_uk, then v rows of W_uv).
struct MlaShape {
  int64_t heads, nope, rope, v, kv_lora;
  float softmax_scale;
  static MlaShape FromConfig(const ModelConfig& cfg);
};
// Expanded form (prefill): materialises k_nope and v for S cached tokens and
// runs Tq queries at positions [S - Tq, S) with a causal mask.
// q: [Tq, heads, nope + rope] (rope part rotated); out: [Tq, heads, v].
// scratch: at least S * heads * (nope + v) + Tq * S floats.
void MlaExpanded(const MlaShape& s, const float* q, int64_t Tq, const float* latent, const float* k_pe,
                 int64_t S, const float* w_kv_b, float* out, float* scratch);
// Absorbed form (decode): q_nope is folded into the latent space (q.W_uk) and
// the output leaves it through W_uv; attends to all S cached tokens.
// q: [Tq, heads, nope + rope]; out: [Tq, heads, v]; the j-th query attends to
// positions [0, S - Tq + j] (causal). scratch: Tq*heads*(kv_lora*2 + S) floats.
void MlaAbsorbed(const MlaShape& s, const float* q, int64_t Tq, const float* latent, const float* k_pe,
                 int64_t S, const float* w_kv_b, float* out, float* scratch);

// Sampling. temperature <= 0 is greedy (argmax, lowest index on ties).
// top_k <= 0 and top_p >= 1 disable those filters. The draw is a function of
// (seed, step) only, so a sequence samples the same tokens in any batch.
struct SamplingParams {
  float temperature = 0.0f;
  int64_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
};
int32_t Sample(const float* logits, int64_t vocab, const SamplingParams& p, uint64_t step);

// Peak of BLAS SGEMM measured on square n x n matrices (GFLOP/s), the rows of
// the product split over the thread pool's threads (BLAS single-threaded).
double MeasureSgemmPeakGflops(int64_t n, double min_seconds);

// Memory read bandwidth (GB/s): BLAS sasum over `bytes` of floats, far larger
// than the caches, split over the thread pool's threads; the best of slices of
// 32 MiB read in turn (each cold), for at least min_seconds.
double MeasureReadBandwidthGBps(int64_t bytes, double min_seconds);

}  // namespace expertmesh::kernels
