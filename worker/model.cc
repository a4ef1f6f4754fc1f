#include "worker/model.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>

#include <sys/mman.h>
#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "glog/logging.h"

namespace expertmesh::worker {

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Gate [I,H], up [I,H] and down [H,I] of one SwiGLU MLP under `prefix`.
absl::Status LoadMlp(const WeightGetter& get, const std::string& prefix, ExpertWeights* e) {
  RETURN_IF_ERROR(get(prefix + "gate_proj.weight", &e->gate));
  RETURN_IF_ERROR(get(prefix + "up_proj.weight", &e->up));
  return get(prefix + "down_proj.weight", &e->down);
}

}  // namespace

WeightGetter::WeightGetter(const std::vector<TensorSpec>& specs, TensorFiller fill, WeightMapper map)
    : by_name_(std::make_shared<std::map<std::string, TensorSpec>>()),
      fill_(std::move(fill)),
      map_(std::move(map)),
      done_(std::make_shared<int64_t>(0)) {
  for (const TensorSpec& s : specs) {
    if (by_name_->emplace(s.name, s).second) total_ += s.numel();
  }
}

absl::StatusOr<const TensorSpec*> WeightGetter::Spec(const std::string& name) const {
  auto it = by_name_->find(name);
  if (it == by_name_->end()) return absl::InternalError(absl::StrCat("no tensor spec for ", name));
  return &it->second;
}

absl::Status WeightGetter::operator()(const std::string& name, std::vector<float>* out) const {
  ASSIGN_OR_RETURN(const TensorSpec* spec, Spec(name));
  const size_t at = out->size();
  out->resize(at + static_cast<size_t>(spec->numel()));
  *done_ += spec->numel();
  return fill_(*spec, out->data() + at);
}

absl::Status WeightGetter::operator()(const std::string& name, kernels::Weight* out) const {
  ASSIGN_OR_RETURN(const TensorSpec* spec, Spec(name));
  if (spec->shape.size() != 2) {
    return absl::InternalError(absl::StrCat(name, ": a weight matrix needs 2 dimensions, the spec has ",
                                            ShapeString(spec->shape)));
  }
  const int64_t rows = spec->shape[0], cols = spec->shape[1];
  if (map_) {
    ASSIGN_OR_RETURN(kernels::Weight w, map_(*spec));
    if (!w.empty()) {
      *done_ += spec->numel();
      *out = std::move(w);
      return absl::OkStatus();
    }
  }
  std::vector<float> v(static_cast<size_t>(spec->numel()));
  RETURN_IF_ERROR(fill_(*spec, v.data()));
  *done_ += spec->numel();
  *out = kernels::Weight::FromFloat(std::move(v), rows, cols);
  return absl::OkStatus();
}

TensorFiller CheckpointFiller(const ShardedCheckpoint* ckpt, const ModelConfig& cfg) {
  return [ckpt, cfg](const TensorSpec& s, float* out) { return LoadF32Into(*ckpt, s, cfg, out); };
}

TensorFiller RandomFiller(uint64_t seed) {
  return [seed](const TensorSpec& s, float* out) {
    const std::vector<float> v = RandomTensor(s, seed);
    std::copy(v.begin(), v.end(), out);
    return absl::OkStatus();
  };
}

namespace {

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14
#endif

// Maps the pages of [p, p + n) of a file mapping into this process now
// (MADV_POPULATE_READ: read from the page cache or the disk, page tables
// filled), so that loading costs what the shard's own bytes cost and the first
// forward step does not fault them in one at a time. Only the tensors the shard
// uses are touched: a worker's RSS holds its experts, not the whole file.
// Older kernels: MADV_WILLNEED (read-ahead only).
// Then one byte of every page is read: under some hypervisors (shadow page
// tables, e.g. PVM guests) the first access to each page still traps after
// MADV_POPULATE_READ, ~3-4 us a page, which made the first forward step (the
// prefill, streaming most experts) run at ~1-3 GB/s instead of 10-20 GB/s
// (docs/PERFORMANCE.md, "CPU prefill: first touch of mapped weights"). On
// bare metal the reads cost a TLB miss a page. llama.cpp pays the same in
// its load-time warm-up run.
void Prefault(const void* p, size_t n) {
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t b = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  const uintptr_t e = reinterpret_cast<uintptr_t>(p) + n;
  if (n == 0) return;
  if (::madvise(reinterpret_cast<void*>(b), e - b, MADV_POPULATE_READ) != 0) {
    ::madvise(reinterpret_cast<void*>(b), e - b, MADV_WILLNEED);
  }
  unsigned char sink = 0;
  for (uintptr_t a = b; a < e; a += page) sink ^= *reinterpret_cast<const volatile unsigned char*>(a);
  asm volatile("" : : "r"(sink));
}

}  // namespace

