#include "launch/flags.h"

#include <vector>

#include "absl/flags/flag.h"

ABSL_FLAG(std::string, checkpoint, "", "checkpoint folder (config.json + safetensors shards + index)");
ABSL_FLAG(std::string, preset, "tiny", "model preset: tiny, small or deepseek-v3");
ABSL_FLAG(uint64_t, seed, 0, "random seed (weights for `checkpoint`, sampling for `generate`)");
ABSL_FLAG(bool, json, false, "print one JSON object instead of a table");

ABSL_FLAG(std::string, prompts, "", "JSON-lines file, one {\"tokens\":[ids...]} per prompt");
ABSL_FLAG(int64_t, max_new_tokens, 16, "tokens to generate per prompt");
ABSL_FLAG(double, temperature, 0.0, "sampling temperature; 0 = greedy");
ABSL_FLAG(int64_t, top_k, 0, "keep the k most likely tokens (0 = all)");
ABSL_FLAG(double, top_p, 1.0, "keep the smallest set of tokens whose probability reaches p (1 = all)");
ABSL_FLAG(std::vector<std::string>, stop_token_ids, {}, "comma-separated ids that end a sequence when generated");

ABSL_FLAG(int32_t, pp, 1, "pipeline stages");
ABSL_FLAG(int32_t, ep, 1, "expert-parallel (and attention data-parallel) ranks per stage");
ABSL_FLAG(int32_t, redundant_experts, 0, "extra expert slots per MoE layer for replicas of hot experts");
ABSL_FLAG(std::vector<std::string>, layers_per_stage, {},
          "explicit split, e.g. 2,2 (sums to num_hidden_layers); default: balanced by cost");
ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "host:port the coordinator serves gRPC on (port 0 picks a free one; 0.0.0.0 for other machines)");
ABSL_FLAG(std::string, journal, "",
          "coordinator journal file: accepted jobs survive a restart on the same file (empty: none)");
