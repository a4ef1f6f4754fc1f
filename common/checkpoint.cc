#include "common/checkpoint.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/random.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace expertmesh {

namespace {

using Init = TensorSpec::Init;

void AddLinear(std::vector<TensorSpec>* out, const std::string& name, int64_t rows, int64_t cols,
               bool fp8, float gain = 1.0f) {
  out->push_back({name, {rows, cols}, fp8, Init::kNormal, gain / std::sqrt(static_cast<float>(cols))});
}

void AddNorm(std::vector<TensorSpec>* out, const std::string& name, int64_t n) {
  out->push_back({name, {n}, false, Init::kNorm, 0.0f});
}

void AddBlock(const ModelConfig& c, int64_t layer, bool moe, const ShardFilter& f,
              std::vector<TensorSpec>* out) {
  const std::string p = absl::StrCat("model.layers.", layer, ".");
  const int64_t H = c.hidden_size, nh = c.num_attention_heads;
  // Residual branches are scaled down so activations stay O(1) over many layers.
  const float out_gain = 1.0f / std::sqrt(2.0f * static_cast<float>(c.num_hidden_layers));
  AddNorm(out, p + "input_layernorm.weight", H);
  AddNorm(out, p + "post_attention_layernorm.weight", H);
  const std::string a = p + "self_attn.";
  if (c.q_lora_rank > 0) {
    AddLinear(out, a + "q_a_proj.weight", c.q_lora_rank, H, true);
    AddNorm(out, a + "q_a_layernorm.weight", c.q_lora_rank);
    AddLinear(out, a + "q_b_proj.weight", nh * c.qk_head_dim(), c.q_lora_rank, true);
  } else {
    AddLinear(out, a + "q_proj.weight", nh * c.qk_head_dim(), H, true);
  }
  AddLinear(out, a + "kv_a_proj_with_mqa.weight", c.kv_lora_rank + c.qk_rope_head_dim, H, true);
  AddNorm(out, a + "kv_a_layernorm.weight", c.kv_lora_rank);
  AddLinear(out, a + "kv_b_proj.weight", nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, true);
  AddLinear(out, a + "o_proj.weight", H, nh * c.v_head_dim, true, out_gain);
  const std::string m = p + "mlp.";
  if (!moe) {
    AddLinear(out, m + "gate_proj.weight", c.intermediate_size, H, true);
    AddLinear(out, m + "up_proj.weight", c.intermediate_size, H, true);
    AddLinear(out, m + "down_proj.weight", H, c.intermediate_size, true, out_gain);
    return;
  }
  out->push_back({m + "gate.weight", {c.n_routed_experts, H}, false, Init::kNormal,
                  1.0f / std::sqrt(static_cast<float>(H))});
  out->push_back({m + "gate.e_score_correction_bias", {c.n_routed_experts}, false, Init::kBias, 0.05f});
  const int64_t I = c.moe_intermediate_size;
  for (int64_t e = 0; e < c.n_routed_experts; ++e) {
    if (f.expert && !f.expert(layer, e)) continue;
    const std::string ep = absl::StrCat(m, "experts.", e, ".");
    AddLinear(out, ep + "gate_proj.weight", I, H, true);
    AddLinear(out, ep + "up_proj.weight", I, H, true);
    AddLinear(out, ep + "down_proj.weight", H, I, true, out_gain);
  }
  if (c.n_shared_experts > 0) {
    const int64_t S = I * c.n_shared_experts;
    AddLinear(out, m + "shared_experts.gate_proj.weight", S, H, true);
    AddLinear(out, m + "shared_experts.up_proj.weight", S, H, true);
    AddLinear(out, m + "shared_experts.down_proj.weight", H, S, true, out_gain);
  }
}

// A decoder layer of Qwen2ForCausalLM / LlamaForCausalLM: GQA attention
// (q/k/v biases when attention_bias), SwiGLU MLP.
void AddDenseBlock(const ModelConfig& c, int64_t layer, std::vector<TensorSpec>* out) {
  const std::string p = absl::StrCat("model.layers.", layer, ".");
  const int64_t H = c.hidden_size, q = c.num_attention_heads * c.attn_head_dim(), kv = c.kv_dim();
  const float out_gain = 1.0f / std::sqrt(2.0f * static_cast<float>(c.num_hidden_layers));
  AddNorm(out, p + "input_layernorm.weight", H);
  const std::string a = p + "self_attn.";
  AddLinear(out, a + "q_proj.weight", q, H, false);
  AddLinear(out, a + "k_proj.weight", kv, H, false);
  AddLinear(out, a + "v_proj.weight", kv, H, false);
  if (c.attention_bias) {
    out->push_back({a + "q_proj.bias", {q}, false, Init::kNormal, 0.1f});
    out->push_back({a + "k_proj.bias", {kv}, false, Init::kNormal, 0.1f});
    out->push_back({a + "v_proj.bias", {kv}, false, Init::kNormal, 0.1f});
  }
  AddLinear(out, a + "o_proj.weight", H, q, false, out_gain);
  AddNorm(out, p + "post_attention_layernorm.weight", H);
  const std::string m = p + "mlp.";
  AddLinear(out, m + "gate_proj.weight", c.intermediate_size, H, false);
  AddLinear(out, m + "up_proj.weight", c.intermediate_size, H, false);
  AddLinear(out, m + "down_proj.weight", H, c.intermediate_size, false, out_gain);
}

// Qwen2ForCausalLM / LlamaForCausalLM: embed_tokens, the layers, model.norm
// and lm_head unless tie_word_embeddings (then the head is embed_tokens,
// which a shard with the head but not the embedding reads as well).
std::vector<TensorSpec> DenseSpec(const ModelConfig& c, const ShardFilter& f) {
  std::vector<TensorSpec> out;
  const int64_t end = f.layer_end < 0 ? c.num_hidden_layers : std::min(f.layer_end, c.num_hidden_layers);
  if (f.embed || (f.head && c.tie_word_embeddings)) {
    out.push_back({"model.embed_tokens.weight", {c.vocab_size, c.hidden_size}, false, Init::kNormal, 1.0f});
  }
  for (int64_t l = std::max<int64_t>(f.layer_begin, 0); l < end; ++l) AddDenseBlock(c, l, &out);
  if (f.head) {
    AddNorm(&out, "model.norm.weight", c.hidden_size);
    if (!c.tie_word_embeddings) AddLinear(&out, "lm_head.weight", c.vocab_size, c.hidden_size, false);
  }
  return out;
}

uint64_t HashName(const std::string& s, uint64_t seed) {
  uint64_t h = SplitMix64(seed);
  for (unsigned char ch : s) h = SplitMix64(h ^ ch);
  return h;
}

}  // namespace

