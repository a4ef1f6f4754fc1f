#include "worker/generation.h"

#include <algorithm>
#include <chrono>

#include "common/status.h"

namespace expertmesh::worker {

namespace {
double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

absl::StatusOr<std::vector<GenerationResult>> GenerateBatch(Engine* engine,
                                                            const std::vector<GenerationRequest>& reqs,
                                                            GenerationStats* stats) {
  const size_t n = reqs.size();
  std::vector<GenerationResult> results(n);
  std::vector<SequenceCache> caches(n);
  for (auto& c : caches) c = engine->NewCache();
  GenerationStats st;
  // Prefill: every prompt in one batch.
  std::vector<Segment> segs;
  for (size_t i = 0; i < n; ++i) {
    segs.push_back({&caches[i], reqs[i].prompt.data(), static_cast<int64_t>(reqs[i].prompt.size())});
    st.prompt_tokens += static_cast<int64_t>(reqs[i].prompt.size());
  }
  std::vector<float> logits;
  double t0 = Now();
  if (n > 0) RETURN_IF_ERROR(engine->Forward(segs, &logits));
  st.prefill_s = Now() - t0;
  const int64_t vocab = n > 0 ? static_cast<int64_t>(logits.size() / n) : 0;
  std::vector<int32_t> next(n, 0);
  std::vector<size_t> active;
  for (size_t i = 0; i < n; ++i) {
    const float* row = logits.data() + i * vocab;
    results[i].prefill_logits.assign(row, row + vocab);
    if (reqs[i].max_new_tokens == 0) continue;
    next[i] = kernels::Sample(row, vocab, reqs[i].sampling, 0);
    results[i].tokens.push_back(next[i]);
    const auto& stop = reqs[i].stop_token_ids;
    const bool stopped = std::find(stop.begin(), stop.end(), next[i]) != stop.end();
    if (!stopped && reqs[i].max_new_tokens > 1) active.push_back(i);
  }
  // Decode: one token per active sequence per step.
  t0 = Now();
  while (!active.empty()) {
    segs.clear();
    for (size_t i : active) segs.push_back({&caches[i], &next[i], 1});
    RETURN_IF_ERROR(engine->Forward(segs, &logits));
    ++st.decode_steps;
    std::vector<size_t> still;
    for (size_t j = 0; j < active.size(); ++j) {
      const size_t i = active[j];
      const uint64_t step = results[i].tokens.size();
      next[i] = kernels::Sample(logits.data() + j * vocab, vocab, reqs[i].sampling, step);
      results[i].tokens.push_back(next[i]);
      const auto& stop = reqs[i].stop_token_ids;
      const bool stopped = std::find(stop.begin(), stop.end(), next[i]) != stop.end();
      if (!stopped && static_cast<int64_t>(results[i].tokens.size()) < reqs[i].max_new_tokens) still.push_back(i);
    }
    active.swap(still);
  }
  st.decode_s = Now() - t0;
  for (const auto& r : results) st.generated_tokens += static_cast<int64_t>(r.tokens.size());
  if (stats != nullptr) *stats = st;
  return results;
}

}  // namespace expertmesh::worker
