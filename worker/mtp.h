// The multi-token-prediction (MTP) module of DeepSeek-V3 (paper §2.2; the
// layer num_hidden_layers of the checkpoint), run on the CPU engine.
//
// For position i of a sequence t_0, t_1, ..., with h_i the main model's final
// hidden state at i *after* the final RMSNorm (model.norm; what vLLM passes
// as previous_hidden_states):
//
//   x_i    = eh_proj([enorm(embed_mtp(t_{i+1})) ; hnorm(h_i)])    // [embedding, hidden]
//   y_i    = block_L(x_i)       MLA attention over the MTP layer's own latent
//                               cache at position i, then MoE (or dense MLP)
//   logits = shared_head.head(shared_head.norm(y_i))              // predicts t_{i+2}
//
// The block runs through Engine::RunBlock (the same attention and MoE code as
// the main layers). Each sequence has one SequenceCache for the MTP layer
// (one slot), holding positions 0..length-1.
//
//   ASSIGN_OR_RETURN(auto mtp, MtpModule::Load(dir));
//   SequenceCache mc = mtp->NewCache();
//   std::vector<Segment> segs = {{&mc, next_tokens, n}};     // t_{i+1} for i = mc.length ..
//   RETURN_IF_ERROR(mtp->Forward(&engine, segs, main_normed_hidden, &out));   // out[T, H]
//   mtp->Logits(out.data() + row * H, 1, &logits);
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/config.h"
#include "worker/model.h"

namespace expertmesh::worker {

struct MtpWeights {
  LayerWeights block;                      // layer num_hidden_layers (attention + MoE)
  kernels::Weight embed;                   // model.layers.L.embed_tokens [vocab, H]
  std::vector<float> enorm, hnorm;         // [H]
  kernels::Weight eh_proj;                 // [H, 2H]: columns [0, H) embedding, [H, 2H) hidden
  std::vector<float> head_norm;            // shared_head.norm [H]
  kernels::Weight head;                    // shared_head.head [vocab, H]
};

class MtpModule {
 public:
  // Loads the first MTP layer (layer num_hidden_layers) of the checkpoint,
  // validating its tensors. FailedPrecondition when num_nextn_predict_layers is 0.
  static absl::StatusOr<std::unique_ptr<MtpModule>> Load(const std::string& dir);
  // The same weights as `expertmesh checkpoint --dtype fp32 --seed S`, no disk.
  static absl::StatusOr<std::unique_ptr<MtpModule>> Random(const ModelConfig& cfg, uint64_t seed);

  const ModelConfig& config() const { return cfg_; }
  const MtpWeights& weights() const { return w_; }
  int64_t layer() const { return w_.block.index; }

  // A latent cache for the MTP layer (one slot).
  SequenceCache NewCache() const;

  // Runs the module on segments of MTP-layer caches: segment s covers
  // positions [cache.length, cache.length + n); its `tokens` are t_{i+1} for
  // those positions i. main_normed[T, H] (T = sum of n, same row order) are
  // the main model's final-normed hidden states h_i. Writes out[T, H] =
  // shared_head.norm(block(...)) and advances the caches by n. `engine` must
  // have the same config (its attention and MoE code run the block).
  absl::Status Forward(Engine* engine, const std::vector<Segment>& segs, const float* main_normed,
                       std::vector<float>* out) const;
  // shared_head.head on n rows of Forward's output: logits[n, vocab].
  void Logits(const float* normed, int64_t n, std::vector<float>* logits) const;

 private:
  absl::Status Build(const WeightGetter& get);

  ModelConfig cfg_;
  MtpWeights w_;
};

}  // namespace expertmesh::worker
