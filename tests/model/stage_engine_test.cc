// StageEngine (worker/stage_engine.h) on the CPU: a pipeline of two stage
// engines computes the whole model's logits bit for bit (prefill, decode,
// segments with no tokens), sequences own their caches, the route observer
// sees each MoE layer once, and bad steps are refused with the reason. The
// GPU implementation is built here too and must refuse without a device.
#include "worker/stage_engine.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "common/checkpoint.h"
#include "gtest/gtest.h"
#include "tests/common/test_util.h"
#include "worker/model.h"

namespace expertmesh::worker {
namespace {

using testing_util::TempDir;

class StageEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto cfg = ModelConfig::Preset("tiny");
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    cfg_ = *cfg;
    GenerateOptions g;
    g.out_dir = tmp_.path() + "/tiny";
    g.dtype = "bf16";
    g.seed = 21;
    ASSERT_TRUE(GenerateCheckpoint(cfg_, g).ok());
    dir_ = g.out_dir;
  }
  // Stage engine of layers [begin, end).
  std::unique_ptr<StageEngine> Stage(int64_t begin, int64_t end) {
    StageEngineOptions o;
    o.checkpoint = dir_;
    o.filter.layer_begin = begin;
    o.filter.layer_end = end;
    o.filter.embed = begin == 0;
    o.filter.head = end == cfg_.num_hidden_layers;
    auto e = MakeStageEngine(o);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? *std::move(e) : nullptr;
  }

  TempDir tmp_;
  ModelConfig cfg_;
  std::string dir_;
};

TEST_F(StageEngineTest, TwoStagesEqualTheWholeModel) {
  auto whole = ModelShard::Load(dir_, ShardFilter{});
  ASSERT_TRUE(whole.ok()) << whole.status();
  Engine ref(whole->get());
  std::unique_ptr<StageEngine> a = Stage(0, 2), b = Stage(2, cfg_.num_hidden_layers);
  ASSERT_TRUE(a && b);
  EXPECT_TRUE(a->has_embed() && !a->has_head() && !b->has_embed() && b->has_head());
  EXPECT_FALSE(a->caps().cuda);
  EXPECT_TRUE(a->caps().expert_rebalancing);
  std::map<int64_t, int64_t> routed;  // MoE layer -> routed (token, k) pairs seen
  auto count = [&routed](int64_t layer, const int32_t*, int64_t n) { routed[layer] += n; };
  a->SetRouteObserver(count);
  b->SetRouteObserver(count);

  const std::vector<int32_t> p0 = {1, 2, 3, 4, 5}, p1 = {900, 17, 33};
  SequenceCache r0 = ref.NewCache(), r1 = ref.NewCache();
  StageSequence a0(a.get()), a1(a.get()), b0(b.get()), b1(b.get());
  std::vector<float> want, hidden, got;
  // Prefill both, then decode sequence 0 alone with sequence 1 present but idle (n = 0).
  ASSERT_TRUE(ref.Forward({{&r0, p0.data(), 5}, {&r1, p1.data(), 3}}, &want).ok());
  StageEngine::StepIo io;
  io.hidden_out = &hidden;
  ASSERT_TRUE(a->Step({{a0.id(), p0.data(), 5}, {a1.id(), p1.data(), 3}}, io).ok());
  ASSERT_EQ(static_cast<int64_t>(hidden.size()), 8 * cfg_.hidden_size);
  StageEngine::StepIo io2;
  io2.hidden_in = hidden.data();
  io2.logits = &got;
  ASSERT_TRUE(b->Step({{b0.id(), nullptr, 5}, {b1.id(), nullptr, 3}}, io2).ok());
  EXPECT_EQ(got, want);
  EXPECT_EQ(a0.length(), 5);
  EXPECT_EQ(b1.length(), 3);
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) moe_layers += cfg_.IsMoeLayer(l) ? 1 : 0;
  EXPECT_EQ(static_cast<int64_t>(routed.size()), moe_layers);
  for (const auto& [layer, n] : routed) EXPECT_EQ(n, 8 * cfg_.num_experts_per_tok) << "layer " << layer;

  const int32_t t0 = a->Sample(want, 0, kernels::SamplingParams{}, 0);
  ASSERT_TRUE(ref.Forward({{&r0, &t0, 1}}, &want).ok());
  ASSERT_TRUE(a->Step({{a0.id(), &t0, 1}, {a1.id(), nullptr, 0}}, io).ok());
  io2.hidden_in = hidden.data();  // the new step's output
  ASSERT_TRUE(b->Step({{b0.id(), nullptr, 1}, {b1.id(), nullptr, 0}}, io2).ok());
  EXPECT_EQ(got, want);  // one logits row: segments with n = 0 have none
  EXPECT_EQ(b0.length(), 6);
  EXPECT_EQ(b1.length(), 3);
  EXPECT_GT(a->times().attention, 0.0);
  EXPECT_GT(a->times().embed_head, 0.0);
  EXPECT_EQ(a->exchange_times().dispatch, 0.0);  // no expert parallelism
}

TEST_F(StageEngineTest, SequencesOwnTheirCaches) {
  std::unique_ptr<StageEngine> e = Stage(0, cfg_.num_hidden_layers);
  ASSERT_TRUE(e);
  StageEngine::SeqId id;
  {
    StageSequence s(e.get());
    id = s.id();
    EXPECT_EQ(e->SequenceLength(id), 0);
    StageSequence moved = std::move(s);
    EXPECT_EQ(moved.id(), id);
    EXPECT_EQ(e->SequenceLength(id), 0);
  }
  EXPECT_EQ(e->SequenceLength(id), -1);  // released once, by the handle that held it last
}

