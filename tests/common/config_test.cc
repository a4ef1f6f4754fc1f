// ModelConfig: presets, HF config.json parsing, validation messages.
#include "common/config.h"

#include <cmath>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/common/test_util.h"

namespace expertmesh {
namespace {

using absl::StatusCode;
using nlohmann::json;
using testing_util::TempDir;
using testing_util::WriteFile;

TEST(Config, V3PresetIsTheReleaseConfig) {
  auto c = ModelConfig::Preset("deepseek-v3");
  ASSERT_OK(c);
  EXPECT_EQ(c->hidden_size, 7168);
  EXPECT_EQ(c->num_hidden_layers, 61);
  EXPECT_EQ(c->first_k_dense_replace, 3);
  EXPECT_EQ(c->n_routed_experts, 256);
  EXPECT_EQ(c->num_experts_per_tok, 8);
  EXPECT_EQ(c->n_group, 8);
  EXPECT_EQ(c->topk_group, 4);
  EXPECT_EQ(c->q_lora_rank, 1536);
  EXPECT_EQ(c->kv_lora_rank, 512);
  EXPECT_EQ(c->vocab_size, 129280);
  EXPECT_DOUBLE_EQ(c->routed_scaling_factor, 2.5);
  EXPECT_EQ(c->rope_scaling.type, "yarn");
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 4096);
  EXPECT_TRUE(c->quantization_config.present);
  const double m = 0.1 * std::log(40.0) + 1.0;
  EXPECT_NEAR(c->softmax_scale(), m * m / std::sqrt(192.0), 1e-12);
  EXPECT_EQ(c->kv_cache_dim(), 576);
}

TEST(Config, TinyPresetHasV3Structure) {
  auto c = ModelConfig::Preset("tiny");
  ASSERT_OK(c);
  EXPECT_EQ(c->n_routed_experts, 256);
  EXPECT_EQ(c->num_experts_per_tok, 8);
  EXPECT_EQ(c->n_group, 8);
  EXPECT_EQ(c->topk_group, 4);
  EXPECT_EQ(c->n_shared_experts, 1);
  EXPECT_GE(c->num_hidden_layers, 4);
  EXPECT_EQ(c->first_k_dense_replace, 1);
  EXPECT_EQ(c->num_nextn_predict_layers, 1);
  EXPECT_GT(c->q_lora_rank, 0);
  EXPECT_EQ(c->rope_scaling.type, "yarn");
  ASSERT_OK(c->Validate());
}

TEST(Config, PresetsRoundTripThroughJson) {
  for (const auto& name : ModelConfig::PresetNames()) {
    SCOPED_TRACE(name);
    auto c = ModelConfig::Preset(name);
    ASSERT_OK(c);
    auto back = ModelConfig::FromJson(c->ToJson());
    ASSERT_OK(back);
    EXPECT_EQ(back->ToJson(), c->ToJson());
  }
  EXPECT_ERROR(ModelConfig::Preset("huge"), StatusCode::kNotFound, "huge", "tiny");
}

TEST(Config, HfDetails) {
  json j = ModelConfig::Preset("tiny")->ToJson();
  j["q_lora_rank"] = nullptr;  // V2-Lite style: no q compression
  auto c = ModelConfig::FromJson(j);
  ASSERT_OK(c);
  EXPECT_EQ(c->q_lora_rank, 0);
  j = ModelConfig::Preset("tiny")->ToJson();
  j["rope_scaling"] = nullptr;
  c = ModelConfig::FromJson(j);
  ASSERT_OK(c);
  EXPECT_EQ(c->rope_scaling.type, "none");
  EXPECT_NEAR(c->softmax_scale(), 1.0 / std::sqrt(48.0), 1e-12);
  j = ModelConfig::Preset("tiny")->ToJson();
  j["rope_scaling"].erase("type");
  j["rope_scaling"]["rope_type"] = "yarn";  // newer transformers spelling
  c = ModelConfig::FromJson(j);
  ASSERT_OK(c);
  EXPECT_EQ(c->rope_scaling.type, "yarn");
}

struct Bad {
  const char* path;  // dotted
  json value;
  std::vector<std::string> fragments;
};

void Set(json* j, const std::string& dotted, const json& v) {
  json* cur = j;
  size_t start = 0, dot;
  while ((dot = dotted.find('.', start)) != std::string::npos) {
    cur = &(*cur)[dotted.substr(start, dot - start)];
    start = dot + 1;
  }
  (*cur)[dotted.substr(start)] = v;
}

// Each case, set on the tiny preset (with an fp8 quantization_config), is
// INVALID_ARGUMENT and the message holds every fragment.
void ExpectAllRefused(const std::vector<Bad>& cases) {
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(c.path) + " = " + c.value.dump());
    json j = ModelConfig::Preset("tiny")->ToJson();
    j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"weight_block_size", {128, 128}}};
    Set(&j, c.path, c.value);
    auto r = ModelConfig::FromJson(j);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    for (const auto& f : c.fragments) {
      EXPECT_NE(r.status().message().find(f), std::string::npos) << r.status();
    }
  }
}

