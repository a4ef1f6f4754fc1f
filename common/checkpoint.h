// The tensors of a DeepSeek-V3 checkpoint (HF names and shapes), loading them
// as fp32 (dequantising bf16/f16 and fp8 with 128x128 block scales), and a
// generator of random checkpoints in exactly the HF layout.
//
//   auto spec = CheckpointSpec(cfg, ShardFilter{.layer_begin = 0, .layer_end = 2});
//   RETURN_IF_ERROR(ValidateCheckpoint(*ckpt, spec, cfg));   // all problems at once
//   ASSIGN_OR_RETURN(std::vector<float> w, LoadF32(*ckpt, spec[0], cfg));
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/config.h"
#include "common/safetensors.h"

namespace expertmesh {

struct TensorSpec {
  enum class Init { kNormal, kNorm, kBias };
  std::string name;
  std::vector<int64_t> shape;
  bool fp8 = false;   // a linear weight stored as F8_E4M3 + weight_scale_inv in fp8 checkpoints
  Init init = Init::kNormal;
  float std = 0.0f;   // for kNormal / kBias
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// Which part of the model a process needs. Layers in [layer_begin, layer_end)
// (layer_end < 0: through the last MTP layer); `expert(layer, e)` selects the
// routed experts to load (null: all).
struct ShardFilter {
  int64_t layer_begin = 0;
  int64_t layer_end = -1;
  bool embed = true;   // model.embed_tokens
  bool head = true;    // model.norm, lm_head
  std::function<bool(int64_t layer, int64_t expert)> expert;
};

std::vector<TensorSpec> CheckpointSpec(const ModelConfig& cfg, const ShardFilter& filter = {});

// Name of the block-scale tensor of an fp8 weight.
std::string ScaleName(const std::string& weight_name);

// Checks that every tensor of `spec` exists with its shape and a usable dtype
// (fp8 weights need a weight_scale_inv of shape [ceil(rows/br), ceil(cols/bc)]).
// Reports every problem in one message.
absl::Status ValidateCheckpoint(const ShardedCheckpoint& ckpt, const std::vector<TensorSpec>& spec,
                                const ModelConfig& cfg);

// Reads one tensor as fp32, dequantising fp8 block-scaled weights.
absl::StatusOr<std::vector<float>> LoadF32(const ShardedCheckpoint& ckpt, const TensorSpec& spec,
                                           const ModelConfig& cfg);
// The same into out[0, spec.numel()): one pass over the stored bytes (fp8
// codes decoded and scaled block by block), no temporary.
absl::Status LoadF32Into(const ShardedCheckpoint& ckpt, const TensorSpec& spec, const ModelConfig& cfg, float* out);

struct GenerateOptions {
  std::string out_dir;
  std::string dtype = "fp32";          // fp32 | bf16 | fp8
  uint64_t seed = 0;
  uint64_t shard_size_bytes = 5ull << 30;
  // Standard deviation of every MoE layer's gate.e_score_correction_bias
  // (negative: the spec's 0.05). Larger values make some experts hot: a
  // skewed routing load, for expert-rebalancing studies.
  float router_bias_std = -1.0f;
  std::function<void(const std::string& msg)> progress;  // optional
};

// Writes config.json, model-0000i-of-0000n.safetensors shards and
// model.safetensors.index.json. Deterministic for a seed: each tensor's values
// depend only on (seed, tensor name). Memory use is bounded by one shard.
absl::Status GenerateCheckpoint(const ModelConfig& cfg, const GenerateOptions& opts);

// The values the generator draws for one tensor (fp32, before any rounding).
std::vector<float> RandomTensor(const TensorSpec& spec, uint64_t seed);

// Quantises a row-major [rows, cols] matrix to fp8 e4m3 with one fp32 scale
// per (br x bc) block: w ~= q * scale_inv[r/br][c/bc].
void QuantizeFp8Blocks(const float* w, int64_t rows, int64_t cols, int64_t br, int64_t bc,
                       std::vector<uint8_t>* q, std::vector<float>* scale_inv);

}  // namespace expertmesh
