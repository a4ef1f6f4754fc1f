// GgufWriter (byte layout of GGUF v3) and the deepseek2 conversion of a tiny
// checkpoint: names, ggml dims, dtypes and values (k_b / v_b split, stacked
// experts), read back with an independent little parser.
#include "common/gguf.h"

#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "common/checkpoint.h"
#include "common/dtype.h"
#include "common/safetensors.h"
#include "gtest/gtest.h"
#include "tests/common/test_util.h"

namespace expertmesh {
namespace {

using testing_util::TempDir;

struct Info {
  std::vector<uint64_t> ne;
  uint32_t type = 0;
  uint64_t offset = 0;
};
struct Parsed {
  uint32_t version = 0;
  std::map<std::string, uint32_t> kv_type;   // key -> gguf value type
  std::map<std::string, uint32_t> u32;
  std::map<std::string, float> f32;
  std::map<std::string, std::string> str;
  std::map<std::string, uint64_t> array_len;
  std::map<std::string, Info> tensors;
  std::vector<std::string> order;
  uint64_t data_start = 0;
  std::string bytes;
};

// A reader written from the GGUF spec (ggml docs/gguf.md), not from the writer.
Parsed Parse(const std::string& path) {
  Parsed p;
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  p.bytes = ss.str();
  size_t pos = 0;
  auto get = [&](void* out, size_t n) {
    EXPECT_LE(pos + n, p.bytes.size());
    std::memcpy(out, p.bytes.data() + pos, n);
    pos += n;
  };
  auto u32 = [&] { uint32_t v; get(&v, 4); return v; };
  auto u64 = [&] { uint64_t v; get(&v, 8); return v; };
  auto str = [&] {
    const uint64_t n = u64();
    std::string s = p.bytes.substr(pos, n);
    pos += n;
    return s;
  };
  EXPECT_EQ(p.bytes.substr(0, 4), "GGUF");
  pos = 4;
  p.version = u32();
  const uint64_t nt = u64(), nkv = u64();
  for (uint64_t i = 0; i < nkv; ++i) {
    const std::string key = str();
    const uint32_t t = u32();
    p.kv_type[key] = t;
    switch (t) {
      case 4: p.u32[key] = u32(); break;
      case 6: { float v; get(&v, 4); p.f32[key] = v; } break;
      case 7: { uint8_t b; get(&b, 1); p.u32[key] = b; } break;
      case 8: p.str[key] = str(); break;
      case 9: {
        const uint32_t et = u32();
        const uint64_t n = u64();
        p.array_len[key] = n;
        for (uint64_t j = 0; j < n; ++j) {
          if (et == 8) str(); else pos += 4;  // strings, or 4-byte elements (f32 / i32)
        }
      } break;
      default: ADD_FAILURE() << key << ": unexpected type " << t; return p;
    }
  }
  for (uint64_t i = 0; i < nt; ++i) {
    const std::string name = str();
    Info in;
    const uint32_t nd = u32();
    for (uint32_t d = 0; d < nd; ++d) in.ne.push_back(u64());
    in.type = u32();
    in.offset = u64();
    p.tensors[name] = in;
    p.order.push_back(name);
  }
  p.data_start = (pos + 31) / 32 * 32;
  return p;
}

TEST(GgufWriter, LayoutHeaderKvTensorsAlignment) {
  TempDir d;
  GgufWriter w;
  w.AddString("general.architecture", "x");
  w.AddU32("x.n", 7);
  w.AddF32("x.f", 0.5f);
  w.AddBool("x.b", true);
  w.AddStringArray("x.s", {"a", "bc"});
  w.AddI32Array("x.i", {1, 2, 3});
  w.AddTensor("t0", {3}, GgmlType::kF32, [](std::vector<uint8_t>* o) {
    const float v[3] = {1, 2, 3};
    o->assign(reinterpret_cast<const uint8_t*>(v), reinterpret_cast<const uint8_t*>(v) + 12);
    return absl::OkStatus();
  });
  w.AddTensor("t1", {2, 5}, GgmlType::kBF16, [](std::vector<uint8_t>* o) {
    o->assign(20, 0xab);
    return absl::OkStatus();
  });
  ASSERT_TRUE(w.Write(d.File("a.gguf")).ok());
  Parsed p = Parse(d.File("a.gguf"));
  EXPECT_EQ(p.version, 3u);
  EXPECT_EQ(p.str["general.architecture"], "x");
  EXPECT_EQ(p.u32["x.n"], 7u);
  EXPECT_EQ(p.f32["x.f"], 0.5f);
  EXPECT_EQ(p.kv_type["x.b"], 7u);
  EXPECT_EQ(p.array_len["x.s"], 2u);
  EXPECT_EQ(p.array_len["x.i"], 3u);
  ASSERT_EQ(p.order, (std::vector<std::string>{"t0", "t1"}));
  EXPECT_EQ(p.tensors["t0"].offset, 0u);
  EXPECT_EQ(p.tensors["t1"].offset, 32u);  // 12 bytes padded to 32
  EXPECT_EQ(p.tensors["t1"].ne, (std::vector<uint64_t>{2, 5}));
  EXPECT_EQ(p.tensors["t1"].type, 30u);
  EXPECT_EQ(p.bytes.size(), p.data_start + 32 + 32);
  float back[3];
  std::memcpy(back, p.bytes.data() + p.data_start, 12);
  EXPECT_EQ(back[2], 3.0f);
  EXPECT_EQ(static_cast<uint8_t>(p.bytes[p.data_start + 32]), 0xab);
}

TEST(GgufWriter, ProducerErrorsAndWrongSizesFail) {
  TempDir d;
  GgufWriter w;
  w.AddTensor("t", {4}, GgmlType::kF32, [](std::vector<uint8_t>* o) {
    o->assign(8, 0);
    return absl::OkStatus();
  });
  absl::Status s = w.Write(d.File("b.gguf"));
  EXPECT_FALSE(s.ok());
  EXPECT_NE(std::string(s.message()).find("tensor t: produced 8 bytes, expected 16"), std::string::npos) << s;
}

class GgufConvert : public ::testing::TestWithParam<std::string> {};

TEST_P(GgufConvert, TinyDeepseek2NamesShapesAndValues) {
  const std::string dtype = GetParam();
  TempDir d;
  auto cfg = ModelConfig::Preset("tiny");
  ASSERT_TRUE(cfg.ok());
  GenerateOptions o;
  o.out_dir = d.File("ck");
  o.dtype = dtype;
  o.seed = 5;
  ASSERT_TRUE(GenerateCheckpoint(*cfg, o).ok());
  ASSERT_TRUE(ConvertCheckpointToGguf(o.out_dir, d.File("t.gguf")).ok());
  Parsed p = Parse(d.File("t.gguf"));
  const ModelConfig& c = *cfg;
  EXPECT_EQ(p.str["general.architecture"], "deepseek2");
  EXPECT_EQ(p.u32["deepseek2.block_count"], c.num_hidden_layers);
  EXPECT_EQ(p.u32["deepseek2.attention.head_count_kv"], 1u);
  EXPECT_EQ(p.u32["deepseek2.attention.key_length"], c.kv_lora_rank + c.qk_rope_head_dim);
  EXPECT_EQ(p.u32["deepseek2.attention.key_length_mla"], c.qk_head_dim());
  EXPECT_EQ(p.u32["deepseek2.attention.value_length_mla"], c.v_head_dim);
  EXPECT_EQ(p.u32["deepseek2.expert_gating_func"], 2u);  // sigmoid
  EXPECT_EQ(p.u32["deepseek2.expert_group_count"], c.n_group);
  EXPECT_EQ(p.u32["deepseek2.expert_group_used_count"], c.topk_group);
  EXPECT_EQ(p.u32["deepseek2.expert_weights_norm"], 1u);
  EXPECT_FLOAT_EQ(p.f32["deepseek2.expert_weights_scale"], 2.5f);
  EXPECT_EQ(p.str["deepseek2.rope.scaling.type"], "yarn");
  EXPECT_FLOAT_EQ(p.f32["deepseek2.rope.scaling.factor"], 40.0f);
  EXPECT_EQ(p.u32["deepseek2.rope.scaling.original_context_length"], 128u);
  EXPECT_FLOAT_EQ(p.f32["deepseek2.rope.scaling.yarn_log_multiplier"], 0.1f);
  EXPECT_EQ(p.array_len["tokenizer.ggml.tokens"], static_cast<uint64_t>(c.vocab_size));
  // 3 global + per layer: 2 norms, 3 q, 2 kv_a, k_b, v_b, o = 10; dense +3; MoE +2 router +3 exps +3 shexp.
  const uint64_t moe = c.num_hidden_layers - c.first_k_dense_replace;
  EXPECT_EQ(p.tensors.size(), 3 + 10 * c.num_hidden_layers + 3 * c.first_k_dense_replace + 8 * moe);
  EXPECT_EQ(p.tensors.count("blk.4.attn_norm.weight"), 0u);  // MTP layer left out
  const uint32_t mat = dtype == "fp32" ? 0 : 30;
  const uint64_t nh = c.num_attention_heads, dn = c.qk_nope_head_dim, dv = c.v_head_dim, Lr = c.kv_lora_rank;
  EXPECT_EQ(p.tensors["token_embd.weight"].ne, (std::vector<uint64_t>{160, 1024}));
  EXPECT_EQ(p.tensors["token_embd.weight"].type, mat);
  EXPECT_EQ(p.tensors["blk.0.attn_norm.weight"].type, 0u);
  EXPECT_EQ(p.tensors["blk.1.ffn_gate_inp.weight"].type, 0u);
  EXPECT_EQ(p.tensors["blk.1.exp_probs_b.bias"].ne, (std::vector<uint64_t>{256}));
  EXPECT_EQ(p.tensors["blk.1.attn_k_b.weight"].ne, (std::vector<uint64_t>{dn, Lr, nh}));
  EXPECT_EQ(p.tensors["blk.1.attn_v_b.weight"].ne, (std::vector<uint64_t>{Lr, dv, nh}));
  EXPECT_EQ(p.tensors["blk.1.ffn_gate_exps.weight"].ne, (std::vector<uint64_t>{160, 24, 256}));
  EXPECT_EQ(p.tensors["blk.1.ffn_down_exps.weight"].ne, (std::vector<uint64_t>{24, 160, 256}));
  EXPECT_EQ(p.tensors["blk.1.ffn_gate_exps.weight"].type, mat);

  // Values: against the checkpoint read through LoadF32 (fp8: dequantised, then BF16).
  auto ck = ShardedCheckpoint::Open(o.out_dir);
  ASSERT_TRUE(ck.ok());
  std::map<std::string, TensorSpec> spec;
  for (const auto& s : CheckpointSpec(c)) spec[s.name] = s;
  auto value = [&](const std::string& name, uint64_t index) {
    const Info& in = p.tensors[name];
    const char* base = p.bytes.data() + p.data_start + in.offset;
    if (in.type == 0) {
      float f;
      std::memcpy(&f, base + 4 * index, 4);
      return f;
    }
    uint16_t h;
    std::memcpy(&h, base + 2 * index, 2);
    return Bf16ToFloat(h);
  };
  auto expect_round = [&](float ref) { return dtype == "fp32" ? ref : Bf16ToFloat(FloatToBf16(ref)); };
  auto kvb = LoadF32(**ck, spec["model.layers.1.self_attn.kv_b_proj.weight"], c);
  ASSERT_TRUE(kvb.ok());
  for (uint64_t h : {uint64_t{0}, nh - 1}) {
    for (uint64_t i : {uint64_t{0}, uint64_t{5}, dn - 1}) {
      for (uint64_t j : {uint64_t{0}, uint64_t{9}, Lr - 1}) {
        // k_b[h][j][i] = kv_b[h * (dn + dv) + i][j]
        EXPECT_EQ(value("blk.1.attn_k_b.weight", (h * Lr + j) * dn + i),
                  expect_round((*kvb)[(h * (dn + dv) + i) * Lr + j]));
      }
    }
    for (uint64_t i : {uint64_t{0}, dv - 1}) {
      for (uint64_t j : {uint64_t{0}, Lr - 1}) {
        EXPECT_EQ(value("blk.1.attn_v_b.weight", (h * dv + i) * Lr + j),
                  expect_round((*kvb)[(h * (dn + dv) + dn + i) * Lr + j]));
      }
    }
  }
  auto e7 = LoadF32(**ck, spec["model.layers.2.mlp.experts.7.down_proj.weight"], c);
  ASSERT_TRUE(e7.ok());
  const uint64_t per = 160 * 24;
  for (uint64_t k : {uint64_t{0}, uint64_t{100}, per - 1}) {
    EXPECT_EQ(value("blk.2.ffn_down_exps.weight", 7 * per + k), expect_round((*e7)[k]));
  }
  auto bias = LoadF32(**ck, spec["model.layers.3.mlp.gate.e_score_correction_bias"], c);
  ASSERT_TRUE(bias.ok());
  EXPECT_EQ(value("blk.3.exp_probs_b.bias", 200), (*bias)[200]);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, GgufConvert, ::testing::Values("fp32", "bf16", "fp8"));

TEST(GgufConvertErrors, MissingCheckpointIsAClearError) {
  TempDir d;
  absl::Status s = ConvertCheckpointToGguf(d.File("nope"), d.File("x.gguf"));
  EXPECT_FALSE(s.ok());
  EXPECT_NE(std::string(s.message()).find("config.json"), std::string::npos) << s;
}

}  // namespace
}  // namespace expertmesh