TEST(Config, InvalidValuesNameTheField) {
  const std::vector<Bad> cases = {
      {"model_type", "mixtral", {"model_type", "deepseek_v3", "qwen2", "llama"}},
      {"vocab_size", 0, {"vocab_size"}},
      {"vocab_size", "big", {"vocab_size", "wrong type"}},
      {"hidden_size", -160, {"hidden_size"}},
      {"num_hidden_layers", 0, {"num_hidden_layers"}},
      {"first_k_dense_replace", 5, {"first_k_dense_replace"}},
      {"n_routed_experts", 0, {"n_routed_experts"}},
      {"num_experts_per_tok", 300, {"num_experts_per_tok"}},
      {"n_group", 3, {"n_group", "divide"}},
      {"topk_group", 0, {"topk_group"}},
      {"topk_group", 9, {"topk_group"}},
      {"scoring_func", "relu", {"scoring_func"}},
      {"topk_method", "magic", {"topk_method"}},
      {"routed_scaling_factor", 0.0, {"routed_scaling_factor"}},
      {"qk_rope_head_dim", 7, {"qk_rope_head_dim"}},
      {"kv_lora_rank", -1, {"kv_lora_rank"}},
      {"v_head_dim", 0, {"v_head_dim"}},
      {"num_key_value_heads", 1, {"num_key_value_heads"}},
      {"rms_norm_eps", -1e-6, {"rms_norm_eps"}},
      {"rope_theta", 0, {"rope_theta"}},
      {"rope_scaling.type", "dynamic", {"rope_scaling.type", "yarn"}},
      {"rope_scaling.factor", 0.5, {"rope_scaling.factor"}},
      {"rope_scaling.beta_fast", 0.5, {"beta_fast"}},
      {"rope_scaling.original_max_position_embeddings", 0, {"original_max_position_embeddings"}},
      {"rope_scaling", 5, {"rope_scaling"}},
      {"quantization_config.quant_method", "gptq", {"quantization_config.quant_method", "fp8"}},
      {"quantization_config.fmt", "e5m2", {"quantization_config.fmt", "e4m3"}},
      {"quantization_config.weight_block_size", json::array({128}), {"weight_block_size"}},
      {"quantization_config.weight_block_size", json::array({0, 128}), {"weight_block_size"}},
      {"tie_word_embeddings", true, {"tie_word_embeddings"}},
      {"norm_topk_prob", "yes", {"norm_topk_prob", "wrong type"}},
  };
  ExpectAllRefused(cases);
}

// Absurd values are refused by type and range before anything is sized from
// them (they used to end in std::bad_alloc after ~40 s, or be truncated).
TEST(Config, TypesAndRangesBeforeAllocation) {
  const std::vector<Bad> cases = {
      {"hidden_size", 160.7, {"hidden_size", "wrong type", "160.7", "integer"}},
      {"hidden_size", 160.0, {"hidden_size", "integer"}},
      {"num_hidden_layers", true, {"num_hidden_layers", "integer"}},
      {"n_routed_experts", int64_t{1} << 40, {"n_routed_experts", "1099511627776", "[1, 4096]"}},
      {"num_hidden_layers", 1000000000, {"num_hidden_layers", "[1, 1024]"}},
      {"vocab_size", int64_t{1} << 30, {"vocab_size", "[1, 16777216]"}},
      {"hidden_size", 1 << 20, {"hidden_size", "[1, 65536]"}},
      {"moe_layer_freq", 0, {"moe_layer_freq"}},
      {"max_position_embeddings", int64_t{1} << 40, {"max_position_embeddings"}},
      {"num_nextn_predict_layers", 100, {"num_nextn_predict_layers", "[0, 16]"}},
      {"n_shared_experts", -1, {"n_shared_experts"}},
      {"q_lora_rank", int64_t{1} << 20, {"q_lora_rank"}},
      {"qk_rope_head_dim", 8192, {"qk_rope_head_dim", "4096"}},
      {"bos_token_id", 5000, {"bos_token_id", "[0, 1023]"}},
      {"eos_token_id", -1, {"eos_token_id"}},
      {"rms_norm_eps", 1e300, {"rms_norm_eps"}},
      {"rope_theta", 1e300, {"rope_theta"}},
      {"routed_scaling_factor", "2.5", {"routed_scaling_factor", "wrong type", "number"}},
      {"rope_scaling.factor", 1e300, {"rope_scaling.factor"}},
      {"quantization_config.weight_block_size", json::array({128.5, 128}), {"weight_block_size", "integers"}},
      {"model_type", 3, {"model_type", "string"}},
  };
  ExpectAllRefused(cases);
  // Every field in range, but together far too large.
  json j = ModelConfig::Preset("deepseek-v3")->ToJson();
  j["num_hidden_layers"] = 1024;
  j["n_routed_experts"] = 4096;
  j["hidden_size"] = 65536;
  EXPECT_ERROR(ModelConfig::FromJson(j), StatusCode::kInvalidArgument, "parameters", "num_hidden_layers");
}

