// expertmesh checkpoint: writes a random checkpoint in the HF DeepSeek-V3 layout.
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "common/checkpoint.h"
#include "common/config.h"
#include "launch/flags.h"
#include "launch/verbs.h"

ABSL_FLAG(std::string, dtype, "fp32",
          "weight dtype: fp32, bf16, or fp8 (e4m3 linear weights with one fp32 scale per 128x128 block; "
          "norms, router, embeddings and heads in bf16)");
ABSL_FLAG(std::string, out, "", "output folder (created if missing)");
ABSL_FLAG(std::string, config, "", "optional config.json to use instead of --preset");
ABSL_FLAG(uint64_t, shard_size, 5ull << 30, "maximum bytes per safetensors shard");
ABSL_FLAG(double, router_bias_std, 0.05,
          "standard deviation of the routers' e_score_correction_bias; larger values make some experts hot "
          "(skewed expert load, e.g. 0.3 for rebalancing studies)");

namespace expertmesh::launch {

int CheckpointMain(int argc, char** argv) {
  ParseVerbFlags(argc, argv);
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) {
    std::fprintf(stderr, "expertmesh checkpoint: --out DIR is required\n");
    return 2;
  }
  const std::string cfg_src = absl::GetFlag(FLAGS_config).empty() ? absl::GetFlag(FLAGS_preset)
                                                                  : absl::GetFlag(FLAGS_config);
  auto cfg = ModelConfig::FromPresetOrPath(cfg_src);
  if (!cfg.ok()) {
    std::fprintf(stderr, "expertmesh checkpoint: %s\n", std::string(cfg.status().message()).c_str());
    return 2;
  }
  GenerateOptions o;
  o.out_dir = out;
  o.dtype = absl::GetFlag(FLAGS_dtype);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.shard_size_bytes = absl::GetFlag(FLAGS_shard_size);
  o.router_bias_std = static_cast<float>(absl::GetFlag(FLAGS_router_bias_std));
  if (!(o.router_bias_std >= 0)) {
    std::fprintf(stderr, "expertmesh checkpoint: --router-bias-std must be >= 0\n");
    return 2;
  }
  o.progress = [](const std::string& m) { std::fprintf(stderr, "checkpoint: %s\n", m.c_str()); };
  absl::Status s = GenerateCheckpoint(*cfg, o);
  if (!s.ok()) {
    std::fprintf(stderr, "expertmesh checkpoint: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  std::fprintf(stderr, "checkpoint: done: %s\n", out.c_str());
  return 0;
}

}  // namespace expertmesh::launch
