#include "common/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <type_traits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace expertmesh {

namespace {

using nlohmann::json;

// Reads optional key `k` of `j` into `out`; records a type error in `errs`.
// Strict: an integer field takes only a JSON integer (160.7 or 160.0 is an
// error, not 160), a bool only true/false, a number any finite JSON number.
template <typename T>
void Get(const json& j, const char* k, T* out, std::vector<std::string>* errs,
         const std::string& prefix = "") {
  auto it = j.find(k);
  if (it == j.end() || it->is_null()) return;
  auto wrong = [&](const char* want) {
    errs->push_back(absl::StrCat(prefix, k, ": wrong type (", it->type_name(), " ", it->dump(),
                                 "; expected ", want, ")"));
  };
  if constexpr (std::is_same_v<T, bool>) {
    if (!it->is_boolean()) return wrong("true or false");
  } else if constexpr (std::is_integral_v<T>) {
    if (!it->is_number_integer()) return wrong("an integer");
  } else if constexpr (std::is_floating_point_v<T>) {
    if (!it->is_number()) return wrong("a number");
  } else if constexpr (std::is_same_v<T, std::string>) {
    if (!it->is_string()) return wrong("a string");
  } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
    bool ok = it->is_array();
    for (const auto& v : *it) ok = ok && v.is_number_integer();
    if (!ok) return wrong("an array of integers");
  }
  try {
    *out = it->get<T>();
  } catch (const json::exception& e) {
    wrong("another type");
  }
}

}  // namespace

int64_t ModelConfig::num_moe_layers() const {
  // Layers l in [first_k_dense_replace, num_hidden_layers) with l % moe_layer_freq == 0,
  // counted in closed form (safe on unvalidated configs: no loop, no division by 0).
  const int64_t f = moe_layer_freq, a = std::max<int64_t>(first_k_dense_replace, 0), n = num_hidden_layers;
  if (f <= 0 || n <= a) return 0;
  return (n - 1) / f - (a + f - 1) / f + 1;
}

std::string ModelConfig::architecture() const {
  if (model_type == "qwen2") return "Qwen2ForCausalLM";
  if (model_type == "llama") return "LlamaForCausalLM";
  return "DeepseekV3ForCausalLM";
}

double ModelConfig::ParameterCount() const {
  if (dense_arch()) {
    const double h = static_cast<double>(hidden_size), q = static_cast<double>(num_attention_heads) * attn_head_dim(),
                 kv = static_cast<double>(kv_dim());
    const double attn = h * q + 2.0 * h * kv + q * h + (attention_bias ? q + 2.0 * kv : 0.0);
    const double layer = attn + 3.0 * h * static_cast<double>(intermediate_size) + 2.0 * h;
    return static_cast<double>(vocab_size) * h * (tie_word_embeddings ? 1 : 2) +
           static_cast<double>(num_hidden_layers) * layer + h;
  }
  const double h = static_cast<double>(hidden_size), heads = static_cast<double>(num_attention_heads);
  const double q = q_lora_rank > 0 ? h * q_lora_rank + static_cast<double>(q_lora_rank) * heads * qk_head_dim()
                                   : h * heads * qk_head_dim();
  const double attn = q + h * kv_cache_dim() + static_cast<double>(kv_lora_rank) * heads * (qk_nope_head_dim + v_head_dim) +
                      heads * v_head_dim * h;
  const double dense = 3.0 * h * intermediate_size;
  const double moe = (static_cast<double>(n_routed_experts) + n_shared_experts) * 3.0 * h * moe_intermediate_size +
                     h * n_routed_experts;
  const double moe_layers = static_cast<double>(num_moe_layers());
  double n = static_cast<double>(vocab_size) * h * (tie_word_embeddings ? 1 : 2);
  n += static_cast<double>(num_hidden_layers) * attn + moe_layers * moe + (num_hidden_layers - moe_layers) * dense;
  n += static_cast<double>(num_nextn_predict_layers) * (attn + moe + 2.0 * h * h);
  return n;
}

double ModelConfig::softmax_scale() const {
  if (dense_arch()) return 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(attn_head_dim(), 1)));
  double s = 1.0 / std::sqrt(static_cast<double>(qk_head_dim()));
  if (rope_scaling.type == "yarn" && rope_scaling.mscale_all_dim > 0 && rope_scaling.factor > 1) {
    const double m = 0.1 * rope_scaling.mscale_all_dim * std::log(rope_scaling.factor) + 1.0;
    s *= m * m;
  }
  return s;
}

