#include "worker/mtp.h"

#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "glog/logging.h"
#include "kernels/cpu/kernels.h"

namespace expertmesh::worker {

namespace {

// The MTP layer's tensors (no main embedding / head).
ShardFilter MtpFilter(const ModelConfig& cfg) {
  ShardFilter f;
  f.layer_begin = cfg.num_hidden_layers;
  f.layer_end = cfg.num_hidden_layers + 1;
  f.embed = false;
  f.head = false;
  return f;
}

absl::Status NeedMtp(const ModelConfig& cfg) {
  if (cfg.num_nextn_predict_layers < 1) {
    return absl::FailedPreconditionError(
        "the checkpoint has no MTP layer (config num_nextn_predict_layers = 0); speculative decoding with "
        "--speculative mtp needs one");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<MtpModule>> MtpModule::Load(const std::string& dir) {
  ASSIGN_OR_RETURN(ModelConfig cfg, ModelConfig::FromFile(dir + "/config.json"));
  RETURN_IF_ERROR(NeedMtp(cfg));
  ASSIGN_OR_RETURN(std::shared_ptr<const ShardedCheckpoint> ckpt, ShardedCheckpoint::Open(dir));
  const std::vector<TensorSpec> spec = CheckpointSpec(cfg, MtpFilter(cfg));
  RETURN_IF_ERROR(ValidateCheckpoint(*ckpt, spec, cfg));
  auto m = std::unique_ptr<MtpModule>(new MtpModule());
  m->cfg_ = cfg;
  RETURN_IF_ERROR(m->Build(CheckpointGetter(ckpt, cfg, spec)));
  return m;
}

absl::StatusOr<std::unique_ptr<MtpModule>> MtpModule::Random(const ModelConfig& cfg, uint64_t seed) {
  RETURN_IF_ERROR(cfg.Validate());
  RETURN_IF_ERROR(NeedMtp(cfg));
  auto m = std::unique_ptr<MtpModule>(new MtpModule());
  m->cfg_ = cfg;
  RETURN_IF_ERROR(m->Build(WeightGetter(CheckpointSpec(cfg, MtpFilter(cfg)), RandomFiller(seed))));
  return m;
}

absl::Status MtpModule::Build(const WeightGetter& get) {
  const ShardFilter filter = MtpFilter(cfg_);
  const int64_t L = cfg_.num_hidden_layers;
  RETURN_IF_ERROR(LoadBlockWeights(cfg_, L, filter, get, &w_.block));
  const std::string p = absl::StrCat("model.layers.", L, ".");
  RETURN_IF_ERROR(get(p + "embed_tokens.weight", &w_.embed));
  RETURN_IF_ERROR(get(p + "enorm.weight", &w_.enorm));
  RETURN_IF_ERROR(get(p + "hnorm.weight", &w_.hnorm));
  RETURN_IF_ERROR(get(p + "eh_proj.weight", &w_.eh_proj));
  RETURN_IF_ERROR(get(p + "shared_head.norm.weight", &w_.head_norm));
  RETURN_IF_ERROR(get(p + "shared_head.head.weight", &w_.head));
  return absl::OkStatus();
}

SequenceCache MtpModule::NewCache() const {
  SequenceCache c;
  c.latent.resize(1);
  c.k_pe.resize(1);
  return c;
}

absl::Status MtpModule::Forward(Engine* engine, const std::vector<Segment>& segs, const float* main_normed,
                                std::vector<float>* out) const {
  const int64_t H = cfg_.hidden_size, V = cfg_.vocab_size;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  int64_t T = 0;
  for (const auto& s : segs) {
    if (s.cache == nullptr || s.cache->latent.size() != 1) {
      return absl::InvalidArgumentError("MtpModule::Forward: segments need MTP caches (MtpModule::NewCache)");
    }
    T += s.n;
  }
  // [enorm(embed(t_{i+1})) | hnorm(h_i)] per row, then eh_proj.
  std::vector<float> cat(T * 2 * H), emb(H);
  int64_t row = 0;
  for (const auto& s : segs) {
    for (int64_t i = 0; i < s.n; ++i, ++row) {
      const int32_t t = s.tokens[i];
      if (t < 0 || t >= V) {
        return absl::InvalidArgumentError(absl::StrCat("MtpModule::Forward: token ", t, " out of [0, ", V, ")"));
      }
      float* dst = cat.data() + row * 2 * H;
      w_.embed.Row(t, emb.data());
      kernels::RmsNorm(emb.data(), 1, H, w_.enorm.data(), eps, dst);
      kernels::RmsNorm(main_normed + row * H, 1, H, w_.hnorm.data(), eps, dst + H);
    }
  }
  out->resize(T * H);
  if (T > 0) kernels::Linear(cat.data(), T, 2 * H, w_.eh_proj, out->data());
  RETURN_IF_ERROR(engine->RunBlock(w_.block, 0, segs, out));
  for (const auto& s : segs) s.cache->length += s.n;
  if (T > 0) kernels::RmsNorm(out->data(), T, H, w_.head_norm.data(), eps, out->data());
  return absl::OkStatus();
}

void MtpModule::Logits(const float* normed, int64_t n, std::vector<float>* logits) const {
  const int64_t H = cfg_.hidden_size, V = cfg_.vocab_size;
  logits->resize(n * V);
  if (n > 0) kernels::Linear(normed, n, H, w_.head, logits->data());
}

}  // namespace expertmesh::worker