WeightMapper CheckpointMapper(std::shared_ptr<const ShardedCheckpoint> ckpt, const ModelConfig& cfg) {
  const bool blocks128 =
      cfg.quantization_config.weight_block_rows == 128 && cfg.quantization_config.weight_block_cols == 128;
  return [ckpt = std::move(ckpt), blocks128](const TensorSpec& s) -> absl::StatusOr<kernels::Weight> {
    const TensorView* t = ckpt->Find(s.name);
    if (t == nullptr) return absl::NotFoundError(absl::StrCat(s.name, ": missing from checkpoint ", ckpt->dir()));
    if (t->shape != s.shape || s.shape.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(s.name, ": shape ", ShapeString(t->shape), ", expected ",
                                                     ShapeString(s.shape)));
    }
    const int64_t rows = s.shape[0], cols = s.shape[1];
    auto aligned = [](const void* p, size_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; };
    switch (t->dtype) {
      case DType::kF32:
      case DType::kBF16:
        // safetensors does not align tensors: a misaligned one is copied (same dtype).
        if (!aligned(t->data, DTypeSize(t->dtype))) return kernels::Weight::FromBytes(t->dtype, t->data, rows, cols);
        Prefault(t->data, t->nbytes);
        return kernels::Weight::Mapped(t->dtype, t->data, rows, cols, ckpt);
      case DType::kF8E4M3: {
        const TensorView* sc = ckpt->Find(ScaleName(s.name));
        // Other block sizes, or misaligned scales: dequantised to fp32 by the filler.
        if (!blocks128 || sc == nullptr || sc->dtype != DType::kF32 || !aligned(sc->data, sizeof(float))) {
          return kernels::Weight();
        }
        Prefault(t->data, t->nbytes);
        Prefault(sc->data, sc->nbytes);
        return kernels::Weight::Mapped(DType::kF8E4M3, t->data, rows, cols, ckpt,
                                       reinterpret_cast<const float*>(sc->data));
      }
      default:  // f16: converted to fp32 by the filler
        return kernels::Weight();
    }
  };
}

LoadProgress ProgressLines(std::string what, std::function<void(const std::string& line)> sink) {
  if (!sink) sink = [](const std::string& line) { LOG(INFO) << line; };
  struct State {
    double start = Now();
    int shown = 0;  // tenths passed
  };
  auto st = std::make_shared<State>();
  return [st, what = std::move(what), sink = std::move(sink)](double fraction) {
    const double t = Now() - st->start;
    const int tenths = static_cast<int>(std::min(1.0, std::max(0.0, fraction)) * 10.0 + 1e-9);
    if (tenths <= st->shown || t < 1.0) {
      if (tenths > st->shown && t < 1.0) st->shown = tenths;  // quick so far: nothing to show
      return;
    }
    st->shown = tenths;
    sink(absl::StrFormat("loading %s: %d%% (%.1f s)", what, 10 * tenths, t));
  };
}

WeightGetter CheckpointGetter(std::shared_ptr<const ShardedCheckpoint> ckpt, const ModelConfig& cfg,
                              const std::vector<TensorSpec>& specs) {
  return WeightGetter(specs, CheckpointFiller(ckpt.get(), cfg), CheckpointMapper(ckpt, cfg));
}

