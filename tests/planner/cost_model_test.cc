// Cost-model arithmetic against hand-computed values (REFERENCE.md numbers).
#include "gtest/gtest.h"
#include "topology/cost_model.h"
#include "topology/simulator.h"

namespace expertmesh::topology {
namespace {

ModelConfig V3() { return *ModelConfig::Preset("deepseek-v3"); }

TEST(CostModelTest, ParameterCounts) {
  const ModelWeights w = CountWeights(V3());
  // 671.03B main model; 653.9B of it routed experts.
  EXPECT_NEAR(static_cast<double>(w.TotalParams()), 671.03e9, 0.01e9);
  EXPECT_EQ(w.routed_expert.params, 3 * 7168 * 2048);                 // 44.04M
  EXPECT_NEAR(static_cast<double>(w.attention.params), 187.1e6, 0.1e6);  // MLA + norms
  EXPECT_EQ(w.dense_mlp.params, 3LL * 7168 * 18432);                 // 396.4M
  EXPECT_EQ(w.embed.params, 129280LL * 7168);                        // 926.7M
  EXPECT_EQ(w.num_moe_layers, 58);
  EXPECT_EQ(w.num_dense_layers, 3);
  // Activated per token without the embedding: 36.63B.
  EXPECT_NEAR(static_cast<double>(w.ActivatedParams(8)), 36.63e9, 0.05e9);
}

TEST(CostModelTest, WeightBytes) {
  const ModelWeights w = CountWeights(V3());
  // One FP8 expert: 44.04M bytes + 3 matrices x 16 x 56 blocks... of fp32 scales.
  const double expert = w.routed_expert.Bytes("fp8");
  EXPECT_NEAR(expert, 44.05e6, 0.01e6);
  EXPECT_DOUBLE_EQ(w.routed_expert.Bytes("bf16"), 2.0 * 3 * 7168 * 2048);
  // Whole main model in FP8 ~ 673 GB (REFERENCE: 669.1B FP8 + 2.0B BF16 + scales).
  double total = w.embed.Bytes("fp8") + w.head.Bytes("fp8") + 61 * w.attention.Bytes("fp8") +
                 3 * w.dense_mlp.Bytes("fp8") +
                 58 * (w.router.Bytes("fp8") + w.shared_experts.Bytes("fp8") + 256 * expert);
  EXPECT_NEAR(total / 1e9, 673.0, 2.0);
}

TEST(CostModelTest, KvCacheBytes) {
  const ModelConfig c = V3();
  EXPECT_EQ(KvBytesPerTokenLayer(c, "bf16"), 1152);          // (512 + 64) x 2
  EXPECT_EQ(KvBytesPerTokenLayer(c, "bf16") * 61, 70272);    // per token, all layers
  EXPECT_EQ(KvBytesPerTokenLayer(c, "fp8"), 656);            // FlashMLA FP8 layout
}

TEST(CostModelTest, AllToAllPayloads) {
  EXPECT_DOUBLE_EQ(DispatchBytesPerCopy(V3()), 7392);  // FP8 + 56 fp32 scales
  EXPECT_DOUBLE_EQ(CombineBytesPerCopy(V3()), 14336);  // BF16
}

DeviceSpec H800() {
  DeviceSpec d;
  d.kind = "H800-SXM5";
  d.count = 8;
  d.tflops_fp8_dense = 1979;
  d.tflops_bf16_dense = 989;
  d.hbm_gib = 80;
  d.hbm_gbytes_per_s = 3350;
  d.gemm_dtype = "fp8";
  d.efficiency.gemm_fp8 = 0.5;
  d.efficiency.hbm = 0.75;
  d.efficiency.kernel_overhead_us = 4;
  return d;
}

TEST(CostModelTest, GemmRoofline) {
  const DeviceCostModel dev(H800());
  // Compute-bound: 4096 x 7168 x 4096 FP8.
  OpCost g = dev.Gemm("g", 4096, 7168, 4096, true);
  EXPECT_DOUBLE_EQ(g.flops, 2.0 * 4096 * 7168 * 4096);
  EXPECT_NEAR(g.seconds, g.flops / (1979e12 * 0.5) + 4e-6, 1e-9);
  EXPECT_EQ(g.limiter, Limiter::kCompute);
  // Memory-bound: one token through o_proj reads the 117.4 MB FP8 weight.
  g = dev.Gemm("o", 1, 16384, 7168, true);
  const double bytes = 16384.0 * 7168 * (1 + 4.0 / 16384) + 16384 + 7168 * 2;
  EXPECT_NEAR(g.bytes, bytes, 1);
  EXPECT_NEAR(g.seconds, bytes / (3350e9 * 0.75) + 4e-6, 1e-9);
  EXPECT_EQ(g.limiter, Limiter::kMemory);
}

TEST(CostModelTest, AttentionFlops) {
  const ModelConfig c = V3();
  const DeviceCostModel dev(H800());
  // Decode, absorbed MLA: 278,528 FLOPs per attended token per layer.
  BatchShape d{true, 1, 1, 4096};
  for (const OpCost& op : AttentionOps(c, dev, d, 1152)) {
    if (op.name == "attention_core_mla") {
      EXPECT_DOUBLE_EQ(op.flops, 278528.0 * 4096);
      EXPECT_DOUBLE_EQ(op.bytes, 4096.0 * 1152 + 128.0 * (576 + 512) * 2);
    }
  }
  // Prefill, expanded form: 81,920 FLOPs per causal (query, key) pair; a
  // 4-token prompt has 4 + 3 + 2 + 1 = 10 pairs.
  BatchShape p{false, 4, 1, 0};
  bool seen = false;
  for (const OpCost& op : AttentionOps(c, dev, p, 1152)) {
    if (op.name == "attention_core") {
      EXPECT_DOUBLE_EQ(op.flops, 81920.0 * 10);
      seen = true;
    }
  }
  EXPECT_TRUE(seen);
}

TEST(CostModelTest, ElementwiseAndOverhead) {
  const DeviceCostModel dev(H800());
  const OpCost e = dev.Elementwise("e", 2.5125e9, 3);
  EXPECT_NEAR(e.seconds, 2.5125e9 / (3350e9 * 0.75) + 12e-6, 1e-12);
  const OpCost tiny = dev.Elementwise("t", 10, 1);
  EXPECT_EQ(tiny.limiter, Limiter::kOverhead);
}

}  // namespace
}  // namespace expertmesh::topology