std::vector<TensorSpec> CheckpointSpec(const ModelConfig& c, const ShardFilter& f) {
  if (c.dense_arch()) return DenseSpec(c, f);
  std::vector<TensorSpec> out;
  const int64_t total = c.num_hidden_layers + c.num_nextn_predict_layers;
  const int64_t end = f.layer_end < 0 ? total : std::min(f.layer_end, total);
  if (f.embed) {
    out.push_back({"model.embed_tokens.weight", {c.vocab_size, c.hidden_size}, false, Init::kNormal, 1.0f});
  }
  for (int64_t l = std::max<int64_t>(f.layer_begin, 0); l < end; ++l) {
    const bool mtp = l >= c.num_hidden_layers;
    AddBlock(c, l, c.IsMoeLayer(l), f, &out);
    if (mtp) {
      const std::string p = absl::StrCat("model.layers.", l, ".");
      out.push_back({p + "embed_tokens.weight", {c.vocab_size, c.hidden_size}, false, Init::kNormal, 1.0f});
      AddNorm(&out, p + "enorm.weight", c.hidden_size);
      AddNorm(&out, p + "hnorm.weight", c.hidden_size);
      AddLinear(&out, p + "eh_proj.weight", c.hidden_size, 2 * c.hidden_size, false);
      AddNorm(&out, p + "shared_head.norm.weight", c.hidden_size);
      AddLinear(&out, p + "shared_head.head.weight", c.vocab_size, c.hidden_size, false);
    }
  }
  if (f.head) {
    AddNorm(&out, "model.norm.weight", c.hidden_size);
    AddLinear(&out, "lm_head.weight", c.vocab_size, c.hidden_size, false);
  }
  return out;
}

