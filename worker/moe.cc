#include "worker/moe.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>

#include "common/thread_pool.h"
#include "glog/logging.h"

namespace expertmesh::worker {

namespace {

// Tokens per task when a token-parallel step (router, shared expert, the
// final weighted sum) is split over threads.
constexpr int64_t kTokenChunk = 64;

// Runs fn(task, thread) for every task in [0, n) on the process's thread
// pool (common/thread_pool.h), one task per chunk: the kernels inside a task
// run single-threaded (nested pool calls run inline), so small GEMMs run side
// by side on every core. One task: inline on the caller.
void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  expertmesh::ParallelFor(n, 1, [&](int64_t begin, int64_t end, int thread) {
    for (int64_t i = begin; i < end; ++i) fn(i, thread);
  });
}

// Routed experts (and, with_shared, the shared expert) on x[T,H], added to
// y: y[t] += sum over k of weights[t,k] * expert[ids[t,k]](x[t]) (in k
// order), then y[t] += shared(x[t]). Every expert with tokens and every
// token chunk of the shared expert is one task of one ParallelFor, largest
// first; each writes its own rows (routed outputs into an expert-sorted
// buffer), so the sums, taken afterwards per token, are bitwise the same for
// any thread count.
void ExpertsAccumulate(const MoeWeights& w, const float* x, int64_t T, const int32_t* ids, const float* weights,
                       int64_t K, bool with_shared, float* y) {
  const int64_t H = w.hidden, I = w.expert_inter, Is = w.shared_inter, E = static_cast<int64_t>(w.experts.size());
  with_shared = with_shared && Is > 0;
  const int64_t pairs = ids != nullptr ? T * K : 0;
  if (T == 0 || (pairs == 0 && !with_shared)) return;
  // Counting sort of (token, k) pairs by expert.
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t i = 0; i < pairs; ++i) ++start[ids[i] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> order(pairs), fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < pairs; ++i) order[fill[ids[i]]++] = i;
  for (int64_t e = 0; e < E; ++e) {
    CHECK(start[e + 1] == start[e] || w.experts[e].loaded())
        << "expert " << e << " is routed to but not loaded on this process";
  }
  std::vector<int64_t> pos_of_pair(pairs);
  for (int64_t i = 0; i < pairs; ++i) pos_of_pair[order[i]] = i;
  // Tasks: shared-expert chunks (-1 - chunk), then experts by descending
  // token count (the longest first, so the threads finish together).
  const int64_t shared_chunks = with_shared ? (T + kTokenChunk - 1) / kTokenChunk : 0;
  std::vector<int64_t> tasks;
  for (int64_t c = 0; c < shared_chunks; ++c) tasks.push_back(-1 - c);
  const size_t first_expert = tasks.size();
  int64_t max_tokens = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (start[e + 1] > start[e]) tasks.push_back(e);
    max_tokens = std::max(max_tokens, start[e + 1] - start[e]);
  }
  std::stable_sort(tasks.begin() + first_expert, tasks.end(), [&](int64_t a, int64_t b) {
    return start[a + 1] - start[a] > start[b + 1] - start[b];
  });
  // Outputs and per-thread buffers are written before they are read: no
  // zero-filling.
  std::unique_ptr<float[]> sorted_out(new float[pairs * H]);
  std::unique_ptr<float[]> shared_out(new float[with_shared ? T * H : 0]);
  const int64_t threads = ThreadPool::Default().num_threads();
  const int64_t scratch_floats = std::max(max_tokens * 3 * I, with_shared ? kTokenChunk * 3 * Is : 0);
  std::vector<std::unique_ptr<float[]>> xin(threads), scratch(threads);
  ParallelFor(static_cast<int64_t>(tasks.size()), [&](int64_t i, int64_t thread) {
    if (!scratch[thread]) {
      xin[thread].reset(new float[max_tokens * H]);
      scratch[thread].reset(new float[scratch_floats]);
    }
    const int64_t task = tasks[i];
    if (task < 0) {  // shared expert on tokens [t0, t0 + n)
      const int64_t t0 = (-1 - task) * kTokenChunk, n = std::min(kTokenChunk, T - t0);
      RunExpert(w.shared, H, Is, x + t0 * H, n, shared_out.get() + t0 * H, scratch[thread].get());
      return;
    }
    const int64_t e = task, n = start[e + 1] - start[e];
    float* in = xin[thread].get();
    for (int64_t j = 0; j < n; ++j) {
      std::memcpy(in + j * H, x + (order[start[e] + j] / K) * H, H * sizeof(float));
    }
    RunExpert(w.experts[e], H, I, in, n, sorted_out.get() + start[e] * H, scratch[thread].get());
  });
  ParallelFor((T + kTokenChunk - 1) / kTokenChunk, [&](int64_t chunk, int64_t) {
    for (int64_t t = chunk * kTokenChunk; t < std::min(T, (chunk + 1) * kTokenChunk); ++t) {
      float* yr = y + t * H;
      for (int64_t k = 0; k < (ids != nullptr ? K : 0); ++k) {
        const float g = weights[t * K + k];
        const float* o = sorted_out.get() + pos_of_pair[t * K + k] * H;
        for (int64_t h = 0; h < H; ++h) yr[h] += g * o[h];
      }
      if (with_shared) {
        const float* s = shared_out.get() + t * H;
        for (int64_t h = 0; h < H; ++h) yr[h] += s[h];
      }
    }
  });
}

}  // namespace

