// Messages between the pipeline stages of one lane (EP rank r of every stage).
//
// Stage 0 sends a MicroBatch to stage 1, which forwards it (with its own
// hidden states) to stage 2, ...; the last stage samples and sends a Return
// back to stage 0. Every micro-batch gets exactly one Return. Every stage's
// EP ranks see the same kind of micro-batch at the same tick (stage 0 decides
// collectively), so MoE all-to-alls stay in lockstep, also with zero tokens.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace expertmesh::worker::runtime {

enum class BatchKind : uint32_t {
  kWork = 0,   // run the layers (segments may be empty on this lane)
  kIdle = 1,   // keep-alive: no compute, no all-to-all
  kStop = 2,   // shut down after forwarding
};

struct SegmentMeta {
  uint64_t key = 0;        // the sequence, unique within the lane
  int64_t start = 0;       // position of the first new token (= tokens cached)
  int64_t n = 0;           // new tokens in this micro-batch
  // Sampling of the token that follows (used by the last stage).
  float temperature = 0, top_p = 1;
  int64_t top_k = 0;
  uint64_t seed = 0;
  uint64_t step = 0;       // tokens generated so far
  // 0: a prefill chunk that is not the prompt's last (chunked prefill): the
  // last stage returns no sampled token for it (token 0, ignored by stage 0).
  uint32_t sample = 1;
  uint32_t reserved = 0;   // keeps the struct free of padding (sent as bytes)
};

struct MicroBatch {
  BatchKind kind = BatchKind::kWork;
  uint64_t tick = 0;
  // The expert placement version this micro-batch runs with: a later stage
  // switches to it (from its staged experts) before running its layers.
  int64_t placement_version = 1;
  std::vector<uint64_t> release;      // sequences whose caches can be freed
  std::vector<SegmentMeta> segments;
  std::vector<int32_t> tokens;        // the segments' new tokens (for stage 0 only; not sent)
  std::vector<float> hidden;          // [sum n, hidden_size]
};

// A Return token for a key whose logits row on the last stage was not finite
// (NaN or inf): stage 0 fails that sequence (FINISH_REASON_ERROR).
inline constexpr int32_t kNonFiniteLogitsToken = -1;

struct Return {
  BatchKind kind = BatchKind::kWork;
  uint64_t tick = 0;
  std::vector<uint64_t> keys;
  std::vector<int32_t> tokens;        // the sampled next token of each key
};

std::string Encode(const MicroBatch& mb);                       // hidden included, tokens not
absl::StatusOr<MicroBatch> DecodeMicroBatch(const std::string& bytes, int64_t hidden_size);
std::string Encode(const Return& r);
absl::StatusOr<Return> DecodeReturn(const std::string& bytes);

}  // namespace expertmesh::worker::runtime
