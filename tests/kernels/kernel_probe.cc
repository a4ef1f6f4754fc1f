// kernel_probe: runs every CPU kernel on random inputs drawn from a seed and
// writes inputs and outputs to one safetensors file, for the independent
// numpy checks in tests/kernels/test_kernels.py.
//
//   em_kernel_probe --out probe.safetensors [--seed 7]
//
// Tensor names are "<case>.<field>"; all tensors are F32 (integer results such
// as router ids and sampled tokens are exact in F32). Scalar parameters of a
// case are stored as 1-element tensors so the checker needs no side channel.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/safetensors.h"
#include "kernels/cpu/kernels.h"

namespace em = expertmesh;
namespace k = expertmesh::kernels;

namespace {

class Probe {
 public:
  explicit Probe(uint64_t seed) : rng_(seed) {}

  std::vector<float> Normal(size_t n, float std = 1.0f) {
    std::normal_distribution<float> d(0.0f, std);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng_);
    return v;
  }
  void Put(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    if (n != static_cast<int64_t>(v.size())) {
      std::fprintf(stderr, "kernel_probe: internal error: %s has %zu values for %lld\n", name.c_str(),
                   v.size(), static_cast<long long>(n));
      std::exit(2);
    }
    w_.AddF32(name, std::move(shape), v);
  }
  void Scalar(const std::string& name, double v) { Put(name, {1}, {static_cast<float>(v)}); }
  em::SafetensorsWriter& writer() { return w_; }
  std::mt19937_64& rng() { return rng_; }

 private:
  std::mt19937_64 rng_;
  em::SafetensorsWriter w_;
};

// A buffer of `n` floats followed by a guard zone; Overrun() counts guard
// values a kernel wrote (a write past the size its contract documents).
class Guarded {
 public:
  static constexpr size_t kGuard = 1 << 16;
  explicit Guarded(int64_t n) : n_(static_cast<size_t>(n)), v_(n_ + kGuard, kSentinel) {}
  float* data() { return v_.data(); }
  std::vector<float> Values() const { return std::vector<float>(v_.begin(), v_.begin() + n_); }
  double Overrun() const {
    size_t bad = 0;
    for (size_t i = n_; i < v_.size(); ++i) bad += std::memcmp(&v_[i], &kSentinel, 4) != 0;
    return static_cast<double>(bad);
  }

 private:
  static constexpr float kSentinel = -12345.678f;
  size_t n_;
  std::vector<float> v_;
};

void LinearCases(Probe* p) {
  struct C { int64_t M, K, N; bool acc; const char* name; };
  for (const C& c : {C{7, 160, 96, false, "linear_a"}, C{1, 320, 160, false, "linear_b"},
                     C{13, 64, 128, true, "linear_acc"}}) {
    auto x = p->Normal(c.M * c.K), w = p->Normal(c.N * c.K, 0.1f), y = p->Normal(c.M * c.N);
    p->Put(std::string(c.name) + ".x", {c.M, c.K}, x);
    p->Put(std::string(c.name) + ".w", {c.N, c.K}, w);
    p->Put(std::string(c.name) + ".y0", {c.M, c.N}, y);
    k::Linear(x.data(), c.M, c.K, w.data(), c.N, y.data(), c.acc);
    p->Put(std::string(c.name) + ".y", {c.M, c.N}, y);
    p->Scalar(std::string(c.name) + ".accumulate", c.acc ? 1 : 0);
  }
}