std::string ScaleName(const std::string& weight_name) { return weight_name + "_scale_inv"; }

namespace {
std::vector<int64_t> ScaleShape(const TensorSpec& s, const ModelConfig& c) {
  const int64_t br = c.quantization_config.weight_block_rows, bc = c.quantization_config.weight_block_cols;
  return {(s.shape[0] + br - 1) / br, (s.shape[1] + bc - 1) / bc};
}
}  // namespace

absl::Status ValidateCheckpoint(const ShardedCheckpoint& ck, const std::vector<TensorSpec>& spec,
                                const ModelConfig& cfg) {
  std::vector<std::string> errs;
  for (const auto& s : spec) {
    const TensorView* t = ck.Find(s.name);
    if (t == nullptr) {
      errs.push_back(absl::StrCat(s.name, ": missing (expected shape ", ShapeString(s.shape), ")"));
      continue;
    }
    if (t->shape != s.shape) {
      errs.push_back(absl::StrCat(s.name, " (", t->file, "): shape ", ShapeString(t->shape), ", expected ",
                                  ShapeString(s.shape)));
      continue;
    }
    if (t->dtype == DType::kF8E4M3) {
      if (!s.fp8 || s.shape.size() != 2) {
        errs.push_back(absl::StrCat(s.name, " (", t->file, "): dtype F8_E4M3 where F32, BF16 or F16 is expected"));
        continue;
      }
      const TensorView* sc = ck.Find(ScaleName(s.name));
      const auto want = ScaleShape(s, cfg);
      if (sc == nullptr) {
        errs.push_back(absl::StrCat(ScaleName(s.name), ": missing (F8_E4M3 weight needs F32 block scales of shape ",
                                    ShapeString(want), ")"));
      } else if (sc->dtype != DType::kF32 || sc->shape != want) {
        errs.push_back(absl::StrCat(ScaleName(s.name), " (", sc->file, "): ", DTypeName(sc->dtype), " ",
                                    ShapeString(sc->shape), ", expected F32 ", ShapeString(want)));
      }
    }
  }
  if (!errs.empty()) {
    constexpr size_t kShown = 20;  // a mismatched config can yield thousands
    const size_t n = errs.size();
    if (n > kShown) {
      errs.resize(kShown);
      errs.push_back(absl::StrCat("... and ", n - kShown, " more"));
    }
    return absl::InvalidArgumentError(absl::StrCat("checkpoint ", ck.dir(), " does not match its config (", n,
                                                   " problem", n > 1 ? "s" : "", "): ", absl::StrJoin(errs, "; ")));
  }
  return absl::OkStatus();
}

