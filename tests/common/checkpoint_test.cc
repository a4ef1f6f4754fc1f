// Checkpoint generator, loader and validator on a micro DeepSeek-V3 config
// (same structure as tiny, smaller; 16x16 fp8 blocks so edge blocks are partial).
#include "common/checkpoint.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "tests/common/test_util.h"

namespace expertmesh {
namespace {

using absl::StatusCode;
using testing_util::TempDir;

ModelConfig Micro() {
  ModelConfig c = *ModelConfig::Preset("tiny");
  c.vocab_size = 64;
  c.hidden_size = 40;
  c.intermediate_size = 48;
  c.moe_intermediate_size = 8;
  c.num_hidden_layers = 2;
  c.first_k_dense_replace = 1;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 2;
  c.q_lora_rank = 16;
  c.kv_lora_rank = 16;
  c.qk_nope_head_dim = 8;
  c.qk_rope_head_dim = 4;
  c.v_head_dim = 8;
  c.n_routed_experts = 16;
  c.num_experts_per_tok = 4;
  c.n_group = 4;
  c.topk_group = 2;
  c.max_position_embeddings = 256;
  c.rope_scaling.original_max_position_embeddings = 32;
  c.quantization_config.weight_block_rows = 16;
  c.quantization_config.weight_block_cols = 16;
  return c;
}

std::unique_ptr<ShardedCheckpoint> Generate(const TempDir& d, const std::string& dtype, uint64_t seed,
                                            const std::string& sub, uint64_t shard = 5ull << 30) {
  GenerateOptions o;
  o.out_dir = d.File(sub);
  o.dtype = dtype;
  o.seed = seed;
  o.shard_size_bytes = shard;
  absl::Status s = GenerateCheckpoint(Micro(), o);
  EXPECT_OK(s);
  auto ck = ShardedCheckpoint::Open(o.out_dir);
  EXPECT_OK(ck);
  return ck.ok() ? std::move(*ck) : nullptr;
}

ModelConfig LoadedConfig(const std::string& dir) {
  auto c = ModelConfig::FromFile(dir + "/config.json");
  EXPECT_OK(c);
  return *c;
}

TEST(Checkpoint, GeneratedDtypesLoadAndValidate) {
  TempDir d;
  for (const std::string dt : {"fp32", "bf16", "fp8"}) {
    SCOPED_TRACE(dt);
    auto ck = Generate(d, dt, 5, dt);
    ASSERT_NE(ck, nullptr);
    const ModelConfig cfg = LoadedConfig(d.File(dt));
    EXPECT_EQ(cfg.quantization_config.present, dt == "fp8");
    const auto spec = CheckpointSpec(cfg);
    ASSERT_OK(ValidateCheckpoint(*ck, spec, cfg));
    int fp8_tensors = 0;
    for (const auto& s : spec) {
      SCOPED_TRACE(s.name);
      auto w = LoadF32(*ck, s, cfg);
      ASSERT_OK(w);
      const std::vector<float> want = RandomTensor(s, 5);
      ASSERT_EQ(w->size(), want.size());
      const TensorView* t = ck->Find(s.name);
      if (s.init == TensorSpec::Init::kBias) EXPECT_EQ(t->dtype, DType::kF32);
      if (t->dtype == DType::kF8E4M3) {
        ++fp8_tensors;
        // Exactly q * scale_inv[r / 16][c / 16], and within e4m3 rounding of the drawn values.
        const TensorView* sc = ck->Find(ScaleName(s.name));
        ASSERT_NE(sc, nullptr);
        ASSERT_EQ(sc->dtype, DType::kF32);
        const int64_t rows = s.shape[0], cols = s.shape[1], nbc = (cols + 15) / 16;
        ASSERT_EQ(sc->shape, (std::vector<int64_t>{(rows + 15) / 16, nbc}));
        const float* scale = reinterpret_cast<const float*>(sc->data);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < cols; ++c) {
            const float sv = scale[(r / 16) * nbc + c / 16];
            const float q = F8E4M3ToFloat(t->data[r * cols + c]);
            ASSERT_EQ((*w)[r * cols + c], q * sv) << r << "," << c;
            const float x = want[r * cols + c];
            ASSERT_LE(std::fabs(q * sv - x), std::max(std::fabs(x) / 16.0f, sv / 1024.0f) * 1.0001f)
                << r << "," << c;
          }
        }
      } else if (t->dtype == DType::kBF16) {
        for (size_t i = 0; i < want.size(); ++i) {
          ASSERT_LE(std::fabs((*w)[i] - want[i]), std::fabs(want[i]) / 256.0f) << i;
        }
      } else {
        ASSERT_EQ(t->dtype, DType::kF32);
        ASSERT_EQ(std::memcmp(w->data(), want.data(), want.size() * 4), 0);
      }
    }
    if (dt == "fp8") EXPECT_GT(fp8_tensors, 50);
  }
}