absl::Status LoadBlockWeights(const ModelConfig& c, int64_t l, const ShardFilter& filter, const WeightGetter& get,
                              LayerWeights* lw) {
  lw->index = l;
  lw->is_moe = c.IsMoeLayer(l);
  const std::string p = absl::StrCat("model.layers.", l, ".");
  RETURN_IF_ERROR(get(p + "input_layernorm.weight", &lw->input_norm));
  RETURN_IF_ERROR(get(p + "post_attention_layernorm.weight", &lw->post_norm));
  const std::string a = p + "self_attn.";
  if (c.dense_arch()) {
    AttentionWeights& w = lw->attn;
    RETURN_IF_ERROR(get(a + "q_proj.weight", &w.q));
    RETURN_IF_ERROR(get(a + "k_proj.weight", &w.k));
    RETURN_IF_ERROR(get(a + "v_proj.weight", &w.v));
    RETURN_IF_ERROR(get(a + "o_proj.weight", &w.o));
    if (c.attention_bias) {
      RETURN_IF_ERROR(get(a + "q_proj.bias", &w.q_bias));
      RETURN_IF_ERROR(get(a + "k_proj.bias", &w.k_bias));
      RETURN_IF_ERROR(get(a + "v_proj.bias", &w.v_bias));
    }
    return LoadMlp(get, p + "mlp.", &lw->dense);
  }
  if (c.q_lora_rank > 0) {
    RETURN_IF_ERROR(get(a + "q_a_proj.weight", &lw->attn.q_a));
    RETURN_IF_ERROR(get(a + "q_a_layernorm.weight", &lw->attn.q_a_norm));
    RETURN_IF_ERROR(get(a + "q_b_proj.weight", &lw->attn.q_b));
  } else {
    RETURN_IF_ERROR(get(a + "q_proj.weight", &lw->attn.q));
  }
  RETURN_IF_ERROR(get(a + "kv_a_proj_with_mqa.weight", &lw->attn.kv_a));
  RETURN_IF_ERROR(get(a + "kv_a_layernorm.weight", &lw->attn.kv_a_norm));
  RETURN_IF_ERROR(get(a + "kv_b_proj.weight", &lw->attn.kv_b));
  RETURN_IF_ERROR(get(a + "o_proj.weight", &lw->attn.o));
  const std::string m = p + "mlp.";
  if (!lw->is_moe) {
    RETURN_IF_ERROR(LoadMlp(get, m, &lw->dense));
  } else {
    MoeWeights& mw = lw->moe;
    mw.hidden = c.hidden_size;
    mw.expert_inter = c.moe_intermediate_size;
    mw.shared_inter = c.moe_intermediate_size * c.n_shared_experts;
    mw.router_params = kernels::RouterParams::FromConfig(c);
    RETURN_IF_ERROR(get(m + "gate.weight", &mw.router));
    RETURN_IF_ERROR(get(m + "gate.e_score_correction_bias", &mw.bias));
    mw.experts.resize(c.n_routed_experts);
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      if (filter.expert && !filter.expert(l, e)) continue;
      const std::string ep = absl::StrCat(m, "experts.", e, ".");
      RETURN_IF_ERROR(LoadMlp(get, ep, &mw.experts[e]));
    }
    if (c.n_shared_experts > 0) {
      RETURN_IF_ERROR(LoadMlp(get, m + "shared_experts.", &mw.shared));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ModelShard>> ModelShard::Load(const std::string& dir, const ShardFilter& filter,
                                                             LoadProgress progress) {
  if (!progress) progress = ProgressLines(dir);
  ASSIGN_OR_RETURN(ModelConfig cfg, ModelConfig::FromFile(dir + "/config.json"));
  ASSIGN_OR_RETURN(std::shared_ptr<const ShardedCheckpoint> ckpt, ShardedCheckpoint::Open(dir));
  const std::vector<TensorSpec> spec = CheckpointSpec(cfg, filter);
  RETURN_IF_ERROR(ValidateCheckpoint(*ckpt, spec, cfg));
  auto shard = std::unique_ptr<ModelShard>(new ModelShard());
  shard->cfg_ = cfg;
  RETURN_IF_ERROR(shard->Build(filter, CheckpointGetter(ckpt, cfg, spec), progress));
  return shard;
}

absl::StatusOr<ModelShard::ExpertSet> ModelShard::LoadExperts(
    const std::string& dir, const std::map<int64_t, std::vector<int32_t>>& which) {
  ASSIGN_OR_RETURN(ModelConfig cfg, ModelConfig::FromFile(dir + "/config.json"));
  for (const auto& [layer, ids] : which) {
    if (layer < 0 || layer >= cfg.num_hidden_layers || !cfg.IsMoeLayer(layer)) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not a MoE layer of ", dir));
    }
    for (int32_t e : ids) {
      if (e < 0 || e >= cfg.n_routed_experts) {
        return absl::InvalidArgumentError(absl::StrCat("expert ", e, " of layer ", layer, " is out of range [0, ",
                                                       cfg.n_routed_experts, ")"));
      }
    }
  }
  ShardFilter f;
  f.embed = false;
  f.head = false;
  f.expert = [&which](int64_t l, int64_t e) {
    auto it = which.find(l);
    return it != which.end() && std::find(it->second.begin(), it->second.end(), e) != it->second.end();
  };
  // Only the routed experts' tensors of the spec.
  std::vector<TensorSpec> wanted;
  for (auto& s : CheckpointSpec(cfg, f)) {
    if (s.name.find(".mlp.experts.") != std::string::npos) wanted.push_back(s);
  }
  ASSIGN_OR_RETURN(std::shared_ptr<const ShardedCheckpoint> ckpt, ShardedCheckpoint::Open(dir));
  RETURN_IF_ERROR(ValidateCheckpoint(*ckpt, wanted, cfg));
  const WeightGetter get = CheckpointGetter(ckpt, cfg, wanted);
  ExpertSet out;
  for (const auto& [layer, ids] : which) {
    for (int32_t e : ids) {
      RETURN_IF_ERROR(LoadMlp(get, absl::StrCat("model.layers.", layer, ".mlp.experts.", e, "."), &out[layer][e]));
    }
  }
  return out;
}

LayerWeights* ModelShard::MoeLayer(int64_t layer) {
  if (layer < layer_begin_ || layer >= layer_end_) return nullptr;
  LayerWeights& lw = layers_[static_cast<size_t>(layer - layer_begin_)];
  return lw.is_moe ? &lw : nullptr;
}

absl::Status ModelShard::ReplaceExperts(ExpertSet experts, const std::map<int64_t, std::set<int32_t>>& keep) {
  // Check everything first: an error changes nothing.
  for (const auto& [layer, ids] : experts) {
    if (MoeLayer(layer) == nullptr) return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not a MoE layer of this shard"));
    for (const auto& [e, w] : ids) {
      if (e < 0 || e >= cfg_.n_routed_experts || !w.loaded()) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", layer, ": expert ", e, " is out of range or empty"));
      }
    }
  }
  for (const auto& [layer, ids] : keep) {
    LayerWeights* lw = MoeLayer(layer);
    if (lw == nullptr) return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not a MoE layer of this shard"));
    for (int32_t e : ids) {
      const bool given = experts.count(layer) > 0 && experts[layer].count(e) > 0;
      if (e < 0 || e >= cfg_.n_routed_experts || (!given && !lw->moe.experts[static_cast<size_t>(e)].loaded())) {
        return absl::FailedPreconditionError(absl::StrCat("layer ", layer, ": expert ", e,
                                                          " is to be kept but is neither loaded nor given"));
      }
    }
  }
  for (auto& [layer, ids] : experts) {
    LayerWeights* lw = MoeLayer(layer);
    for (auto& [e, w] : ids) lw->moe.experts[static_cast<size_t>(e)] = std::move(w);
  }
  for (const auto& [layer, ids] : keep) {
    std::vector<ExpertWeights>& ex = MoeLayer(layer)->moe.experts;
    for (size_t e = 0; e < ex.size(); ++e) {
      if (ids.count(static_cast<int32_t>(e)) == 0) ex[e] = ExpertWeights();  // frees the memory
    }
  }
  return absl::OkStatus();
}

