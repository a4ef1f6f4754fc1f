#include "worker/moe.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <thread>

#include "glog/logging.h"

namespace expertmesh::worker {

namespace {

// Runs fn(e, xin, scratch) for every expert with tokens (start[e] <
// start[e+1]). Large batches spread experts over one thread per core, each
// calling single-threaded BLAS (small GEMMs scale better this way than with
// BLAS's own threads); small ones run inline.
void ParallelForExperts(const std::vector<int64_t>& start,
                        const std::function<void(int64_t, float*, float*)>& fn, int64_t H, int64_t I) {
  const int64_t E = static_cast<int64_t>(start.size()) - 1, total = start[E];
  int64_t max_tokens = 0;
  for (int64_t e = 0; e < E; ++e) max_tokens = std::max(max_tokens, start[e + 1] - start[e]);
  // As many threads as BLAS may use (OPENBLAS_NUM_THREADS, default: one per core).
  const int64_t threads = std::min<int64_t>(std::max(1, openblas_get_num_threads()), E);
  if (threads <= 1 || total < 64) {
    std::vector<float> xin(max_tokens * H), scratch(max_tokens * 3 * I);
    for (int64_t e = 0; e < E; ++e) {
      if (start[e + 1] > start[e]) fn(e, xin.data(), scratch.data());
    }
    return;
  }
  const int blas_threads = openblas_get_num_threads();
  openblas_set_num_threads(1);
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    std::vector<float> xin(max_tokens * H), scratch(max_tokens * 3 * I);
    for (int64_t e; (e = next.fetch_add(1)) < E;) {
      if (start[e + 1] > start[e]) fn(e, xin.data(), scratch.data());
    }
  };
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < threads; ++i) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  openblas_set_num_threads(blas_threads);
}

}  // namespace

void RouteTokens(const MoeWeights& w, const float* x, int64_t T, std::vector<int32_t>* ids,
                 std::vector<float>* weights) {
  const int64_t E = w.router_params.num_experts, K = w.router_params.top_k;
  std::vector<float> logits(T * E);
  kernels::Linear(x, T, w.hidden, w.router.data(), E, logits.data());
  ids->resize(T * K);
  weights->resize(T * K);
  kernels::Route(logits.data(), w.bias.empty() ? nullptr : w.bias.data(), T, w.router_params, ids->data(),
                 weights->data());
}

void RunExpert(const ExpertWeights& e, int64_t H, int64_t I, const float* x, int64_t T, float* out,
               float* scratch) {
  if (T == 0) return;
  float* gu = scratch;  // [T, 2I]
  kernels::Linear(x, T, H, e.gate_up.data(), 2 * I, gu);
  float* act = scratch + T * 2 * I;  // [T, I]
  for (int64_t t = 0; t < T; ++t) kernels::SiluMul(gu + t * 2 * I, gu + t * 2 * I + I, I, act + t * I);
  kernels::Linear(act, T, I, e.down.data(), H, out);
}

void RoutedExpertsAccumulate(const MoeWeights& w, const float* x, int64_t T, const int32_t* ids,
                             const float* weights, int64_t K, float* y) {
  const int64_t H = w.hidden, I = w.expert_inter, E = static_cast<int64_t>(w.experts.size());
  if (T == 0) return;
  // Counting sort of (token, k) pairs by expert.
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t i = 0; i < T * K; ++i) ++start[ids[i] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> order(T * K), fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < T * K; ++i) order[fill[ids[i]]++] = i;
  for (int64_t e = 0; e < E; ++e) {
    CHECK(start[e + 1] == start[e] || w.experts[e].loaded())
        << "expert " << e << " is routed to but not loaded on this process";
  }
  // Each expert writes its outputs into its own contiguous rows of an
  // expert-sorted buffer, so experts can run on different threads; the
  // weighted sum per token is then taken in k order (bitwise the same result
  // for any thread count).
  std::vector<float> sorted_out(T * K * H);
  std::vector<int64_t> pos_of_pair(T * K);
  for (int64_t i = 0; i < T * K; ++i) pos_of_pair[order[i]] = i;
  ParallelForExperts(start, [&](int64_t e, float* xin, float* scratch) {
    const int64_t n = start[e + 1] - start[e];
    for (int64_t j = 0; j < n; ++j) {
      std::memcpy(xin + j * H, x + (order[start[e] + j] / K) * H, H * sizeof(float));
    }
    RunExpert(w.experts[e], H, I, xin, n, sorted_out.data() + start[e] * H, scratch);
  }, H, I);
  for (int64_t t = 0; t < T; ++t) {
    float* yr = y + t * H;
    for (int64_t k = 0; k < K; ++k) {
      const float g = weights[t * K + k];
      const float* o = sorted_out.data() + pos_of_pair[t * K + k] * H;
      for (int64_t h = 0; h < H; ++h) yr[h] += g * o[h];
    }
  }
}

void SharedExpertAccumulate(const MoeWeights& w, const float* x, int64_t T, float* y) {
  if (w.shared_inter == 0 || T == 0) return;
  std::vector<float> out(T * w.hidden), scratch(T * 3 * w.shared_inter);
  RunExpert(w.shared, w.hidden, w.shared_inter, x, T, out.data(), scratch.data());
  for (int64_t i = 0; i < T * w.hidden; ++i) y[i] += out[i];
}

void MoeForwardLocal(const MoeWeights& w, const float* x, int64_t T, float* y) {
  std::fill(y, y + T * w.hidden, 0.0f);
  if (T == 0) return;
  std::vector<int32_t> ids;
  std::vector<float> weights;
  RouteTokens(w, x, T, &ids, &weights);
  RoutedExpertsAccumulate(w, x, T, ids.data(), weights.data(), w.router_params.top_k, y);
  SharedExpertAccumulate(w, x, T, y);
}

}  // namespace expertmesh::worker
