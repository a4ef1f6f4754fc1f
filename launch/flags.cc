#include "launch/flags.h"

#include "absl/flags/flag.h"

ABSL_FLAG(std::string, checkpoint, "", "checkpoint folder (config.json + safetensors shards + index)");
ABSL_FLAG(std::string, preset, "tiny", "model preset: tiny, small or deepseek-v3");
ABSL_FLAG(uint64_t, seed, 0, "random seed (weights for `checkpoint`, sampling for `generate`)");
ABSL_FLAG(bool, json, false, "print one JSON object instead of a table");
