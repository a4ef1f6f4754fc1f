// expertmesh bench gemv: kernels::Linear on the weight shapes of a preset
// (default small) in fp32, bf16 and fp8 (128 x 128 block scales), for M
// tokens in {1, 8, 64, 512}, the reference implementation (LinearReference:
// dequantise + BLAS SGEMM on BLAS's own threads, as before the pool) beside
// the kernels (the pool's threads). Each weight is rotated over enough copies
// that every call streams it from memory, not from the caches; printed beside
// the read bandwidth and the SGEMM peak measured in the same run on the same
// threads.
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "common/config.h"
#include "common/dtype.h"
#include "common/thread_pool.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cpu/weight.h"
#include "launch/bench_flags.h"
#include "launch/flags.h"
#include "nlohmann/json.hpp"

namespace expertmesh::launch {

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Best (least) seconds per call of fn(i) (i counts calls) over at least
// --min_seconds and 3 calls (or --iters calls), after one warm-up call: the
// best, not the median, because a shared machine preempts long calls.
template <typename F>
double BestSeconds(F fn) {
  fn(0);
  const double min_s = absl::GetFlag(FLAGS_min_seconds);
  const int64_t iters = absl::GetFlag(FLAGS_iters);
  std::vector<double> t;
  const double start = Now();
  for (int64_t i = 1; (iters > 0 && static_cast<int64_t>(t.size()) < iters) ||
                      (iters <= 0 && (Now() - start < min_s || t.size() < 3));
       ++i) {
    const double t0 = Now();
    fn(i);
    t.push_back(Now() - t0);
  }
  return *std::min_element(t.begin(), t.end());
}

kernels::Weight MakeWeight(DType t, int64_t N, int64_t K, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> f(static_cast<size_t>(N * K));
  for (auto& v : f) v = u(rng);
  if (t == DType::kF32) return kernels::Weight::FromFloat(std::move(f), N, K);
  if (t == DType::kBF16) {
    std::vector<uint16_t> b(f.size());
    for (size_t i = 0; i < f.size(); ++i) b[i] = FloatToBf16(f[i]);
    return kernels::Weight::FromBytes(t, b.data(), N, K);
  }
  std::vector<uint8_t> b(f.size());
  for (size_t i = 0; i < f.size(); ++i) b[i] = FloatToF8E4M3(f[i] * 400.0f);
  std::vector<float> scales(static_cast<size_t>(((N + 127) / 128) * ((K + 127) / 128)), 1.0f / 400.0f);
  return kernels::Weight::FromBytes(t, b.data(), N, K, std::move(scales));
}

struct Shape {
  const char* name;
  int64_t N, K;
};

}  // namespace