// LinearFewRows (the no-packing kernel of MoE experts): remainders of its
// 4-row blocks of w (N % 4), of its 3-row blocks of x (M % 3) and of its
// 8-float steps over K (K % 8), and the expert shapes of the tiny preset.
void FewRowsCases(Probe* p) {
  struct C { int64_t M, K, N; const char* name; };
  for (const C& c : {C{17, 160, 96, "fewrows_a"}, C{1, 24, 160, "fewrows_b"}, C{5, 13, 7, "fewrows_c"},
                     C{48, 256, 130, "fewrows_d"}, C{2, 1024, 5, "fewrows_e"}, C{4, 3, 1, "fewrows_f"}}) {
    auto x = p->Normal(c.M * c.K), w = p->Normal(c.N * c.K, 0.1f);
    Guarded y(c.M * c.N);
    k::LinearFewRows(x.data(), c.M, c.K, w.data(), c.N, y.data());
    p->Put(std::string(c.name) + ".x", {c.M, c.K}, x);
    p->Put(std::string(c.name) + ".w", {c.N, c.K}, w);
    p->Put(std::string(c.name) + ".y", {c.M, c.N}, y.Values());
    p->Scalar(std::string(c.name) + ".overrun", y.Overrun());
  }
}

void NormCases(Probe* p) {
  const int64_t T = 5, H = 160;
  auto x = p->Normal(T * H, 3.0f), w = p->Normal(H, 0.2f);
  for (auto& v : w) v += 1.0f;
  x[3] = 0;  // one row scaled tiny: eps matters there
  for (int64_t i = 0; i < H; ++i) x[4 * H + i] *= 1e-4f;
  const float eps = 1e-6f;
  std::vector<float> y(T * H);
  k::RmsNorm(x.data(), T, H, w.data(), eps, y.data());
  p->Put("rmsnorm.x", {T, H}, x);
  p->Put("rmsnorm.w", {H}, w);
  p->Scalar("rmsnorm.eps", eps);
  p->Put("rmsnorm.y", {T, H}, y);
  std::vector<float> inplace = x;  // y may alias x
  k::RmsNorm(inplace.data(), T, H, w.data(), eps, inplace.data());
  p->Put("rmsnorm.y_inplace", {T, H}, inplace);
}

void SwigluCases(Probe* p) {
  const int64_t n = 1000;
  auto g = p->Normal(n, 4.0f), u = p->Normal(n);
  g[0] = 90.0f;   // exp overflow territory in either direction
  g[1] = -90.0f;
  g[2] = -1000.0f;
  g[3] = 0.0f;
  std::vector<float> out(n);
  k::SiluMul(g.data(), u.data(), n, out.data());
  p->Put("silumul.gate", {n}, g);
  p->Put("silumul.up", {n}, u);
  p->Put("silumul.out", {n}, out);
  std::vector<float> alias = g;
  k::SiluMul(alias.data(), u.data(), n, alias.data());
  p->Put("silumul.out_inplace", {n}, alias);

  const int64_t T = 9, H = 160, I = 24;
  auto x = p->Normal(T * H), wg = p->Normal(I * H, 0.08f), wu = p->Normal(I * H, 0.08f),
       wd = p->Normal(H * I, 0.2f);
  Guarded y(T * H), scratch(2 * T * I);
  k::SwiGlu(x.data(), T, H, I, wg.data(), wu.data(), wd.data(), y.data(), scratch.data());
  p->Scalar("swiglu.overrun_y", y.Overrun());
  p->Scalar("swiglu.overrun_scratch", scratch.Overrun());
  p->Put("swiglu.x", {T, H}, x);
  p->Put("swiglu.wg", {I, H}, wg);
  p->Put("swiglu.wu", {I, H}, wu);
  p->Put("swiglu.wd", {H, I}, wd);
  p->Put("swiglu.y", {T, H}, y.Values());
}