std::vector<int32_t> ModelShard::LoadedExperts(int64_t layer) const {
  std::vector<int32_t> out;
  if (layer < layer_begin_ || layer >= layer_end_) return out;
  const LayerWeights& lw = layers_[static_cast<size_t>(layer - layer_begin_)];
  for (size_t e = 0; e < lw.moe.experts.size(); ++e) {
    if (lw.moe.experts[e].loaded()) out.push_back(static_cast<int32_t>(e));
  }
  return out;
}

absl::StatusOr<std::unique_ptr<ModelShard>> ModelShard::Random(const ModelConfig& cfg, const ShardFilter& filter,
                                                               uint64_t seed) {
  RETURN_IF_ERROR(cfg.Validate());
  auto shard = std::unique_ptr<ModelShard>(new ModelShard());
  shard->cfg_ = cfg;
  RETURN_IF_ERROR(shard->Build(filter, WeightGetter(CheckpointSpec(cfg, filter), RandomFiller(seed))));
  return shard;
}

absl::Status ModelShard::Build(const ShardFilter& filter, const WeightGetter& get, const LoadProgress& progress) {
  const ModelConfig& c = cfg_;
  auto report = [&] {
    if (progress && get.numel_total() > 0) progress(static_cast<double>(get.numel_done()) / get.numel_total());
  };
  layer_begin_ = std::max<int64_t>(0, filter.layer_begin);
  layer_end_ = filter.layer_end < 0 ? c.num_hidden_layers : std::min(filter.layer_end, c.num_hidden_layers);
  if (filter.embed) RETURN_IF_ERROR(get("model.embed_tokens.weight", &embed_));
  if (filter.head) {
    RETURN_IF_ERROR(get("model.norm.weight", &final_norm_));
    // Tied embeddings (dense architectures): the head is embed_tokens.
    RETURN_IF_ERROR(get(c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight", &lm_head_));
  }
  for (int64_t l = layer_begin_; l < layer_end_; ++l) {
    LayerWeights lw;
    RETURN_IF_ERROR(LoadBlockWeights(c, l, filter, get, &lw));
    layers_.push_back(std::move(lw));
    report();
  }
  report();
  return absl::OkStatus();
}

Engine::Engine(const ModelShard* shard)
    : shard_(shard),
      cfg_(shard->config()),
      rope_(shard->config()),
      mla_(kernels::MlaShape::FromConfig(shard->config())),
      half_rope_(shard->config()),
      gqa_(kernels::GqaShape::FromConfig(shard->config())) {}

SequenceCache Engine::NewCache() const {
  SequenceCache c;
  const size_t n = shard_->layers().size();
  if (cfg_.dense_arch()) {
    c.k.resize(n);
    c.v.resize(n);
  } else {
    c.latent.resize(n);
    c.k_pe.resize(n);
  }
  return c;
}

void Engine::Embed(const std::vector<Segment>& segs, std::vector<float>* hidden) const {
  const int64_t H = cfg_.hidden_size;
  int64_t T = 0;
  for (const auto& s : segs) T += s.n;
  hidden->resize(T * H);
  int64_t row = 0;
  for (const auto& s : segs) {
    for (int64_t i = 0; i < s.n; ++i, ++row) {
      CHECK(s.tokens[i] >= 0 && s.tokens[i] < cfg_.vocab_size) << "token ids are validated before Embed";
      shard_->embed().Row(s.tokens[i], hidden->data() + row * H);
    }
  }
}

void Engine::DenseAttention(const LayerWeights& lw, size_t slot, const std::vector<Segment>& segs, const float* x,
                            int64_t T, float* out) {
  const ModelConfig& c = cfg_;
  const int64_t H = c.hidden_size, nh = c.num_attention_heads, nkv = c.num_key_value_heads, d = c.attn_head_dim();
  const int64_t qw = nh * d, kvw = nkv * d;
  const AttentionWeights& w = lw.attn;
  std::vector<float> q(T * qw), k(T * kvw), v(T * kvw);
  kernels::Linear(x, T, H, w.q, q.data());
  kernels::Linear(x, T, H, w.k, k.data());
  kernels::Linear(x, T, H, w.v, v.data());
  if (c.attention_bias) {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t i = 0; i < qw; ++i) q[t * qw + i] += w.q_bias[i];
      for (int64_t i = 0; i < kvw; ++i) {
        k[t * kvw + i] += w.k_bias[i];
        v[t * kvw + i] += w.v_bias[i];
      }
    }
  }
  std::vector<float> attn(T * qw), scratch;
  int64_t row = 0;
  for (const Segment& s : segs) {
    SequenceCache& cache = *s.cache;
    const int64_t start = cache.length, S = start + s.n;
    std::vector<float>& kc = cache.k[slot];
    std::vector<float>& vc = cache.v[slot];
    kc.resize(S * kvw);
    vc.resize(S * kvw);
    for (int64_t i = 0; i < s.n; ++i) {  // the new tokens at positions start + i, appended
      float* kd = kc.data() + (start + i) * kvw;
      std::memcpy(kd, k.data() + (row + i) * kvw, kvw * sizeof(float));
      std::memcpy(vc.data() + (start + i) * kvw, v.data() + (row + i) * kvw, kvw * sizeof(float));
      half_rope_.Apply(kd, nkv, d, start + i);
      half_rope_.Apply(q.data() + (row + i) * qw, nh, d, start + i);
    }
    if (s.n > 0) {
      scratch.resize(static_cast<size_t>(kernels::GqaScratch(gqa_, s.n, S)));
      kernels::GqaAttention(gqa_, q.data() + row * qw, s.n, kc.data(), vc.data(), S, attn.data() + row * qw,
                            scratch.data());
    }
    row += s.n;
  }
  kernels::Linear(attn.data(), T, qw, w.o, out);
}

