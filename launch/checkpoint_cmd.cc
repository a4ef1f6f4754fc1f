// expertmesh checkpoint: writes a random checkpoint in the HF DeepSeek-V3 layout.
#include <cstdio>
#include <filesystem>
#include <string>

#include "absl/flags/flag.h"
#include "common/checkpoint.h"
#include "common/config.h"
#include "common/gguf.h"
#include "common/tokenizer.h"
#include "launch/flags.h"
#include "launch/text.h"
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
ABSL_FLAG(std::string, gguf, "",
          "also write the checkpoint as a GGUF file of llama.cpp's deepseek2 architecture (F32 from fp32, BF16 from "
          "bf16; fp8 weights dequantised to BF16; a placeholder vocabulary: drive llama.cpp with token ids). With "
          "--checkpoint DIR (and no --out): convert that existing checkpoint instead of generating one");

namespace expertmesh::launch {

namespace {
int WriteGguf(const std::string& dir) {
  GgufConvertOptions go;
  go.progress = [](const std::string& m) { std::fprintf(stderr, "checkpoint: gguf: %s\n", m.c_str()); };
  absl::Status s = ConvertCheckpointToGguf(dir, absl::GetFlag(FLAGS_gguf), go);
  if (!s.ok()) {
    std::fprintf(stderr, "expertmesh checkpoint: --gguf: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  std::fprintf(stderr, "checkpoint: gguf: done: %s\n", absl::GetFlag(FLAGS_gguf).c_str());
  return 0;
}
}  // namespace

int CheckpointMain(int argc, char** argv) {
  ParseVerbFlags(argc, argv);
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty() && !absl::GetFlag(FLAGS_gguf).empty() && !absl::GetFlag(FLAGS_checkpoint).empty()) {
    return WriteGguf(absl::GetFlag(FLAGS_checkpoint));  // convert an existing checkpoint
  }
  if (out.empty()) {
    std::fprintf(stderr, "expertmesh checkpoint: --out DIR is required (or --checkpoint DIR --gguf FILE to convert "
                         "an existing checkpoint)\n");
    return 2;
  }
  const std::string cfg_src = absl::GetFlag(FLAGS_config).empty() ? absl::GetFlag(FLAGS_preset)
                                                                  : absl::GetFlag(FLAGS_config);
  auto cfg = ModelConfig::FromPresetOrPath(cfg_src);
  if (!cfg.ok()) {
    std::fprintf(stderr, "expertmesh checkpoint: %s\n", std::string(cfg.status().message()).c_str());
    return 2;
  }
  // --tokenizer: checked before writing weights (its vocabulary must fit the model's).
  std::string tokenizer_dir;
  if (!absl::GetFlag(FLAGS_tokenizer).empty()) {
    auto dir = ResolveTokenizerDir(absl::GetFlag(FLAGS_tokenizer));
    if (!dir.ok()) {
      std::fprintf(stderr, "expertmesh checkpoint: %s\n", std::string(dir.status().message()).c_str());
      return 2;
    }
    auto tok = Tokenizer::FromDir(*dir);
    if (!tok.ok()) {
      std::fprintf(stderr, "expertmesh checkpoint: %s\n", std::string(tok.status().message()).c_str());
      return 2;
    }
    if ((*tok)->vocab_size() > cfg->vocab_size) {
      std::fprintf(stderr,
                   "expertmesh checkpoint: the tokenizer has %d tokens but vocab_size is %lld; use a preset whose "
                   "vocabulary fits it (tiny-text, deepseek-v3; tiny-qwen2-text or r1-distill-qwen-* for qwen2.5 / "
                   "qwen3 / r1-distill-qwen; tiny-llama-text or r1-distill-llama-* for llama3.1 / llama3 / "
                   "r1-distill-llama) or --config\n",
                   (*tok)->vocab_size(), static_cast<long long>(cfg->vocab_size));
      return 2;
    }
    tokenizer_dir = *dir;
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
  if (!tokenizer_dir.empty()) {
    namespace fs = std::filesystem;
    for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
      const fs::path src = fs::path(tokenizer_dir) / f;
      if (!fs::exists(src)) continue;
      std::error_code ec;
      fs::copy_file(src, fs::path(out) / f, fs::copy_options::overwrite_existing, ec);
      if (ec) {
        std::fprintf(stderr, "expertmesh checkpoint: copying %s: %s\n", src.c_str(), ec.message().c_str());
        return 1;
      }
    }
    std::fprintf(stderr, "checkpoint: tokenizer from %s\n", tokenizer_dir.c_str());
  }
  std::fprintf(stderr, "checkpoint: done: %s\n", out.c_str());
  if (!absl::GetFlag(FLAGS_gguf).empty()) return WriteGguf(out);
  return 0;
}

}  // namespace expertmesh::launch