int BenchGemv() {
  auto cfg = ModelConfig::FromPresetOrPath(absl::GetFlag(FLAGS_preset));
  if (!cfg.ok()) {
    std::fprintf(stderr, "expertmesh bench gemv: %s\n", std::string(cfg.status().message()).c_str());
    return 2;
  }
  const int64_t H = cfg->hidden_size;
  const int64_t I = cfg->moe_intermediate_size > 0 ? cfg->moe_intermediate_size : cfg->intermediate_size;
  std::vector<Shape> shapes;
  if (cfg->q_lora_rank > 0) shapes.push_back({"q_a (q_lora x H)", cfg->q_lora_rank, H});
  shapes.push_back({"expert gate+up (2I x H)", 2 * I, H});
  shapes.push_back({"expert down (H x I)", H, I});
  shapes.push_back({"lm_head (vocab x H)", cfg->vocab_size, H});

  ThreadPool& pool = ThreadPool::Default();
  const int threads = pool.num_threads();
  std::fprintf(stderr, "bench gemv: measuring read bandwidth and SGEMM peak on %d threads...\n", threads);
  // Measured before and after the kernels (the better of the two: a shared
  // machine only ever lowers them).
  double bw = kernels::MeasureReadBandwidthGBps(int64_t{1} << 30, 1.0);
  double peak = kernels::MeasureSgemmPeakGflops(1024, 1.0);
  const bool json = absl::GetFlag(FLAGS_json);
  struct Row {
    DType t;
    const Shape* s;
    int64_t M;
    double before, after;
  };
  std::vector<Row> rows;
  std::mt19937 rng(1);
  const std::vector<int64_t> Ms = {1, 8, 64, 512};
  for (DType t : {DType::kF32, DType::kBF16, DType::kF8E4M3}) {
    for (const Shape& s : shapes) {
      const kernels::Weight w0 = MakeWeight(t, s.N, s.K, rng);
      // Copies of the weight, at least 1 GiB in all (beyond any cache, as
      // the read bandwidth's buffer).
      const int64_t copies =
          std::clamp<int64_t>((int64_t{1} << 30) / static_cast<int64_t>(w0.bytes()) + 1, 1, 4096);
      std::vector<kernels::Weight> ws;
      ws.reserve(static_cast<size_t>(copies));
      for (int64_t c = 0; c < copies; ++c) {
        ws.push_back(kernels::Weight::FromBytes(
            t, w0.data(), s.N, s.K,
            t == DType::kF8E4M3 ? std::vector<float>(w0.scale_inv(),
                                                     w0.scale_inv() + ((s.N + 127) / 128) * ((s.K + 127) / 128))
                                : std::vector<float>{}));
      }
      for (int64_t M : Ms) {
        std::vector<float> x(static_cast<size_t>(M * s.K), 0.01f), y(static_cast<size_t>(M * s.N));
        // Before: the reference on BLAS's own threads (OpenBLAS as it was
        // configured before the pool made it single-threaded).
        openblas_set_num_threads(threads);
        const double before = BestSeconds([&](int64_t i) {
          kernels::LinearReference(x.data(), M, s.K, ws[static_cast<size_t>(i % copies)], y.data());
        });
        openblas_set_num_threads(1);
        const double after = BestSeconds([&](int64_t i) {
          kernels::Linear(x.data(), M, s.K, ws[static_cast<size_t>(i % copies)], y.data());
        });
        rows.push_back({t, &s, M, before, after});
        std::fprintf(stderr, "  %s %s M=%lld: before %.3f ms, after %.3f ms\n", DTypeName(t), s.name,
                     static_cast<long long>(M), before * 1e3, after * 1e3);
      }
    }
  }
  bw = std::max(bw, kernels::MeasureReadBandwidthGBps(int64_t{1} << 30, 1.0));
  peak = std::max(peak, kernels::MeasureSgemmPeakGflops(1024, 1.0));
  double load = 0;
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &load) != 1) load = 0;
    std::fclose(f);
  }
  nlohmann::json out_rows = nlohmann::json::array();
  if (!json) {
    std::printf("preset %s, %d threads, kernels %s; read bandwidth %.1f GB/s, SGEMM peak %.1f GFLOP/s (this run, "
                "best of before and after); load average %.1f\n",
                absl::GetFlag(FLAGS_preset).c_str(), threads, kernels::LinearIsa().c_str(), bw, peak, load);
    std::printf("%-7s %-24s %11s %4s %10s %10s %8s %9s %6s %9s %6s\n", "dtype", "shape", "N x K", "M", "before ms",
                "after ms", "speedup", "GB/s", "of bw", "GFLOP/s", "of pk");
  }
  for (const Row& r : rows) {
    const double bytes = static_cast<double>(r.s->N * r.s->K) * static_cast<double>(DTypeSize(r.t));
    const double gbps = bytes / r.after / 1e9;
    const double gflops = 2.0 * static_cast<double>(r.M * r.s->N * r.s->K) / r.after / 1e9;
    out_rows.push_back({{"dtype", DTypeName(r.t)}, {"shape", r.s->name}, {"n", r.s->N}, {"k", r.s->K}, {"m", r.M},
                        {"before_s", r.before}, {"after_s", r.after}, {"weight_gbps", gbps},
                        {"of_bandwidth", gbps / bw}, {"gflops", gflops}, {"of_peak", gflops / peak}});
    if (!json) {
      char nk[32];
      std::snprintf(nk, sizeof nk, "%lldx%lld", static_cast<long long>(r.s->N), static_cast<long long>(r.s->K));
      std::printf("%-7s %-24s %11s %4lld %10.3f %10.3f %7.2fx %9.1f %6.2f %9.1f %6.2f\n", DTypeName(r.t), r.s->name,
                  nk, static_cast<long long>(r.M), r.before * 1e3, r.after * 1e3, r.before / r.after, gbps, gbps / bw,
                  gflops, gflops / peak);
    }
  }
  if (json) {
    nlohmann::json out = {{"preset", absl::GetFlag(FLAGS_preset)}, {"threads", threads},
                          {"isa", kernels::LinearIsa()}, {"read_bandwidth_gbps", bw},
                          {"sgemm_peak_gflops", peak}, {"load_average", load},
                          {"rows", out_rows}};
    std::printf("%s\n", out.dump(2).c_str());
  }
  return 0;
}

}  // namespace expertmesh::launch