void Engine::Attention(const LayerWeights& lw, size_t slot, const std::vector<Segment>& segs, const float* x,
                       int64_t T, float* out) {
  if (cfg_.dense_arch()) return DenseAttention(lw, slot, segs, x, T, out);
  const ModelConfig& c = cfg_;
  const int64_t H = c.hidden_size, nh = c.num_attention_heads, qd = c.qk_head_dim(), L = c.kv_lora_rank,
                dr = c.qk_rope_head_dim, dv = c.v_head_dim;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const AttentionWeights& w = lw.attn;
  std::vector<float> q(T * nh * qd);
  if (c.q_lora_rank > 0) {
    std::vector<float> qa(T * c.q_lora_rank);
    kernels::Linear(x, T, H, w.q_a, qa.data());
    kernels::RmsNorm(qa.data(), T, c.q_lora_rank, w.q_a_norm.data(), eps, qa.data());
    kernels::Linear(qa.data(), T, c.q_lora_rank, w.q_b, q.data());
  } else {
    kernels::Linear(x, T, H, w.q, q.data());
  }
  std::vector<float> kv(T * (L + dr));
  kernels::Linear(x, T, H, w.kv_a, kv.data());
  std::vector<float> attn(T * nh * dv);
  std::vector<float> scratch;
  int64_t row = 0;
  for (const Segment& s : segs) {
    SequenceCache& cache = *s.cache;
    const int64_t start = cache.length, S = start + s.n;
    std::vector<float>& lat = cache.latent[slot];
    std::vector<float>& kpe = cache.k_pe[slot];
    lat.resize(S * L);
    kpe.resize(S * dr);
    for (int64_t i = 0; i < s.n; ++i) {
      const float* src = kv.data() + (row + i) * (L + dr);
      kernels::RmsNorm(src, 1, L, w.kv_a_norm.data(), eps, lat.data() + (start + i) * L);
      std::memcpy(kpe.data() + (start + i) * dr, src + L, dr * sizeof(float));
      rope_.Apply(kpe.data() + (start + i) * dr, 1, dr, start + i);
      rope_.Apply(q.data() + (row + i) * nh * qd + c.qk_nope_head_dim, nh, qd, start + i);
    }
    const float* qs = q.data() + row * nh * qd;
    float* os = attn.data() + row * nh * dv;
    if (s.n == 1) {  // decode: absorbed form over the latent cache
      scratch.resize(nh * (2 * L + S));
      kernels::MlaAbsorbed(mla_, qs, 1, lat.data(), kpe.data(), S, w.kv_b.data(), os, scratch.data());
    } else if (s.n > 0) {  // prefill: expanded form
      scratch.resize(S * nh * (c.qk_nope_head_dim + dv) + s.n * S);
      kernels::MlaExpanded(mla_, qs, s.n, lat.data(), kpe.data(), S, w.kv_b.data(), os, scratch.data());
    }
    row += s.n;
  }
  kernels::Linear(attn.data(), T, nh * dv, w.o, out);
}

