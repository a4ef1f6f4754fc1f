// A shard of a model and the engine that runs it on the CPU: DeepSeek-V3
// (MLA attention over a latent KV cache, MoE layers) or a dense architecture
// (Qwen2 / Llama: GQA attention over a K/V cache, SwiGLU MLP; common/config.h).
//
// A shard holds the layers [layer_begin, layer_end) of one pipeline stage
// (all of them for `expertmesh generate`), the embedding on the first stage and
// the final norm + lm_head on the last. The weight matrices stay in the
// checkpoint's precision (kernels::Weight: fp32, bf16, or fp8 e4m3 with
// 128 x 128 block scales), mapped straight from the memory-mapped safetensors
// files (the shard keeps the checkpoint open); f16 matrices, and fp8 ones with
// other block sizes, are converted to owned fp32 at load. Norm vectors, biases
// and kv_b (which the MLA kernels read as fp32) are fp32 copies. Only the
// tensors of the shard (and, for MoE layers, only the selected experts) are
// touched.
//
// A forward step runs a batch of sequence segments: each segment is a number
// of new tokens of one sequence, appended to that sequence's latent KV cache.
// Prefill and decode, sequences of different lengths, and sequences joining or
// leaving between steps are all the same call.
//
//   ASSIGN_OR_RETURN(auto shard, ModelShard::Load(dir, ShardFilter{}));
//   Engine engine(shard.get());
//   SequenceCache cache = engine.NewCache();
//   std::vector<Segment> segs = {{&cache, tokens.data(), n}};
//   RETURN_IF_ERROR(engine.Forward(segs, &logits));   // [num segments, vocab]
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/checkpoint.h"
#include "common/config.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cpu/weight.h"
#include "worker/expert_exchange.h"
#include "worker/moe.h"

namespace expertmesh::worker {

struct AttentionWeights {
  kernels::Weight q_a, q_b;               // q_lora_rank > 0
  std::vector<float> q_a_norm;
  kernels::Weight q;                      // q_lora_rank == 0 and dense architectures: q_proj
  kernels::Weight kv_a, o;
  std::vector<float> kv_a_norm;
  std::vector<float> kv_b;                // fp32: the MLA kernels read it directly
  // Dense architectures (GQA): k_proj, v_proj; the q/k/v biases when
  // attention_bias (Qwen2), else empty.
  kernels::Weight k, v;
  std::vector<float> q_bias, k_bias, v_bias;
};

struct LayerWeights {
  int64_t index = 0;
  bool is_moe = false;
  std::vector<float> input_norm, post_norm;
  AttentionWeights attn;
  ExpertWeights dense;  // dense layers: gate, up [I, H], down [H, I]
  MoeWeights moe;       // MoE layers
};

// Writes the values of one tensor to out[0, spec.numel()) as fp32.
using TensorFiller = std::function<absl::Status(const TensorSpec& spec, float* out)>;
// Makes a Weight of a 2-D tensor without filling fp32 values: a mapped view of
// the file's bytes. Returns an empty Weight when the tensor cannot be mapped
// (its values are then filled as fp32 into an owned Weight).
using WeightMapper = std::function<absl::StatusOr<kernels::Weight>(const TensorSpec& spec)>;

// Reads the tensors of a checkpoint spec by name: vectors as fp32 (appended to
// *out), matrices as kernels::Weight (mapped when possible, else owned fp32).
class WeightGetter {
 public:
  WeightGetter(const std::vector<TensorSpec>& specs, TensorFiller fill, WeightMapper map = nullptr);
  absl::Status operator()(const std::string& name, std::vector<float>* out) const;
  absl::Status operator()(const std::string& name, kernels::Weight* out) const;
  // Elements of the tensors got so far, and of all tensors of the specs (progress).
  int64_t numel_done() const { return *done_; }
  int64_t numel_total() const { return total_; }

