// Cost of each operation the runtime executes for one micro-batch on one
// device: FLOPs, HBM bytes, kernel launches, and the time they take on a
// DeviceSpec (a roofline with the device's efficiency factors plus a fixed
// cost per kernel). Parameter counts come from CheckpointSpec (the exact
// tensor list the loader reads), never from separate arithmetic.
//
//   ModelWeights w = CountWeights(cfg);                 // w.TotalParams() == 671.03e9 for V3
//   DeviceCostModel dev(cluster.node.device);
//   for (const OpCost& op : AttentionOps(cfg, dev, shape, kv_bytes)) t += op.seconds;
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/config.h"
#include "topology/cluster.h"

namespace expertmesh::topology {

// Parameters of one part of the model.
struct WeightPart {
  int64_t params = 0;        // elements
  int64_t quantized = 0;     // elements of linear weights stored FP8 in an FP8 checkpoint
  int64_t scale_blocks = 0;  // their 128x128 blocks (one fp32 scale each)
  // Bytes on a device whose GEMMs use `gemm_dtype` (fp8: quantized weights 1 B
  // + 4 B per block, the rest BF16; bf16: 2 B each; fp32: 4 B each).
  double Bytes(const std::string& gemm_dtype) const;
  WeightPart& operator+=(const WeightPart& o);
};

struct ModelWeights {
  WeightPart embed;           // model.embed_tokens
  WeightPart head;            // model.norm + lm_head
  WeightPart attention;       // one layer: MLA projections, their norms, the layer's two RMSNorms
  WeightPart dense_mlp;       // one dense layer's SwiGLU MLP
  WeightPart router;          // one MoE layer's gate weight + correction bias
  WeightPart shared_experts;  // one MoE layer's shared expert(s)
  WeightPart routed_expert;   // ONE routed expert
  int64_t num_layers = 0, num_dense_layers = 0, num_moe_layers = 0, num_routed_experts = 0;

  // Main model (MTP module excluded): 671.03e9 for DeepSeek-V3.
  int64_t TotalParams() const;
  // Used per token: attention, dense MLPs, router, shared + top-k routed experts, head (embedding excluded).
  int64_t ActivatedParams(int64_t top_k) const;
};

ModelWeights CountWeights(const ModelConfig& cfg);

// KV cache bytes per token per layer: (kv_lora_rank + qk_rope_head_dim) values;
// bf16: 2 B each (1,152 B at V3 size, 70,272 B over 61 layers); fp8: FlashMLA's
// layout (latent in FP8 with one fp32 scale per 128 values, rope part BF16: 656 B);
// fp32: 4 B each (the CPU runtime's cache).
int64_t KvBytesPerTokenLayer(const ModelConfig& cfg, const std::string& kv_dtype);

enum class Limiter { kCompute, kMemory, kOverhead, kNvlink, kNic, kPipeline };
const char* LimiterName(Limiter l);

struct OpCost {
  std::string name;
  double flops = 0;
  double bytes = 0;      // HBM bytes (link bytes for communication)
  double kernels = 0;    // launches (GPU) or BLAS calls (CPU path); expected values may be fractional
  double seconds = 0;
  Limiter limiter = Limiter::kCompute;
};

// Roofline timing on one device: time = combine(flops / (peak * eff), bytes /
// (HBM * eff_hbm)) + kernels * kernel_overhead, where combine is the max of the
// two (memory_compute_overlap = 1, GPUs) or their sum (0, single-threaded BLAS).
class DeviceCostModel {
 public:
  explicit DeviceCostModel(const DeviceSpec& d) : d_(d) {}
  const DeviceSpec& device() const { return d_; }