absl::Status Engine::RunBlock(const LayerWeights& lw, size_t slot, const std::vector<Segment>& segs,
                              std::vector<float>* hidden) {
  const int64_t H = cfg_.hidden_size;
  int64_t T = 0;
  for (const auto& s : segs) T += s.n;
  if (static_cast<int64_t>(hidden->size()) != T * H) {
    return absl::InvalidArgumentError(absl::StrCat("hidden has ", hidden->size(), " values, expected ", T * H));
  }
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  std::vector<float> normed(T * H), branch(T * H);
  double t0 = Now();
  kernels::RmsNorm(hidden->data(), T, H, lw.input_norm.data(), eps, normed.data());
  Attention(lw, slot, segs, normed.data(), T, branch.data());
  for (int64_t i = 0; i < T * H; ++i) (*hidden)[i] += branch[i];
  double t1 = Now();
  times_.attention += t1 - t0;
  kernels::RmsNorm(hidden->data(), T, H, lw.post_norm.data(), eps, normed.data());
  if (lw.is_moe) {
    RETURN_IF_ERROR(Moe(lw, normed.data(), T, branch.data()));
    times_.moe += Now() - t1;
  } else {
    std::vector<float> scratch(T * 3 * cfg_.intermediate_size);
    RunExpert(lw.dense, H, cfg_.intermediate_size, normed.data(), T, branch.data(), scratch.data());
    times_.dense += Now() - t1;
  }
  for (int64_t i = 0; i < T * H; ++i) (*hidden)[i] += branch[i];
  return absl::OkStatus();
}