TEST_F(StageEngineTest, RefusesBadSteps) {
  std::unique_ptr<StageEngine> e = Stage(0, cfg_.num_hidden_layers);
  std::unique_ptr<StageEngine> mid = Stage(1, 2);
  ASSERT_TRUE(e && mid);
  StageSequence s(e.get());
  std::vector<float> logits;
  StageEngine::StepIo io;
  io.logits = &logits;
  const int32_t bad = static_cast<int32_t>(cfg_.vocab_size);
  EXPECT_ERROR(e->Step({{s.id(), &bad, 1}}, io), absl::StatusCode::kInvalidArgument, "token id 1024");
  EXPECT_ERROR(e->Step({{12345, &bad, 1}}, io), absl::StatusCode::kInvalidArgument, "unknown sequence 12345");
  const int32_t ok = 3;
  EXPECT_ERROR(e->Step({{s.id(), &ok, 1}}, StageEngine::StepIo{}), absl::StatusCode::kInvalidArgument, "logits");
  EXPECT_EQ(s.length(), 0);  // refused before any layer ran
  StageSequence m(mid.get());
  std::vector<float> out;
  StageEngine::StepIo mio;
  mio.hidden_out = &out;
  EXPECT_ERROR(mid->Step({{m.id(), nullptr, 2}}, mio), absl::StatusCode::kInvalidArgument, "hidden_in");
  // Expert parallelism without a data plane: MoE steps fail until one is given.
  std::map<int64_t, topology::ExpertPlacement> placements;
  placements[1] = topology::ExpertPlacement::Uniform(cfg_.n_routed_experts, 1);
  ASSERT_TRUE(mid->SetExpertParallel(nullptr, &placements, absl::Seconds(5)).ok());
  const std::vector<float> h(2 * cfg_.hidden_size, 0.5f);
  mio.hidden_in = h.data();
  EXPECT_ERROR(mid->Step({{m.id(), nullptr, 2}}, mio), absl::StatusCode::kFailedPrecondition, "no data plane");
  // The CPU engine has no device memory.
  mio.hidden_on_device = true;
  EXPECT_ERROR(mid->Step({{m.id(), nullptr, 2}}, mio), absl::StatusCode::kInvalidArgument, "device");
}

// Issue 15 (chunked prefill): a prompt appended to its cache in chunks of
// several tokens at positions > 0 gives the logits of one whole-prompt step
// (fp32: up to the rounding of different batch shapes, 1e-4 relative), and
// the same greedy continuation. A second sequence in the same steps keeps
// the batches mixed, as on a worker.
TEST_F(StageEngineTest, ChunkedPrefillEqualsOneStep) {
  std::unique_ptr<StageEngine> e = Stage(0, cfg_.num_hidden_layers);
  ASSERT_TRUE(e);
  std::vector<int32_t> prompt(37), other = {5, 6, 7, 8, 9, 10, 11};
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>((i * 131 + 7) % cfg_.vocab_size);
  const int64_t V = cfg_.vocab_size;
  auto argmax = [V](const float* row) {
    return static_cast<int32_t>(std::max_element(row, row + V) - row);
  };
  auto near = [](const std::vector<float>& a, const float* b, int64_t n, const std::string& what) {
    float scale = 0;
    for (int64_t i = 0; i < n; ++i) scale = std::max(scale, std::abs(a[i]));
    for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(a[i], b[i], 1e-4f * scale + 1e-6f) << what << " [" << i << "]";
  };
  StageEngine::StepIo io;
  std::vector<float> logits;
  io.logits = &logits;
  // Whole prompt in one step.
  StageSequence whole(e.get());
  ASSERT_TRUE(e->Step({{whole.id(), prompt.data(), 37}}, io).ok());
  std::vector<float> want(logits.begin(), logits.begin() + V);
  // Chunks of 16, 16, 5 (only the last one's logits are the prompt's), next
  // to another sequence's prefill and decode.
  StageSequence chunked(e.get()), side(e.get());
  ASSERT_TRUE(e->Step({{chunked.id(), prompt.data(), 16}, {side.id(), other.data(), 7}}, io).ok());
  const int32_t side_next = argmax(logits.data() + V);
  ASSERT_TRUE(e->Step({{side.id(), &side_next, 1}, {chunked.id(), prompt.data() + 16, 16}}, io).ok());
  ASSERT_TRUE(e->Step({{chunked.id(), prompt.data() + 32, 5}}, io).ok());
  EXPECT_EQ(chunked.length(), 37);
  near(want, logits.data(), V, "prompt logits");
  // The same greedy continuation, decoding both.
  int32_t a = argmax(want.data()), b = argmax(logits.data());
  ASSERT_EQ(a, b);
  for (int step = 1; step < 8; ++step) {
    ASSERT_TRUE(e->Step({{whole.id(), &a, 1}}, io).ok());
    std::vector<float> wa(logits.begin(), logits.begin() + V);
    ASSERT_TRUE(e->Step({{chunked.id(), &b, 1}}, io).ok());
    near(wa, logits.data(), V, "decode step " + std::to_string(step));
    a = argmax(wa.data());
    b = argmax(logits.data());
    ASSERT_EQ(a, b) << "step " << step;
  }
}

TEST_F(StageEngineTest, CudaWithoutDeviceIsRefused) {
  std::string why;
  if (CudaEngineAvailable(&why)) GTEST_SKIP() << "a CUDA device is present (tests/gpu_engine covers it)";
  StageEngineOptions o;
  o.checkpoint = dir_;
  o.cuda = true;
  EXPECT_ERROR(MakeStageEngine(o), absl::StatusCode::kFailedPrecondition, "no CUDA device");
}

}  // namespace
}  // namespace expertmesh::worker