std::string ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

TEST(Checkpoint, DeterministicAndSharded) {
  TempDir d;
  Generate(d, "bf16", 9, "a");
  Generate(d, "bf16", 9, "b");
  Generate(d, "bf16", 10, "c");
  const std::string one = "/model-00001-of-00001.safetensors";
  EXPECT_EQ(ReadAll(d.File("a") + one), ReadAll(d.File("b") + one));
  EXPECT_NE(ReadAll(d.File("a") + one), ReadAll(d.File("c") + one));

  auto single = Generate(d, "fp8", 9, "single");
  auto sharded = Generate(d, "fp8", 9, "sharded", 20000);
  ASSERT_NE(sharded, nullptr);
  int shards = 0;
  for (const auto& e : std::filesystem::directory_iterator(d.File("sharded"))) {
    shards += e.path().extension() == ".safetensors";
  }
  EXPECT_GT(shards, 3);
  EXPECT_EQ(single->Names(), sharded->Names());
  const ModelConfig cfg = LoadedConfig(d.File("sharded"));
  ASSERT_OK(ValidateCheckpoint(*sharded, CheckpointSpec(cfg), cfg));
  for (const auto& s : CheckpointSpec(cfg)) {
    auto a = LoadF32(*single, s, cfg), b = LoadF32(*sharded, s, cfg);
    ASSERT_OK(a);
    ASSERT_OK(b);
    ASSERT_EQ(*a, *b) << s.name;
  }
}

// Rewrites `src` into one model.safetensors in `dir` (no index), dropping
// `drop` and replacing entries by `replace` (name -> dtype, shape, bytes).
struct Entry {
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};
std::unique_ptr<ShardedCheckpoint> Rewrite(const ShardedCheckpoint& src, const std::string& dir,
                                           const std::set<std::string>& drop,
                                           const std::map<std::string, Entry>& replace) {
  std::filesystem::create_directories(dir);
  SafetensorsWriter w;
  for (const auto& n : src.Names()) {
    if (drop.count(n)) continue;
    auto it = replace.find(n);
    if (it != replace.end()) {
      w.Add(n, it->second.dtype, it->second.shape, it->second.bytes);
      continue;
    }
    const TensorView* t = src.Find(n);
    w.Add(n, t->dtype, t->shape, std::vector<uint8_t>(t->data, t->data + t->nbytes));
  }
  EXPECT_TRUE(w.Write(dir + "/model.safetensors").ok());
  auto ck = ShardedCheckpoint::Open(dir);
  EXPECT_OK(ck);
  return ck.ok() ? std::move(*ck) : nullptr;
}

TEST(Checkpoint, ValidationNamesEveryProblem) {
  TempDir d;
  auto good = Generate(d, "fp8", 1, "good");
  ASSERT_NE(good, nullptr);
  const ModelConfig cfg = LoadedConfig(d.File("good"));
  const auto spec = CheckpointSpec(cfg);
  const std::string q_a = "model.layers.1.self_attn.q_a_proj.weight";           // [16, 40] fp8
  const std::string norm = "model.norm.weight";                                 // [40] bf16
  const std::string o = "model.layers.0.self_attn.o_proj.weight";              // [40, 16] fp8
  const std::string e3 = "model.layers.1.mlp.experts.3.down_proj.weight";
  const std::string e7 = "model.layers.1.mlp.experts.7.gate_proj.weight";

  auto missing = Rewrite(*good, d.File("missing"), {e3, ScaleName(e3), e7, ScaleName(e7)}, {});
  EXPECT_ERROR(ValidateCheckpoint(*missing, spec, cfg), StatusCode::kInvalidArgument, e3 + ": missing",
               e7 + ": missing", "2 problems", "[40, 8]");

  auto shape = Rewrite(*good, d.File("shape"), {}, {{q_a, {DType::kF8E4M3, {40, 16}, std::vector<uint8_t>(640)}}});
  EXPECT_ERROR(ValidateCheckpoint(*shape, spec, cfg), StatusCode::kInvalidArgument, q_a, "[40, 16]",
               "expected [16, 40]");

  auto f8norm = Rewrite(*good, d.File("f8norm"), {}, {{norm, {DType::kF8E4M3, {40}, std::vector<uint8_t>(40)}}});
  EXPECT_ERROR(ValidateCheckpoint(*f8norm, spec, cfg), StatusCode::kInvalidArgument, norm, "F8_E4M3");

  auto noscale = Rewrite(*good, d.File("noscale"), {ScaleName(o)}, {});
  EXPECT_ERROR(ValidateCheckpoint(*noscale, spec, cfg), StatusCode::kInvalidArgument, ScaleName(o), "missing",
               "[3, 1]");

  auto badscale = Rewrite(*good, d.File("badscale"), {},
                          {{ScaleName(o), {DType::kF32, {1, 3}, std::vector<uint8_t>(12)}},
                           {ScaleName(q_a), {DType::kBF16, {1, 3}, std::vector<uint8_t>(6)}}});
  EXPECT_ERROR(ValidateCheckpoint(*badscale, spec, cfg), StatusCode::kInvalidArgument, ScaleName(o),
               "expected F32 [3, 1]", ScaleName(q_a), "BF16", "2 problems");

  // LoadF32 of a broken tensor is an error, never a crash.
  const TensorSpec *os = nullptr, *e3s = nullptr;
  for (const auto& s : spec) {
    if (s.name == o) os = &s;
    if (s.name == e3) e3s = &s;
  }
  ASSERT_TRUE(os != nullptr && e3s != nullptr);
  EXPECT_ERROR(LoadF32(*noscale, *os, cfg), StatusCode::kInvalidArgument, ScaleName(o));
  EXPECT_ERROR(LoadF32(*badscale, *os, cfg), StatusCode::kInvalidArgument, ScaleName(o));
  EXPECT_ERROR(LoadF32(*missing, *e3s, cfg), StatusCode::kNotFound, e3);
}

