// CUDA elementwise kernels against their CPU twins: RMSNorm, SwiGLU
// activation, rotary (YaRN), embedding, argmax (greedy sampling), casts,
// fp8 block dequantisation.
#include <algorithm>
#include <cstring>

#include "common/checkpoint.h"
#include "common/config.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cuda/kernels.h"
#include "tests/gpu/gpu_test_util.h"

namespace expertmesh {
namespace {

namespace cuda = kernels::cuda;
using gputest::DeviceBuffer;

TEST(GpuElementwise, RmsNormMatchesCpu) {
  EM_SKIP_WITHOUT_GPU();
  auto rng = gputest::Rng();
  for (int64_t H : {160, 7168}) {
    const int64_t T = 37;
    std::vector<float> x = gputest::Normal(rng, T * H, 2.0f);
    std::vector<float> w = gputest::Normal(rng, H, 0.1f, 1.0f);
    auto xb = gputest::ToBf16(x);
    std::vector<float> ref(T * H);
    kernels::RmsNorm(x.data(), T, H, w.data(), 1e-6f, ref.data());
    DeviceBuffer<uint16_t> dx(xb), dy(T * H);
    DeviceBuffer<float> dw(w);
    ASSERT_OK(cuda::RmsNorm(dx.get(), T, H, dw.get(), 1e-6f, dy.get(), nullptr));
    EM_EXPECT_CLOSE(("RmsNorm H=" + std::to_string(H)).c_str(), gputest::FromBf16(dy.Download()), ref, 1e-2);
    // In place (y aliases x).
    ASSERT_OK(cuda::RmsNorm(dx.get(), T, H, dw.get(), 1e-6f, dx.get(), nullptr));
    EM_EXPECT_CLOSE("RmsNorm in place", gputest::FromBf16(dx.Download()), ref, 1e-2);
  }
}

TEST(GpuElementwise, SiluMulRowsMatchesCpu) {
  EM_SKIP_WITHOUT_GPU();
  auto rng = gputest::Rng();
  for (int64_t I : {24, 2048}) {
    const int64_t T = 33;
    std::vector<float> gu = gputest::Normal(rng, T * 2 * I, 3.0f);
    auto gub = gputest::ToBf16(gu);
    std::vector<float> ref(T * I);
    for (int64_t t = 0; t < T; ++t) kernels::SiluMul(&gu[t * 2 * I], &gu[t * 2 * I + I], I, &ref[t * I]);
    DeviceBuffer<uint16_t> dgu(gub), dout(T * I);
    ASSERT_OK(cuda::SiluMulRows(dgu.get(), T, I, dout.get(), nullptr));
    EM_EXPECT_CLOSE(("SiluMulRows I=" + std::to_string(I)).c_str(), gputest::FromBf16(dout.Download()), ref, 1e-2);
  }
}

TEST(GpuElementwise, RopeMatchesCpu) {
  EM_SKIP_WITHOUT_GPU();
  auto rng = gputest::Rng();
  for (const char* preset : {"deepseek-v3", "tiny"}) {
    auto cfg = ModelConfig::Preset(preset);
    ASSERT_TRUE(cfg.ok());
    const kernels::Rope rope(*cfg);
    const int64_t heads = cfg->num_attention_heads, dn = cfg->qk_nope_head_dim, dr = cfg->qk_rope_head_dim;
    const int64_t qd = dn + dr, tokens = 9;
    std::vector<float> q = gputest::Normal(rng, tokens * heads * qd);
    auto qb = gputest::ToBf16(q);
    std::vector<int32_t> pos(tokens);
    std::uniform_int_distribution<int32_t> pd(0, static_cast<int32_t>(cfg->max_position_embeddings - 1));
    for (auto& p : pos) p = pd(rng);
    pos[0] = 0;
    std::vector<float> ref = q;
    for (int64_t t = 0; t < tokens; ++t) rope.Apply(&ref[t * heads * qd + dn], heads, qd, pos[t]);
    DeviceBuffer<uint16_t> dq(qb);
    DeviceBuffer<int32_t> dpos(pos);
    DeviceBuffer<double> dinv(rope.inv_freq());
    ASSERT_OK(cuda::RopeApply(dq.get() + dn, tokens, heads, heads * qd, qd, dr, dpos.get(), dinv.get(), nullptr));
    EM_EXPECT_CLOSE((std::string("Rope ") + preset).c_str(), gputest::FromBf16(dq.Download()), ref, 1e-2);
  }
}

TEST(GpuElementwise, EmbeddingAndArgmax) {
  EM_SKIP_WITHOUT_GPU();
  auto rng = gputest::Rng();
  const int64_t V = 1000, H = 64, T = 7;
  std::vector<float> table = gputest::Normal(rng, V * H);
  auto tb = gputest::ToBf16(table);
  std::vector<int32_t> ids = {0, 999, 17, -1, 1000, 512, 3};
  DeviceBuffer<uint16_t> dt(tb), dout(T * H);
  DeviceBuffer<int32_t> dids(ids);
  ASSERT_OK(cuda::Embedding(dt.get(), V, H, dids.get(), T, dout.get(), nullptr));
  const auto out = dout.Download();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      const uint16_t want = (ids[t] >= 0 && ids[t] < V) ? tb[ids[t] * H + h] : 0;
      ASSERT_EQ(out[t * H + h], want) << "token " << t << " dim " << h;
    }
  }
  // Greedy sampling over a V3-sized vocabulary, with planted ties.
  const int64_t vocab = 129280, rows = 5;
  std::vector<float> logits = gputest::Normal(rng, rows * vocab);
  logits[1 * vocab + 77] = logits[1 * vocab + 99] = 50.0f;  // tie: lower index wins
  logits[2 * vocab + vocab - 1] = 60.0f;
  DeviceBuffer<float> dl(logits);
  DeviceBuffer<int32_t> dam(rows);
  ASSERT_OK(cuda::ArgmaxRows(dl.get(), rows, vocab, dam.get(), nullptr));
  const auto am = dam.Download();
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_EQ(am[r], kernels::Sample(&logits[r * vocab], vocab, kernels::SamplingParams{}, 0)) << "row " << r;
  }
}

