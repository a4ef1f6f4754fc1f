// em_gpu_bench: each CUDA kernel of expertmesh beside its floor, from the HBM
// bandwidth and the bf16 matrix peak measured in the same run.
//
//   em_gpu_bench [--reps N] [--only ceilings|router|experts|mla]
//
// Prints a table and one "RESULT {json}" line per measurement (read by
// bench/gpu/summary.py, which puts PyTorch's numbers beside them). Times are
// medians of per-launch CUDA-event timings after warm-up; inputs are random
// (never zeros) and larger than the L2 cache.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench/gpu/fill.h"
#include "common/config.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/kernels.h"

namespace em = expertmesh;
namespace cuda = expertmesh::kernels::cuda;

namespace {

int g_reps = 20;
std::string g_only;  // run one section only (profiling)
bool Section(const char* name) { return g_only.empty() || g_only == name; }

#define CK(expr)                                                                                   \
  do {                                                                                             \
    cudaError_t e_ = (expr);                                                                       \
    if (e_ != cudaSuccess) {                                                                       \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                                \
    }                                                                                              \
  } while (0)
#define OK(expr)                                                                                     \
  do {                                                                                               \
    absl::Status s_ = (expr);                                                                        \
    if (!s_.ok()) {                                                                                  \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, s_.ToString().c_str());     \
      std::exit(1);                                                                                  \
    }                                                                                                \
  } while (0)

// A failed launch inside a timed lambda is recorded, not fatal: the other
// measurements still run (TRY), and the operation's line says FAILED.
std::string g_error;
#define TRY(expr)                                                        \
  do {                                                                   \
    absl::Status s_ = (expr);                                            \
    if (!s_.ok() && g_error.empty()) g_error = s_.ToString();            \
  } while (0)

template <typename T>
T* DevAlloc(size_t n) {
  void* p = nullptr;
  CK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
  return static_cast<T*>(p);
}

// Median milliseconds of `fn` (one CUDA-event pair per repetition).
double TimeMs(const std::function<void()>& fn, int warmup = 3, int reps = -1) {
  if (reps < 0) reps = g_reps;
  for (int i = 0; i < warmup; ++i) fn();
  CK(cudaDeviceSynchronize());
  std::vector<cudaEvent_t> ev(2 * reps);
  for (auto& e : ev) CK(cudaEventCreate(&e));
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(ev[2 * i]));
    fn();
    CK(cudaEventRecord(ev[2 * i + 1]));
  }
  CK(cudaDeviceSynchronize());
  CK(cudaGetLastError());
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) CK(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
  for (auto& e : ev) cudaEventDestroy(e);
  std::sort(ms.begin(), ms.end());
  return ms[reps / 2];
}

double g_bw = 3.0e12;    // bytes/s; replaced by the measured value
double g_peak = 7.9e14;  // flop/s bf16; replaced by the measured value

// One result line: floor from measured ceilings, achieved share of it.
void Report(const std::string& name, double ms, double bytes, double flops, const std::string& goal_kind,
            double goal_pct) {
  const double t_bytes = bytes / g_bw * 1e3, t_flops = flops / g_peak * 1e3;
  const double floor_ms = std::max(t_bytes, t_flops);
  const double gbs = bytes / (ms * 1e-3) / 1e9, tflops = flops / (ms * 1e-3) / 1e12;
  // Share of the ceiling the goal is stated against (HBM or matrix peak).
  const double pct = goal_kind == "hbm" ? 100.0 * t_bytes / ms : goal_kind == "mma" ? 100.0 * t_flops / ms
                                                                                     : 100.0 * floor_ms / ms;
  std::printf("%-40s %9.3f ms  floor %8.3f ms  %8.1f GB/s  %7.1f TFLOP/s  %5.1f%% of %s%s\n", name.c_str(), ms,
              floor_ms, gbs, tflops, pct, goal_kind == "hbm" ? "HBM" : goal_kind == "mma" ? "bf16 peak" : "floor",
              goal_pct > 0 ? (pct >= goal_pct ? "  [goal met]" : "  [goal missed]") : "");
  std::printf(
      "RESULT {\"name\": \"%s\", \"ms\": %.5f, \"floor_ms\": %.5f, \"bytes\": %.0f, \"flops\": %.0f, \"gbs\": %.1f, "
      "\"tflops\": %.2f, \"pct\": %.2f, \"goal_kind\": \"%s\", \"goal_pct\": %.0f}\n",
      name.c_str(), ms, floor_ms, bytes, flops, gbs, tflops, pct, goal_kind.c_str(), goal_pct);
  std::fflush(stdout);
}