// Rope on `cfg`: vectors of `heads` heads laid out as [nope | rope] per head,
// rotated at several positions; the nope parts must stay untouched.
void RopeCase(Probe* p, const std::string& name, const em::ModelConfig& cfg) {
  k::Rope rope(cfg);
  const int64_t heads = 4, rope_dim = cfg.qk_rope_head_dim, stride = cfg.qk_nope_head_dim + rope_dim;
  const std::vector<int64_t> positions = {0, 1, 2, 7, 127, 128, 1000, 4095, 65536};
  const int64_t P = static_cast<int64_t>(positions.size());
  auto x = p->Normal(P * heads * stride);
  std::vector<float> y = x;
  for (int64_t i = 0; i < P; ++i) {
    rope.Apply(y.data() + i * heads * stride + cfg.qk_nope_head_dim, heads, stride, positions[i]);
  }
  std::vector<float> pos(positions.begin(), positions.end());
  std::vector<float> inv(rope.inv_freq().begin(), rope.inv_freq().end());
  p->Put(name + ".x", {P, heads, stride}, x);
  p->Put(name + ".positions", {P}, pos);
  p->Put(name + ".y", {P, heads, stride}, y);
  p->Put(name + ".inv_freq", {rope_dim / 2}, inv);
  p->Scalar(name + ".nope", static_cast<double>(cfg.qk_nope_head_dim));
  p->Scalar(name + ".softmax_scale", cfg.softmax_scale());
  p->Scalar(name + ".softmax_scale_mla", k::MlaShape::FromConfig(cfg).softmax_scale);
}

void RopeCases(Probe* p) {
  em::ModelConfig tiny = *em::ModelConfig::Preset("tiny");
  RopeCase(p, "rope_tiny", tiny);
  RopeCase(p, "rope_v3", *em::ModelConfig::Preset("deepseek-v3"));
  em::ModelConfig plain = tiny;
  plain.rope_scaling.type = "none";
  RopeCase(p, "rope_plain", plain);
  em::ModelConfig f1 = tiny;  // a custom YaRN: other betas / factor / theta
  f1.rope_scaling.factor = 8.0;
  f1.rope_scaling.beta_fast = 16.0;
  f1.rope_scaling.beta_slow = 2.0;
  f1.rope_scaling.original_max_position_embeddings = 512;
  f1.rope_theta = 50000.0;
  f1.qk_rope_head_dim = 32;
  RopeCase(p, "rope_custom", f1);
}

void RouteCase(Probe* p, const std::string& name, const k::RouterParams& rp, const std::vector<float>& logits,
               const std::vector<float>* bias, int64_t T) {
  std::vector<int32_t> ids(T * rp.top_k);
  std::vector<float> w(T * rp.top_k);
  k::Route(logits.data(), bias ? bias->data() : nullptr, T, rp, ids.data(), w.data());
  p->Put(name + ".logits", {T, rp.num_experts}, logits);
  if (bias) p->Put(name + ".bias", {rp.num_experts}, *bias);
  p->Put(name + ".ids", {T, rp.top_k}, std::vector<float>(ids.begin(), ids.end()));
  p->Put(name + ".weights", {T, rp.top_k}, w);
  p->Scalar(name + ".num_groups", rp.num_groups);
  p->Scalar(name + ".topk_groups", rp.topk_groups);
  p->Scalar(name + ".top_k", rp.top_k);
  p->Scalar(name + ".norm_topk_prob", rp.norm_topk_prob ? 1 : 0);
  p->Scalar(name + ".scaling", rp.scaling);
}