absl::Status LoadF32Into(const ShardedCheckpoint& ck, const TensorSpec& s, const ModelConfig& cfg, float* out) {
  const TensorView* t = ck.Find(s.name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat(s.name, ": missing from checkpoint ", ck.dir()));
  if (t->shape != s.shape) {
    return absl::InvalidArgumentError(absl::StrCat(s.name, ": shape ", ShapeString(t->shape), ", expected ",
                                                   ShapeString(s.shape)));
  }
  if (t->dtype != DType::kF8E4M3) {
    ConvertToFloat(t->dtype, t->data, static_cast<size_t>(s.numel()), out);
    return absl::OkStatus();
  }
  const TensorView* sc = ck.Find(ScaleName(s.name));
  const auto want = ScaleShape(s, cfg);
  if (sc == nullptr || sc->dtype != DType::kF32 || sc->shape != want || s.shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(ScaleName(s.name), ": missing or not F32 ", ShapeString(want)));
  }
  // Decode and scale in one pass, a 128-column block at a time (no division per value).
  const float* scale = reinterpret_cast<const float*>(sc->data);
  const uint8_t* q = static_cast<const uint8_t*>(t->data);
  const int64_t rows = s.shape[0], cols = s.shape[1];
  const int64_t br = cfg.quantization_config.weight_block_rows, bc = cfg.quantization_config.weight_block_cols;
  for (int64_t r = 0; r < rows; ++r) {
    const float* srow = scale + (r / br) * want[1];
    const uint8_t* qrow = q + r * cols;
    float* orow = out + r * cols;
    for (int64_t c0 = 0, b = 0; c0 < cols; c0 += bc, ++b) {
      const float f = srow[b];
      const int64_t c1 = std::min(cols, c0 + bc);
      for (int64_t c = c0; c < c1; ++c) orow[c] = F8E4M3ToFloat(qrow[c]) * f;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> LoadF32(const ShardedCheckpoint& ck, const TensorSpec& s,
                                           const ModelConfig& cfg) {
  std::vector<float> out(static_cast<size_t>(s.numel()));
  RETURN_IF_ERROR(LoadF32Into(ck, s, cfg, out.data()));
  return out;
}

std::vector<float> RandomTensor(const TensorSpec& s, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(s.numel()));
  uint64_t state = HashName(s.name, seed);
  auto uniform = [&state]() {  // (0, 1)
    state = SplitMix64(state);
    return UnitInterval(state);
  };
  auto normal = [&]() {  // Box-Muller, one value per pair of uniforms: simple and exact
    const double u1 = uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  };
  switch (s.init) {
    case Init::kNorm:
      for (auto& x : v) x = static_cast<float>(1.0 + 0.1 * normal());
      break;
    case Init::kBias:
    case Init::kNormal:
      for (auto& x : v) x = static_cast<float>(s.std * normal());
      break;
  }
  return v;
}

void QuantizeFp8Blocks(const float* w, int64_t rows, int64_t cols, int64_t br, int64_t bc,
                       std::vector<uint8_t>* q, std::vector<float>* scale_inv) {
  const int64_t nbr = (rows + br - 1) / br, nbc = (cols + bc - 1) / bc;
  q->assign(static_cast<size_t>(rows * cols), 0);
  scale_inv->assign(static_cast<size_t>(nbr * nbc), 1.0f);
  for (int64_t bi = 0; bi < nbr; ++bi) {
    for (int64_t bj = 0; bj < nbc; ++bj) {
      const int64_t r0 = bi * br, r1 = std::min(rows, r0 + br), c0 = bj * bc, c1 = std::min(cols, c0 + bc);
      float amax = 0.0f;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
      const float scale = amax > 0 ? amax / kF8E4M3Max : 1.0f;
      (*scale_inv)[bi * nbc + bj] = scale;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) (*q)[r * cols + c] = FloatToF8E4M3(w[r * cols + c] / scale);
    }
  }
}

