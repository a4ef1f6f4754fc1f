// A writer of GGUF v3 files (the model format of ggml / llama.cpp), and the
// conversion of an expertmesh (HF DeepSeek-V3 layout) checkpoint to llama.cpp's
// `deepseek2` architecture.
//
// File layout (little-endian): "GGUF", version 3, tensor count (u64), KV count
// (u64); the KV pairs (key as u64 length + bytes, u32 value type, value);
// one info per tensor (name, u32 n_dims, u64 ne[n_dims] with ne[0] the
// contiguous dimension -- a row-major torch shape [rows, cols] is ne
// [cols, rows] --, u32 ggml type, u64 offset into the data section); padding
// to `general.alignment` (32); the tensor data, each tensor padded to 32.
//
//   GgufWriter w;
//   w.AddString("general.architecture", "deepseek2");
//   w.AddU32("deepseek2.block_count", 4);
//   w.AddTensor("output_norm.weight", {160}, GgmlType::kF32, [&](std::vector<uint8_t>* out) { ... });
//   RETURN_IF_ERROR(w.Write("model.gguf"));   // tensors produced one at a time
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/config.h"

namespace expertmesh {

// ggml's tensor types that the writer emits (values of enum ggml_type).
enum class GgmlType : uint32_t { kF32 = 0, kF16 = 1, kBF16 = 30 };
size_t GgmlTypeSize(GgmlType t);

class GgufWriter {
 public:
  // Fills `out` with the tensor's bytes (exactly numel * type size).
  using Producer = std::function<absl::Status(std::vector<uint8_t>* out)>;

  void AddString(const std::string& key, const std::string& v);
  void AddU32(const std::string& key, uint32_t v);
  void AddF32(const std::string& key, float v);
  void AddBool(const std::string& key, bool v);
  void AddStringArray(const std::string& key, const std::vector<std::string>& v);
  void AddF32Array(const std::string& key, const std::vector<float>& v);
  void AddI32Array(const std::string& key, const std::vector<int32_t>& v);
  // ne: ggml dimensions, ne[0] contiguous (the reverse of a row-major shape).
  void AddTensor(const std::string& name, std::vector<int64_t> ne, GgmlType type, Producer produce);

  size_t tensor_count() const { return tensors_.size(); }
  // Writes `path` (through path + ".tmp", renamed when complete), calling
  // each producer once, in the order added; memory use is one tensor.
  absl::Status Write(const std::string& path) const;

 private:
  struct Tensor {
    std::string name;
    std::vector<int64_t> ne;
    GgmlType type;
    Producer produce;
    uint64_t nbytes = 0;
  };
  std::string kv_;       // serialised KV pairs
  uint64_t kv_count_ = 0;
  std::vector<Tensor> tensors_;
};

struct GgufConvertOptions {
  std::function<void(const std::string& msg)> progress;  // optional
};

// Converts the checkpoint folder `dir` (config.json + safetensors, our HF
// DeepSeek-V3 layout, fp32 / bf16 / fp8) to a GGUF file of llama.cpp's
// `deepseek2` architecture at `out_path`:
//   * tensors renamed as llama.cpp's convert_hf_to_gguf.py does (DeepseekV2Model),
//     routed experts stacked into ffn_{gate,up,down}_exps [E, rows, cols],
//     kv_b_proj split per head into attn_k_b (transposed) and attn_v_b (MLA);
//   * dtype: an fp32 checkpoint is written F32; bf16 is written BF16; fp8 weights
//     are dequantised (block scales applied) and rounded to BF16. Vectors (norms,
//     e_score_correction_bias) and the router (ffn_gate_inp) are F32, as in
//     convert_hf_to_gguf.py. The MTP layers are left out (as convert does);
//   * metadata: the deepseek2 keys (MLA ranks and head sizes, MoE counts, sigmoid
//     gating, group-limited routing, routed scaling, YaRN with its log multiplier);
//   * a placeholder SentencePiece-style vocabulary of vocab_size pieces
//     (<unk>, <s>, </s>, the 256 byte pieces, then "tok<i>") so that llama.cpp
//     loads it: drive it with token ids, not text.
absl::Status ConvertCheckpointToGguf(const std::string& dir, const std::string& out_path,
                                     const GgufConvertOptions& opts = {});

}  // namespace expertmesh