void RouteCases(Probe* p) {
  const em::ModelConfig tiny = *em::ModelConfig::Preset("tiny");
  const k::RouterParams rp = k::RouterParams::FromConfig(tiny);
  const int64_t E = rp.num_experts, T = 48;
  auto logits = p->Normal(T * E, 1.5f);
  auto bias = p->Normal(E, 0.05f);
  RouteCase(p, "route_random", rp, logits, &bias, T);
  RouteCase(p, "route_nobias", rp, logits, nullptr, T);

  // A large bias on a few experts: the choice follows the bias, the weights
  // must still be the raw scores.
  std::vector<float> big_bias(E, 0.0f);
  for (int e = 5; e < E; e += 37) big_bias[e] = 0.8f;
  k::RouterParams plain = rp;
  plain.norm_topk_prob = false;
  plain.scaling = 1.0f;
  RouteCase(p, "route_bigbias_unnormalised", plain, logits, &big_bias, T);

  // Group limiting must matter: per token, spread the 8 highest logits over 8
  // different groups (one very high expert per group, the rest low), and make
  // the groups with a strong second expert win, so the ungrouped top-8
  // (which would take one expert from each group) is not allowed.
  const int64_t per = E / rp.num_groups, Tg = 8;
  std::vector<float> forced(Tg * E);
  std::uniform_real_distribution<float> u(-6.0f, -4.0f);
  for (int64_t t = 0; t < Tg; ++t) {
    float* r = forced.data() + t * E;
    for (int64_t e = 0; e < E; ++e) r[e] = u(p->rng());
    for (int64_t g = 0; g < rp.num_groups; ++g) {
      r[g * per + (g + t) % per] = 3.0f + 0.1f * static_cast<float>(g);  // one star per group
      if ((g + t) % 2 == 0) r[g * per + (g + t + 1) % per] = 1.0f + 0.05f * static_cast<float>(g);
    }
  }
  RouteCase(p, "route_groups", rp, forced, nullptr, Tg);
}

void MlaCases(Probe* p) {
  const em::ModelConfig tiny = *em::ModelConfig::Preset("tiny");
  const k::MlaShape s = k::MlaShape::FromConfig(tiny);
  struct C { int64_t S, Tq; const char* name; };
  for (const C& c : {C{11, 11, "mla_prefill"}, C{11, 3, "mla_chunk"}, C{17, 1, "mla_decode"}, C{1, 1, "mla_one"}}) {
    const int64_t qd = s.nope + s.rope;
    auto q = p->Normal(c.Tq * s.heads * qd), latent = p->Normal(c.S * s.kv_lora),
         kpe = p->Normal(c.S * s.rope), wkvb = p->Normal(s.heads * (s.nope + s.v) * s.kv_lora, 0.15f);
    // Outputs and scratch have exactly the documented sizes (kernels.h),
    // followed by a guard zone that must stay untouched.
    Guarded out_e(c.Tq * s.heads * s.v), out_a(c.Tq * s.heads * s.v);
    Guarded scratch_e(c.S * s.heads * (s.nope + s.v) + c.Tq * c.S);
    Guarded scratch_a(c.Tq * s.heads * (s.kv_lora * 2 + c.S));
    k::MlaExpanded(s, q.data(), c.Tq, latent.data(), kpe.data(), c.S, wkvb.data(), out_e.data(), scratch_e.data());
    k::MlaAbsorbed(s, q.data(), c.Tq, latent.data(), kpe.data(), c.S, wkvb.data(), out_a.data(), scratch_a.data());
    const std::string n = c.name;
    p->Scalar(n + ".overrun_out_expanded", out_e.Overrun());
    p->Scalar(n + ".overrun_out_absorbed", out_a.Overrun());
    p->Scalar(n + ".overrun_scratch_expanded", scratch_e.Overrun());
    p->Scalar(n + ".overrun_scratch_absorbed", scratch_a.Overrun());
    p->Put(n + ".q", {c.Tq, s.heads, qd}, q);
    p->Put(n + ".latent", {c.S, s.kv_lora}, latent);
    p->Put(n + ".k_pe", {c.S, s.rope}, kpe);
    p->Put(n + ".w_kv_b", {s.heads * (s.nope + s.v), s.kv_lora}, wkvb);
    p->Put(n + ".out_expanded", {c.Tq, s.heads, s.v}, out_e.Values());
    p->Put(n + ".out_absorbed", {c.Tq, s.heads, s.v}, out_a.Values());
    p->Scalar(n + ".softmax_scale", s.softmax_scale);
    p->Scalar(n + ".heads", s.heads);
    p->Scalar(n + ".nope", s.nope);
    p->Scalar(n + ".v", s.v);
  }
}