// Runs fn once to check it, then times it and reports (or reports the error).
void Measure(const std::string& name, const std::function<void()>& fn, double bytes, double flops,
             const std::string& goal_kind, double goal_pct) {
  g_error.clear();
  fn();
  cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess && g_error.empty()) g_error = cudaGetErrorString(e);
  if (!g_error.empty()) {
    std::printf("%-40s FAILED: %s\n", name.c_str(), g_error.c_str());
    std::printf("RESULT {\"name\": \"%s\", \"error\": \"see bench.log\"}\n", name.c_str());
    return;
  }
  Report(name, TimeMs(fn), bytes, flops, goal_kind, goal_pct);
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc) g_reps = std::atoi(argv[++i]);
    if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc) g_only = argv[++i];
  }
  std::string why;
  if (!cuda::DeviceAvailable(&why)) {
    std::printf("no CUDA device: %s\n", why.c_str());
    return 0;
  }
  std::printf("device: %s\n", cuda::DeviceDescription().c_str());
  cuda::ContextOptions opts;
  opts.pool_bytes = size_t{3} << 30;
  auto ctx_or = cuda::Context::Create(opts);
  OK(ctx_or.status());
  cuda::Context& ctx = **ctx_or;
  uint64_t seed = 1;

  // ---- ceilings: HBM copy bandwidth and bf16 matrix peak ----
  if (Section("ceilings")) {
    const size_t bytes = size_t{2} << 30;
    char* a = DevAlloc<char>(bytes);
    char* b = DevAlloc<char>(bytes);
    em::bench::FillUniformBf16(reinterpret_cast<uint16_t*>(a), bytes / 2, seed++, -1, 1);
    const double ms = TimeMs([&] { CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
    g_bw = 2.0 * bytes / (ms * 1e-3);
    std::printf("HBM copy (2 GiB D2D, read + write)       %9.3f ms  %8.1f GB/s\n", ms, g_bw / 1e9);
    std::printf("RESULT {\"name\": \"ceiling.hbm_copy\", \"ms\": %.5f, \"gbs\": %.1f}\n", ms, g_bw / 1e9);
    CK(cudaFree(a));
    CK(cudaFree(b));
  }
  if (Section("ceilings")) {
    const int64_t n = 8192;
    uint16_t* x = DevAlloc<uint16_t>(n * n);
    uint16_t* w = DevAlloc<uint16_t>(n * n);
    uint16_t* y = DevAlloc<uint16_t>(n * n);
    em::bench::FillUniformBf16(x, n * n, seed++, -1, 1);
    em::bench::FillUniformBf16(w, n * n, seed++, -1, 1);
    const double ms = TimeMs([&] { OK(cuda::Linear(ctx, x, n, n, w, n, y, cuda::OutType::kBf16)); }, 3, 10);
    g_peak = 2.0 * n * n * n / (ms * 1e-3);
    std::printf("bf16 matrix peak (8192^3, cuBLASLt)      %9.3f ms  %7.1f TFLOP/s\n", ms, g_peak / 1e12);
    std::printf("RESULT {\"name\": \"ceiling.bf16_mma\", \"ms\": %.5f, \"tflops\": %.2f}\n", ms, g_peak / 1e12);
    CK(cudaFree(x));
    CK(cudaFree(w));
    CK(cudaFree(y));
  }

  // ---- router + permute: 4096 tokens, V3 router (256 experts, 8 groups keep 4, top-8), hidden 7168 ----
  if (Section("router")) {
    const int64_t T = 4096, E = 256, K = 8, H = 7168;
    em::kernels::RouterParams rp;  // V3 defaults
    float* logits = DevAlloc<float>(T * E);
    float* bias = DevAlloc<float>(E);
    uint16_t* x = DevAlloc<uint16_t>(T * H);
    uint16_t* xp = DevAlloc<uint16_t>(T * K * H);
    uint16_t* y = DevAlloc<uint16_t>(T * H);
    int32_t* ids = DevAlloc<int32_t>(T * K);
    float* wts = DevAlloc<float>(T * K);
    int32_t* off = DevAlloc<int32_t>(E + 1);
    int32_t* pos = DevAlloc<int32_t>(T * K);
    em::bench::FillUniformF32(logits, T * E, seed++, -4, 4);
    em::bench::FillUniformF32(bias, E, seed++, -0.1f, 0.1f);
    em::bench::FillUniformBf16(x, T * H, seed++, -2, 2);
    auto route = [&] { TRY(cuda::Route(logits, bias, T, rp, ids, wts, nullptr)); };
    auto layout = [&] { TRY(cuda::ExpertLayout(ctx, ids, T, K, E, off, pos)); };
    auto permute = [&] { TRY(cuda::Permute(x, T, H, pos, K, xp, nullptr)); };
    const double b_route = T * E * 4.0 + E * 4.0 + T * K * 8.0;
    const double b_perm = T * H * 2.0 + T * K * H * 2.0 + T * K * 4.0;
    Measure("router (fused, V3 grouped top-8)", route, b_route, 0, "hbm", 0);
    Measure("expert layout (3 kernels)", layout, T * K * 4.0 * 2 + (E + 1) * 4.0, 0, "hbm", 0);
    Measure("permute (4096 x 8 rows of 7168)", permute, b_perm, 0, "hbm", 0);
    Measure(
        "router + permute",
        [&] {
          route();
          layout();
          permute();
        },
        b_route + b_perm + T * K * 4.0, 0, "hbm", 50);
    Measure(
        "combine (weighted, 8 rows per token)", [&] { TRY(cuda::Combine(xp, pos, wts, T, K, H, y, false, nullptr)); },
        T * K * H * 2.0 + T * H * 2.0 + T * K * 8.0, 0, "hbm", 0);
    for (void* p : {(void*)logits, (void*)bias, (void*)x, (void*)xp, (void*)y, (void*)ids, (void*)wts, (void*)off,
                    (void*)pos})
      CK(cudaFree(p));
  }

  // ---- grouped expert GEMM: hidden 7168, inter 2048, 4096 tokens x top-8 over 32 local experts ----
  if (Section("experts")) {
    const int64_t T = 4096, E = 32, K = 8, H = 7168, I = 2048, rows = T * K;
    em::kernels::RouterParams rp;
    rp.num_experts = E;
    rp.num_groups = 1;
    rp.topk_groups = 1;
    rp.top_k = K;
    float* logits = DevAlloc<float>(T * E);
    int32_t* ids = DevAlloc<int32_t>(T * K);
    float* wts = DevAlloc<float>(T * K);
    int32_t* off = DevAlloc<int32_t>(E + 1);
    int32_t* pos = DevAlloc<int32_t>(T * K);
    uint16_t* x = DevAlloc<uint16_t>(T * H);
    uint16_t* xp = DevAlloc<uint16_t>(rows * H);
    uint16_t* op = DevAlloc<uint16_t>(rows * H);
    em::bench::FillUniformF32(logits, T * E, seed++, -4, 4);
    em::bench::FillUniformBf16(x, T * H, seed++, -2, 2);
    OK(cuda::Route(logits, nullptr, T, rp, ids, wts, nullptr));
    OK(cuda::ExpertLayout(ctx, ids, T, K, E, off, pos));
    OK(cuda::Permute(x, T, H, pos, K, xp, nullptr));
    std::vector<int32_t> off32(E + 1);
    CK(cudaMemcpy(off32.data(), off, (E + 1) * 4, cudaMemcpyDeviceToHost));
    std::vector<int64_t> offs(off32.begin(), off32.end());
    int64_t mn = rows, mx = 0;
    for (int64_t e = 0; e < E; ++e) {
      mn = std::min(mn, offs[e + 1] - offs[e]);
      mx = std::max(mx, offs[e + 1] - offs[e]);
    }
    std::printf("grouped GEMM: %lld rows over %lld experts (min %lld, max %lld per expert)\n",
                static_cast<long long>(rows), static_cast<long long>(E), static_cast<long long>(mn),
                static_cast<long long>(mx));
    std::printf("RESULT {\"name\": \"info.expert_rows\", \"offsets\": [");
    for (int64_t e = 0; e <= E; ++e) std::printf("%s%lld", e ? ", " : "", static_cast<long long>(offs[e]));
    std::printf("]}\n");
    const double flops = 2.0 * rows * (H * 2.0 * I + I * H);
    const double wbytes_bf16 = E * 3.0 * H * I * 2;
    const double abytes = rows * (H * 2.0 * 2 + 2 * I * 2.0 * 2 + I * 2.0 * 2);
    {
      uint16_t* wgu = DevAlloc<uint16_t>(E * 2 * I * H);
      uint16_t* wd = DevAlloc<uint16_t>(E * H * I);
      em::bench::FillUniformBf16(wgu, E * 2 * I * H, seed++, -0.03f, 0.03f);
      em::bench::FillUniformBf16(wd, E * H * I, seed++, -0.03f, 0.03f);
      cuda::GroupedExpertWeights gw;
      gw.num_experts = E;
      gw.hidden = H;
      gw.inter = I;
      for (int64_t e = 0; e < E; ++e) {
        gw.gate_up.push_back(wgu + e * 2 * I * H);
        gw.down.push_back(wd + e * H * I);
      }
      Measure(
          "grouped experts bf16 (cuBLASLt)", [&] { TRY(cuda::GroupedExperts(ctx, gw, xp, offs.data(), op)); },
          wbytes_bf16 + abytes, flops, "mma", 60);
      CK(cudaFree(wgu));
      CK(cudaFree(wd));
    }
    {
      uint8_t* wgu = DevAlloc<uint8_t>(E * 2 * I * H);
      uint8_t* wd = DevAlloc<uint8_t>(E * H * I);
      // Per-row scales as ExpandFp8Scales makes them at load: [K/128][N] per expert.
      float* sgu = DevAlloc<float>(E * (H / 128) * 2 * I);
      float* sd = DevAlloc<float>(E * (I / 128) * H);
      em::bench::FillUniformFp8(wgu, E * 2 * I * H, seed++, 240.0f);
      em::bench::FillUniformFp8(wd, E * H * I, seed++, 240.0f);
      em::bench::FillUniformF32(sgu, E * (H / 128) * 2 * I, seed++, 1e-4f, 2e-4f);
      em::bench::FillUniformF32(sd, E * (I / 128) * H, seed++, 1e-4f, 2e-4f);
      cuda::GroupedExpertWeights gw;
      gw.num_experts = E;
      gw.hidden = H;
      gw.inter = I;
      gw.fp8 = true;
      for (int64_t e = 0; e < E; ++e) {
        gw.gate_up.push_back(wgu + e * 2 * I * H);
        gw.down.push_back(wd + e * H * I);
        gw.gate_up_scale.push_back(sgu + e * (H / 128) * 2 * I);
        gw.down_scale.push_back(sd + e * (I / 128) * H);
      }
      Measure(
          "grouped experts fp8 (cuBLASLt 128x128)",
          [&] { TRY(cuda::GroupedExperts(ctx, gw, xp, offs.data(), op, off)); }, wbytes_bf16 / 2 + abytes, flops, "mma",
          0);
      for (void* p : {(void*)wgu, (void*)wd, (void*)sgu, (void*)sd}) CK(cudaFree(p));
    }
    for (void* p : {(void*)logits, (void*)ids, (void*)wts, (void*)off, (void*)pos, (void*)x, (void*)xp, (void*)op})
      CK(cudaFree(p));
  }

  // ---- MLA decode: batch 64, 4K context, 128 heads, kv_lora 512, rope 64 ----
  if (Section("mla")) {
    const int64_t B = 64, S = 4096, H = 128, L = 512, R = 64, D = L + R, page = 64, pages = S / page;
    const em::ModelConfig cfg;  // V3
    const em::kernels::MlaShape shape = em::kernels::MlaShape::FromConfig(cfg);
    uint16_t* cache = DevAlloc<uint16_t>(B * S * D);
    uint16_t* qa = DevAlloc<uint16_t>(B * H * D);
    uint16_t* ol = DevAlloc<uint16_t>(B * H * L);
    uint16_t* q = DevAlloc<uint16_t>(B * H * (shape.nope + shape.rope));
    uint16_t* wkvb = DevAlloc<uint16_t>(H * (shape.nope + shape.v) * L);
    uint16_t* out = DevAlloc<uint16_t>(B * H * shape.v);
    int32_t* table = DevAlloc<int32_t>(B * pages);
    int32_t* lens = DevAlloc<int32_t>(B);
    em::bench::FillUniformBf16(cache, B * S * D, seed++, -1, 1);
    em::bench::FillUniformBf16(qa, B * H * D, seed++, -1, 1);
    em::bench::FillUniformBf16(q, B * H * (shape.nope + shape.rope), seed++, -1, 1);
    em::bench::FillUniformBf16(wkvb, H * (shape.nope + shape.v) * L, seed++, -0.05f, 0.05f);
    std::vector<int32_t> tbl(B * pages), ln(B, static_cast<int32_t>(S));
    std::iota(tbl.begin(), tbl.end(), 0);
    std::shuffle(tbl.begin(), tbl.end(), std::mt19937(7));
    CK(cudaMemcpy(table, tbl.data(), tbl.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(lens, ln.data(), ln.size() * 4, cudaMemcpyHostToDevice));
    cuda::MlaDecodeParams p;
    p.q = qa;
    p.kv_cache = cache;
    p.block_table = table;
    p.seq_lens = lens;
    p.out = ol;
    p.batch = B;
    p.heads = H;
    p.page_size = page;
    p.max_pages = pages;
    p.softmax_scale = shape.softmax_scale;
    const double bytes = B * S * D * 2.0 + B * H * D * 2.0 + B * H * L * 2.0;
    const double flops = 2.0 * B * H * S * (D + L);
    p.kernel = 1;
    Measure("MLA decode, mma.sync kernel", [&] { TRY(cuda::MlaDecode(ctx, p)); }, bytes, flops, "hbm", 0);
    p.kernel = 2;
    Measure("MLA decode, wgmma 64-token tiles x 2", [&] { TRY(cuda::MlaDecode(ctx, p)); }, bytes, flops, "hbm", 0);
    p.kernel = 3;
    Measure("MLA decode, wgmma 32-token tiles x 4", [&] { TRY(cuda::MlaDecode(ctx, p)); }, bytes, flops, "hbm", 0);
    p.kernel = 4;
    Measure("MLA decode, wgmma 64x2, S on one WG", [&] { TRY(cuda::MlaDecode(ctx, p)); }, bytes, flops, "hbm", 0);
    p.kernel = 0;
    Measure("MLA decode (B64, 4K ctx, 128 heads)", [&] { TRY(cuda::MlaDecode(ctx, p)); }, bytes, flops, "hbm", 50);
    const double proj_flops = 2.0 * B * H * (shape.nope * L + L * shape.v);
    Measure(
        "MLA absorbed: absorb + decode + out-proj",
        [&] {
          TRY(cuda::MlaAbsorbQuery(ctx, shape, q, B, wkvb, qa));
          TRY(cuda::MlaDecode(ctx, p));
          TRY(cuda::MlaProjectOut(ctx, shape, ol, B, wkvb, out));
        },
        bytes + H * (shape.nope + shape.v) * L * 2.0, flops + proj_flops, "hbm", 0);
    for (void* ptr : {(void*)cache, (void*)qa, (void*)ol, (void*)q, (void*)wkvb, (void*)out, (void*)table, (void*)lens})
      CK(cudaFree(ptr));
  }
  OK(ctx.Synchronize());
  return 0;
}
