#include "topology/cost_model.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/checkpoint.h"

namespace expertmesh::topology {

double WeightPart::Bytes(const std::string& gemm_dtype) const {
  if (gemm_dtype == "fp8") {
    return static_cast<double>(quantized) + 4.0 * static_cast<double>(scale_blocks) +
           2.0 * static_cast<double>(params - quantized);
  }
  return (gemm_dtype == "bf16" ? 2.0 : 4.0) * static_cast<double>(params);
}

WeightPart& WeightPart::operator+=(const WeightPart& o) {
  params += o.params;
  quantized += o.quantized;
  scale_blocks += o.scale_blocks;
  return *this;
}

int64_t ModelWeights::TotalParams() const {
  return embed.params + head.params + num_layers * attention.params + num_dense_layers * dense_mlp.params +
         num_moe_layers * (router.params + shared_experts.params + num_routed_experts * routed_expert.params);
}

int64_t ModelWeights::ActivatedParams(int64_t top_k) const {
  return head.params + num_layers * attention.params + num_dense_layers * dense_mlp.params +
         num_moe_layers * (router.params + shared_experts.params + top_k * routed_expert.params);
}

ModelWeights CountWeights(const ModelConfig& cfg) {
  ModelWeights w;
  w.num_layers = cfg.num_hidden_layers;
  w.num_moe_layers = cfg.num_moe_layers();
  w.num_dense_layers = w.num_layers - w.num_moe_layers;
  w.num_routed_experts = cfg.n_routed_experts;
  ShardFilter f;
  f.layer_end = cfg.num_hidden_layers;  // main model; the MTP module is not served by the planner
  f.expert = [](int64_t, int64_t e) { return e == 0; };  // one routed expert per layer is enough to size them
  const int64_t br = cfg.quantization_config.weight_block_rows, bc = cfg.quantization_config.weight_block_cols;
  // Per-layer parts are taken from the first dense and the first MoE layer.
  const int64_t first_moe = cfg.first_k_dense_replace;
  for (const TensorSpec& t : CheckpointSpec(cfg, f)) {
    WeightPart p;
    p.params = t.numel();
    if (t.fp8 && t.shape.size() == 2) {
      p.quantized = p.params;
      p.scale_blocks = ((t.shape[0] + br - 1) / br) * ((t.shape[1] + bc - 1) / bc);
    }
    const std::string& n = t.name;
    if (n == "model.embed_tokens.weight") {
      w.embed += p;
    } else if (n == "lm_head.weight" || n == "model.norm.weight") {
      w.head += p;
    } else {
      // "model.layers.{L}." prefix.
      const int64_t layer = std::stoll(n.substr(13, n.find('.', 13) - 13));
      const bool moe = cfg.IsMoeLayer(layer);
      const bool representative = moe ? layer == first_moe : layer == 0;
      if (!representative) continue;
      if (absl::StrContains(n, ".mlp.experts.")) {
        w.routed_expert += p;
      } else if (absl::StrContains(n, ".mlp.shared_experts.")) {
        w.shared_experts += p;
      } else if (absl::StrContains(n, ".mlp.gate.")) {
        w.router += p;
      } else if (absl::StrContains(n, ".mlp.")) {
        w.dense_mlp += p;
      } else if (layer == 0 || (w.num_dense_layers == 0 && layer == first_moe)) {
        w.attention += p;  // self_attn.* and the layer norms, same in every layer
      }
    }
  }
  return w;
}

int64_t KvBytesPerTokenLayer(const ModelConfig& cfg, const std::string& kv_dtype) {
  if (kv_dtype == "fp32") return 4 * cfg.kv_cache_dim();
  if (kv_dtype == "fp8" && cfg.dense_arch()) return cfg.kv_cache_dim();  // K and V in FP8
  if (kv_dtype == "fp8") {
    // Latent in FP8 + one fp32 scale per 128 values + rope part in BF16 (FlashMLA FP8 layout).
    return cfg.kv_lora_rank + 4 * ((cfg.kv_lora_rank + 127) / 128) + 2 * cfg.qk_rope_head_dim;
  }
  return 2 * cfg.kv_cache_dim();
}

const char* LimiterName(Limiter l) {
  switch (l) {
    case Limiter::kCompute:
      return "compute";
    case Limiter::kMemory:
      return "memory bandwidth";
    case Limiter::kOverhead:
      return "kernel launch overhead";
    case Limiter::kNvlink:
      return "intra-node fabric";
    case Limiter::kNic:
      return "inter-node network";
    case Limiter::kPipeline:
      return "pipeline transfer";
  }
  return "?";
}

double DeviceCostModel::ActInBytes() const { return d_.gemm_dtype == "fp8" ? 1.0 : ActOutBytes(); }
double DeviceCostModel::ActOutBytes() const { return d_.gemm_dtype == "fp32" ? 4.0 : 2.0; }

double DeviceCostModel::Combine(double tc, double tm) const {
  const double ov = d_.efficiency.memory_compute_overlap;
  return std::max(tc, tm) + (1.0 - ov) * std::min(tc, tm);
}

double DeviceCostModel::GemmRate(bool quantized_weight) const {
  const Efficiency& e = d_.efficiency;
  if (d_.gemm_dtype == "fp32") return d_.GemmFlops() * e.gemm_fp32;  // every GEMM is an SGEMM
  if (quantized_weight) return d_.GemmFlops() * (d_.gemm_dtype == "fp8" ? e.gemm_fp8 : e.gemm_bf16);
  return d_.Bf16Flops() * e.gemm_bf16;
}

OpCost DeviceCostModel::Finish(OpCost op, double compute_rate) const {
  const double tc = compute_rate > 0 ? op.flops / compute_rate : 0;
  const double tm = op.bytes / MemRate();
  const double to = op.kernels * d_.efficiency.kernel_overhead_us * 1e-6;
  op.seconds = Combine(tc, tm) + to;
  if (to > Combine(tc, tm)) {
    op.limiter = Limiter::kOverhead;
  } else {
    op.limiter = tc >= tm ? Limiter::kCompute : Limiter::kMemory;
  }
  return op;
}

OpCost DeviceCostModel::Gemm(const std::string& name, double m, double k, double n, bool quantized_weight,
                             double calls, double weight_reads) const {
  OpCost op{name};
  op.flops = 2.0 * m * k * n;
  double wbytes;
  if (quantized_weight) {
    wbytes = d_.WeightBytes() + (d_.gemm_dtype == "fp8" ? 4.0 / (128.0 * 128.0) : 0.0);
    op.bytes = weight_reads * k * n * wbytes + m * k * ActInBytes() + m * n * ActOutBytes();
  } else {
    wbytes = d_.gemm_dtype == "fp32" ? 4.0 : 2.0;
    op.bytes = weight_reads * k * n * wbytes + (m * k + m * n) * ActOutBytes();
  }
  op.kernels = calls;
  return Finish(op, GemmRate(quantized_weight));
}

double ExpectedMaxOfNormals(int64_t n) {
  // Tabulated for small n (Teichroew 1956); Blom's approximation beyond.
  static const double kTable[] = {0, 0, 0.5642, 0.8463, 1.0294, 1.1630, 1.2672, 1.3522, 1.4236};
  if (n <= 1) return 0;
  if (n <= 8) return kTable[n];
  // Phi^-1((n - 0.375) / (n + 0.25)) by a rational approximation of the inverse normal tail.
  const double p = (static_cast<double>(n) - 0.375) / (static_cast<double>(n) + 0.25);
  const double t = std::sqrt(-2.0 * std::log(1.0 - p));
  return t - (2.515517 + 0.802853 * t + 0.010328 * t * t) / (1 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t);
}

OpCost DeviceCostModel::GroupedGemm(const std::string& name, const std::vector<double>& tokens_per_expert, double k,
                                    double n, int64_t max_of_ranks) const {
  OpCost op{name};
  double rows = 0, touched = 0, touched_var = 0;
  for (double t : tokens_per_expert) {
    rows += t;
    const double p = 1.0 - std::exp(-std::max(t, 0.0));  // P(expert receives >= 1 token)
    touched += p;
    touched_var += p * (1.0 - p);
  }
  touched = std::min(static_cast<double>(tokens_per_expert.size()),
                     touched + ExpectedMaxOfNormals(max_of_ranks) * std::sqrt(touched_var));
  const double wbytes = d_.WeightBytes() + (d_.gemm_dtype == "fp8" ? 4.0 / (128.0 * 128.0) : 0.0);
  op.flops = 2.0 * rows * k * n;
  op.bytes = touched * k * n * wbytes + rows * (k * ActInBytes() + n * ActOutBytes());
  if (d_.cpu_path()) {
    op.kernels = touched;
  } else {
    op.kernels = tokens_per_expert.empty() ? 0 : 1;
  }
  return Finish(op, GemmRate(true));
}

OpCost DeviceCostModel::Elementwise(const std::string& name, double bytes, double kernels) const {
  OpCost op{name};
  op.bytes = bytes;
  op.kernels = kernels;
  return Finish(op, 0);
}

OpCost DeviceCostModel::AttentionPrefill(const std::string& name, double flops, double bytes, double calls) const {
  OpCost op{name};
  op.flops = flops;
  op.bytes = bytes;
  op.kernels = calls;
  return Finish(op, d_.Bf16Flops() * d_.efficiency.attention_prefill);
}

OpCost DeviceCostModel::AttentionDecode(const std::string& name, double flops, double bytes, double calls) const {
  // The decode kernel has its own memory efficiency (FlashMLA streams the
  // cache near peak bandwidth), so it is timed here rather than by Finish.
  // GPU: split-KV attention + the combine of the splits (2 launches).
  OpCost op{name};
  op.flops = flops;
  op.bytes = bytes;
  op.kernels = calls;
  const double tc = flops / (d_.Bf16Flops() * d_.efficiency.attention_decode_compute);
  const double tm = bytes / (d_.hbm_gbytes_per_s * 1e9 * d_.efficiency.attention_decode_memory);
  const double to = calls * d_.efficiency.kernel_overhead_us * 1e-6;
  op.seconds = Combine(tc, tm) + to;
  op.limiter = to > Combine(tc, tm) ? Limiter::kOverhead : (tc >= tm ? Limiter::kCompute : Limiter::kMemory);
  return op;
}

namespace {

// GQA attention of the dense architectures (Qwen2, Llama): fused q/k/v
// projection (+ biases), rotary + append to the K/V cache, causal attention
// over the cache (decode: bound by reading K and V), o_proj.
std::vector<OpCost> GqaAttentionOps(const ModelConfig& c, const DeviceCostModel& dev, const BatchShape& b,
                                    int64_t kvb) {
  const double T = b.tokens, S = std::max(b.sequences, 1e-9), H = static_cast<double>(c.hidden_size);
  const double nh = static_cast<double>(c.num_attention_heads), hd = static_cast<double>(c.attn_head_dim());
  const double kv = static_cast<double>(c.kv_dim());
  const double a2 = dev.ActOutBytes(), a1 = dev.ActInBytes();
  const bool cpu = dev.device().cpu_path();
  std::vector<OpCost> ops;
  ops.push_back(dev.Elementwise("input_norm", T * H * (a2 + a2 + a1), 1));
  ops.push_back(dev.Gemm("qkv_proj", T, H, nh * hd + 2 * kv, true));
  ops.push_back(dev.Elementwise("bias_rope_cache", T * (nh * hd + 2 * kv) * 2 * a2 + T * static_cast<double>(kvb), 1));
  if (!b.decode) {
    const double n = T / S, ctx_tokens = T + S * b.context;
    const double pairs = S * (n * b.context + n * (n + 1) / 2);  // causal (query, key) pairs
    const double flops = 4.0 * nh * hd * pairs;
    const double bytes = 2.0 * T * nh * hd * a2 + ctx_tokens * static_cast<double>(kvb);
    ops.push_back(dev.AttentionPrefill("attention_core", flops, bytes, cpu ? nh * S : 1));
  } else {
    const double flops = 4.0 * nh * hd * b.context * T;
    const double bytes = S * b.context * static_cast<double>(kvb) + 2.0 * T * nh * hd * a2;
    ops.push_back(dev.AttentionDecode("attention_core_gqa", flops, bytes, cpu ? nh * S : 2));
  }
  ops.push_back(dev.Elementwise("o_quant", T * nh * hd * (a2 + a1), 1));
  ops.push_back(dev.Gemm("o_proj", T, nh * hd, H, true));
  ops.push_back(dev.Elementwise("residual_post_norm", T * H * (4 * a2 + a1), 1));
  return ops;
}

}  // namespace

std::vector<OpCost> AttentionOps(const ModelConfig& c, const DeviceCostModel& dev, const BatchShape& b,
                                 int64_t kvb) {
  if (c.dense_arch()) return GqaAttentionOps(c, dev, b, kvb);
  const double T = b.tokens, S = std::max(b.sequences, 1e-9), H = static_cast<double>(c.hidden_size);
  const double nh = static_cast<double>(c.num_attention_heads), qk = static_cast<double>(c.qk_head_dim());
  const double nope = static_cast<double>(c.qk_nope_head_dim), rope = static_cast<double>(c.qk_rope_head_dim);
  const double v = static_cast<double>(c.v_head_dim), lora = static_cast<double>(c.kv_lora_rank);
  const double ql = static_cast<double>(c.q_lora_rank);
  const double a2 = dev.ActOutBytes(), a1 = dev.ActInBytes();
  std::vector<OpCost> ops;
  // RMSNorm fused with the FP8 quantisation of its output: read, write, write quantised.
  ops.push_back(dev.Elementwise("input_norm", T * H * (a2 + a2 + a1), 1));
  if (ql > 0) {
    ops.push_back(dev.Gemm("q_a_proj", T, H, ql, true));
    ops.push_back(dev.Elementwise("q_a_norm", T * ql * (a2 + a2 + a1), 1));
    ops.push_back(dev.Gemm("q_b_proj", T, ql, nh * qk, true));
  } else {
    ops.push_back(dev.Gemm("q_proj", T, H, nh * qk, true));
  }
  ops.push_back(dev.Gemm("kv_a_proj", T, H, lora + rope, true));
  // kv_a_layernorm + rotary on q and k + append to the latent cache.
  ops.push_back(dev.Elementwise("kv_norm_rope_cache",
                                T * (lora + rope) * 2 * a2 + T * nh * rope * 2 * a2 + T * static_cast<double>(kvb), 2));
  // The CPU path runs attention one sequence at a time (kernels/cpu MlaExpanded
  // and MlaAbsorbed): prefill one kv_b expansion per sequence and 3 SGEMMs per
  // head; decode 5 SGEMMs per head (absorb q, two score parts, P x latent,
  // absorb v), reading kv_b once per sequence. The GPU path launches each once
  // for the whole batch.
  const bool cpu = dev.device().cpu_path();
  if (!b.decode) {
    const double n = T / S;  // new tokens per sequence
    const double ctx_tokens = T + S * b.context;
    // Expand the latent K/V of the whole context (cached prefix included) per head.
    ops.push_back(dev.Gemm("kv_b_proj", ctx_tokens, lora, nh * (nope + v), true, cpu ? S : 1, cpu ? S : 1));
    const double pairs = S * (n * b.context + n * (n + 1) / 2);  // causal (query, key) pairs
    const double flops = 2.0 * nh * (qk + v) * pairs;
    const double bytes = (T * nh * qk + ctx_tokens * nh * (qk + v) + T * nh * v) * a2;
    ops.push_back(dev.AttentionPrefill("attention_core", flops, bytes, cpu ? 3 * nh * S : 1));
  } else {
    // Weight-absorbed MLA: q_nope -> latent, attention over the latent cache, latent -> v.
    ops.push_back(dev.Gemm("q_absorb_bmm", T, nh * nope, lora, false, cpu ? nh * S : 1, cpu ? S : 1));
    const double flops = 2.0 * nh * ((lora + rope) + lora) * b.context * T;
    const double bytes = S * b.context * static_cast<double>(kvb) + T * nh * (lora + rope + lora) * a2;
    ops.push_back(dev.AttentionDecode("attention_core_mla", flops, bytes, cpu ? 3 * nh * S : 2));
    ops.push_back(dev.Gemm("v_absorb_bmm", T, nh * lora, v, false, cpu ? nh * S : 1, cpu ? S : 1));
  }
  ops.push_back(dev.Elementwise("o_quant", T * nh * v * (a2 + a1), 1));
  ops.push_back(dev.Gemm("o_proj", T, nh * v, H, true));
  // Residual add + post-attention RMSNorm (+ quantisation for the MLP input).
  ops.push_back(dev.Elementwise("residual_post_norm", T * H * (4 * a2 + a1), 1));
  return ops;
}

std::vector<OpCost> DenseMlpOps(const ModelConfig& c, const DeviceCostModel& dev, double T) {
  const double H = static_cast<double>(c.hidden_size), I = static_cast<double>(c.intermediate_size);
  const double a2 = dev.ActOutBytes(), a1 = dev.ActInBytes();
  return {dev.Gemm("mlp_gate_up", T, H, 2 * I, true), dev.Elementwise("mlp_swiglu", T * I * (2 * a2 + a1), 1),
          dev.Gemm("mlp_down", T, I, H, true), dev.Elementwise("mlp_residual", T * H * 3 * a2, 1)};
}

std::vector<OpCost> RouterOps(const ModelConfig& c, const DeviceCostModel& dev, double T) {
  const double E = static_cast<double>(c.n_routed_experts);
  return {dev.Gemm("router_gate", T, static_cast<double>(c.hidden_size), E, false),
          // sigmoid + bias, group top-2 sums, group top-k, expert top-k (fp32 scores).
          dev.Elementwise("router_topk", T * E * 4 * 3, 1)};
}

std::vector<OpCost> SharedExpertOps(const ModelConfig& c, const DeviceCostModel& dev, double T) {
  if (c.n_shared_experts <= 0) return {};
  const double H = static_cast<double>(c.hidden_size);
  const double I = static_cast<double>(c.moe_intermediate_size * c.n_shared_experts);
  const double a2 = dev.ActOutBytes(), a1 = dev.ActInBytes();
  return {dev.Gemm("shared_gate_up", T, H, 2 * I, true), dev.Elementwise("shared_swiglu", T * I * (2 * a2 + a1), 1),
          dev.Gemm("shared_down", T, I, H, true)};
}

std::vector<OpCost> RoutedExpertOps(const ModelConfig& c, const DeviceCostModel& dev,
                                    const std::vector<double>& per_expert, double T, int64_t max_of_ranks) {
  const double H = static_cast<double>(c.hidden_size), I = static_cast<double>(c.moe_intermediate_size);
  const double a2 = dev.ActOutBytes(), a1 = dev.ActInBytes();
  double rows = 0;
  for (double t : per_expert) rows += t;
  return {dev.GroupedGemm("experts_gate_up", per_expert, H, 2 * I, max_of_ranks),
          dev.Elementwise("experts_swiglu", rows * I * (2 * a2 + a1), 1),
          dev.GroupedGemm("experts_down", per_expert, I, H, max_of_ranks),
          // Weighted sum of the combined expert outputs + shared expert + residual.
          dev.Elementwise("moe_output_sum", T * H * 4 * a2, 1)};
}

std::vector<OpCost> EmbedOps(const ModelConfig& c, const DeviceCostModel& dev, double T) {
  return {dev.Elementwise("embed_lookup", T * static_cast<double>(c.hidden_size) * 2 * dev.ActOutBytes(), 1)};
}

std::vector<OpCost> HeadOps(const ModelConfig& c, const DeviceCostModel& dev, double T) {
  const double H = static_cast<double>(c.hidden_size), V = static_cast<double>(c.vocab_size);
  return {dev.Elementwise("final_norm", T * H * 2 * dev.ActOutBytes(), 1), dev.Gemm("lm_head", T, H, V, false),
          dev.Elementwise("sampling", T * V * 4 * 2, 2)};
}

double SumSeconds(const std::vector<OpCost>& ops) {
  double s = 0;
  for (const auto& o : ops) s += o.seconds;
  return s;
}

}  // namespace expertmesh::topology