void SampleCases(Probe* p) {
  // Greedy: argmax, lowest index on ties.
  const int64_t V = 1024;
  auto logits = p->Normal(V);
  k::SamplingParams greedy;
  p->Put("sample_greedy.logits", {V}, logits);
  p->Scalar("sample_greedy.token", k::Sample(logits.data(), V, greedy, 0));
  std::vector<float> tie(V, -1.0f);
  tie[700] = 5.0f;
  tie[300] = 5.0f;
  tie[900] = 5.0f;
  p->Scalar("sample_tie.token", k::Sample(tie.data(), V, greedy, 3));
  k::SamplingParams topk1{1.0f, 1, 1.0f, 42};  // top-k 1 is greedy whatever the temperature
  p->Scalar("sample_topk1.token", k::Sample(logits.data(), V, topk1, 5));

  // Distributions: many draws (varying step, and seed) from a small vocabulary.
  const std::vector<float> small = {2.0f, 1.0f, 0.5f, 0.0f, -1.0f, 1.5f, -3.0f, 0.25f};
  const int64_t n = static_cast<int64_t>(small.size()), draws = 20000;
  p->Put("sample_dist.logits", {n}, small);
  struct D { float t; int64_t k; float top_p; const char* name; };
  for (const D& d : {D{1.0f, 0, 1.0f, "t1"}, D{0.5f, 0, 1.0f, "t05"}, D{2.0f, 0, 1.0f, "t2"},
                     D{1.0f, 3, 1.0f, "k3"}, D{1.0f, 0, 0.7f, "p07"}, D{0.7f, 4, 0.9f, "t07k4p09"}}) {
    std::vector<float> counts(n, 0.0f);
    for (int64_t i = 0; i < draws; ++i) {
      k::SamplingParams sp{d.t, d.k, d.top_p, static_cast<uint64_t>(1000 + i / 100)};
      const int32_t tok = k::Sample(small.data(), n, sp, static_cast<uint64_t>(i % 100));
      if (tok < 0 || tok >= n) {
        std::fprintf(stderr, "kernel_probe: Sample returned %d for vocab %lld\n", tok, static_cast<long long>(n));
        std::exit(1);
      }
      counts[tok] += 1.0f;
    }
    const std::string base = std::string("sample_dist_") + d.name;
    p->Put(base + ".counts", {n}, counts);
    p->Scalar(base + ".temperature", d.t);
    p->Scalar(base + ".top_k", static_cast<double>(d.k));
    p->Scalar(base + ".top_p", d.top_p);
  }
  // Determinism: the same (seed, step) draws the same token.
  k::SamplingParams sp{1.0f, 0, 1.0f, 77};
  const int32_t a = k::Sample(logits.data(), V, sp, 9), b = k::Sample(logits.data(), V, sp, 9);
  p->Scalar("sample_repeat.same", a == b ? 1 : 0);
}

}  // namespace

int main(int argc, char** argv) {
  std::string out;
  uint64_t seed = 7;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
      out = argv[++i];
    } else if (std::strcmp(argv[i], "--seed") == 0 && i + 1 < argc) {
      seed = std::strtoull(argv[++i], nullptr, 10);
    } else {
      std::fprintf(stderr, "usage: %s --out FILE [--seed S]\n", argv[0]);
      return 2;
    }
  }
  if (out.empty()) {
    std::fprintf(stderr, "usage: %s --out FILE [--seed S]\n", argv[0]);
    return 2;
  }
  Probe p(seed);
  LinearCases(&p);
  FewRowsCases(&p);
  NormCases(&p);
  SwigluCases(&p);
  RopeCases(&p);
  RouteCases(&p);
  MlaCases(&p);
  SampleCases(&p);
  absl::Status s = p.writer().Write(out);
  if (!s.ok()) {
    std::fprintf(stderr, "kernel_probe: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