TEST(GpuElementwise, CastsRoundToNearestEven) {
  EM_SKIP_WITHOUT_GPU();
  auto rng = gputest::Rng();
  std::vector<float> x = gputest::Normal(rng, 10007, 100.0f);
  x[0] = 0.0f;
  x[1] = -0.0f;
  x[2] = 1e-40f;  // subnormal
  DeviceBuffer<float> dx(x), dback(x.size());
  DeviceBuffer<uint16_t> db(x.size());
  ASSERT_OK(cuda::CastF32ToBf16(dx.get(), x.size(), db.get(), nullptr));
  ASSERT_OK(cuda::CastBf16ToF32(db.get(), x.size(), dback.get(), nullptr));
  const auto b = db.Download();
  const auto back = dback.Download();
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(b[i], FloatToBf16(x[i])) << i;
    ASSERT_EQ(back[i], Bf16ToFloat(b[i])) << i;
  }
}

TEST(GpuElementwise, DequantFp8BlocksMatchesCpu) {
  EM_SKIP_WITHOUT_GPU();
  auto rng = gputest::Rng();
  const int64_t rows = 288, cols = 416;  // partial edge blocks both ways
  std::vector<float> w = gputest::Normal(rng, rows * cols, 0.02f);
  std::vector<uint8_t> q;
  std::vector<float> sc;
  QuantizeFp8Blocks(w.data(), rows, cols, 128, 128, &q, &sc);
  DeviceBuffer<uint8_t> dq(q);
  DeviceBuffer<float> dsc(sc);
  DeviceBuffer<uint16_t> dout(rows * cols);
  ASSERT_OK(cuda::DequantFp8Blocks(dq.get(), rows, cols, dsc.get(), 128, 128, dout.get(), nullptr));
  const auto out = dout.Download();
  const int64_t nbc = (cols + 127) / 128;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float want = F8E4M3ToFloat(q[r * cols + c]) * sc[(r / 128) * nbc + c / 128];
      ASSERT_EQ(out[r * cols + c], FloatToBf16(want)) << r << "," << c;
    }
  }
}

}  // namespace
}  // namespace expertmesh
