// Validation of SubmitJob requests. Every error is INVALID_ARGUMENT and names
// the offending field the way a client wrote it, e.g.
//   "sequences[3].tokens[7]: 130000 is out of range [0, 129280)".
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "proto/expertmesh.pb.h"

namespace expertmesh::coordinator {

struct JobLimits {
  int64_t vocab_size = 0;               // token ids lie in [0, vocab_size)
  int64_t max_position_embeddings = 0;  // prompt + max_new_tokens <= this
  int64_t max_sequences_per_job = 0;
  int64_t max_client_request_id_bytes = 256;
};

// Checks one sequence; `field` prefixes messages ("sequences[3]").
absl::Status ValidateSequence(const v1::SequenceRequest& seq, const JobLimits& limits, const std::string& field);

// Checks the whole request: batch size, client_request_id, every sequence.
absl::Status ValidateSubmitJob(const v1::SubmitJobRequest& request, const JobLimits& limits);

}  // namespace expertmesh::coordinator
