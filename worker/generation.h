// Batched generation on one process: all sequences prefill together, then
// decode one token per sequence per step with the latent KV cache; finished
// sequences leave the batch. Sampling of a sequence depends only on its own
// seed and step, so it is the same in any batch and under any plan.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cpu/kernels.h"
#include "worker/model.h"
#include "worker/mtp.h"

namespace expertmesh::worker {

struct GenerationRequest {
  std::vector<int32_t> prompt;
  int64_t max_new_tokens = 16;
  kernels::SamplingParams sampling;
  std::vector<int32_t> stop_token_ids;  // generation ends after emitting one of these
};

struct GenerationResult {
  std::vector<int32_t> tokens;   // generated ids only
  std::vector<float> prefill_logits;  // logits after the prompt's last token [vocab]
  // Speculative decoding with keep_mtp_logits only: the MTP module's logits
  // at every prompt position i (predicting t_{i+2}; the last row uses the
  // first generated token as t_{i+1}), [prompt length, vocab].
  std::vector<float> mtp_prompt_logits;
};

struct GenerationStats {
  int64_t prompt_tokens = 0, generated_tokens = 0, decode_steps = 0;
  double prefill_s = 0, decode_s = 0;
};

// One step's work for one request: n new tokens (the whole prompt at first,
// then the last sampled token).
struct StepItem {
  size_t request = 0;  // index into the requests
  const int32_t* tokens = nullptr;
  int64_t n = 0;
};
// Runs one step of an engine for `items` (each request at most once) and
// returns the logits after each item's last token, [items, vocab].
using StepFn = std::function<absl::Status(const std::vector<StepItem>& items, std::vector<float>* logits)>;

// OK when every value of a logits row is finite; else FAILED_PRECONDITION
// naming the prompt (its index in the batch), the generation step (0: the
// token after the prompt) and what to check. Sampling a NaN row would give
// token 0 (greedy argmax) and look like success; every sampling site of the
// generators below checks first, and the whole batch fails on the first bad
// row (no results: a NaN weight poisons every sequence that reaches it).
absl::Status CheckLogitsFinite(const float* row, int64_t vocab, size_t prompt, int64_t step);
// True when every one of the n values is finite (no NaN, no inf).
bool AllFinite(const float* values, int64_t n);

// The scheduling of a batch, independent of the engine: every prompt in one
// prefill step, then one token per live request per step until each reaches
// max_new_tokens or emits a stop token. Requests must be validated.
absl::StatusOr<std::vector<GenerationResult>> RunGeneration(const std::vector<GenerationRequest>& requests,
                                                            const StepFn& step, GenerationStats* stats = nullptr);

// RunGeneration on the CPU engine, one latent cache per request.
absl::StatusOr<std::vector<GenerationResult>> GenerateBatch(Engine* engine,
                                                            const std::vector<GenerationRequest>& requests,
                                                            GenerationStats* stats = nullptr);

// Speculative decoding with the MTP module, one draft token per sequence and
// step: the main model verifies [last token, draft] in one forward; the draft
// is accepted when it equals the token the main model samples at its
// position (greedy: the argmax; with temperature the same seeded draw as
// plain generation), so the tokens are those of GenerateBatch (up to float
// rounding of the different batch shapes, which matters only at near-ties).
// A rejected draft's main-cache entry is truncated; the MTP cache only ever
// receives verified positions. Sequences with one token left verify no draft.
struct SpeculativeStats {
  int64_t drafts = 0;          // draft tokens the main model verified
  int64_t accepted = 0;        // of which it accepted
  int64_t sequence_steps = 0;  // sum over decode steps of the sequences in the step
  int64_t decode_tokens = 0;   // tokens emitted by decode steps
  double acceptance_rate() const { return drafts > 0 ? static_cast<double>(accepted) / drafts : 0.0; }
  // Tokens per sequence per main-model decode step (1 without speculation).
  double tokens_per_step() const {
    return sequence_steps > 0 ? static_cast<double>(decode_tokens) / sequence_steps : 0.0;
  }
};

absl::StatusOr<std::vector<GenerationResult>> GenerateBatchSpeculative(
    Engine* engine, const MtpModule* mtp, const std::vector<GenerationRequest>& requests,
    GenerationStats* stats = nullptr, SpeculativeStats* spec_stats = nullptr, bool keep_mtp_logits = false);

}  // namespace expertmesh::worker
