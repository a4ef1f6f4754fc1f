// expertmesh bench: measured benchmarks, each printed beside the limit it is
// compared with, measured in the same run.
//   layer         one MoE layer and one MLA layer on the CPU kernels vs BLAS SGEMM peak
//   moe-alltoall  expert-parallel dispatch/combine vs the transport's raw all-to-all-v
//   serve         a local cluster serving a batch job (bench_serve.cc)
//   control-plane the coordinator's Sync/Heartbeat latency under job submits (bench_control_plane.cc)
//   gemv          kernels::Linear (fp32/bf16/fp8) vs read bandwidth and SGEMM peak (bench_gemv.cc)
//   peer          `generate` beside llama.cpp on the same checkpoint as GGUF (bench_peer.cc)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "common/checkpoint.h"
#include "common/config.h"
#include "kernels/cpu/kernels.h"
#include "launch/bench_flags.h"
#include "launch/flags.h"
#include "launch/text.h"
#include "launch/verbs.h"
#include "nlohmann/json.hpp"
#include "worker/model.h"
#include "worker/moe.h"

namespace expertmesh::launch {

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Runs fn repeatedly (after one warm-up call) for at least min_seconds or
// `iters` times; returns the median seconds per call.
template <typename F>
double TimeIt(F fn) {
  fn();
  const double min_s = absl::GetFlag(FLAGS_min_seconds);
  const int64_t iters = absl::GetFlag(FLAGS_iters);
  std::vector<double> t;
  const double start = Now();
  while ((iters > 0 && static_cast<int64_t>(t.size()) < iters) || (iters <= 0 && (Now() - start < min_s || t.size() < 3))) {
    const double t0 = Now();
    fn();
    t.push_back(Now() - t0);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int BenchLayer() {
  auto cfg = ModelConfig::FromPresetOrPath(absl::GetFlag(FLAGS_preset));
  if (!cfg.ok()) {
    std::fprintf(stderr, "expertmesh bench layer: %s\n", std::string(cfg.status().message()).c_str());
    return 2;
  }
  if (cfg->dense_arch()) {
    std::fprintf(stderr, "expertmesh bench layer: measures a DeepSeek-V3 MoE / MLA layer; %s is a dense %s model "
                         "(use `bench serve` or `generate`)\n",
                 absl::GetFlag(FLAGS_preset).c_str(), cfg->architecture().c_str());
    return 2;
  }
  const int64_t T = absl::GetFlag(FLAGS_tokens);
  if (T <= 0) {
    std::fprintf(stderr, "expertmesh bench layer: --tokens must be > 0\n");
    return 2;
  }
  const ModelConfig& c = *cfg;
  const int64_t L = c.first_k_dense_replace;  // the first MoE layer
  std::fprintf(stderr, "bench layer: building random weights of layer %lld of preset %s...\n",
               static_cast<long long>(L), absl::GetFlag(FLAGS_preset).c_str());
  ShardFilter f;
  f.layer_begin = L;
  f.layer_end = L + 1;
  f.embed = false;
  f.head = false;
  auto shard = worker::ModelShard::Random(c, f, absl::GetFlag(FLAGS_seed));
  if (!shard.ok()) {
    std::fprintf(stderr, "expertmesh bench layer: %s\n", std::string(shard.status().message()).c_str());
    return 1;
  }
  const worker::LayerWeights& lw = (*shard)->layers()[0];
  const int64_t H = c.hidden_size, E = c.n_routed_experts, K = c.num_experts_per_tok, I = c.moe_intermediate_size,
                Is = I * c.n_shared_experts;
  TensorSpec xs{"bench.x", {T, H}, false, TensorSpec::Init::kNormal, 1.0f};
  std::vector<float> x = RandomTensor(xs, 7), y(T * H);

  std::fprintf(stderr, "bench layer: measuring SGEMM peak and memory bandwidth...\n");
  const double peak = kernels::MeasureSgemmPeakGflops(2048, 1.0);
  const double bw = kernels::MeasureReadBandwidthGBps(1ll << 30, 1.0);

  std::fprintf(stderr, "bench layer: timing the MoE layer (T=%lld)...\n", static_cast<long long>(T));
  const double moe_s = TimeIt([&] { worker::MoeForwardLocal(lw.moe, x.data(), T, y.data()); });
  const double moe_flops = 2.0 * T * H * E + 2.0 * T * K * 3 * H * I + 2.0 * T * 3 * H * Is;
  // Bytes a pass must read at least: the weights of every expert the batch
  // routes to (each read once), router and shared expert, the activations.
  std::vector<int32_t> ids;
  std::vector<float> gate_w;
  worker::RouteTokens(lw.moe, x.data(), T, &ids, &gate_w);
  std::vector<char> used(E, 0);
  for (int32_t e : ids) used[e] = 1;
  const double experts_used = std::count(used.begin(), used.end(), 1);
  const double moe_bytes = 4.0 * (experts_used * 3 * H * I + 3.0 * H * Is + E * H + 2.0 * T * H);
  // Roofline: the time floor is the larger of compute at peak and bytes at bandwidth.
  const double moe_floor_s = std::max(moe_flops / (peak * 1e9), moe_bytes / (bw * 1e9));

  std::fprintf(stderr, "bench layer: timing the MLA layer (prefill of %lld tokens)...\n", static_cast<long long>(T));
  worker::Engine engine(shard->get());
  std::vector<int32_t> toks(T, 0);
  const int64_t nh = c.num_attention_heads, qd = c.qk_head_dim(), Lr = c.kv_lora_rank, dr = c.qk_rope_head_dim,
                dn = c.qk_nope_head_dim, dv = c.v_head_dim, ql = c.q_lora_rank;
  const double mla_s = TimeIt([&] {
    worker::SequenceCache cache = engine.NewCache();
    std::vector<worker::Segment> segs = {{&cache, toks.data(), T}};
    engine.Attention(lw, 0, segs, x.data(), T, y.data());
  });
  const double proj = ql > 0 ? H * ql + ql * nh * qd : H * nh * qd;
  const double pairs = T * (T + 1) / 2.0;  // causal
  const double mla_flops = 2.0 * T * (proj + H * (Lr + dr) + Lr * nh * (dn + dv) + nh * dv * H) +
                           2.0 * nh * pairs * (qd + dv);

  const double moe_gf = moe_flops / moe_s / 1e9, mla_gf = mla_flops / mla_s / 1e9;
  const double moe_roofline_gf = moe_flops / moe_floor_s / 1e9;
  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json j = {{"preset", absl::GetFlag(FLAGS_preset)}, {"tokens", T},
                        {"sgemm_peak_gflops", peak}, {"read_bandwidth_gbps", bw},
                        {"moe_weight_bytes", moe_bytes}, {"moe_experts_used", experts_used},
                        {"moe_roofline_gflops", moe_roofline_gf}, {"moe_ratio_to_roofline", moe_gf / moe_roofline_gf},
                        {"moe_layer_s", moe_s}, {"moe_layer_gflops", moe_gf}, {"moe_ratio", moe_gf / peak},
                        {"mla_layer_s", mla_s}, {"mla_layer_gflops", mla_gf}, {"mla_ratio", mla_gf / peak}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("preset %s, %lld tokens; SGEMM peak (2048^3, same BLAS, this run): %.1f GFLOP/s; "
                "memory read bandwidth (this run): %.1f GB/s\n",
                absl::GetFlag(FLAGS_preset).c_str(), static_cast<long long>(T), peak, bw);
    std::printf("%-34s %10s %10s %8s\n", "layer", "ms", "GFLOP/s", "ratio");
    std::printf("%-34s %10.2f %10.1f %8.2f\n", "MoE (router + 8 routed + shared)", moe_s * 1e3, moe_gf, moe_gf / peak);
    std::printf("%-34s %10.2f %10.1f %8.2f\n", "MLA (prefill, causal)", mla_s * 1e3, mla_gf, mla_gf / peak);
    std::printf("MoE roofline: %.0f experts used, %.0f MB of weights read once per pass -> floor %.2f ms = "
                "%.1f GFLOP/s; MoE reaches %.2f of it\n",
                experts_used, moe_bytes / 1e6, moe_floor_s * 1e3, moe_roofline_gf, moe_gf / moe_roofline_gf);
  }
  return 0;
}

}  // namespace

int BenchMain(int argc, char** argv) {
  std::vector<char*> pos = ParseVerbFlags(argc, argv);
  const std::string what = pos.size() > 1 ? pos[1] : "";
  if (what == "layer") return BenchLayer();
  if (what == "moe-alltoall") return BenchMoeAlltoall(argc, argv);
  if (what == "serve") return BenchServe();
  if (what == "control-plane") return BenchControlPlane();
  if (what == "tokenizer") return BenchTokenizer();
  if (what == "gemv") return BenchGemv();
  if (what == "peer") return BenchPeer();
  std::fprintf(stderr,
               "expertmesh bench: name a benchmark: layer, moe-alltoall, serve, control-plane, tokenizer, gemv or peer "
               "(see --help)\n");
  return 2;
}

}  // namespace expertmesh::launch
