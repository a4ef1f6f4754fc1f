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
};

struct GenerationStats {
  int64_t prompt_tokens = 0, generated_tokens = 0, decode_steps = 0;
  double prefill_s = 0, decode_s = 0;
};

// Runs all requests to completion. Requests must be validated (ValidatePrompt).
absl::StatusOr<std::vector<GenerationResult>> GenerateBatch(Engine* engine,
                                                            const std::vector<GenerationRequest>& requests,
                                                            GenerationStats* stats = nullptr);

}  // namespace expertmesh::worker
