// What a worker counts for its heartbeats: where its time goes, routed tokens
// per expert, steps and tokens.
//
// Threads: the stage thread (and, for LoadCounter, the GPU engine's routing
// callback on the stage thread) writes; the heartbeat thread reads. The times
// are relaxed atomics written by one thread (a torn sum is impossible, a
// slightly stale one harmless); LoadCounter has its own mutex. Nothing blocks.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/time/time.h"

namespace expertmesh::worker::runtime {

// Seconds, cumulative.
struct StageTimes {
  std::atomic<double> transfer{0}, idle{0}, control{0}, embed_head{0}, dispatch{0}, combine{0}, expert{0};
};

// Adds v to *a (single writer).
inline void AddTime(std::atomic<double>* a, double v) {
  a->store(a->load(std::memory_order_relaxed) + v, std::memory_order_relaxed);
}

inline double SecondsSince(absl::Time since) { return absl::ToDoubleSeconds(absl::Now() - since); }

// Routed tokens per expert per layer since the last heartbeat.
class LoadCounter {
 public:
  void Add(int64_t layer, int64_t num_experts, const std::vector<int32_t>& ids) {
    std::lock_guard<std::mutex> l(mu_);
    auto& v = counts_[layer];
    if (v.empty()) v.assign(num_experts, 0);
    for (int32_t e : ids) ++v[e];
  }
  std::map<int64_t, std::vector<int64_t>> Take() {
    std::lock_guard<std::mutex> l(mu_);
    return std::exchange(counts_, {});
  }

 private:
  std::mutex mu_;
  std::map<int64_t, std::vector<int64_t>> counts_;
};

struct StageStats {
  StageTimes times;
  LoadCounter load;
  std::atomic<int64_t> steps{0}, tokens{0}, active{0};  // active: sequences this stage holds
  absl::Time serving_since = absl::Now();              // set before the heartbeat thread starts
};

}  // namespace expertmesh::worker::runtime