absl::Status GenerateCheckpoint(const ModelConfig& cfg_in, const GenerateOptions& o) {
  namespace fs = std::filesystem;
  DType wdtype;
  bool fp8 = false;
  if (o.dtype == "fp32") {
    wdtype = DType::kF32;
  } else if (o.dtype == "bf16") {
    wdtype = DType::kBF16;
  } else if (o.dtype == "fp8") {
    wdtype = DType::kBF16;  // non-linear tensors of fp8 checkpoints are bf16, as in the release
    fp8 = true;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--dtype \"", o.dtype, "\": expected fp32, bf16 or fp8"));
  }
  if (o.shard_size_bytes == 0) return absl::InvalidArgumentError("--shard-size must be > 0");
  ModelConfig cfg = cfg_in;
  cfg.quantization_config.present = fp8;
  cfg.torch_dtype = o.dtype == "fp32" ? "float32" : "bfloat16";
  RETURN_IF_ERROR(cfg.Validate());
  std::error_code ec;
  fs::create_directories(o.out_dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat(o.out_dir, ": cannot create folder: ", ec.message()));

  const auto spec = CheckpointSpec(cfg);
  const int64_t br = cfg.quantization_config.weight_block_rows, bc = cfg.quantization_config.weight_block_cols;
  // Plan shards from byte sizes alone, so file names (…-of-N) are known up front.
  auto bytes_of = [&](const TensorSpec& s) -> uint64_t {
    if (fp8 && s.fp8) {
      const uint64_t nb = ((s.shape[0] + br - 1) / br) * ((s.shape[1] + bc - 1) / bc);
      return static_cast<uint64_t>(s.numel()) + 4 * nb;
    }
    // Correction biases stay fp32 in every dtype (as in the release).
    if (s.init == Init::kBias) return 4ull * s.numel();
    return static_cast<uint64_t>(s.numel()) * DTypeSize(wdtype);
  };
  std::vector<int> shard_of(spec.size());
  int nshards = 1;
  uint64_t cur = 0, total_bytes = 0;
  for (size_t i = 0; i < spec.size(); ++i) {
    const uint64_t b = bytes_of(spec[i]);
    if (cur > 0 && cur + b > o.shard_size_bytes) {
      ++nshards;
      cur = 0;
    }
    cur += b;
    total_bytes += b;
    shard_of[i] = nshards;
  }
  auto shard_name = [&](int k) { return absl::StrFormat("model-%05d-of-%05d.safetensors", k, nshards); };
  nlohmann::json weight_map = nlohmann::json::object();
  SafetensorsWriter w;
  w.SetMetadata("format", "pt");
  int shard = 1;
  auto flush = [&]() -> absl::Status {
    const std::string name = shard_name(shard);
    for (const auto& n : w.names()) weight_map[n] = name;
    RETURN_IF_ERROR(w.Write(o.out_dir + "/" + name));
    if (o.progress) o.progress(absl::StrCat("wrote ", name, " (", w.data_bytes() >> 20, " MiB)"));
    w = SafetensorsWriter();
    w.SetMetadata("format", "pt");
    return absl::OkStatus();
  };
  for (size_t i = 0; i < spec.size(); ++i) {
    if (shard_of[i] != shard) {
      RETURN_IF_ERROR(flush());
      shard = shard_of[i];
    }
    TensorSpec s = spec[i];
    if (s.init == Init::kBias && o.router_bias_std >= 0) s.std = o.router_bias_std;
    std::vector<float> v = RandomTensor(s, o.seed);
    if (fp8 && s.fp8) {
      std::vector<uint8_t> q;
      std::vector<float> sc;
      QuantizeFp8Blocks(v.data(), s.shape[0], s.shape[1], br, bc, &q, &sc);
      w.Add(s.name, DType::kF8E4M3, s.shape, std::move(q));
      w.AddF32(ScaleName(s.name), {(s.shape[0] + br - 1) / br, (s.shape[1] + bc - 1) / bc}, sc);
      continue;
    }
    const DType dt = s.init == Init::kBias ? DType::kF32 : wdtype;
    std::vector<uint8_t> bytes(v.size() * DTypeSize(dt));
    ConvertFromFloat(dt, v.data(), v.size(), bytes.data());
    w.Add(s.name, dt, s.shape, std::move(bytes));
  }
  RETURN_IF_ERROR(flush());
  nlohmann::json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
  {
    std::ofstream f(o.out_dir + "/model.safetensors.index.json");
    f << index.dump(2) << "\n";
    if (!f) return absl::DataLossError(absl::StrCat(o.out_dir, ": cannot write model.safetensors.index.json"));
  }
  {
    std::ofstream f(o.out_dir + "/config.json");
    f << cfg.ToJson().dump(2) << "\n";
    if (!f) return absl::DataLossError(absl::StrCat(o.out_dir, ": cannot write config.json"));
  }
  return absl::OkStatus();
}

}  // namespace expertmesh