void RouteTokens(const MoeWeights& w, const float* x, int64_t T, std::vector<int32_t>* ids,
                 std::vector<float>* weights) {
  const int64_t E = w.router_params.num_experts, K = w.router_params.top_k, H = w.hidden;
  ids->resize(T * K);
  weights->resize(T * K);
  std::vector<float> logits(T * E);
  // Token chunks on parallel threads (single-threaded BLAS); one chunk inline.
  ParallelFor((T + kTokenChunk - 1) / kTokenChunk, [&](int64_t chunk, int64_t) {
    const int64_t t0 = chunk * kTokenChunk, n = std::min(kTokenChunk, T - t0);
    kernels::Linear(x + t0 * H, n, H, w.router, logits.data() + t0 * E);
    kernels::Route(logits.data() + t0 * E, w.bias.empty() ? nullptr : w.bias.data(), n, w.router_params,
                   ids->data() + t0 * K, weights->data() + t0 * K);
  });
}

void RunExpert(const ExpertWeights& e, int64_t H, int64_t I, const float* x, int64_t T, float* out,
               float* scratch) {
  if (T == 0) return;
  float* gate = scratch;         // [T, I]
  float* up = scratch + T * I;   // [T, I]
  float* act = up + T * I;       // [T, I]
  kernels::Linear(x, T, H, e.gate, gate);
  kernels::Linear(x, T, H, e.up, up);
  kernels::SiluMul(gate, up, T * I, act);
  kernels::Linear(act, T, I, e.down, out);
}

ExpertWeights ExpertWeights::FromFloat(const std::vector<float>& gate_up, std::vector<float> down, int64_t H,
                                       int64_t I) {
  CHECK_EQ(static_cast<int64_t>(gate_up.size()), 2 * I * H);
  ExpertWeights e;
  e.gate = kernels::Weight::FromFloat(std::vector<float>(gate_up.begin(), gate_up.begin() + I * H), I, H);
  e.up = kernels::Weight::FromFloat(std::vector<float>(gate_up.begin() + I * H, gate_up.end()), I, H);
  e.down = kernels::Weight::FromFloat(std::move(down), H, I);
  return e;
}

void RoutedExpertsAccumulate(const MoeWeights& w, const float* x, int64_t T, const int32_t* ids,
                             const float* weights, int64_t K, float* y) {
  ExpertsAccumulate(w, x, T, ids, weights, K, /*with_shared=*/false, y);
}

void MoeExpertsAccumulate(const MoeWeights& w, const float* x, int64_t T, const int32_t* ids, const float* weights,
                          int64_t K, float* y) {
  ExpertsAccumulate(w, x, T, ids, weights, K, /*with_shared=*/true, y);
}

void SharedExpertAccumulate(const MoeWeights& w, const float* x, int64_t T, float* y) {
  ExpertsAccumulate(w, x, T, nullptr, nullptr, 0, /*with_shared=*/true, y);
}

void MoeForwardLocal(const MoeWeights& w, const float* x, int64_t T, float* y) {
  std::fill(y, y + T * w.hidden, 0.0f);
  if (T == 0) return;
  std::vector<int32_t> ids;
  std::vector<float> weights;
  RouteTokens(w, x, T, &ids, &weights);
  MoeExpertsAccumulate(w, x, T, ids.data(), weights.data(), w.router_params.top_k, y);
}

}  // namespace expertmesh::worker