TEST(Checkpoint, ShardFilterSelectsASubset) {
  const ModelConfig cfg = Micro();
  ShardFilter f;
  f.layer_begin = 1;
  f.layer_end = 2;
  f.embed = false;
  f.head = false;
  f.expert = [](int64_t, int64_t e) { return e == 2 || e == 5; };
  std::set<std::string> names;
  for (const auto& s : CheckpointSpec(cfg, f)) names.insert(s.name);
  EXPECT_TRUE(names.count("model.layers.1.mlp.experts.2.up_proj.weight"));
  EXPECT_TRUE(names.count("model.layers.1.mlp.experts.5.down_proj.weight"));
  EXPECT_FALSE(names.count("model.layers.1.mlp.experts.3.up_proj.weight"));
  EXPECT_TRUE(names.count("model.layers.1.mlp.shared_experts.up_proj.weight"));
  EXPECT_TRUE(names.count("model.layers.1.mlp.gate.e_score_correction_bias"));
  EXPECT_FALSE(names.count("model.layers.0.self_attn.o_proj.weight"));
  EXPECT_FALSE(names.count("model.embed_tokens.weight"));
  EXPECT_FALSE(names.count("lm_head.weight"));
  EXPECT_FALSE(names.count("model.layers.2.eh_proj.weight"));  // MTP layer is layer 2 here
  // full spec: MTP layer present, HF names
  std::set<std::string> all;
  for (const auto& s : CheckpointSpec(cfg)) all.insert(s.name);
  for (const char* n : {"model.layers.2.eh_proj.weight", "model.layers.2.enorm.weight", "model.layers.2.hnorm.weight",
                        "model.layers.2.shared_head.head.weight", "model.layers.0.mlp.gate_proj.weight",
                        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "lm_head.weight", "model.norm.weight"}) {
    EXPECT_TRUE(all.count(n)) << n;
  }
}

TEST(Checkpoint, TinyFp32IsUnder100MB) {
  int64_t bytes = 0;
  for (const auto& s : CheckpointSpec(*ModelConfig::Preset("tiny"))) bytes += 4 * s.numel();
  EXPECT_LT(bytes, 100ll << 20);
}

TEST(Checkpoint, QuantizeFp8BlocksPartialEdges) {
  // 3 x 5 matrix in 2 x 2 blocks: scales are amax / 448 per (partial) block.
  const std::vector<float> w = {1, -2, 3, 0.5f, 0,  //
                                4, 0.1f, -8, 1, 0,   //
                                0, 0, 0, 0, 896};
  std::vector<uint8_t> q;
  std::vector<float> s;
  QuantizeFp8Blocks(w.data(), 3, 5, 2, 2, &q, &s);
  ASSERT_EQ(s.size(), 6u);
  EXPECT_FLOAT_EQ(s[0], 4.0f / 448);
  EXPECT_FLOAT_EQ(s[1], 8.0f / 448);
  EXPECT_EQ(s[2], 1.0f);  // all-zero blocks: scale 1
  EXPECT_EQ(s[3], 1.0f);
  EXPECT_EQ(s[4], 1.0f);
  EXPECT_FLOAT_EQ(s[5], 2.0f);
  for (int r = 0; r < 3; ++r) {
    for (int c = 0; c < 5; ++c) {
      const float x = w[r * 5 + c], sc = s[(r / 2) * 3 + c / 2];
      EXPECT_NEAR(F8E4M3ToFloat(q[r * 5 + c]) * sc, x, std::max(std::fabs(x) / 16, sc / 1024)) << r << "," << c;
    }
  }
  EXPECT_EQ(F8E4M3ToFloat(q[1 * 5 + 2]) * s[1], -8.0f);  // the block maximum is exact
}

}  // namespace
}  // namespace expertmesh
