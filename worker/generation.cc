#include "worker/generation.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"

#include "common/status.h"

namespace expertmesh::worker {

namespace {
double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

bool AllFinite(const float* values, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::isfinite(values[i]);  // no early exit: the common case scans it all
  return ok;
}

absl::Status CheckLogitsFinite(const float* row, int64_t vocab, size_t prompt, int64_t step) {
  if (AllFinite(row, vocab)) return absl::OkStatus();
  for (int64_t v = 0; v < vocab; ++v) {
    if (!std::isfinite(row[v])) {
      return absl::FailedPreconditionError(absl::StrCat(
          "prompt ", prompt, ", step ", step, ": the model's logits are not finite (NaN or inf: the logit of token ",
          v, " is ", row[v], "): the checkpoint's weights or weight_scale_inv hold NaN/inf values"));
    }
  }
  return absl::OkStatus();
}

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
  // Samples request i's next token from `row` into *goes_on (true while it
  // goes on); an error when the row is not finite.
  auto advance = [&](size_t i, const float* row, bool* goes_on) -> absl::Status {
    const size_t step_i = results[i].tokens.size();
    RETURN_IF_ERROR(CheckLogitsFinite(row, vocab, i, static_cast<int64_t>(step_i)));
    next[i] = kernels::Sample(row, vocab, reqs[i].sampling, step_i);
    results[i].tokens.push_back(next[i]);
    const auto& stop = reqs[i].stop_token_ids;
    const bool stopped = std::find(stop.begin(), stop.end(), next[i]) != stop.end();
    *goes_on = !stopped && static_cast<int64_t>(results[i].tokens.size()) < reqs[i].max_new_tokens;
    return absl::OkStatus();
  };
  std::vector<size_t> active;
  for (size_t i = 0; i < n; ++i) {
    const float* row = logits.data() + i * vocab;
    results[i].prefill_logits.assign(row, row + vocab);
    bool goes_on = false;
    if (reqs[i].max_new_tokens > 0) RETURN_IF_ERROR(advance(i, row, &goes_on));
    if (goes_on) active.push_back(i);
  }
  t0 = Now();
  while (!active.empty()) {  // decode: one token per live request per step
    items.clear();
    for (size_t i : active) items.push_back({i, &next[i], 1});
    RETURN_IF_ERROR(step(items, &logits));
    ++st.decode_steps;
    std::vector<size_t> still;
    for (size_t j = 0; j < active.size(); ++j) {
      bool goes_on = false;
      RETURN_IF_ERROR(advance(active[j], logits.data() + j * vocab, &goes_on));
      if (goes_on) still.push_back(active[j]);
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

absl::StatusOr<std::vector<GenerationResult>> GenerateBatchSpeculative(Engine* engine, const MtpModule* mtp,
                                                                       const std::vector<GenerationRequest>& reqs,
                                                                       GenerationStats* stats,
                                                                       SpeculativeStats* spec_stats,
                                                                       bool keep_mtp_logits) {
  const ModelConfig& cfg = mtp->config();
  const int64_t H = cfg.hidden_size, V = cfg.vocab_size;
  const size_t n = reqs.size();
  std::vector<GenerationResult> results(n);
  GenerationStats st;
  SpeculativeStats sp;
  std::vector<SequenceCache> main_cache(n), mtp_cache(n);
  for (size_t i = 0; i < n; ++i) {
    main_cache[i] = engine->NewCache();
    mtp_cache[i] = mtp->NewCache();
    st.prompt_tokens += static_cast<int64_t>(reqs[i].prompt.size());
  }
  std::vector<int32_t> last(n, 0);    // the last emitted token (not yet in the main cache)
  std::vector<int32_t> draft(n, -1);  // the MTP's proposal for the token after `last` (-1: none)
  auto remaining = [&](size_t i) { return reqs[i].max_new_tokens - static_cast<int64_t>(results[i].tokens.size()); };
  // Emits token t for request i; true while it goes on.
  auto emit = [&](size_t i, int32_t t) {
    results[i].tokens.push_back(t);
    last[i] = t;
    const auto& stop = reqs[i].stop_token_ids;
    return std::find(stop.begin(), stop.end(), t) == stop.end() && remaining(i) > 0;
  };
  auto argmax = [](const float* row, int64_t v) {
    return static_cast<int32_t>(std::max_element(row, row + v) - row);
  };

  // MTP inputs of one step: per request, the verified positions' main hidden
  // rows and their next tokens.
  struct MtpItem {
    size_t request;
    std::array<int32_t, 2> next;
    int64_t n;
  };
  std::vector<float> mtp_hidden, mtp_out, logits;
  std::vector<int32_t> prompt_next;  // prefill: t_{i+1} for every prompt position, all requests
  // Runs the MTP on `items` (hidden rows in mtp_hidden, same order) and sets
  // each request's draft to the argmax at its last position.
  auto run_mtp = [&](const std::vector<MtpItem>& items, const std::vector<const int32_t*>& toks,
                     bool keep) -> absl::Status {
    if (items.empty()) return absl::OkStatus();
    std::vector<Segment> segs;
    for (size_t k = 0; k < items.size(); ++k) segs.push_back({&mtp_cache[items[k].request], toks[k], items[k].n});
    RETURN_IF_ERROR(mtp->Forward(engine, segs, mtp_hidden.data(), &mtp_out));
    int64_t row = 0;
    std::vector<float> lastrows;
    for (const auto& it : items) {
      if (keep) {
        mtp->Logits(mtp_out.data() + row * H, it.n, &logits);
        results[it.request].mtp_prompt_logits = logits;
      }
      row += it.n;
      lastrows.insert(lastrows.end(), mtp_out.begin() + (row - 1) * H, mtp_out.begin() + row * H);
    }
    mtp->Logits(lastrows.data(), static_cast<int64_t>(items.size()), &logits);
    for (size_t k = 0; k < items.size(); ++k) draft[items[k].request] = argmax(logits.data() + k * V, V);
    return absl::OkStatus();
  };

  // Prefill: every prompt in one main step, then the MTP over every prompt position.
  std::vector<size_t> active;
  double t0 = Now();
  if (n > 0) {
    std::vector<Segment> segs;
    for (size_t i = 0; i < n; ++i) {
      segs.push_back({&main_cache[i], reqs[i].prompt.data(), static_cast<int64_t>(reqs[i].prompt.size())});
    }
    std::vector<float> normed;
    RETURN_IF_ERROR(engine->ForwardHidden(segs, &normed));
    std::vector<float> lastrows;
    int64_t row = 0;
    for (size_t i = 0; i < n; ++i) {
      row += static_cast<int64_t>(reqs[i].prompt.size());
      lastrows.insert(lastrows.end(), normed.begin() + (row - 1) * H, normed.begin() + row * H);
    }
    engine->HeadRows(lastrows.data(), static_cast<int64_t>(n), &logits);
    std::vector<int32_t> first(n);
    std::vector<bool> needs_mtp(n, false);
    for (size_t i = 0; i < n; ++i) {
      const float* r = logits.data() + i * V;
      results[i].prefill_logits.assign(r, r + V);
      if (reqs[i].max_new_tokens > 0) RETURN_IF_ERROR(CheckLogitsFinite(r, V, i, 0));
      first[i] = kernels::Sample(r, V, reqs[i].sampling, 0);
      const bool goes_on = reqs[i].max_new_tokens > 0 && emit(i, first[i]);
      if (goes_on) active.push_back(i);
      needs_mtp[i] = keep_mtp_logits || (goes_on && remaining(i) >= 2);
    }
    std::vector<MtpItem> items;
    std::vector<const int32_t*> toks;
    for (size_t i = 0; i < n; ++i) {
      const auto& p = reqs[i].prompt;
      if (needs_mtp[i]) {
        items.push_back({i, {0, 0}, static_cast<int64_t>(p.size())});
        prompt_next.insert(prompt_next.end(), p.begin() + 1, p.end());
        prompt_next.push_back(first[i]);
      }
    }
    row = 0;
    int64_t off = 0, mrow = 0;
    mtp_hidden.resize(prompt_next.size() * H);
    for (size_t i = 0; i < n; ++i) {
      const int64_t len = static_cast<int64_t>(reqs[i].prompt.size());
      if (needs_mtp[i]) {
        std::memcpy(mtp_hidden.data() + mrow * H, normed.data() + row * H, len * H * sizeof(float));
        toks.push_back(prompt_next.data() + off);
        off += len;
        mrow += len;
      }
      row += len;
    }
    RETURN_IF_ERROR(run_mtp(items, toks, keep_mtp_logits));
  }
  st.prefill_s = Now() - t0;

  // Decode: verify [last, draft] (or [last] when one token is left), accept or
  // roll back, then let the MTP propose the next draft.
  t0 = Now();
  std::vector<std::array<int32_t, 2>> buf(n);
  while (!active.empty()) {
    std::vector<Segment> segs;
    for (size_t i : active) {
      const bool with_draft = draft[i] >= 0 && remaining(i) >= 2;
      if (!with_draft) draft[i] = -1;
      buf[i] = {last[i], std::max(draft[i], 0)};
      segs.push_back({&main_cache[i], buf[i].data(), with_draft ? 2 : 1});
    }
    std::vector<float> normed;
    RETURN_IF_ERROR(engine->ForwardHidden(segs, &normed));
    engine->HeadRows(normed.data(), static_cast<int64_t>(normed.size()) / H, &logits);
    ++st.decode_steps;
    sp.sequence_steps += static_cast<int64_t>(active.size());
    std::vector<size_t> still;
    std::vector<MtpItem> items;
    mtp_hidden.clear();
    int64_t row = 0;
    for (size_t k = 0; k < active.size(); ++k) {
      const size_t i = active[k];
      const int64_t seg_n = segs[k].n;
      const int32_t d = draft[i];
      const size_t before = results[i].tokens.size();
      RETURN_IF_ERROR(CheckLogitsFinite(logits.data() + row * V, V, i, static_cast<int64_t>(before)));
      const int32_t x = kernels::Sample(logits.data() + row * V, V, reqs[i].sampling, before);
      bool goes_on = emit(i, x);
      MtpItem it{i, {x, 0}, 1};
      if (d >= 0) {
        ++sp.drafts;
        if (x == d) {
          ++sp.accepted;
          if (goes_on) {  // the draft's logits are valid: one more token from this step
            RETURN_IF_ERROR(
                CheckLogitsFinite(logits.data() + (row + 1) * V, V, i, static_cast<int64_t>(before + 1)));
            const int32_t y = kernels::Sample(logits.data() + (row + 1) * V, V, reqs[i].sampling, before + 1);
            goes_on = emit(i, y);
            it.next[1] = y;
            it.n = 2;
          }
        } else {
          main_cache[i].Truncate(main_cache[i].length - 1);  // drop the rejected draft's entry
        }
      }
      sp.decode_tokens += static_cast<int64_t>(results[i].tokens.size() - before);
      draft[i] = -1;
      if (goes_on) {
        still.push_back(i);
        if (remaining(i) >= 2) {  // a draft is worth proposing
          mtp_hidden.insert(mtp_hidden.end(), normed.begin() + row * H, normed.begin() + (row + it.n) * H);
          items.push_back(it);
        }  // else: one token left, verified without a draft; the MTP cache may fall behind
      }
      row += seg_n;
    }
    std::vector<const int32_t*> toks;
    for (auto& it : items) toks.push_back(it.next.data());
    RETURN_IF_ERROR(run_mtp(items, toks, false));
    active.swap(still);
  }
  st.decode_s = Now() - t0;
  for (const auto& r : results) st.generated_tokens += static_cast<int64_t>(r.tokens.size());
  if (stats != nullptr) *stats = st;
  if (spec_stats != nullptr) *spec_stats = sp;
  return results;
}

}  // namespace expertmesh::worker