namespace {

// The defaults of a dense architecture before its config.json is read: no
// MLA, MoE or MTP fields; HF's defaults for the rest.
ModelConfig DenseDefaults(const std::string& model_type) {
  ModelConfig c;
  c.model_type = model_type;
  c.moe_intermediate_size = 0;
  c.first_k_dense_replace = 0;  // set to num_hidden_layers once read
  c.num_nextn_predict_layers = 0;
  c.n_routed_experts = 0;
  c.n_shared_experts = 0;
  c.num_experts_per_tok = 0;
  c.n_group = 1;
  c.topk_group = 1;
  c.routed_scaling_factor = 1.0;
  c.q_lora_rank = 0;
  c.kv_lora_rank = 0;
  c.qk_nope_head_dim = 0;
  c.qk_rope_head_dim = 0;
  c.v_head_dim = 0;
  c.rope_scaling.type = "none";
  c.attention_bias = model_type == "qwen2";
  return c;
}

// An id field that HF also writes as a list (Llama-3.1 instruct:
// eos_token_id = [128001, 128008, 128009]): the first one.
void GetTokenId(const json& j, const char* k, int64_t* out, std::vector<std::string>* errs) {
  auto it = j.find(k);
  if (it != j.end() && it->is_array()) {
    if (it->empty() || !(*it)[0].is_number_integer()) {
      errs->push_back(absl::StrCat(k, ": expected an integer or a non-empty list of integers"));
    } else {
      *out = (*it)[0].get<int64_t>();
    }
    return;
  }
  Get(j, k, out, errs);
}

// config.json of Qwen2ForCausalLM / LlamaForCausalLM.
absl::StatusOr<ModelConfig> DenseFromJson(const json& j, const std::string& model_type) {
  ModelConfig c = DenseDefaults(model_type);
  std::vector<std::string> errs;
  Get(j, "vocab_size", &c.vocab_size, &errs);
  Get(j, "hidden_size", &c.hidden_size, &errs);
  Get(j, "intermediate_size", &c.intermediate_size, &errs);
  Get(j, "num_hidden_layers", &c.num_hidden_layers, &errs);
  Get(j, "num_attention_heads", &c.num_attention_heads, &errs);
  c.num_key_value_heads = c.num_attention_heads;  // HF: absent means multi-head attention
  Get(j, "num_key_value_heads", &c.num_key_value_heads, &errs);
  Get(j, "head_dim", &c.head_dim, &errs);
  Get(j, "max_position_embeddings", &c.max_position_embeddings, &errs);
  Get(j, "rope_theta", &c.rope_theta, &errs);
  Get(j, "rms_norm_eps", &c.rms_norm_eps, &errs);
  Get(j, "tie_word_embeddings", &c.tie_word_embeddings, &errs);
  Get(j, "torch_dtype", &c.torch_dtype, &errs);
  GetTokenId(j, "bos_token_id", &c.bos_token_id, &errs);
  GetTokenId(j, "eos_token_id", &c.eos_token_id, &errs);
  if (model_type == "llama") Get(j, "attention_bias", &c.attention_bias, &errs);
  std::string act = "silu";
  Get(j, "hidden_act", &act, &errs);
  if (act != "silu") errs.push_back(absl::StrCat("hidden_act = \"", act, "\": expected \"silu\""));
  bool sliding = false;
  Get(j, "use_sliding_window", &sliding, &errs);
  if (sliding) errs.push_back("use_sliding_window = true: sliding-window attention is not supported (expected false)");
  bool mlp_bias = false;
  Get(j, "mlp_bias", &mlp_bias, &errs);
  if (mlp_bias) errs.push_back("mlp_bias = true: MLP biases are not supported (expected false)");
  auto rs = j.find("rope_scaling");
  if (rs != j.end() && !rs->is_null()) {
    if (!rs->is_object()) {
      errs.push_back("rope_scaling: expected an object or null");
    } else {
      RopeScaling& r = c.rope_scaling;
      r.type.clear();
      Get(*rs, "rope_type", &r.type, &errs, "rope_scaling.");
      if (r.type.empty()) Get(*rs, "type", &r.type, &errs, "rope_scaling.");
      if (r.type == "default") r.type = "none";
      Get(*rs, "factor", &r.factor, &errs, "rope_scaling.");
      Get(*rs, "low_freq_factor", &r.low_freq_factor, &errs, "rope_scaling.");
      Get(*rs, "high_freq_factor", &r.high_freq_factor, &errs, "rope_scaling.");
      Get(*rs, "original_max_position_embeddings", &r.original_max_position_embeddings, &errs,
          "rope_scaling.");
    }
  }
  if (j.contains("quantization_config") && !j["quantization_config"].is_null()) {
    errs.push_back(absl::StrCat("quantization_config: ", model_type,
                                " checkpoints are read unquantised (fp32, bf16 or f16 weights)"));
  }
  if (!errs.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("config: ", absl::StrJoin(errs, "; ")));
  }
  c.first_k_dense_replace = c.num_hidden_layers;  // every layer is dense
  absl::Status s = c.Validate();
  if (!s.ok()) return s;
  return c;
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfig::FromJson(const json& j) {
  if (!j.is_object()) return absl::InvalidArgumentError("config: expected a JSON object");
  ModelConfig c;
  std::vector<std::string> errs;
  Get(j, "model_type", &c.model_type, &errs);
  if (errs.empty() && (c.model_type == "qwen2" || c.model_type == "llama")) return DenseFromJson(j, c.model_type);
  Get(j, "vocab_size", &c.vocab_size, &errs);
  Get(j, "hidden_size", &c.hidden_size, &errs);
  Get(j, "intermediate_size", &c.intermediate_size, &errs);
  Get(j, "moe_intermediate_size", &c.moe_intermediate_size, &errs);
  Get(j, "num_hidden_layers", &c.num_hidden_layers, &errs);
  Get(j, "first_k_dense_replace", &c.first_k_dense_replace, &errs);
  Get(j, "moe_layer_freq", &c.moe_layer_freq, &errs);
  Get(j, "num_nextn_predict_layers", &c.num_nextn_predict_layers, &errs);
  Get(j, "num_attention_heads", &c.num_attention_heads, &errs);
  Get(j, "num_key_value_heads", &c.num_key_value_heads, &errs);
  Get(j, "n_routed_experts", &c.n_routed_experts, &errs);
  Get(j, "n_shared_experts", &c.n_shared_experts, &errs);
  Get(j, "num_experts_per_tok", &c.num_experts_per_tok, &errs);
  Get(j, "n_group", &c.n_group, &errs);
  Get(j, "topk_group", &c.topk_group, &errs);
  Get(j, "scoring_func", &c.scoring_func, &errs);
  Get(j, "topk_method", &c.topk_method, &errs);
  Get(j, "norm_topk_prob", &c.norm_topk_prob, &errs);
  Get(j, "routed_scaling_factor", &c.routed_scaling_factor, &errs);
  if (j.contains("q_lora_rank") && j["q_lora_rank"].is_null()) c.q_lora_rank = 0;
  Get(j, "q_lora_rank", &c.q_lora_rank, &errs);
  Get(j, "kv_lora_rank", &c.kv_lora_rank, &errs);
  Get(j, "qk_nope_head_dim", &c.qk_nope_head_dim, &errs);
  Get(j, "qk_rope_head_dim", &c.qk_rope_head_dim, &errs);
  Get(j, "v_head_dim", &c.v_head_dim, &errs);
  Get(j, "max_position_embeddings", &c.max_position_embeddings, &errs);
  Get(j, "rope_theta", &c.rope_theta, &errs);
  Get(j, "rms_norm_eps", &c.rms_norm_eps, &errs);
  Get(j, "tie_word_embeddings", &c.tie_word_embeddings, &errs);
  Get(j, "torch_dtype", &c.torch_dtype, &errs);
  Get(j, "bos_token_id", &c.bos_token_id, &errs);
  Get(j, "eos_token_id", &c.eos_token_id, &errs);
  auto rs = j.find("rope_scaling");
  if (rs == j.end() || rs->is_null()) {
    c.rope_scaling.type = "none";
  } else if (!rs->is_object()) {
    errs.push_back("rope_scaling: expected an object or null");
  } else {
    RopeScaling& r = c.rope_scaling;
    r.type.clear();
    Get(*rs, "type", &r.type, &errs, "rope_scaling.");
    if (r.type.empty()) Get(*rs, "rope_type", &r.type, &errs, "rope_scaling.");
    Get(*rs, "factor", &r.factor, &errs, "rope_scaling.");
    Get(*rs, "original_max_position_embeddings", &r.original_max_position_embeddings, &errs,
        "rope_scaling.");
    Get(*rs, "beta_fast", &r.beta_fast, &errs, "rope_scaling.");
    Get(*rs, "beta_slow", &r.beta_slow, &errs, "rope_scaling.");
    Get(*rs, "mscale", &r.mscale, &errs, "rope_scaling.");
    Get(*rs, "mscale_all_dim", &r.mscale_all_dim, &errs, "rope_scaling.");
  }
  auto qc = j.find("quantization_config");
  if (qc != j.end() && !qc->is_null()) {
    QuantizationConfig& q = c.quantization_config;
    q.present = true;
    Get(*qc, "quant_method", &q.quant_method, &errs, "quantization_config.");
    Get(*qc, "fmt", &q.fmt, &errs, "quantization_config.");
    Get(*qc, "activation_scheme", &q.activation_scheme, &errs, "quantization_config.");
    std::vector<int64_t> block;
    Get(*qc, "weight_block_size", &block, &errs, "quantization_config.");
    if (!block.empty()) {
      if (block.size() != 2) {
        errs.push_back("quantization_config.weight_block_size: expected [rows, cols]");
      } else {
        q.weight_block_rows = block[0];
        q.weight_block_cols = block[1];
      }
    }
  }
  if (!errs.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("config: ", absl::StrJoin(errs, "; ")));
  }
  absl::Status s = c.Validate();
  if (!s.ok()) return s;
  return c;
}