 private:
  absl::StatusOr<const TensorSpec*> Spec(const std::string& name) const;
  std::shared_ptr<std::map<std::string, TensorSpec>> by_name_;
  TensorFiller fill_;
  WeightMapper map_;
  std::shared_ptr<int64_t> done_;
  int64_t total_ = 0;
};

// Told the fraction in [0, 1] of a load done, as it advances.
using LoadProgress = std::function<void(double fraction)>;
// A LoadProgress that, once a load has taken longer than a second, writes a
// line per 10% ("loading <what>: 40% (2.1 s)") through `sink` (default:
// glog INFO); the 100% line gives the load's time.
LoadProgress ProgressLines(std::string what, std::function<void(const std::string& line)> sink = nullptr);
// Fillers: a checkpoint's tensors (fp8 dequantised), or the generator's
// random values for a seed (what `expertmesh checkpoint` writes in fp32).
TensorFiller CheckpointFiller(const ShardedCheckpoint* ckpt, const ModelConfig& cfg);
TensorFiller RandomFiller(uint64_t seed);
// Maps the checkpoint's f32, bf16 and fp8 (128 x 128 block-scaled) matrices;
// the Weights keep `ckpt` (and its mmaps) alive.
WeightMapper CheckpointMapper(std::shared_ptr<const ShardedCheckpoint> ckpt, const ModelConfig& cfg);
// A WeightGetter over a checkpoint: mapped matrices, fp32 vectors.
WeightGetter CheckpointGetter(std::shared_ptr<const ShardedCheckpoint> ckpt, const ModelConfig& cfg,
                              const std::vector<TensorSpec>& specs);

// Loads the transformer block of layer `l` (input/post norms, MLA attention,
// dense MLP or MoE with the experts `filter` selects) through `get`. Used for
// the main layers by ModelShard and for the MTP layer (worker/mtp.h).
absl::Status LoadBlockWeights(const ModelConfig& cfg, int64_t l, const ShardFilter& filter, const WeightGetter& get,
                              LayerWeights* lw);

class ModelShard {
 public:
  // Opens the checkpoint folder, validates every tensor the filter selects
  // (all problems reported at once) and loads them: matrices mapped (no
  // bytes read until used), vectors and converted matrices read. `progress`
  // (default: ProgressLines to glog) is told how far it is.
  static absl::StatusOr<std::unique_ptr<ModelShard>> Load(const std::string& dir, const ShardFilter& filter,
                                                          LoadProgress progress = nullptr);
  // Builds a shard with random weights (same values as `expertmesh checkpoint`
  // with this seed and fp32), without touching the disk: for benchmarks.
  static absl::StatusOr<std::unique_ptr<ModelShard>> Random(const ModelConfig& cfg, const ShardFilter& filter,
                                                            uint64_t seed);

  const ModelConfig& config() const { return cfg_; }
  int64_t layer_begin() const { return layer_begin_; }
  int64_t layer_end() const { return layer_end_; }  // main-model layers only
  bool has_embed() const { return !embed_.empty(); }
  bool has_head() const { return !lm_head_.empty(); }
  const std::vector<LayerWeights>& layers() const { return layers_; }
  const kernels::Weight& embed() const { return embed_; }  // [vocab, H]: rows via Weight::Row
  const std::vector<float>& final_norm() const { return final_norm_; }
  const kernels::Weight& lm_head() const { return lm_head_; }

  // Routed experts by MoE layer and logical id: what expert rebalancing
  // loads next to the experts in use before the switch.
  using ExpertSet = std::map<int64_t, std::map<int32_t, ExpertWeights>>;
  // Reads the routed experts `which` (MoE layer -> logical ids) of the
  // checkpoint in `dir`, validated like Load (every problem at once).
  static absl::StatusOr<ExpertSet> LoadExperts(const std::string& dir,
                                               const std::map<int64_t, std::vector<int32_t>>& which);
  // Moves `experts` into the shard's MoE layers, then unloads every routed
  // expert of the layers in `keep` that keep does not list. Errors (a layer
  // outside the shard or not MoE, an id out of range, a kept expert neither
  // loaded nor given) change nothing.
  absl::Status ReplaceExperts(ExpertSet experts, const std::map<int64_t, std::set<int32_t>>& keep);
  // Logical ids of the routed experts loaded for `layer` (empty outside the shard).
  std::vector<int32_t> LoadedExperts(int64_t layer) const;

 private:
  LayerWeights* MoeLayer(int64_t layer);
  absl::Status Build(const ShardFilter& filter, const WeightGetter& get, const LoadProgress& progress = nullptr);

  ModelConfig cfg_;
  int64_t layer_begin_ = 0, layer_end_ = 0;
  std::vector<LayerWeights> layers_;
  kernels::Weight embed_, lm_head_;
  std::vector<float> final_norm_;
};

// KV cache of one sequence over the layers of a shard. DeepSeek-V3 (latent):
// per layer, kv_lora_rank normalised latent values and qk_rope_head_dim
// rotated key values per token (DeepSeek-V3: 576 per token per layer).
// Dense architectures: per layer, the rotated keys and the values of the
// num_key_value_heads KV heads.
struct SequenceCache {
  std::vector<std::vector<float>> latent;  // [layer][pos * kv_lora]
  std::vector<std::vector<float>> k_pe;    // [layer][pos * rope]
  std::vector<std::vector<float>> k, v;    // dense: [layer][pos * kv_heads * head_dim]
  int64_t length = 0;                      // tokens cached

