#include "coordinator/validation.h"

#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"

namespace expertmesh::coordinator {
namespace {

absl::Status Invalid(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

}  // namespace

absl::Status ValidateSequence(const v1::SequenceRequest& seq, const JobLimits& limits, const std::string& field) {
  if (seq.tokens_size() == 0) return Invalid(field + ".tokens", "empty prompt; give at least one token id");
  for (int i = 0; i < seq.tokens_size(); ++i) {
    const int64_t t = seq.tokens(i);
    if (t < 0 || t >= limits.vocab_size) {
      return Invalid(absl::StrCat(field, ".tokens[", i, "]"),
                     absl::StrCat(t, " is out of range [0, ", limits.vocab_size, ")"));
    }
  }
  if (seq.max_new_tokens() < 1) {
    return Invalid(field + ".max_new_tokens", absl::StrCat(seq.max_new_tokens(), " must be >= 1"));
  }
  const int64_t total = static_cast<int64_t>(seq.tokens_size()) + seq.max_new_tokens();
  if (total > limits.max_position_embeddings) {
    return Invalid(field + ".max_new_tokens",
                   absl::StrCat("prompt (", seq.tokens_size(), " tokens) + max_new_tokens (", seq.max_new_tokens(),
                                ") = ", total, " exceeds the context of ", limits.max_position_embeddings,
                                " positions (max_position_embeddings)"));
  }
  if (seq.has_sampling()) {
    const v1::SamplingParams& s = seq.sampling();
    if (!std::isfinite(s.temperature()) || s.temperature() < 0) {
      return Invalid(field + ".sampling.temperature",
                     absl::StrCat(s.temperature(), " must be a finite number >= 0 (0 = greedy)"));
    }
    if (s.top_k() < 0) {
      return Invalid(field + ".sampling.top_k", absl::StrCat(s.top_k(), " must be >= 0 (0 = no top-k filter)"));
    }
    if (std::isnan(s.top_p()) || s.top_p() < 0 || s.top_p() > 1) {
      return Invalid(field + ".sampling.top_p",
                     absl::StrCat(s.top_p(), " must lie in (0, 1] (0 is read as 1, no top-p filter)"));
    }
  }
  for (int i = 0; i < seq.stop_token_ids_size(); ++i) {
    const int64_t t = seq.stop_token_ids(i);
    if (t < 0 || t >= limits.vocab_size) {
      return Invalid(absl::StrCat(field, ".stop_token_ids[", i, "]"),
                     absl::StrCat(t, " is out of range [0, ", limits.vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateSubmitJob(const v1::SubmitJobRequest& request, const JobLimits& limits) {
  if (request.sequences_size() == 0) return Invalid("sequences", "empty batch; give at least one sequence");
  if (request.sequences_size() > limits.max_sequences_per_job) {
    return Invalid("sequences", absl::StrCat(request.sequences_size(), " sequences exceed the limit of ",
                                             limits.max_sequences_per_job, " per job; split the batch"));
  }
  if (static_cast<int64_t>(request.client_request_id().size()) > limits.max_client_request_id_bytes) {
    return Invalid("client_request_id", absl::StrCat(request.client_request_id().size(), " bytes exceed the limit of ",
                                                     limits.max_client_request_id_bytes));
  }
  for (int i = 0; i < request.sequences_size(); ++i) {
    absl::Status s = ValidateSequence(request.sequences(i), limits, absl::StrCat("sequences[", i, "]"));
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace expertmesh::coordinator