TEST(Config, ParameterCountOfTheRelease) {
  auto c = ModelConfig::Preset("deepseek-v3");
  ASSERT_OK(c);
  // The published 671B for the main model (norms not counted) plus 11.6B for
  // the MTP block (its embedding and head are shared with the main model).
  ModelConfig no_mtp = *c;
  no_mtp.num_nextn_predict_layers = 0;
  EXPECT_NEAR(no_mtp.ParameterCount() / 1e9, 671.0, 0.1);
  EXPECT_NEAR(c->ParameterCount() / 1e9, 682.6, 0.1);
  EXPECT_EQ(c->num_moe_layers(), 58);
  ModelConfig every_other = *c;
  every_other.moe_layer_freq = 2;
  int64_t n = 0;
  for (int64_t l = 0; l < every_other.num_hidden_layers; ++l) n += every_other.IsMoeLayer(l) ? 1 : 0;
  EXPECT_EQ(every_other.num_moe_layers(), n);
}

TEST(Config, ReportsEveryProblemAtOnce) {
  json j = ModelConfig::Preset("tiny")->ToJson();
  j["hidden_size"] = 0;
  j["n_group"] = 3;
  j["scoring_func"] = "x";
  EXPECT_ERROR(ModelConfig::FromJson(j), StatusCode::kInvalidArgument, "hidden_size", "n_group", "scoring_func");
  EXPECT_ERROR(ModelConfig::FromJson(json::array({1})), StatusCode::kInvalidArgument, "object");
}

TEST(Config, Files) {
  TempDir d;
  EXPECT_ERROR(ModelConfig::FromFile(d.File("config.json")), StatusCode::kNotFound, "config.json");
  WriteFile(d.File("config.json"), "{\"hidden_size\": ");
  EXPECT_ERROR(ModelConfig::FromFile(d.File("config.json")), StatusCode::kInvalidArgument, "config.json", "JSON");
  json j = ModelConfig::Preset("tiny")->ToJson();
  j["topk_group"] = 12;
  WriteFile(d.File("config.json"), j.dump());
  EXPECT_ERROR(ModelConfig::FromFile(d.File("config.json")), StatusCode::kInvalidArgument, "config.json",
               "topk_group");
  WriteFile(d.File("config.json"), ModelConfig::Preset("tiny")->ToJson().dump());
  ASSERT_OK(ModelConfig::FromPresetOrPath(d.path()));
  ASSERT_OK(ModelConfig::FromPresetOrPath(d.File("config.json")));
  EXPECT_ERROR(ModelConfig::FromPresetOrPath(d.File("nothing")), StatusCode::kNotFound, "nothing");
}


// ---------------------------------------------------------------- dense architectures

// config.json of deepseek-ai/DeepSeek-R1-Distill-Llama-8B (HF hub), verbatim
// but for the fields the runtime ignores.
constexpr char kDistillLlama8B[] = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
  "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
  "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
  "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256})";

// config.json of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B.
constexpr char kDistillQwen15B[] = R"({
  "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
  "intermediate_size": 8960, "max_position_embeddings": 131072, "max_window_layers": 21,
  "model_type": "qwen2", "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06, "rope_theta": 10000, "sliding_window": 4096, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "transformers_version": "4.44.0", "use_cache": true, "use_mrope": false,
  "use_sliding_window": false, "vocab_size": 151936})";

