// ModelShard::LoadExperts / ReplaceExperts / LoadedExperts: what expert
// rebalancing uses to stage experts next to the ones in use and switch.
// Checked against a shard that loads the same experts at start (fp32 and fp8
// block-scaled checkpoints), and for errors that must change nothing.
#include <map>
#include <set>

#include "common/checkpoint.h"
#include "gtest/gtest.h"
#include "tests/common/test_util.h"
#include "worker/model.h"

namespace expertmesh::worker {
namespace {

using testing_util::TempDir;

std::string WriteTiny(const std::string& dir, const std::string& dtype) {
  auto cfg = ModelConfig::Preset("tiny");
  EXPECT_OK(cfg);
  GenerateOptions g;
  g.out_dir = dir + "/" + dtype;
  g.dtype = dtype;
  g.seed = 11;
  EXPECT_TRUE(GenerateCheckpoint(*cfg, g).ok());
  return g.out_dir;
}

// A shard of layers [1, 4) holding, per MoE layer, the experts `pick` says.
std::unique_ptr<ModelShard> Shard(const std::string& dir, std::function<bool(int64_t, int64_t)> pick) {
  ShardFilter f;
  f.layer_begin = 1;
  f.layer_end = 4;
  f.embed = false;
  f.head = false;
  f.expert = std::move(pick);
  auto s = ModelShard::Load(dir, f);
  EXPECT_OK(s);
  return s.ok() ? *std::move(s) : nullptr;
}

const ExpertWeights& Expert(const ModelShard& s, int64_t layer, int e) {
  return s.layers()[static_cast<size_t>(layer - s.layer_begin())].moe.experts[static_cast<size_t>(e)];
}

class ShardExpertsTest : public ::testing::TestWithParam<std::string> {
 protected:
  TempDir tmp_;
};

TEST_P(ShardExpertsTest, StagedExpertsEqualLoadedOnesAndReplaceSwapsThem) {
  const std::string dir = WriteTiny(tmp_.path(), GetParam());
  // In use: even experts. Wanted: experts 0..63 of every layer.
  auto shard = Shard(dir, [](int64_t, int64_t e) { return e % 2 == 0; });
  auto want = Shard(dir, [](int64_t, int64_t e) { return e < 64; });
  ASSERT_NE(shard, nullptr);
  ASSERT_NE(want, nullptr);
  std::map<int64_t, std::vector<int32_t>> need;
  std::map<int64_t, std::set<int32_t>> keep;
  for (int64_t l = 1; l < 4; ++l) {
    EXPECT_EQ(shard->LoadedExperts(l).size(), 128u);
    for (int32_t e = 0; e < 64; ++e) {
      keep[l].insert(e);
      if (e % 2 == 1) need[l].push_back(e);
    }
  }
  auto staged = ModelShard::LoadExperts(dir, need);
  ASSERT_OK(staged);
  ASSERT_EQ(staged->size(), 3u);
  EXPECT_EQ(staged->at(2).size(), 32u);
  ASSERT_TRUE(shard->ReplaceExperts(*std::move(staged), keep).ok());
  for (int64_t l = 1; l < 4; ++l) {
    std::vector<int32_t> ids(64);
    for (int32_t e = 0; e < 64; ++e) ids[static_cast<size_t>(e)] = e;
    EXPECT_EQ(shard->LoadedExperts(l), ids) << "layer " << l;
    for (int32_t e = 0; e < 64; ++e) {
      // Bit-identical to loading them at start, in the checkpoint's precision.
      const ExpertWeights &got = Expert(*shard, l, e), &ref = Expert(*want, l, e);
      EXPECT_EQ(got.gate.ToFloat(), ref.gate.ToFloat()) << l << "/" << e;
      EXPECT_EQ(got.up.ToFloat(), ref.up.ToFloat()) << l << "/" << e;
      EXPECT_EQ(got.down.ToFloat(), ref.down.ToFloat()) << l << "/" << e;
      EXPECT_EQ(got.down.dtype(), GetParam() == "fp8" ? DType::kF8E4M3 : DType::kF32) << l << "/" << e;
    }
    EXPECT_FALSE(Expert(*shard, l, 64).loaded());
    EXPECT_TRUE(Expert(*shard, l, 64).gate.empty());  // memory released
  }
  EXPECT_TRUE(shard->LoadedExperts(0).empty());  // dense layer outside the shard
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ShardExpertsTest, ::testing::Values("fp32", "fp8"));

TEST(ShardExperts, ErrorsChangeNothing) {
  TempDir tmp;
  const std::string dir = WriteTiny(tmp.path(), "fp32");
  auto shard = Shard(dir, [](int64_t, int64_t e) { return e < 8; });
  ASSERT_NE(shard, nullptr);
  EXPECT_ERROR(ModelShard::LoadExperts(dir, {{0, {1}}}), absl::StatusCode::kInvalidArgument, "layer 0",
               "not a MoE layer");
  EXPECT_ERROR(ModelShard::LoadExperts(dir, {{1, {256}}}), absl::StatusCode::kInvalidArgument, "expert 256",
               "out of range");
  EXPECT_ERROR(ModelShard::LoadExperts(tmp.path() + "/nope", {{1, {1}}}), absl::StatusCode::kNotFound, "nope");
  auto staged = ModelShard::LoadExperts(dir, {{1, {100}}});
  ASSERT_OK(staged);
  // Keeping an expert that is neither loaded nor given: refused, nothing unloaded.
  EXPECT_ERROR(shard->ReplaceExperts(*staged, {{1, {100, 200}}}), absl::StatusCode::kFailedPrecondition, "expert 200",
               "neither loaded nor given");
  EXPECT_EQ(shard->LoadedExperts(1).size(), 8u);
  EXPECT_FALSE(Expert(*shard, 1, 100).loaded());
  // A layer outside the shard.
  EXPECT_ERROR(shard->ReplaceExperts({}, {{0, {1}}}), absl::StatusCode::kInvalidArgument, "layer 0");
  EXPECT_EQ(shard->LoadedExperts(1).size(), 8u);
  // A valid replacement: expert 100 moves in, the others but 0 go.
  ASSERT_TRUE(shard->ReplaceExperts(*std::move(staged), {{1, {0, 100}}}).ok());
  EXPECT_EQ(shard->LoadedExperts(1), (std::vector<int32_t>{0, 100}));
  EXPECT_EQ(shard->LoadedExperts(2).size(), 8u);  // layers not in `keep` are untouched
}

// The shard's matrices keep the checkpoint's precision (mapped, not
// expanded to fp32), and their values are the file's exactly.
class ShardPrecisionTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ShardPrecisionTest, MatricesKeepTheCheckpointDtype) {
  TempDir tmp;
  const std::string dir = WriteTiny(tmp.path(), GetParam());
  ShardFilter f;
  f.layer_end = 2;  // the dense layer 0 and the MoE layer 1
  f.expert = [](int64_t, int64_t e) { return e < 4; };
  std::vector<double> progress;
  auto s = ModelShard::Load(dir, f, [&](double p) { progress.push_back(p); });
  ASSERT_OK(s);
  const ModelShard& shard = **s;
  const DType linear = GetParam() == "fp32" ? DType::kF32 : GetParam() == "bf16" ? DType::kBF16 : DType::kF8E4M3;
  const DType other = GetParam() == "fp32" ? DType::kF32 : DType::kBF16;  // embedding, head, router
  EXPECT_EQ(shard.embed().dtype(), other);
  EXPECT_EQ(shard.lm_head().dtype(), other);
  const LayerWeights& dense = shard.layers()[0];
  const LayerWeights& moe = shard.layers()[1];
  for (const kernels::Weight* w : {&dense.attn.q_a, &dense.attn.q_b, &dense.attn.kv_a, &dense.attn.o, &dense.dense.gate,
                                   &dense.dense.up, &dense.dense.down, &moe.moe.experts[3].gate,
                                   &moe.moe.experts[3].down, &moe.moe.shared.up}) {
    EXPECT_EQ(w->dtype(), linear);
  }
  EXPECT_EQ(moe.moe.router.dtype(), other);
  EXPECT_FALSE(moe.moe.experts[4].loaded());
  // Values: the file's, through the fp32 loader (exact dequantisation).
  auto ckpt = ShardedCheckpoint::Open(dir);
  ASSERT_OK(ckpt);
  auto cfg = ModelConfig::FromFile(dir + "/config.json");
  ASSERT_OK(cfg);
  for (const auto& spec : CheckpointSpec(*cfg, f)) {
    if (spec.name == "model.layers.1.mlp.experts.3.down_proj.weight") {
      auto want = LoadF32(**ckpt, spec, *cfg);
      ASSERT_OK(want);
      EXPECT_EQ(moe.moe.experts[3].down.ToFloat(), *want);
    }
    if (spec.name == "model.embed_tokens.weight") {
      auto want = LoadF32(**ckpt, spec, *cfg);
      ASSERT_OK(want);
      std::vector<float> row(static_cast<size_t>(cfg->hidden_size));
      shard.embed().Row(7, row.data());
      EXPECT_EQ(row, std::vector<float>(want->begin() + 7 * cfg->hidden_size, want->begin() + 8 * cfg->hidden_size));
    }
  }
  ASSERT_FALSE(progress.empty());
  EXPECT_DOUBLE_EQ(progress.back(), 1.0);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ShardPrecisionTest, ::testing::Values("fp32", "bf16", "fp8"));

}  // namespace
}  // namespace expertmesh::worker