absl::Status Engine::Moe(const LayerWeights& lw, const float* x, int64_t T, float* y) {
  const MoeWeights& w = lw.moe;
  const int64_t K = w.router_params.top_k;
  std::fill(y, y + T * w.hidden, 0.0f);
  std::vector<int32_t> ids;
  std::vector<float> weights;
  if (T > 0) {  // routed once: the observer, the local experts or the exchange all take these
    RouteTokens(w, x, T, &ids, &weights);
    if (on_route_) on_route_(lw.index, ids.data(), T * K);
  }
  if (exchange_ == nullptr) {
    if (T > 0) MoeExpertsAccumulate(w, x, T, ids.data(), weights.data(), K, y);
    return absl::OkStatus();
  }
  RETURN_IF_ERROR(exchange_->RunLayer(lw.index, T, x, ids.data(), weights.data(), y));
  if (T > 0) SharedExpertAccumulate(w, x, T, y);
  return absl::OkStatus();
}

absl::Status Engine::RunLayers(const std::vector<Segment>& segs, std::vector<float>* hidden) {
  const int64_t H = cfg_.hidden_size;
  int64_t T = 0;
  for (const auto& s : segs) T += s.n;
  if (static_cast<int64_t>(hidden->size()) != T * H) {
    return absl::InvalidArgumentError(absl::StrCat("hidden has ", hidden->size(), " values, expected ", T * H));
  }
  const auto& layers = shard_->layers();
  for (size_t li = 0; li < layers.size(); ++li) RETURN_IF_ERROR(RunBlock(layers[li], li, segs, hidden));
  for (const auto& s : segs) s.cache->length += s.n;
  return absl::OkStatus();
}

