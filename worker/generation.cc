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

absl::StatusOr<std::vector<GenerationResult>> RunGeneration(const std::vector<GenerationRequest>& reqs,
                                                            const StepFn& step, GenerationStats* stats) {
  const size_t n = reqs.size();
  std::vector<GenerationResult> results(n);
  GenerationStats st;
  std::vector<StepItem> items;
  for (size_t i = 0; i < n; ++i) {
    items.push_back({i, reqs[i].prompt.data(), static_cast<int64_t>(reqs[i].prompt.size())});
    st.prompt_tokens += static_cast<int64_t>(reqs[i].prompt.size());
  }
  std::vector<float> logits;
  double t0 = Now();
  if (n > 0) RETURN_IF_ERROR(step(items, &logits));  // prefill: every prompt in one step
  st.prefill_s = Now() - t0;
  const int64_t vocab = n > 0 ? static_cast<int64_t>(logits.size() / n) : 0;
  std::vector<int32_t> next(n, 0);
  // Samples request i's next token from `row`; true while it goes on.
  auto advance = [&](size_t i, const float* row) {
    next[i] = kernels::Sample(row, vocab, reqs[i].sampling, results[i].tokens.size());
    results[i].tokens.push_back(next[i]);
    const auto& stop = reqs[i].stop_token_ids;
    const bool stopped = std::find(stop.begin(), stop.end(), next[i]) != stop.end();
    return !stopped && static_cast<int64_t>(results[i].tokens.size()) < reqs[i].max_new_tokens;
  };
  std::vector<size_t> active;
  for (size_t i = 0; i < n; ++i) {
    const float* row = logits.data() + i * vocab;
    results[i].prefill_logits.assign(row, row + vocab);
    if (reqs[i].max_new_tokens > 0 && advance(i, row)) active.push_back(i);
  }
  t0 = Now();
  while (!active.empty()) {  // decode: one token per live request per step
    items.clear();
    for (size_t i : active) items.push_back({i, &next[i], 1});
    RETURN_IF_ERROR(step(items, &logits));
    ++st.decode_steps;
    std::vector<size_t> still;
    for (size_t j = 0; j < active.size(); ++j) {
      if (advance(active[j], logits.data() + j * vocab)) still.push_back(active[j]);
    }
    active.swap(still);
  }
  st.decode_s = Now() - t0;
  for (const auto& r : results) st.generated_tokens += static_cast<int64_t>(r.tokens.size());
  if (stats != nullptr) *stats = st;
  return results;
}

absl::StatusOr<std::vector<GenerationResult>> GenerateBatch(Engine* engine,
                                                            const std::vector<GenerationRequest>& reqs,
                                                            GenerationStats* stats) {
  std::vector<SequenceCache> caches(reqs.size());
  for (auto& c : caches) c = engine->NewCache();
  std::vector<Segment> segs;
  return RunGeneration(
      reqs,
      [&](const std::vector<StepItem>& items, std::vector<float>* logits) {
        segs.clear();
        for (const StepItem& it : items) segs.push_back({&caches[it.request], it.tokens, it.n});
        return engine->Forward(segs, logits);
      },
      stats);
}

}  // namespace expertmesh::worker