TEST(DenseConfig, ReadsTheDistillConfigs) {
  auto l = ModelConfig::FromJson(json::parse(kDistillLlama8B));
  ASSERT_OK(l);
  EXPECT_TRUE(l->dense_arch());
  EXPECT_EQ(l->architecture(), "LlamaForCausalLM");
  EXPECT_EQ(l->num_key_value_heads, 8);
  EXPECT_EQ(l->attn_head_dim(), 128);
  EXPECT_EQ(l->kv_cache_dim(), 2 * 8 * 128);
  EXPECT_EQ(l->rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(l->rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(l->rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(l->num_moe_layers(), 0);
  EXPECT_EQ(l->num_nextn_predict_layers, 0);
  EXPECT_FALSE(l->attention_bias);
  EXPECT_NEAR(l->softmax_scale(), 1.0 / std::sqrt(128.0), 1e-12);
  auto q = ModelConfig::FromJson(json::parse(kDistillQwen15B));
  ASSERT_OK(q);
  EXPECT_EQ(q->architecture(), "Qwen2ForCausalLM");
  EXPECT_TRUE(q->attention_bias);
  EXPECT_EQ(q->rope_scaling.type, "none");
  EXPECT_EQ(q->attn_head_dim(), 128);
  // The presets are these configs.
  auto pl = ModelConfig::Preset("r1-distill-llama-8b");
  auto pq = ModelConfig::Preset("r1-distill-qwen-1.5b");
  ASSERT_OK(pl);
  ASSERT_OK(pq);
  EXPECT_EQ(pl->ToJson(), ModelConfig::FromJson(pl->ToJson())->ToJson());
  for (const char* k : {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "vocab_size", "max_position_embeddings", "eos_token_id"}) {
    EXPECT_EQ(pl->ToJson()[k], l->ToJson()[k]) << k;
    EXPECT_EQ(pq->ToJson()[k], q->ToJson()[k]) << k;
  }
  EXPECT_EQ(pl->ToJson()["rope_scaling"], l->ToJson()["rope_scaling"]);
}

TEST(DenseConfig, PresetsHaveThePublishedParameterCounts) {
  // Billions of parameters of the six R1-Distill models (HF model cards: 1.78B,
  // 7.62B, 8.03B, 14.8B, 32.8B, 70.6B).
  const std::vector<std::pair<std::string, double>> want = {
      {"r1-distill-qwen-1.5b", 1.78}, {"r1-distill-qwen-7b", 7.62},  {"r1-distill-llama-8b", 8.03},
      {"r1-distill-qwen-14b", 14.77}, {"r1-distill-qwen-32b", 32.76}, {"r1-distill-llama-70b", 70.55}};
  for (const auto& [name, b] : want) {
    auto c = ModelConfig::Preset(name);
    ASSERT_OK(c);
    EXPECT_NEAR(c->ParameterCount() / 1e9, b, 0.01 * b) << name;
    ASSERT_OK(ModelConfig::FromJson(c->ToJson()));
  }
  for (const char* tiny : {"tiny-qwen2", "tiny-llama"}) ASSERT_OK(ModelConfig::Preset(tiny));
}

TEST(DenseConfig, RefusesWhatTheEngineCannotRun) {
  auto with = [](const char* base, const char* key, json v) {
    json j = json::parse(base);
    j[key] = v;
    return ModelConfig::FromJson(j).status();
  };
  auto expect_error = [](const absl::Status& s, const std::string& what) {
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
    EXPECT_NE(std::string(s.message()).find(what), std::string::npos) << s;
  };
  expect_error(with(kDistillQwen15B, "use_sliding_window", true), "use_sliding_window");
  expect_error(with(kDistillQwen15B, "num_key_value_heads", 5), "num_key_value_heads = 5");
  expect_error(with(kDistillQwen15B, "num_attention_heads", 7), "not a multiple of num_attention_heads");
  expect_error(with(kDistillQwen15B, "hidden_act", "gelu"), "hidden_act");
  expect_error(with(kDistillQwen15B, "rope_scaling", json{{"rope_type", "llama3"}, {"factor", 8.0}}),
               "rope_scaling.rope_type");
  expect_error(with(kDistillLlama8B, "rope_scaling", json{{"rope_type", "yarn"}, {"factor", 8.0}}),
               "\"llama3\"");
  expect_error(with(kDistillLlama8B, "rope_scaling",
                    json{{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 4.0},
                         {"high_freq_factor", 1.0}, {"original_max_position_embeddings", 8192}}),
               "high_freq_factor > low_freq_factor");
  expect_error(with(kDistillLlama8B, "attention_bias", true), "attention_bias");
  expect_error(with(kDistillLlama8B, "quantization_config", json{{"quant_method", "fp8"}}), "quantization_config");
  expect_error(with(kDistillLlama8B, "eos_token_id", 128256), "eos_token_id");
  expect_error(with(kDistillLlama8B, "num_hidden_layers", 0), "num_hidden_layers");
  // eos_token_id as a list (Llama-3.1 instruct): the first id.
  json j = json::parse(kDistillLlama8B);
  j["eos_token_id"] = {128001, 128008, 128009};
  auto c = ModelConfig::FromJson(j);
  ASSERT_OK(c);
  EXPECT_EQ(c->eos_token_id, 128001);
}

}  // namespace
}  // namespace expertmesh
