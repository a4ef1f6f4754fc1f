#include "common/gguf.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>

#include "absl/strings/str_cat.h"
#include "common/checkpoint.h"
#include "common/dtype.h"
#include "common/safetensors.h"
#include "common/status.h"

namespace expertmesh {

namespace {

constexpr uint64_t kAlignment = 32;

// GGUF value types (enum gguf_type).
enum : uint32_t {
  kTypeU32 = 4,
  kTypeI32 = 5,
  kTypeF32 = 6,
  kTypeBool = 7,
  kTypeString = 8,
  kTypeArray = 9,
};

template <typename T>
void Put(std::string* s, T v) {
  s->append(reinterpret_cast<const char*>(&v), sizeof(T));
}
void PutString(std::string* s, const std::string& v) {
  Put<uint64_t>(s, v.size());
  s->append(v);
}
uint64_t Pad(uint64_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

}  // namespace

size_t GgmlTypeSize(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: return 4;
    case GgmlType::kF16:
    case GgmlType::kBF16: return 2;
  }
  return 0;
}

void GgufWriter::AddString(const std::string& key, const std::string& v) {
  PutString(&kv_, key);
  Put<uint32_t>(&kv_, kTypeString);
  PutString(&kv_, v);
  ++kv_count_;
}
void GgufWriter::AddU32(const std::string& key, uint32_t v) {
  PutString(&kv_, key);
  Put<uint32_t>(&kv_, kTypeU32);
  Put<uint32_t>(&kv_, v);
  ++kv_count_;
}
void GgufWriter::AddF32(const std::string& key, float v) {
  PutString(&kv_, key);
  Put<uint32_t>(&kv_, kTypeF32);
  Put<float>(&kv_, v);
  ++kv_count_;
}
void GgufWriter::AddBool(const std::string& key, bool v) {
  PutString(&kv_, key);
  Put<uint32_t>(&kv_, kTypeBool);
  Put<uint8_t>(&kv_, v ? 1 : 0);
  ++kv_count_;
}
void GgufWriter::AddStringArray(const std::string& key, const std::vector<std::string>& v) {
  PutString(&kv_, key);
  Put<uint32_t>(&kv_, kTypeArray);
  Put<uint32_t>(&kv_, kTypeString);
  Put<uint64_t>(&kv_, v.size());
  for (const auto& s : v) PutString(&kv_, s);
  ++kv_count_;
}
void GgufWriter::AddF32Array(const std::string& key, const std::vector<float>& v) {
  PutString(&kv_, key);
  Put<uint32_t>(&kv_, kTypeArray);
  Put<uint32_t>(&kv_, kTypeF32);
  Put<uint64_t>(&kv_, v.size());
  for (float f : v) Put<float>(&kv_, f);
  ++kv_count_;
}
void GgufWriter::AddI32Array(const std::string& key, const std::vector<int32_t>& v) {
  PutString(&kv_, key);
  Put<uint32_t>(&kv_, kTypeArray);
  Put<uint32_t>(&kv_, kTypeI32);
  Put<uint64_t>(&kv_, v.size());
  for (int32_t i : v) Put<int32_t>(&kv_, i);
  ++kv_count_;
}

void GgufWriter::AddTensor(const std::string& name, std::vector<int64_t> ne, GgmlType type, Producer produce) {
  uint64_t n = 1;
  for (int64_t d : ne) n *= static_cast<uint64_t>(d);
  tensors_.push_back({name, std::move(ne), type, std::move(produce), n * GgmlTypeSize(type)});
}

absl::Status GgufWriter::Write(const std::string& path) const {
  std::string head;
  head.append("GGUF", 4);
  Put<uint32_t>(&head, 3);
  Put<uint64_t>(&head, tensors_.size());
  Put<uint64_t>(&head, kv_count_);
  head += kv_;
  uint64_t offset = 0;
  for (const auto& t : tensors_) {
    PutString(&head, t.name);
    Put<uint32_t>(&head, static_cast<uint32_t>(t.ne.size()));
    for (int64_t d : t.ne) Put<uint64_t>(&head, static_cast<uint64_t>(d));
    Put<uint32_t>(&head, static_cast<uint32_t>(t.type));
    Put<uint64_t>(&head, offset);
    offset += Pad(t.nbytes);
  }
  head.resize(Pad(head.size()), '\0');

  const std::string tmp = path + ".tmp";
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(tmp.c_str(), "wb"), &std::fclose);
  if (!f) return absl::PermissionDeniedError(absl::StrCat(tmp, ": cannot create: ", std::strerror(errno)));
  auto put = [&](const void* p, size_t n) -> absl::Status {
    if (n > 0 && std::fwrite(p, 1, n, f.get()) != n) {
      return absl::DataLossError(absl::StrCat(tmp, ": write failed: ", std::strerror(errno)));
    }
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(put(head.data(), head.size()));
  std::vector<uint8_t> buf;
  const char zeros[kAlignment] = {};
  for (const auto& t : tensors_) {
    buf.clear();
    absl::Status s = t.produce(&buf);
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat("tensor ", t.name, ": ", s.message()));
    if (buf.size() != t.nbytes) {
      return absl::InternalError(absl::StrCat("tensor ", t.name, ": produced ", buf.size(), " bytes, expected ",
                                              t.nbytes));
    }
    RETURN_IF_ERROR(put(buf.data(), buf.size()));
    RETURN_IF_ERROR(put(zeros, Pad(t.nbytes) - t.nbytes));
  }
  if (std::fflush(f.get()) != 0) return absl::DataLossError(absl::StrCat(tmp, ": ", std::strerror(errno)));
  f.reset();
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return absl::InternalError(absl::StrCat("rename ", tmp, " -> ", path, ": ", ec.message()));
  return absl::OkStatus();
}