void Engine::Head(const std::vector<Segment>& segs, const std::vector<float>& hidden,
                  std::vector<float>* logits) const {
  const int64_t H = cfg_.hidden_size;
  std::vector<float> last;
  int64_t row = 0;
  for (const auto& s : segs) {
    row += s.n;
    if (s.n == 0) continue;
    last.insert(last.end(), hidden.begin() + (row - 1) * H, hidden.begin() + row * H);
  }
  const int64_t n = static_cast<int64_t>(last.size()) / H;
  kernels::RmsNorm(last.data(), n, H, shard_->final_norm().data(), static_cast<float>(cfg_.rms_norm_eps),
                   last.data());
  HeadRows(last.data(), n, logits);
}

absl::Status Engine::EmbedAndRun(const char* what, const std::vector<Segment>& segs, std::vector<float>* hidden) {
  if (!shard_->has_embed() || !shard_->has_head() || shard_->layer_begin() != 0 ||
      shard_->layer_end() != cfg_.num_hidden_layers) {
    return absl::FailedPreconditionError(absl::StrCat(what, " needs a shard holding the whole model"));
  }
  for (const auto& s : segs) {
    if (s.n <= 0) return absl::InvalidArgumentError(absl::StrCat(what, ": every segment needs at least one token"));
  }
  const double t0 = Now();
  Embed(segs, hidden);
  times_.embed_head += Now() - t0;
  return RunLayers(segs, hidden);
}

absl::Status Engine::Forward(const std::vector<Segment>& segs, std::vector<float>* logits) {
  std::vector<float> hidden;
  RETURN_IF_ERROR(EmbedAndRun("Forward", segs, &hidden));
  const double t0 = Now();
  Head(segs, hidden, logits);
  times_.embed_head += Now() - t0;
  return absl::OkStatus();
}

absl::Status Engine::ForwardHidden(const std::vector<Segment>& segs, std::vector<float>* normed) {
  RETURN_IF_ERROR(EmbedAndRun("ForwardHidden", segs, normed));
  const double t0 = Now();
  const int64_t H = cfg_.hidden_size, T = static_cast<int64_t>(normed->size()) / H;
  kernels::RmsNorm(normed->data(), T, H, shard_->final_norm().data(), static_cast<float>(cfg_.rms_norm_eps),
                   normed->data());
  times_.embed_head += Now() - t0;
  return absl::OkStatus();
}

void Engine::HeadRows(const float* normed, int64_t n, std::vector<float>* logits) const {
  const int64_t H = cfg_.hidden_size, V = cfg_.vocab_size;
  logits->resize(n * V);
  if (n > 0) kernels::Linear(normed, n, H, shard_->lm_head(), logits->data());
}

void SequenceCache::Truncate(int64_t n) {
  CHECK(n >= 0 && n <= length) << "Truncate(" << n << ") of a cache holding " << length << " tokens";
  if (n == length) return;
  for (auto* per_layer : {&latent, &k_pe, &k, &v}) {
    for (auto& values : *per_layer) {
      if (values.empty()) continue;
      const size_t per_token = values.size() / static_cast<size_t>(length);
      values.resize(static_cast<size_t>(n) * per_token);
    }
  }
  length = n;
}

absl::Status ValidatePrompt(const ModelConfig& cfg, const std::vector<int32_t>& tokens, int64_t max_new_tokens,
                            const std::string& what) {
  if (tokens.empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": empty prompt (need at least one token)"));
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= cfg.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": token ", i, " = ", tokens[i],
                                                     " is out of range [0, vocab_size = ", cfg.vocab_size, ")"));
    }
  }
  if (max_new_tokens < 0) return absl::InvalidArgumentError(absl::StrCat(what, ": max_new_tokens must be >= 0"));
  if (static_cast<int64_t>(tokens.size()) + max_new_tokens > cfg.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", tokens.size(), " prompt tokens + ", max_new_tokens,
                                                   " new tokens exceed the context of ", cfg.max_position_embeddings));
  }
  return absl::OkStatus();
}

}  // namespace expertmesh::worker