// The allowed range of every integer field, in one place. The upper bounds
// are far above any published model (DeepSeek-V3: 61 layers, 256 experts,
// width 7168, vocab 129280) and keep every size derived from a config within
// what the loader, the planner and the KV cache can allocate: a config is
// checked against them before anything is sized from it.
struct IntRange {
  const char* name;
  int64_t lo, hi;
};
constexpr int64_t kMaxWidth = int64_t{1} << 16;          // hidden_size, LoRA ranks
constexpr int64_t kMaxFfn = int64_t{1} << 20;            // SwiGLU widths
constexpr int64_t kMaxHeadDim = 4096;
constexpr int64_t kMaxVocab = int64_t{1} << 24;
constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxExperts = 4096;
constexpr int64_t kMaxPositions = int64_t{1} << 24;
// Total parameters (embeddings, attention, dense/shared/routed experts, MTP):
// 64x DeepSeek-V3's 671B.
constexpr double kMaxParameters = 64.0 * 671e9;

// "field = value: must be in ..." messages for Validate and ValidateDense:
// range(name, v, lo, hi) for integers in [lo, hi], real(name, v, lo, hi) for
// reals in (lo, hi].
struct IntRangeCheck {
  std::vector<std::string>* e;
  void operator()(const char* name, int64_t v, int64_t lo, int64_t hi) const {
    if (v < lo || v > hi) e->push_back(absl::StrCat(name, " = ", v, ": must be in [", lo, ", ", hi, "]"));
  }
};
struct RealRangeCheck {
  std::vector<std::string>* e;
  void operator()(const char* name, double v, double lo_exclusive, double hi) const {
    if (!(v > lo_exclusive) || !(v <= hi)) {
      e->push_back(absl::StrCat(name, " = ", v, ": must be in (", lo_exclusive, ", ", hi, "]"));
    }
  }
};

