// Model configuration: the fields of HF `config.json` that the supported
// architectures use, presets, validation. Three architectures:
//   * `deepseek_v3` (DeepseekV3ForCausalLM): MLA attention, MoE layers, MTP;
//   * `qwen2` (Qwen2ForCausalLM) and `llama` (LlamaForCausalLM): dense decoder
//     layers (GQA attention with half-split RoPE, SwiGLU MLP), the
//     architectures of the DeepSeek-R1-Distill models. Qwen2 has q/k/v biases;
//     Llama may use Llama-3.1 rope scaling (`rope_type: llama3`). For these,
//     the MoE / MLA / MTP fields are zero and every layer is dense.
//
//   ASSIGN_OR_RETURN(ModelConfig cfg, ModelConfig::FromFile("ckpt/config.json"));
//   ASSIGN_OR_RETURN(ModelConfig tiny, ModelConfig::Preset("tiny"));
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace expertmesh {

struct RopeScaling {
  std::string type = "yarn";          // "yarn" (DeepSeek-V3), "llama3" (Llama) or "none" (plain RoPE)
  double factor = 40.0;               // context extension factor
  int64_t original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 1.0;
  double low_freq_factor = 1.0;       // llama3: wavelengths above original/low_freq_factor are divided by factor
  double high_freq_factor = 4.0;      // llama3: wavelengths below original/high_freq_factor are kept
};

struct QuantizationConfig {
  bool present = false;               // false: weights are stored unquantised
  std::string quant_method = "fp8";
  std::string fmt = "e4m3";
  std::string activation_scheme = "dynamic";
  int64_t weight_block_rows = 128;    // weight_block_size[0]
  int64_t weight_block_cols = 128;    // weight_block_size[1]
};

struct ModelConfig {
  std::string model_type = "deepseek_v3";
  int64_t vocab_size = 129280;
  int64_t hidden_size = 7168;
  int64_t intermediate_size = 18432;       // dense layers' SwiGLU width
  int64_t moe_intermediate_size = 2048;    // each routed / shared expert's width
  int64_t num_hidden_layers = 61;
  int64_t first_k_dense_replace = 3;
  int64_t moe_layer_freq = 1;
  int64_t num_nextn_predict_layers = 1;    // MTP modules, stored as layers N..N+k-1
  int64_t num_attention_heads = 128;
  int64_t num_key_value_heads = 128;
  int64_t n_routed_experts = 256;
  int64_t n_shared_experts = 1;
  int64_t num_experts_per_tok = 8;
  int64_t n_group = 8;
  int64_t topk_group = 4;
  std::string scoring_func = "sigmoid";
  std::string topk_method = "noaux_tc";
  bool norm_topk_prob = true;
  double routed_scaling_factor = 2.5;
  int64_t q_lora_rank = 1536;              // 0 means no q compression (q_proj)
  int64_t kv_lora_rank = 512;
  int64_t qk_nope_head_dim = 128;
  int64_t qk_rope_head_dim = 64;
  int64_t v_head_dim = 128;
  int64_t max_position_embeddings = 163840;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  std::string torch_dtype = "bfloat16";
  int64_t bos_token_id = 0;
  int64_t eos_token_id = 1;
  QuantizationConfig quantization_config;
  // Dense architectures (qwen2, llama) only:
  int64_t head_dim = 0;                    // per attention head; 0: hidden_size / num_attention_heads
  bool attention_bias = false;             // q/k/v projections have biases (always for qwen2)

  // Presets: "deepseek-v3" (the 671B config), "tiny" (same structure, small
  // widths; CI), "small" (CPU benchmarks; see docs/MODEL.md); the six
  // DeepSeek-R1-Distill models at their real shapes ("r1-distill-qwen-1.5b",
  // "-qwen-7b", "-llama-8b", "-qwen-14b", "-qwen-32b", "-llama-70b") and
  // "tiny-qwen2" / "tiny-llama" (CI).
  static absl::StatusOr<ModelConfig> Preset(const std::string& name);
  static std::vector<std::string> PresetNames();
  // Parses and validates; errors name the field and the allowed values.
  static absl::StatusOr<ModelConfig> FromJson(const nlohmann::json& j);
  static absl::StatusOr<ModelConfig> FromFile(const std::string& path);
  // Resolves a preset name or a path to config.json / a checkpoint folder.
  static absl::StatusOr<ModelConfig> FromPresetOrPath(const std::string& name_or_path);
  nlohmann::json ToJson() const;
  absl::Status Validate() const;

  // Derived quantities.
  // A dense architecture (qwen2, llama): no MLA, no MoE, no MTP.
  bool dense_arch() const { return model_type == "qwen2" || model_type == "llama"; }
  // The HF class name: DeepseekV3ForCausalLM, Qwen2ForCausalLM or LlamaForCausalLM.
  std::string architecture() const;
  // Dense architectures: the attention head width and the K (= V) width of
  // one token: num_key_value_heads * attn_head_dim().
  int64_t attn_head_dim() const {
    return head_dim > 0 ? head_dim : (num_attention_heads > 0 ? hidden_size / num_attention_heads : 0);
  }
  int64_t kv_dim() const { return num_key_value_heads * attn_head_dim(); }
  bool IsMoeLayer(int64_t layer) const {
    return layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  int64_t num_moe_layers() const;
  // Parameters of the whole checkpoint (embeddings, head, attention, dense
  // and MoE layers, MTP modules), as a double so that absurd configs do not
  // overflow. DeepSeek-V3: ~671e9 plus the MTP module.
  double ParameterCount() const;
  int64_t experts_per_group() const { return n_routed_experts / n_group; }
  // Softmax scale of attention: qk_head_dim^-0.5, times mscale^2 under YaRN
  // (dense architectures: attn_head_dim^-0.5).
  double softmax_scale() const;
  // Values cached per token per layer: the latent KV cache of MLA
  // (kv_lora_rank + qk_rope_head_dim), or K and V of the dense architectures
  // (2 * num_key_value_heads * attn_head_dim).
  int64_t kv_cache_dim() const { return dense_arch() ? 2 * kv_dim() : kv_lora_rank + qk_rope_head_dim; }

 private:
  absl::Status ValidateDense() const;
  nlohmann::json DenseToJson() const;
};

}  // namespace expertmesh
