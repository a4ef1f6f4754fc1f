// The CPU engine on the dense architectures (Qwen2, Llama; tiny presets):
// a prompt prefilled in chunks at positions > 0 (the chunked-prefill path),
// token by token, or in one step gives the same logits; sequences of a batch
// are independent; Truncate drops cache entries; a two-stage pipeline of
// StageEngines (tied embeddings: the last stage reads embed_tokens as its
// head) computes the whole model's logits; --device cuda is refused with the
// reason. The numbers themselves are checked against the numpy reference by
// test_generate_dense.py.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checkpoint.h"
#include "gtest/gtest.h"
#include "tests/common/test_util.h"
#include "worker/model.h"
#include "worker/stage_engine.h"

namespace expertmesh::worker {
namespace {

using testing_util::TempDir;

float MaxRelDiff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  float num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num = std::max(num, std::abs(a[i] - b[i]));
    den = std::max(den, std::abs(b[i]));
  }
  return num / std::max(den, 1e-30f);
}

std::vector<int32_t> Prompt(int n, int salt) {
  std::vector<int32_t> t(n);
  for (int i = 0; i < n; ++i) t[i] = (i * 37 + salt * 101 + 5) % 1024;
  return t;
}

class DenseEngineTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    auto cfg = ModelConfig::Preset(GetParam());
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    auto shard = ModelShard::Random(*cfg, ShardFilter{}, 7);
    ASSERT_TRUE(shard.ok()) << shard.status();
    shard_ = std::move(*shard);
  }
  // Logits of the last token after feeding `tokens` in chunks of the given sizes.
  std::vector<float> Chunked(const std::vector<int32_t>& tokens, const std::vector<int64_t>& chunks) {
    Engine e(shard_.get());
    SequenceCache c = e.NewCache();
    std::vector<float> logits;
    int64_t at = 0;
    for (int64_t n : chunks) {
      std::vector<Segment> segs = {{&c, tokens.data() + at, n}};
      EXPECT_TRUE(e.Forward(segs, &logits).ok());
      at += n;
    }
    EXPECT_EQ(at, static_cast<int64_t>(tokens.size()));
    EXPECT_EQ(c.length, at);
    return logits;
  }
  std::unique_ptr<ModelShard> shard_;
};

TEST_P(DenseEngineTest, ChunksAtLaterPositionsEqualOnePrefill) {
  const std::vector<int32_t> p = Prompt(23, 1);
  const std::vector<float> whole = Chunked(p, {23});
  ASSERT_EQ(whole.size(), 1024u);
  EXPECT_LE(MaxRelDiff(Chunked(p, {7, 1, 12, 3}), whole), 2e-5);
  EXPECT_LE(MaxRelDiff(Chunked(p, std::vector<int64_t>(23, 1)), whole), 2e-5);
}

TEST_P(DenseEngineTest, SequencesOfABatchAreIndependent) {
  const std::vector<int32_t> a = Prompt(9, 2), b = Prompt(14, 3);
  const std::vector<float> la = Chunked(a, {4, 5}), lb = Chunked(b, {14});
  // One step: a's second chunk (at position 4) next to b's whole prompt.
  Engine e(shard_.get());
  SequenceCache ca = e.NewCache(), cb = e.NewCache();
  std::vector<float> logits;
  std::vector<Segment> first = {{&ca, a.data(), 4}};
  ASSERT_TRUE(e.Forward(first, &logits).ok());
  std::vector<Segment> both = {{&ca, a.data() + 4, 5}, {&cb, b.data(), 14}};
  ASSERT_TRUE(e.Forward(both, &logits).ok());
  ASSERT_EQ(logits.size(), 2048u);
  EXPECT_LE(MaxRelDiff(std::vector<float>(logits.begin(), logits.begin() + 1024), la), 2e-5);
  EXPECT_LE(MaxRelDiff(std::vector<float>(logits.begin() + 1024, logits.end()), lb), 2e-5);
}

TEST_P(DenseEngineTest, TruncateDropsTheLastEntries) {
  const std::vector<int32_t> p = Prompt(12, 4);
  Engine e(shard_.get());
  SequenceCache c = e.NewCache();
  std::vector<float> logits, again;
  std::vector<Segment> s1 = {{&c, p.data(), 10}};
  ASSERT_TRUE(e.Forward(s1, &logits).ok());
  std::vector<Segment> s2 = {{&c, p.data() + 10, 2}};
  ASSERT_TRUE(e.Forward(s2, &logits).ok());
  c.Truncate(10);
  EXPECT_EQ(c.k[0].size(), static_cast<size_t>(10 * shard_->config().kv_dim()));
  ASSERT_TRUE(e.Forward(s2, &again).ok());
  EXPECT_EQ(again, logits);
}

INSTANTIATE_TEST_SUITE_P(Archs, DenseEngineTest, ::testing::Values("tiny-qwen2", "tiny-llama"));

TEST(DenseStageEngine, TwoStagesWithTiedEmbeddingsEqualTheWholeModel) {
  TempDir tmp;
  auto cfg = ModelConfig::Preset("tiny-llama");
  ASSERT_TRUE(cfg.ok());
  cfg->tie_word_embeddings = true;
  GenerateOptions g;
  g.out_dir = tmp.path() + "/ck";
  g.dtype = "bf16";
  g.seed = 3;
  ASSERT_TRUE(GenerateCheckpoint(*cfg, g).ok());
  auto stage = [&](int64_t begin, int64_t end) {
    StageEngineOptions o;
    o.checkpoint = g.out_dir;
    o.filter.layer_begin = begin;
    o.filter.layer_end = end;
    o.filter.embed = begin == 0;
    o.filter.head = end == cfg->num_hidden_layers;
    auto s = MakeStageEngine(o);
    EXPECT_TRUE(s.ok()) << s.status();
    return std::move(*s);
  };
  auto whole = stage(0, 3), s0 = stage(0, 1), s1 = stage(1, 3);
  ASSERT_FALSE(s1->has_embed());
  ASSERT_TRUE(s1->has_head());
  const std::vector<int32_t> p = Prompt(11, 5);
  StageSequence qw(whole.get()), q0(s0.get()), q1(s1.get());
  for (auto [at, n] : {std::pair<int64_t, int64_t>{0, 8}, {8, 3}}) {  // a chunk, then one at position 8
    std::vector<float> want, hidden, got;
    StageEngine::StepIo io;
    io.logits = &want;
    ASSERT_TRUE(whole->Step({{qw.id(), p.data() + at, n}}, io).ok());
    StageEngine::StepIo io0;
    io0.hidden_out = &hidden;
    ASSERT_TRUE(s0->Step({{q0.id(), p.data() + at, n}}, io0).ok());
    StageEngine::StepIo io1;
    io1.hidden_in = hidden.data();
    io1.logits = &got;
    ASSERT_TRUE(s1->Step({{q1.id(), nullptr, n}}, io1).ok());
    EXPECT_EQ(got, want);
  }
  EXPECT_EQ(s1->SequenceLength(q1.id()), 11);

  StageEngineOptions o;
  o.checkpoint = g.out_dir;
  o.cuda = true;
  auto gpu = MakeStageEngine(o);
  ASSERT_FALSE(gpu.ok());
  EXPECT_EQ(gpu.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(gpu.status().message().find("CPU engine"), std::string::npos) << gpu.status();
}

}  // namespace
}  // namespace expertmesh::worker
