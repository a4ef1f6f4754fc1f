// What a deployment serves: request shape (prompt length, prefix-cache hits,
// output length), the routed-expert load distribution, latency SLOs and the
// daily token volume for fleet sizing. YAML format in docs/PLANNER.md;
// examples in examples/workloads/.
//
//   ASSIGN_OR_RETURN(Workload w, LoadWorkloadFile("examples/workloads/chat.yaml"));
//   ASSIGN_OR_RETURN(auto loads, w.expert_load.Loads(/*layers=*/58, /*experts=*/256));
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace expertmesh::topology {

struct LoadDistribution {
  enum class Kind { kUniform, kZipf, kFile };
  Kind kind = Kind::kUniform;
  double zipf_exponent = 1.0;  // expert of popularity rank r gets weight 1 / r^s
  uint64_t seed = 1;           // per-layer shuffles of the Zipf ranks
  std::string file;            // per-expert load file (kFile)
  std::vector<std::vector<double>> file_layers;  // its contents

  // Loads of each MoE layer, each summing to 1 (fraction of token-copies per
  // expert). A file with one layer applies to every layer; otherwise its layer
  // count must equal num_moe_layers.
  absl::StatusOr<std::vector<std::vector<double>>> Loads(int64_t num_moe_layers, int64_t num_experts) const;
  std::string Describe() const;
};

// Reads the runtime's per-expert load report: {"layers": [[count per expert], ...]}.
absl::StatusOr<std::vector<std::vector<double>>> LoadExpertLoadJson(const std::string& path);

struct Workload {
  std::string name;
  std::string description;
  std::string phase = "decode";         // prefill | decode | both (what `plan` evaluates by default)
  int64_t prompt_tokens = 4096;         // mean prompt length, cached prefix included
  double cache_hit_rate = 0.0;          // fraction of prompt tokens found in the prefix cache (not computed)
  int64_t output_tokens = 1024;         // mean generated tokens per request
  int64_t decode_context_tokens = 0;    // mean KV length seen by a decode step; 0: prompt + output / 2
  LoadDistribution expert_load;
  double max_ttft_ms = 0;               // SLOs; 0: none
  double max_tpot_ms = 0;
  double daily_input_tokens = 0;        // fleet sizing: prompt tokens per day (cache hits included)
  double daily_output_tokens = 0;
  // Compute/communication overlap of the runtime's step:
  //  kTwoMicroBatch: two micro-batches alternate per layer, each slot the max of
  //    one's compute piece and the other's all-to-all (DeepSeek's prefill and
  //    its decode profile);
  //  kFiveStage: decode split into finer stages (DeepSeek's production decode)
  //    so a layer takes the largest of the total compute, the total all-to-all
  //    and one micro-batch's dependency chain; prefill runs kTwoMicroBatch;
  //  kNone: one batch, compute and all-to-all in sequence.
  enum class Overlap { kTwoMicroBatch, kFiveStage, kNone };
  Overlap overlap = Overlap::kTwoMicroBatch;
  bool two_micro_batch_overlap() const { return overlap != Overlap::kNone; }
  std::string kv_cache_dtype = "bf16";  // bf16 | fp8 (FlashMLA layout: 656 B per token per layer at V3 size) | fp32 (CPU)

  int64_t DecodeContext() const {
    return decode_context_tokens > 0 ? decode_context_tokens : prompt_tokens + output_tokens / 2;
  }
  // Prompt tokens that are computed (not cache hits), and the cached prefix.
  double NewPromptTokens() const { return static_cast<double>(prompt_tokens) * (1.0 - cache_hit_rate); }
  double CachedPromptTokens() const { return static_cast<double>(prompt_tokens) * cache_hit_rate; }
};

// `base_dir` resolves a relative expert-load file path.
absl::StatusOr<Workload> ParseWorkloadYaml(const std::string& text, const std::string& source,
                                           const std::string& base_dir);
absl::StatusOr<Workload> LoadWorkloadFile(const std::string& path);

}  // namespace expertmesh::topology