absl::Status ModelConfig::Validate() const {
  std::vector<std::string> e;
  const IntRangeCheck range{&e};
  const RealRangeCheck real{&e};
  if (dense_arch()) return ValidateDense();
  if (model_type != "deepseek_v3") {
    e.push_back(absl::StrCat("model_type = \"", model_type, "\": expected \"deepseek_v3\", \"qwen2\" or \"llama\""));
  }
  const IntRange always[] = {
      {"vocab_size", 1, kMaxVocab},
      {"hidden_size", 1, kMaxWidth},
      {"intermediate_size", 1, kMaxFfn},
      {"moe_intermediate_size", 1, kMaxFfn},
      {"num_hidden_layers", 1, kMaxLayers},
      {"moe_layer_freq", 1, kMaxLayers},
      {"num_attention_heads", 1, 1024},
      {"kv_lora_rank", 1, kMaxWidth},
      {"qk_nope_head_dim", 1, kMaxHeadDim},
      {"v_head_dim", 1, kMaxHeadDim},
      {"max_position_embeddings", 1, kMaxPositions},
  };
  const int64_t values[] = {vocab_size,          hidden_size,      intermediate_size, moe_intermediate_size,
                            num_hidden_layers,   moe_layer_freq,   num_attention_heads, kv_lora_rank,
                            qk_nope_head_dim,    v_head_dim,       max_position_embeddings};
  static_assert(sizeof(always) / sizeof(always[0]) == sizeof(values) / sizeof(values[0]));
  for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); ++i) {
    range(always[i].name, values[i], always[i].lo, always[i].hi);
  }
  range("num_nextn_predict_layers", num_nextn_predict_layers, 0, 16);
  range("bos_token_id", bos_token_id, 0, std::max<int64_t>(vocab_size - 1, 0));
  range("eos_token_id", eos_token_id, 0, std::max<int64_t>(vocab_size - 1, 0));
  if (qk_rope_head_dim <= 0 || qk_rope_head_dim % 2 != 0 || qk_rope_head_dim > kMaxHeadDim) {
    e.push_back(absl::StrCat("qk_rope_head_dim = ", qk_rope_head_dim, ": must be even and in [2, ",
                             kMaxHeadDim, "]"));
  }
  if (q_lora_rank < 0 || q_lora_rank > kMaxWidth) {
    e.push_back(absl::StrCat("q_lora_rank = ", q_lora_rank, ": must be in [0, ", kMaxWidth,
                             "] (0 or null: no q compression)"));
  }
  if (num_key_value_heads != num_attention_heads) {
    e.push_back(absl::StrCat("num_key_value_heads = ", num_key_value_heads,
                             ": MLA needs num_key_value_heads == num_attention_heads (",
                             num_attention_heads, ")"));
  }
  if (first_k_dense_replace < 0 || first_k_dense_replace > num_hidden_layers) {
    e.push_back(absl::StrCat("first_k_dense_replace = ", first_k_dense_replace,
                             ": must be in [0, num_hidden_layers = ", num_hidden_layers, "]"));
  }
  if (num_moe_layers() > 0 || n_routed_experts != 0) {
    range("n_routed_experts", n_routed_experts, 1, kMaxExperts);
    range("n_shared_experts", n_shared_experts, 0, 64);
    if (num_experts_per_tok <= 0 || num_experts_per_tok > n_routed_experts) {
      e.push_back(absl::StrCat("num_experts_per_tok = ", num_experts_per_tok,
                               ": must be in [1, n_routed_experts = ", n_routed_experts, "]"));
    }
    if (n_group <= 0 || (n_routed_experts > 0 && n_routed_experts % n_group != 0)) {
      e.push_back(absl::StrCat("n_group = ", n_group, ": must be > 0 and divide n_routed_experts = ",
                               n_routed_experts));
    } else {
      if (topk_group <= 0 || topk_group > n_group) {
        e.push_back(absl::StrCat("topk_group = ", topk_group, ": must be in [1, n_group = ", n_group, "]"));
      } else if (num_experts_per_tok > topk_group * (n_routed_experts / n_group)) {
        e.push_back(absl::StrCat("num_experts_per_tok = ", num_experts_per_tok,
                                 ": more than the experts in topk_group groups (",
                                 topk_group * (n_routed_experts / n_group), ")"));
      }
      if (n_routed_experts / n_group < 2 && n_group > 1) {
        e.push_back("n_group: each group needs at least 2 experts (group score = sum of its top-2)");
      }
    }
  }
  if (scoring_func != "sigmoid" && scoring_func != "softmax") {
    e.push_back(absl::StrCat("scoring_func = \"", scoring_func, "\": expected \"sigmoid\" or \"softmax\""));
  }
  if (topk_method != "noaux_tc" && topk_method != "group_limited_greedy" && topk_method != "greedy") {
    e.push_back(absl::StrCat("topk_method = \"", topk_method,
                             "\": expected \"noaux_tc\", \"group_limited_greedy\" or \"greedy\""));
  }
  real("routed_scaling_factor", routed_scaling_factor, 0, 1e4);
  real("rope_theta", rope_theta, 0, 1e12);
  real("rms_norm_eps", rms_norm_eps, 0, 1);
  if (rope_scaling.type != "yarn" && rope_scaling.type != "none") {
    e.push_back(absl::StrCat("rope_scaling.type = \"", rope_scaling.type,
                             "\": expected \"yarn\" (or rope_scaling: null)"));
  }
  if (rope_scaling.type == "yarn") {
    if (!(rope_scaling.factor >= 1) || !(rope_scaling.factor <= 1e6)) {
      e.push_back(absl::StrCat("rope_scaling.factor = ", rope_scaling.factor, ": must be in [1, 1e+06]"));
    }
    range("rope_scaling.original_max_position_embeddings", rope_scaling.original_max_position_embeddings, 1,
          kMaxPositions);
    real("rope_scaling.mscale", rope_scaling.mscale, -1e3, 1e3);
    real("rope_scaling.mscale_all_dim", rope_scaling.mscale_all_dim, -1e3, 1e3);
    if (!(rope_scaling.beta_fast > rope_scaling.beta_slow) || !(rope_scaling.beta_slow > 0) ||
        !(rope_scaling.beta_fast <= 1e6)) {
      e.push_back("rope_scaling.beta_fast / beta_slow: need beta_fast > beta_slow > 0");
    }
  }
  if (tie_word_embeddings) e.push_back("tie_word_embeddings = true: DeepSeek-V3 has a separate lm_head (expected false)");
  if (quantization_config.present) {
    const auto& q = quantization_config;
    if (q.quant_method != "fp8") e.push_back(absl::StrCat("quantization_config.quant_method = \"", q.quant_method, "\": expected \"fp8\""));
    if (q.fmt != "e4m3") e.push_back(absl::StrCat("quantization_config.fmt = \"", q.fmt, "\": expected \"e4m3\""));
    if (q.weight_block_rows <= 0 || q.weight_block_cols <= 0 || q.weight_block_rows > kMaxWidth ||
        q.weight_block_cols > kMaxWidth) {
      e.push_back(absl::StrCat("quantization_config.weight_block_size: must be two integers in [1, ", kMaxWidth, "]"));
    }
  }
  if (e.empty()) {
    // Every field is in range; bound what they multiply up to.
    const double params = ParameterCount();
    if (params > kMaxParameters) {
      e.push_back(absl::StrCat("the config describes ", params / 1e9, "B parameters: more than the ",
                               kMaxParameters / 1e9, "B this runtime accepts (check num_hidden_layers, ",
                               "n_routed_experts, hidden_size and the intermediate sizes)"));
    }
  }
  if (!e.empty()) return absl::InvalidArgumentError(absl::StrCat("config: ", absl::StrJoin(e, "; ")));
  return absl::OkStatus();
}