  // [m, k] x [k, n]. `quantized_weight`: the weight is an FP8-checkpoint linear
  // (runs in the device's gemm_dtype); otherwise BF16 (router, head, absorbed
  // MLA BMMs); with gemm_dtype fp32 every GEMM is an SGEMM. `calls`: how many
  // launches / BLAS calls the runtime splits it into (fixed cost each).
  // `weight_reads`: how often the weight is read (the CPU path reads the MLA
  // absorb / expand weights once per sequence).
  OpCost Gemm(const std::string& name, double m, double k, double n, bool quantized_weight,
              double calls = 1, double weight_reads = 1) const;
  // Several experts: tokens_per_expert[i] rows (an expected count) for local
  // expert i. Only experts that receive a token read their weights: expert i
  // is touched with probability 1 - exp(-tokens_per_expert[i]) (Poisson
  // arrivals), which matters only for small decode batches. GPU path: one
  // grouped launch; CPU path: one SGEMM per touched expert.
  // `max_of_ranks` > 1: this device is the slowest of that many EP ranks that
  // wait for each other at the all-to-all; the touched-expert count is then
  // its expected maximum over the ranks, mean + c(ranks) x its standard
  // deviation (c = expected maximum of that many standard normals).
  OpCost GroupedGemm(const std::string& name, const std::vector<double>& tokens_per_expert, double k,
                     double n, int64_t max_of_ranks = 1) const;
  OpCost Elementwise(const std::string& name, double bytes, double kernels) const;
  OpCost AttentionPrefill(const std::string& name, double flops, double bytes, double calls = 1) const;
  OpCost AttentionDecode(const std::string& name, double flops, double bytes, double calls = 2) const;
  // Compute rate of a GEMM (FLOP/s) with its efficiency.
  double GemmRate(bool quantized_weight) const;
  // Combines compute and memory time per memory_compute_overlap.
  double Combine(double compute_s, double memory_s) const;
  // Activation bytes per element read by / written by a GEMM in gemm_dtype.
  double ActInBytes() const;
  double ActOutBytes() const;

 private:
  OpCost Finish(OpCost op, double compute_rate) const;
  double MemRate() const { return d_.hbm_gbytes_per_s * 1e9 * d_.efficiency.hbm; }
  DeviceSpec d_;
};

// The tokens of one micro-batch on one device (DP attention: whole sequences).
struct BatchShape {
  bool decode = false;
  double tokens = 0;      // new tokens (prefill: computed prompt tokens; decode: one per sequence)
  double sequences = 0;   // sequences they belong to
  double context = 0;     // prefill: cached prefix per sequence; decode: KV length per sequence
};

// Per-layer operations, in runtime order. Attention covers input norm through
// o_proj and the post-attention norm (MLA prefill: expanded form with kv_b_proj
// over the whole context and causal flash attention; decode: weight-absorbed
// form over the latent cache).
std::vector<OpCost> AttentionOps(const ModelConfig& cfg, const DeviceCostModel& dev, const BatchShape& b,
                                 int64_t kv_bytes_per_token_layer);
std::vector<OpCost> DenseMlpOps(const ModelConfig& cfg, const DeviceCostModel& dev, double tokens);
std::vector<OpCost> RouterOps(const ModelConfig& cfg, const DeviceCostModel& dev, double tokens);
std::vector<OpCost> SharedExpertOps(const ModelConfig& cfg, const DeviceCostModel& dev, double tokens);
// Routed experts of one device: rows per local expert (received token copies),
// then the weighted sum with the shared expert and the residual for `tokens`.
std::vector<OpCost> RoutedExpertOps(const ModelConfig& cfg, const DeviceCostModel& dev,
                                    const std::vector<double>& tokens_per_local_expert, double tokens,
                                    int64_t max_of_ranks = 1);
// Expected maximum of n independent standard normal variables (0 for n = 1;
// 0.564 for 2, 1.029 for 4, 1.424 for 8).
double ExpectedMaxOfNormals(int64_t n);
// Embedding lookup of `tokens`; final norm, lm_head and sampling of `logit_tokens`.
std::vector<OpCost> EmbedOps(const ModelConfig& cfg, const DeviceCostModel& dev, double tokens);
std::vector<OpCost> HeadOps(const ModelConfig& cfg, const DeviceCostModel& dev, double logit_tokens);

double SumSeconds(const std::vector<OpCost>& ops);

}  // namespace expertmesh::topology