  // Drops the entries of positions >= n (0 <= n <= length), e.g. those of a
  // rejected speculative draft token.
  void Truncate(int64_t n);
};

// `n` new tokens of one sequence at positions [cache->length, cache->length + n).
struct Segment {
  SequenceCache* cache = nullptr;
  const int32_t* tokens = nullptr;  // for shards with the embedding
  int64_t n = 0;
};

// Time spent per kind of work (seconds), accumulated over calls.
struct EngineTimes {
  double attention = 0, moe = 0, dense = 0, embed_head = 0;
};

class Engine {
 public:
  explicit Engine(const ModelShard* shard);
  SequenceCache NewCache() const;

  // The MoE seam (worker/expert_exchange.h). Every MoE layer is routed once
  // here; the routes go to `observer` (when set) and, with an exchange, to
  // the exchange, which runs the routed experts over the stage's EP ranks
  // (it is then called for every MoE layer, also with no tokens). Without
  // one (null, the default) the routed experts run here. Both must outlive
  // the engine's steps.
  void SetExpertExchange(ExpertExchange* exchange) { exchange_ = exchange; }
  void SetRouteObserver(RouteObserver observer) { on_route_ = std::move(observer); }

  // Embedding of the segments' tokens into hidden[T, H] (T = sum of n).
  void Embed(const std::vector<Segment>& segs, std::vector<float>* hidden) const;
  // Runs the shard's layers on hidden[T, H] in place, appending to the caches.
  // Cache lengths advance by n for each segment.
  absl::Status RunLayers(const std::vector<Segment>& segs, std::vector<float>* hidden);
  // Final norm + lm_head of the last token of each segment: logits[S, vocab].
  void Head(const std::vector<Segment>& segs, const std::vector<float>& hidden, std::vector<float>* logits) const;
  // Embed + RunLayers + Head (the shard must hold the whole model).
  absl::Status Forward(const std::vector<Segment>& segs, std::vector<float>* logits);
  // Embed + RunLayers + final norm (model.norm) of every new token: normed[T, H]
  // (the shard must hold the whole model). The logits of any row are
  // HeadRows of it; the MTP module takes these rows as its hidden input.
  absl::Status ForwardHidden(const std::vector<Segment>& segs, std::vector<float>* normed);
  // lm_head of n rows of final-normed hidden states: logits[n, vocab].
  void HeadRows(const float* normed, int64_t n, std::vector<float>* logits) const;

  // One transformer block (RMSNorm, attention, residual, RMSNorm, dense MLP or
  // MoE, residual) on hidden[T, H] in place; attention appends the segments'
  // tokens to the caches at `cache_slot` (cache lengths are not advanced).
  // RunLayers runs the shard's layers through it; the MTP module its own block.
  absl::Status RunBlock(const LayerWeights& lw, size_t cache_slot, const std::vector<Segment>& segs,
                        std::vector<float>* hidden);

  const EngineTimes& times() const { return times_; }

  // The attention of one layer (layers()[layer_slot]) on normed x[T, H]:
  // out[T, H] = o_proj(MLA(x)), appending the segments' new tokens to the
  // caches at that layer (cache lengths are not advanced here).
  void Attention(const LayerWeights& lw, size_t layer_slot, const std::vector<Segment>& segs, const float* x,
                 int64_t T, float* out);

 private:

  // Forward's and ForwardHidden's common part: checks (`what` names the
  // caller in errors), embedding and every layer.
  absl::Status EmbedAndRun(const char* what, const std::vector<Segment>& segs, std::vector<float>* hidden);

  // Attention's dense-architecture form: GQA with half-split RoPE over the
  // caches' K and V (same contract as Attention).
  void DenseAttention(const LayerWeights& lw, size_t slot, const std::vector<Segment>& segs, const float* x,
                      int64_t T, float* out);

  // The MoE block on normed x[T, H]: y = routed + shared (y overwritten).
  absl::Status Moe(const LayerWeights& lw, const float* x, int64_t T, float* y);

  const ModelShard* shard_;
  const ModelConfig& cfg_;
  ExpertExchange* exchange_ = nullptr;
  RouteObserver on_route_;
  kernels::Rope rope_;
  kernels::MlaShape mla_;
  kernels::HalfRope half_rope_;  // dense architectures
  kernels::GqaShape gqa_;
  EngineTimes times_;
};

// Checks a prompt against the model: non-empty, ids in [0, vocab), length +
// max_new_tokens within max_position_embeddings. `what` names it in errors.
absl::Status ValidatePrompt(const ModelConfig& cfg, const std::vector<int32_t>& tokens, int64_t max_new_tokens,
                            const std::string& what);

}  // namespace expertmesh::worker