// Qwen2ForCausalLM / LlamaForCausalLM: the fields they use, and zeros in the
// MoE / MLA / MTP fields (what DenseFromJson sets).
absl::Status ModelConfig::ValidateDense() const {
  std::vector<std::string> e;
  const IntRangeCheck range{&e};
  const RealRangeCheck real{&e};
  range("vocab_size", vocab_size, 1, kMaxVocab);
  range("hidden_size", hidden_size, 1, kMaxWidth);
  range("intermediate_size", intermediate_size, 1, kMaxFfn);
  range("num_hidden_layers", num_hidden_layers, 1, kMaxLayers);
  range("num_attention_heads", num_attention_heads, 1, 1024);
  range("max_position_embeddings", max_position_embeddings, 1, kMaxPositions);
  range("bos_token_id", bos_token_id, 0, std::max<int64_t>(vocab_size - 1, 0));
  range("eos_token_id", eos_token_id, 0, std::max<int64_t>(vocab_size - 1, 0));
  if (num_key_value_heads < 1 || num_key_value_heads > num_attention_heads ||
      (num_key_value_heads > 0 && num_attention_heads % num_key_value_heads != 0)) {
    e.push_back(absl::StrCat("num_key_value_heads = ", num_key_value_heads,
                             ": must be in [1, num_attention_heads = ", num_attention_heads, "] and divide it"));
  }
  if (head_dim == 0 && num_attention_heads > 0 && hidden_size % num_attention_heads != 0) {
    e.push_back(absl::StrCat("hidden_size = ", hidden_size, " is not a multiple of num_attention_heads = ",
                             num_attention_heads, " (give head_dim)"));
  }
  const int64_t hd = attn_head_dim();
  if (head_dim < 0 || hd < 2 || hd % 2 != 0 || hd > kMaxHeadDim) {
    e.push_back(absl::StrCat("head_dim = ", hd, ": must be even and in [2, ", kMaxHeadDim, "]"));
  }
  if (first_k_dense_replace != num_hidden_layers || n_routed_experts != 0 || num_nextn_predict_layers != 0 ||
      q_lora_rank != 0 || kv_lora_rank != 0) {
    e.push_back(absl::StrCat(model_type, ": every layer is dense (first_k_dense_replace = num_hidden_layers, ",
                             "n_routed_experts = 0, num_nextn_predict_layers = 0, no MLA ranks)"));
  }
  if (model_type == "qwen2" && !attention_bias) e.push_back("qwen2: the q/k/v projections have biases");
  if (model_type == "llama" && attention_bias) {
    e.push_back("attention_bias = true: Llama attention biases are not supported (expected false)");
  }
  real("rope_theta", rope_theta, 0, 1e12);
  real("rms_norm_eps", rms_norm_eps, 0, 1);
  const RopeScaling& r = rope_scaling;
  if (r.type == "llama3" && model_type == "llama") {
    if (!(r.factor >= 1) || !(r.factor <= 1e6)) {
      e.push_back(absl::StrCat("rope_scaling.factor = ", r.factor, ": must be in [1, 1e+06]"));
    }
    range("rope_scaling.original_max_position_embeddings", r.original_max_position_embeddings, 1, kMaxPositions);
    if (!(r.low_freq_factor > 0) || !(r.high_freq_factor > r.low_freq_factor) || !(r.high_freq_factor <= 1e6)) {
      e.push_back(absl::StrCat("rope_scaling.low_freq_factor = ", r.low_freq_factor, ", high_freq_factor = ",
                               r.high_freq_factor, ": need high_freq_factor > low_freq_factor > 0"));
    }
  } else if (r.type != "none") {
    e.push_back(absl::StrCat("rope_scaling.rope_type = \"", r.type, "\": expected ",
                             model_type == "llama" ? "\"llama3\" or " : "", "rope_scaling: null for ", model_type));
  }
  if (quantization_config.present) {
    e.push_back(absl::StrCat("quantization_config: ", model_type, " checkpoints are fp32, bf16 or f16 (no fp8)"));
  }
  if (e.empty() && ParameterCount() > kMaxParameters) {
    e.push_back(absl::StrCat("the config describes ", ParameterCount() / 1e9, "B parameters: more than the ",
                             kMaxParameters / 1e9, "B this runtime accepts"));
  }
  if (!e.empty()) return absl::InvalidArgumentError(absl::StrCat("config: ", absl::StrJoin(e, "; ")));
  return absl::OkStatus();
}