namespace {

void Encode(const std::vector<float>& v, GgmlType type, std::vector<uint8_t>* out) {
  const size_t off = out->size();
  out->resize(off + v.size() * GgmlTypeSize(type));
  if (type == GgmlType::kF32) {
    std::memcpy(out->data() + off, v.data(), v.size() * 4);
  } else {
    ConvertFromFloat(type == GgmlType::kBF16 ? DType::kBF16 : DType::kF16, v.data(), v.size(), out->data() + off);
  }
}

// ggml dims of a row-major torch shape.
std::vector<int64_t> Reversed(std::vector<int64_t> shape) { return {shape.rbegin(), shape.rend()}; }

}  // namespace

absl::Status ConvertCheckpointToGguf(const std::string& dir, const std::string& out_path,
                                     const GgufConvertOptions& opts) {
  ASSIGN_OR_RETURN(ModelConfig c, ModelConfig::FromFile(dir + "/config.json"));
  if (c.dense_arch()) {
    return absl::UnimplementedError(absl::StrCat(dir, ": a ", c.architecture(),
                                                 " checkpoint; GGUF conversion covers DeepSeek-V3 (deepseek2) only"));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<ShardedCheckpoint> ck, ShardedCheckpoint::Open(dir));
  ShardFilter filter;
  filter.layer_end = c.num_hidden_layers;  // MTP layers left out, as convert_hf_to_gguf.py does
  const std::vector<TensorSpec> spec = CheckpointSpec(c, filter);
  RETURN_IF_ERROR(ValidateCheckpoint(*ck, spec, c));
  std::map<std::string, const TensorSpec*> by_name;
  for (const auto& s : spec) by_name[s.name] = &s;

  // The stored dtype decides the output dtype of matrices.
  const TensorView* probe = ck->Find("model.layers.0.self_attn.kv_b_proj.weight");
  if (probe == nullptr) return absl::NotFoundError(absl::StrCat(dir, ": no model.layers.0.self_attn.kv_b_proj.weight"));
  const GgmlType mat = probe->dtype == DType::kF32 ? GgmlType::kF32 : GgmlType::kBF16;
  const std::string src_dtype = c.quantization_config.present ? "fp8" : DTypeName(probe->dtype);

  const ShardedCheckpoint* ckp = ck.get();
  auto load = [ckp, &by_name, &c](const std::string& name) -> absl::StatusOr<std::vector<float>> {
    auto it = by_name.find(name);
    if (it == by_name.end()) return absl::InternalError(absl::StrCat("no spec for ", name));
    return LoadF32(*ckp, *it->second, c);
  };

  GgufWriter w;
  const std::string a = "deepseek2.";
  w.AddString("general.architecture", "deepseek2");
  w.AddString("general.name", "expertmesh random DeepSeek-V3 layout");
  w.AddU32("general.alignment", kAlignment);
  w.AddU32("general.file_type", mat == GgmlType::kF32 ? 0 : 32);  // LLAMA_FTYPE_ALL_F32 / MOSTLY_BF16
  w.AddU32(a + "block_count", static_cast<uint32_t>(c.num_hidden_layers));
  w.AddU32(a + "context_length", static_cast<uint32_t>(c.max_position_embeddings));
  w.AddU32(a + "embedding_length", static_cast<uint32_t>(c.hidden_size));
  w.AddU32(a + "feed_forward_length", static_cast<uint32_t>(c.intermediate_size));
  w.AddU32(a + "attention.head_count", static_cast<uint32_t>(c.num_attention_heads));
  w.AddU32(a + "attention.head_count_kv", 1);  // MLA as MQA over the latent
  w.AddF32(a + "rope.freq_base", static_cast<float>(c.rope_theta));
  w.AddF32(a + "attention.layer_norm_rms_epsilon", static_cast<float>(c.rms_norm_eps));
  w.AddU32(a + "expert_used_count", static_cast<uint32_t>(c.num_experts_per_tok));
  w.AddU32(a + "expert_group_count", static_cast<uint32_t>(c.n_group));
  w.AddU32(a + "expert_group_used_count", static_cast<uint32_t>(c.topk_group));
  w.AddU32(a + "expert_gating_func", c.scoring_func == "sigmoid" ? 2 : 1);  // LLAMA_EXPERT_GATING_FUNC_TYPE_*
  w.AddU32(a + "leading_dense_block_count", static_cast<uint32_t>(c.first_k_dense_replace));
  w.AddU32(a + "vocab_size", static_cast<uint32_t>(c.vocab_size));
  if (c.q_lora_rank > 0) w.AddU32(a + "attention.q_lora_rank", static_cast<uint32_t>(c.q_lora_rank));
  w.AddU32(a + "attention.kv_lora_rank", static_cast<uint32_t>(c.kv_lora_rank));
  w.AddU32(a + "attention.key_length", static_cast<uint32_t>(c.kv_lora_rank + c.qk_rope_head_dim));
  w.AddU32(a + "attention.value_length", static_cast<uint32_t>(c.kv_lora_rank));
  w.AddU32(a + "attention.key_length_mla", static_cast<uint32_t>(c.qk_head_dim()));
  w.AddU32(a + "attention.value_length_mla", static_cast<uint32_t>(c.v_head_dim));
  w.AddU32(a + "expert_feed_forward_length", static_cast<uint32_t>(c.moe_intermediate_size));
  w.AddU32(a + "expert_count", static_cast<uint32_t>(c.n_routed_experts));
  w.AddU32(a + "expert_shared_count", static_cast<uint32_t>(c.n_shared_experts));
  w.AddF32(a + "expert_weights_scale", static_cast<float>(c.routed_scaling_factor));
  if (c.norm_topk_prob) w.AddBool(a + "expert_weights_norm", true);
  w.AddU32(a + "rope.dimension_count", static_cast<uint32_t>(c.qk_rope_head_dim));
  if (c.rope_scaling.type == "yarn") {
    const auto& r = c.rope_scaling;
    w.AddString(a + "rope.scaling.type", "yarn");
    w.AddF32(a + "rope.scaling.factor", static_cast<float>(r.factor));
    w.AddU32(a + "rope.scaling.original_context_length", static_cast<uint32_t>(r.original_max_position_embeddings));
    w.AddF32(a + "rope.scaling.yarn_beta_fast", static_cast<float>(r.beta_fast));
    w.AddF32(a + "rope.scaling.yarn_beta_slow", static_cast<float>(r.beta_slow));
    // convert_hf_to_gguf.py writes 0.1 * mscale_all_dim (llama.cpp divides by 0.1 on load,
    // [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]); the softmax scale becomes (1 + 0.1 mscale_all_dim ln factor)^2 / sqrt(d).
    w.AddF32(a + "rope.scaling.yarn_log_multiplier", static_cast<float>(0.1 * r.mscale_all_dim));
  }

  // Placeholder vocabulary (SentencePiece model "llama"): ids map to pieces only.
  {
    std::vector<std::string> tokens(c.vocab_size);
    std::vector<float> scores(c.vocab_size);
    std::vector<int32_t> types(c.vocab_size, 1);  // NORMAL
    for (int64_t i = 0; i < c.vocab_size; ++i) {
      tokens[i] = absl::StrCat("tok", i);
      scores[i] = -static_cast<float>(i);
    }
    auto special = [&](int64_t id, const std::string& piece, int32_t type) {
      if (id >= 0 && id < c.vocab_size) {
        tokens[id] = piece;
        types[id] = type;
      }
    };
    // Bytes after the first three ids (when they fit), so that llama.cpp finds "\n" (<0x0A>).
    if (c.vocab_size >= 3 + 256) {
      for (int b = 0; b < 256; ++b) {
        char buf[8];
        std::snprintf(buf, sizeof(buf), "<0x%02X>", b);
        special(3 + b, buf, 6);  // BYTE
      }
    }
    special(c.bos_token_id, "<s>", 3);   // CONTROL
    special(c.eos_token_id, "</s>", 3);  // CONTROL
    // unk: id 2 unless taken by bos/eos.
    int64_t unk = 2;
    while (unk == c.bos_token_id || unk == c.eos_token_id) ++unk;
    special(unk, "<unk>", 2);  // UNKNOWN
    w.AddString("tokenizer.ggml.model", "llama");
    w.AddStringArray("tokenizer.ggml.tokens", tokens);
    w.AddF32Array("tokenizer.ggml.scores", scores);
    w.AddI32Array("tokenizer.ggml.token_type", types);
    w.AddU32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(c.bos_token_id));
    w.AddU32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(c.eos_token_id));
    w.AddU32("tokenizer.ggml.unknown_token_id", static_cast<uint32_t>(unk));
    w.AddBool("tokenizer.ggml.add_bos_token", false);
    w.AddBool("tokenizer.ggml.add_eos_token", false);
  }

  auto progress = opts.progress;
  // One HF tensor as one GGUF tensor of the given type.
  auto plain = [&](const std::string& hf, const std::string& gg, GgmlType type) -> absl::Status {
    auto it = by_name.find(hf);
    if (it == by_name.end()) return absl::NotFoundError(absl::StrCat(dir, ": no tensor ", hf));
    w.AddTensor(gg, Reversed(it->second->shape), type, [load, hf, type](std::vector<uint8_t>* out) -> absl::Status {
      ASSIGN_OR_RETURN(std::vector<float> v, load(hf));
      Encode(v, type, out);
      return absl::OkStatus();
    });
    return absl::OkStatus();
  };
  auto vec_or_mat = [&](const std::string& hf, const std::string& gg) -> absl::Status {
    auto it = by_name.find(hf);
    if (it == by_name.end()) return absl::NotFoundError(absl::StrCat(dir, ": no tensor ", hf));
    return plain(hf, gg, it->second->shape.size() <= 1 ? GgmlType::kF32 : mat);
  };

  RETURN_IF_ERROR(vec_or_mat("model.embed_tokens.weight", "token_embd.weight"));
  RETURN_IF_ERROR(vec_or_mat("model.norm.weight", "output_norm.weight"));
  if (!c.tie_word_embeddings) RETURN_IF_ERROR(vec_or_mat("lm_head.weight", "output.weight"));
  const int64_t nh = c.num_attention_heads, dn = c.qk_nope_head_dim, dv = c.v_head_dim, Lr = c.kv_lora_rank;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, "."), b = absl::StrCat("blk.", l, ".");
    RETURN_IF_ERROR(vec_or_mat(p + "input_layernorm.weight", b + "attn_norm.weight"));
    RETURN_IF_ERROR(vec_or_mat(p + "post_attention_layernorm.weight", b + "ffn_norm.weight"));
    if (c.q_lora_rank > 0) {
      RETURN_IF_ERROR(vec_or_mat(p + "self_attn.q_a_proj.weight", b + "attn_q_a.weight"));
      RETURN_IF_ERROR(vec_or_mat(p + "self_attn.q_a_layernorm.weight", b + "attn_q_a_norm.weight"));
      RETURN_IF_ERROR(vec_or_mat(p + "self_attn.q_b_proj.weight", b + "attn_q_b.weight"));
    } else {
      RETURN_IF_ERROR(vec_or_mat(p + "self_attn.q_proj.weight", b + "attn_q.weight"));
    }
    RETURN_IF_ERROR(vec_or_mat(p + "self_attn.kv_a_proj_with_mqa.weight", b + "attn_kv_a_mqa.weight"));
    RETURN_IF_ERROR(vec_or_mat(p + "self_attn.kv_a_layernorm.weight", b + "attn_kv_a_norm.weight"));
    RETURN_IF_ERROR(vec_or_mat(p + "self_attn.o_proj.weight", b + "attn_output.weight"));
    // kv_b_proj [nh * (dn + dv), Lr] viewed [nh, dn + dv, Lr]: k_b = rows [0, dn) of each head,
    // transposed to [nh, Lr, dn]; v_b = rows [dn, dn + dv): [nh, dv, Lr].
    const std::string kvb = p + "self_attn.kv_b_proj.weight";
    w.AddTensor(b + "attn_k_b.weight", {dn, Lr, nh}, mat, [load, kvb, nh, dn, dv, Lr, m = mat](std::vector<uint8_t>* out) -> absl::Status {
      ASSIGN_OR_RETURN(std::vector<float> v, load(kvb));
      std::vector<float> k(static_cast<size_t>(nh * Lr * dn));
      for (int64_t h = 0; h < nh; ++h) {
        for (int64_t i = 0; i < dn; ++i) {
          const float* row = v.data() + (h * (dn + dv) + i) * Lr;
          for (int64_t j = 0; j < Lr; ++j) k[(h * Lr + j) * dn + i] = row[j];
        }
      }
      Encode(k, m, out);
      return absl::OkStatus();
    });
    w.AddTensor(b + "attn_v_b.weight", {Lr, dv, nh}, mat, [load, kvb, nh, dn, dv, Lr, m = mat](std::vector<uint8_t>* out) -> absl::Status {
      ASSIGN_OR_RETURN(std::vector<float> v, load(kvb));
      std::vector<float> vb(static_cast<size_t>(nh * dv * Lr));
      for (int64_t h = 0; h < nh; ++h) {
        std::memcpy(vb.data() + h * dv * Lr, v.data() + (h * (dn + dv) + dn) * Lr, sizeof(float) * dv * Lr);
      }
      Encode(vb, m, out);
      return absl::OkStatus();
    });
    const std::string m = p + "mlp.";
    if (!c.IsMoeLayer(l)) {
      RETURN_IF_ERROR(vec_or_mat(m + "gate_proj.weight", b + "ffn_gate.weight"));
      RETURN_IF_ERROR(vec_or_mat(m + "up_proj.weight", b + "ffn_up.weight"));
      RETURN_IF_ERROR(vec_or_mat(m + "down_proj.weight", b + "ffn_down.weight"));
      continue;
    }
    RETURN_IF_ERROR(plain(m + "gate.weight", b + "ffn_gate_inp.weight", GgmlType::kF32));
    RETURN_IF_ERROR(vec_or_mat(m + "gate.e_score_correction_bias", b + "exp_probs_b.bias"));
    const int64_t E = c.n_routed_experts, I = c.moe_intermediate_size, H = c.hidden_size;
    for (const char* proj : {"gate_proj", "up_proj", "down_proj"}) {
      const bool down = std::strcmp(proj, "down_proj") == 0;
      const std::string gg = b + (down ? "ffn_down_exps" : std::strcmp(proj, "gate_proj") == 0 ? "ffn_gate_exps"
                                                                                                : "ffn_up_exps") +
                             ".weight";
      std::vector<int64_t> ne = down ? std::vector<int64_t>{I, H, E} : std::vector<int64_t>{H, I, E};
      const std::string prefix = m + "experts.", suffix = absl::StrCat(".", proj, ".weight");
      w.AddTensor(gg, ne, mat, [load, prefix, suffix, E, m2 = mat, progress, gg](std::vector<uint8_t>* out) -> absl::Status {
        for (int64_t e = 0; e < E; ++e) {
          ASSIGN_OR_RETURN(std::vector<float> v, load(absl::StrCat(prefix, e, suffix)));
          Encode(v, m2, out);
        }
        if (progress) progress(absl::StrCat("wrote ", gg));
        return absl::OkStatus();
      });
    }
    if (c.n_shared_experts > 0) {
      RETURN_IF_ERROR(vec_or_mat(m + "shared_experts.gate_proj.weight", b + "ffn_gate_shexp.weight"));
      RETURN_IF_ERROR(vec_or_mat(m + "shared_experts.up_proj.weight", b + "ffn_up_shexp.weight"));
      RETURN_IF_ERROR(vec_or_mat(m + "shared_experts.down_proj.weight", b + "ffn_down_shexp.weight"));
    }
  }
  if (progress) {
    progress(absl::StrCat("converting ", dir, " (", src_dtype, ") to ", out_path, ": ", w.tensor_count(),
                          " tensors, matrices ", mat == GgmlType::kF32 ? "F32" : "BF16"));
  }
  return w.Write(out_path);
}

}  // namespace expertmesh