// config.json of Qwen2ForCausalLM / LlamaForCausalLM, in HF's field names.
json ModelConfig::DenseToJson() const {
  json j;
  j["architectures"] = {architecture()};
  j["model_type"] = model_type;
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  if (head_dim > 0) j["head_dim"] = head_dim;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rope_theta"] = rope_theta;
  if (rope_scaling.type == "llama3") {
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", rope_scaling.factor},
                         {"low_freq_factor", rope_scaling.low_freq_factor},
                         {"high_freq_factor", rope_scaling.high_freq_factor},
                         {"original_max_position_embeddings", rope_scaling.original_max_position_embeddings}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["rms_norm_eps"] = rms_norm_eps;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["torch_dtype"] = torch_dtype;
  j["bos_token_id"] = bos_token_id;
  j["eos_token_id"] = eos_token_id;
  j["hidden_act"] = "silu";
  if (model_type == "llama") {
    j["attention_bias"] = attention_bias;
    j["mlp_bias"] = false;
  } else {
    j["use_sliding_window"] = false;
    j["sliding_window"] = max_position_embeddings;
    j["max_window_layers"] = num_hidden_layers;
  }
  return j;
}

json ModelConfig::ToJson() const {
  if (dense_arch()) return DenseToJson();
  json j;
  j["architectures"] = {"DeepseekV3ForCausalLM"};
  j["model_type"] = model_type;
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["moe_intermediate_size"] = moe_intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["first_k_dense_replace"] = first_k_dense_replace;
  j["moe_layer_freq"] = moe_layer_freq;
  j["num_nextn_predict_layers"] = num_nextn_predict_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["n_routed_experts"] = n_routed_experts;
  j["n_shared_experts"] = n_shared_experts;
  j["num_experts_per_tok"] = num_experts_per_tok;
  j["n_group"] = n_group;
  j["topk_group"] = topk_group;
  j["scoring_func"] = scoring_func;
  j["topk_method"] = topk_method;
  j["norm_topk_prob"] = norm_topk_prob;
  j["routed_scaling_factor"] = routed_scaling_factor;
  if (q_lora_rank > 0) j["q_lora_rank"] = q_lora_rank; else j["q_lora_rank"] = nullptr;
  j["kv_lora_rank"] = kv_lora_rank;
  j["qk_nope_head_dim"] = qk_nope_head_dim;
  j["qk_rope_head_dim"] = qk_rope_head_dim;
  j["v_head_dim"] = v_head_dim;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rope_theta"] = rope_theta;
  if (rope_scaling.type == "none") {
    j["rope_scaling"] = nullptr;
  } else {
    j["rope_scaling"] = {{"type", rope_scaling.type},
                         {"factor", rope_scaling.factor},
                         {"original_max_position_embeddings", rope_scaling.original_max_position_embeddings},
                         {"beta_fast", rope_scaling.beta_fast},
                         {"beta_slow", rope_scaling.beta_slow},
                         {"mscale", rope_scaling.mscale},
                         {"mscale_all_dim", rope_scaling.mscale_all_dim}};
  }
  j["rms_norm_eps"] = rms_norm_eps;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["torch_dtype"] = torch_dtype;
  j["bos_token_id"] = bos_token_id;
  j["eos_token_id"] = eos_token_id;
  j["hidden_act"] = "silu";
  j["attention_bias"] = false;
  if (quantization_config.present) {
    j["quantization_config"] = {
        {"quant_method", quantization_config.quant_method},
        {"fmt", quantization_config.fmt},
        {"activation_scheme", quantization_config.activation_scheme},
        {"weight_block_size", {quantization_config.weight_block_rows, quantization_config.weight_block_cols}}};
  }
  return j;
}

std::vector<std::string> ModelConfig::PresetNames() {
  return {"deepseek-v3",          "tiny",                 "tiny-text",           "small",
          "r1-distill-qwen-1.5b", "r1-distill-qwen-7b",   "r1-distill-llama-8b", "r1-distill-qwen-14b",
          "r1-distill-qwen-32b",  "r1-distill-llama-70b", "tiny-qwen2",          "tiny-llama",
          "tiny-qwen2-text",      "tiny-llama-text"};
}

namespace {

// A dense preset: the shape of a DeepSeek-R1-Distill config.json (HF hub,
// deepseek-ai/DeepSeek-R1-Distill-*), or a tiny one.
ModelConfig Dense(const std::string& type, int64_t vocab, int64_t hidden, int64_t inter, int64_t layers,
                  int64_t heads, int64_t kv_heads, double theta, double eps) {
  ModelConfig c = DenseDefaults(type);
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.intermediate_size = inter;
  c.num_hidden_layers = layers;
  c.first_k_dense_replace = layers;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.rope_theta = theta;
  c.rms_norm_eps = eps;
  c.max_position_embeddings = 131072;
  if (type == "qwen2") {
    c.bos_token_id = 151643;
    c.eos_token_id = 151643;
  } else {
    c.bos_token_id = 128000;
    c.eos_token_id = 128001;
    c.rope_scaling.type = "llama3";  // Llama-3.1 / 3.3
    c.rope_scaling.factor = 8.0;
    c.rope_scaling.low_freq_factor = 1.0;
    c.rope_scaling.high_freq_factor = 4.0;
    c.rope_scaling.original_max_position_embeddings = 8192;
  }
  return c;
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfig::Preset(const std::string& name) {
  // DeepSeek-R1-Distill (bases: Qwen2.5-Math-1.5B / -7B, Llama-3.1-8B,
  // Qwen2.5-14B / -32B, Llama-3.3-70B-Instruct).
  if (name == "r1-distill-qwen-1.5b") return Dense("qwen2", 151936, 1536, 8960, 28, 12, 2, 10000, 1e-6);
  if (name == "r1-distill-qwen-7b") return Dense("qwen2", 152064, 3584, 18944, 28, 28, 4, 10000, 1e-6);
  if (name == "r1-distill-llama-8b") return Dense("llama", 128256, 4096, 14336, 32, 32, 8, 500000, 1e-5);
  if (name == "r1-distill-qwen-14b") return Dense("qwen2", 152064, 5120, 13824, 48, 40, 8, 1e6, 1e-5);
  if (name == "r1-distill-qwen-32b") return Dense("qwen2", 152064, 5120, 27648, 64, 40, 8, 1e6, 1e-5);
  if (name == "r1-distill-llama-70b") return Dense("llama", 128256, 8192, 28672, 80, 64, 8, 500000, 1e-5);
  if (name == "tiny-qwen2" || name == "tiny-llama" || name == "tiny-qwen2-text" || name == "tiny-llama-text") {
    // CI: GQA (3 query heads per KV head), head_dim 32; tiny-llama's llama3
    // scaling over 64 original positions puts its 16 frequencies in all three
    // bands (kept, smoothed, divided by the factor). The -text variants have
    // the distills' vocabulary sizes, so that the real tokenizers fit
    // (`checkpoint --preset tiny-qwen2-text --tokenizer qwen3`).
    const bool qwen = name == "tiny-qwen2" || name == "tiny-qwen2-text";
    ModelConfig c = Dense(qwen ? "qwen2" : "llama", 1024, 192, 384, 3, 6, 2, qwen ? 10000 : 500000,
                          qwen ? 1e-6 : 1e-5);
    c.max_position_embeddings = 4096;
    c.bos_token_id = 1;
    c.eos_token_id = 2;
    c.rope_scaling.original_max_position_embeddings = 64;
    if (name == "tiny-qwen2-text") c.vocab_size = 151936;
    if (name == "tiny-llama-text") c.vocab_size = 128256;
    return c;
  }
  ModelConfig c;  // defaults are DeepSeek-V3 671B
  if (name == "deepseek-v3") {
    c.quantization_config.present = true;
    return c;
  }
  if (name == "tiny" || name == "tiny-text") {
    // Same structure as V3 (256 experts, top-8, 8 groups keep 4, 1 shared, MLA
    // with q_lora, YaRN, 1 MTP layer); widths chosen so that fp8 128x128
    // blocks include partial edge blocks (160 = 128 + 32).
    c.vocab_size = 1024;
    c.hidden_size = 160;
    c.intermediate_size = 320;
    c.moe_intermediate_size = 24;
    c.num_hidden_layers = 4;
    c.first_k_dense_replace = 1;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 4;
    c.q_lora_rank = 96;
    c.kv_lora_rank = 64;
    c.qk_nope_head_dim = 32;
    c.qk_rope_head_dim = 16;
    c.v_head_dim = 32;
    c.max_position_embeddings = 4096;
    c.rope_scaling.original_max_position_embeddings = 128;
    // tiny-text: tiny with DeepSeek-V3's vocabulary size, so that the real
    // tokenizer fits (`expertmesh checkpoint --preset tiny-text --tokenizer deepseek-v3`).
    if (name == "tiny-text") c.vocab_size = 129280;
    return c;
  }
  if (name == "small") {
    // For CPU benchmarks: V3's routing (256 experts, top-8, 8/4 groups) and
    // MLA shapes at 1/7 of the width; one MoE layer ~ 0.8 GB fp32.
    c.vocab_size = 32000;
    c.hidden_size = 1024;
    c.intermediate_size = 2816;
    c.moe_intermediate_size = 256;
    c.num_hidden_layers = 4;
    c.first_k_dense_replace = 1;
    c.num_attention_heads = 16;
    c.num_key_value_heads = 16;
    c.q_lora_rank = 384;
    c.kv_lora_rank = 256;
    c.qk_nope_head_dim = 64;
    c.qk_rope_head_dim = 32;
    c.v_head_dim = 64;
    c.max_position_embeddings = 32768;
    c.rope_scaling.original_max_position_embeddings = 1024;
    return c;
  }
  return absl::NotFoundError(absl::StrCat("unknown preset \"", name, "\" (expected one of: ",
                                          absl::StrJoin(PresetNames(), ", "), ")"));
}

absl::StatusOr<ModelConfig> ModelConfig::FromFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open config file"));
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  auto c = FromJson(j);
  if (!c.ok()) return absl::Status(c.status().code(), absl::StrCat(path, ": ", c.status().message()));
  return c;
}

absl::StatusOr<ModelConfig> ModelConfig::FromPresetOrPath(const std::string& s) {
  for (const auto& p : PresetNames()) {
    if (s == p) return Preset(s);
  }
  std::ifstream probe(s + "/config.json");
  if (probe) return FromFile(s + "/config.json");
  std::ifstream probe2(s);
  if (probe2) return FromFile(s);
  return absl::NotFoundError(absl::StrCat("\"", s, "\" is neither a preset (",
                                          absl::StrJoin(PresetNames(), ", "),
                                          ") nor a config.json / checkpoint folder"));
}

}  // namespace expertmesh
