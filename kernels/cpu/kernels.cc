#include "kernels/cpu/kernels.h"

#include <cblas.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "common/random.h"
#include "common/thread_pool.h"
#include "kernels/cpu/weight.h"

namespace expertmesh::kernels {

// The fp32 weight seen as a kernels::Weight (a view: no copy), so fp32 takes
// the same kernels as bf16 and fp8 (weight.cc).
void Linear(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y, bool accumulate) {
  if (M == 0 || N == 0) return;
  Linear(x, M, K, Weight::Mapped(DType::kF32, w, N, K, nullptr), y, accumulate);
}

void RmsNorm(const float* x, int64_t T, int64_t H, const float* w, float eps, float* y) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * H;
    float* yr = y + t * H;
    double ss = 0.0;
    for (int64_t i = 0; i < H; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(H) + eps));
    for (int64_t i = 0; i < H; ++i) yr[i] = xr[i] * inv * w[i];
  }
}

void SiluMul(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void SwiGlu(const float* x, int64_t T, int64_t H, int64_t I, const float* wg, const float* wu,
            const float* wd, float* y, float* scratch) {
  if (T == 0) return;
  float* g = scratch;
  float* u = scratch + T * I;
  Linear(x, T, H, wg, I, g);
  Linear(x, T, H, wu, I, u);
  SiluMul(g, u, T * I, g);
  Linear(g, T, I, wd, H, y);
}

Rope::Rope(const ModelConfig& c) : dim_(c.qk_rope_head_dim) {
  const int64_t half = dim_ / 2;
  inv_freq_.resize(half);
  for (int64_t i = 0; i < half; ++i) {
    inv_freq_[i] = 1.0 / std::pow(c.rope_theta, static_cast<double>(2 * i) / static_cast<double>(dim_));
  }
  if (c.rope_scaling.type != "yarn") return;
  const auto& r = c.rope_scaling;
  const double orig = static_cast<double>(r.original_max_position_embeddings);
  auto correction_dim = [&](double rotations) {
    return static_cast<double>(dim_) * std::log(orig / (rotations * 2.0 * M_PI)) / (2.0 * std::log(c.rope_theta));
  };
  double low = std::floor(correction_dim(r.beta_fast));
  double high = std::ceil(correction_dim(r.beta_slow));
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim_ - 1));
  if (low == high) high += 0.001;
  for (int64_t i = 0; i < half; ++i) {
    const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    const double smooth = 1.0 - ramp;  // 1: keep the original frequency (high-frequency dims)
    inv_freq_[i] = inv_freq_[i] / r.factor * (1.0 - smooth) + inv_freq_[i] * smooth;
  }
}

namespace {
// cos and sin of pos * inv_freq[i], i < half (in double, then rounded).
void RopeAngles(const std::vector<double>& inv_freq, int64_t half, int64_t pos, float* cs, float* sn) {
  for (int64_t i = 0; i < half; ++i) {
    const double a = static_cast<double>(pos) * inv_freq[static_cast<size_t>(i)];
    cs[i] = static_cast<float>(std::cos(a));
    sn[i] = static_cast<float>(std::sin(a));
  }
}
}  // namespace

void Rope::Apply(float* x, int64_t n, int64_t stride, int64_t pos) const {
  const int64_t half = dim_ / 2;
  float cs[512], sn[512];
  RopeAngles(inv_freq_, half, pos, cs, sn);
  for (int64_t v = 0; v < n; ++v) {
    float* p = x + v * stride;
    for (int64_t i = 0; i < half; ++i) {
      const float a = p[2 * i], b = p[2 * i + 1];
      p[2 * i] = a * cs[i] - b * sn[i];
      p[2 * i + 1] = a * sn[i] + b * cs[i];
    }
  }
}

HalfRope::HalfRope(const ModelConfig& c) : dim_(c.dense_arch() ? c.attn_head_dim() : 0) {
  const int64_t half = dim_ / 2;
  inv_freq_.resize(half);
  for (int64_t i = 0; i < half; ++i) {
    inv_freq_[i] = 1.0 / std::pow(c.rope_theta, static_cast<double>(2 * i) / static_cast<double>(dim_));
  }
  if (c.rope_scaling.type != "llama3") return;
  const auto& r = c.rope_scaling;
  const double orig = static_cast<double>(r.original_max_position_embeddings);
  const double low_wavelen = orig / r.low_freq_factor, high_wavelen = orig / r.high_freq_factor;
  for (int64_t i = 0; i < half; ++i) {
    const double wavelen = 2.0 * M_PI / inv_freq_[i];
    if (wavelen < high_wavelen) continue;  // high frequencies: kept
    if (wavelen > low_wavelen) {           // low frequencies: divided by the factor
      inv_freq_[i] /= r.factor;
      continue;
    }
    const double smooth = (orig / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
    inv_freq_[i] = (1.0 - smooth) * inv_freq_[i] / r.factor + smooth * inv_freq_[i];
  }
}

void HalfRope::Apply(float* x, int64_t n, int64_t stride, int64_t pos) const {
  const int64_t half = dim_ / 2;
  float cs[2048], sn[2048];
  RopeAngles(inv_freq_, half, pos, cs, sn);
  for (int64_t v = 0; v < n; ++v) {
    float* p = x + v * stride;
    for (int64_t i = 0; i < half; ++i) {
      const float a = p[i], b = p[i + half];
      p[i] = a * cs[i] - b * sn[i];
      p[i + half] = b * cs[i] + a * sn[i];
    }
  }
}

GqaShape GqaShape::FromConfig(const ModelConfig& c) {
  return {c.num_attention_heads, c.num_key_value_heads, c.attn_head_dim(), static_cast<float>(c.softmax_scale())};
}

void GqaAttention(const GqaShape& s, const float* q, int64_t Tq, const float* k, const float* v, int64_t S,
                  float* out, float* scratch) {
  // Per KV head: its K [S, d] and V^T [d, S] and the queries of its heads
  // [R = Tq * group, d] (row j * group + g: query j, head kvh * group + g)
  // are packed, then scores = Q . K^T and out = softmax(scores) . V are two
  // GEMMs (Linear: x . w^T).
  const int64_t d = s.dim, group = s.heads / s.kv_heads, kv_stride = s.kv_heads * d, R = Tq * group;
  float* kp = scratch;       // [S, d]
  float* vt = kp + S * d;    // [d, S]
  float* qp = vt + S * d;    // [R, d], then the output rows
  float* sc = qp + R * d;    // [R, S]
  for (int64_t kvh = 0; kvh < s.kv_heads; ++kvh) {
    for (int64_t t = 0; t < S; ++t) {
      const float* kt = k + t * kv_stride + kvh * d;
      const float* vr = v + t * kv_stride + kvh * d;
      std::copy(kt, kt + d, kp + t * d);
      for (int64_t i = 0; i < d; ++i) vt[i * S + t] = vr[i];
    }
    for (int64_t j = 0; j < Tq; ++j) {
      for (int64_t g = 0; g < group; ++g) {
        const float* src = q + (j * s.heads + kvh * group + g) * d;
        std::copy(src, src + d, qp + (j * group + g) * d);
      }
    }
    Linear(qp, R, d, kp, S, sc);
    for (int64_t r = 0; r < R; ++r) {
      float* row = sc + r * S;
      const int64_t visible = S - Tq + r / group + 1;  // causal
      float mx = -INFINITY;
      for (int64_t t = 0; t < visible; ++t) mx = std::max(mx, row[t] * s.softmax_scale);
      float sum = 0;
      for (int64_t t = 0; t < visible; ++t) {
        row[t] = std::exp(row[t] * s.softmax_scale - mx);
        sum += row[t];
      }
      const float inv = 1.0f / sum;
      for (int64_t t = 0; t < visible; ++t) row[t] *= inv;
      std::fill(row + visible, row + S, 0.0f);
    }
    Linear(sc, R, S, vt, d, qp);
    for (int64_t j = 0; j < Tq; ++j) {
      for (int64_t g = 0; g < group; ++g) {
        const float* src = qp + (j * group + g) * d;
        std::copy(src, src + d, out + (j * s.heads + kvh * group + g) * d);
      }
    }
  }
}

RouterParams RouterParams::FromConfig(const ModelConfig& c) {
  RouterParams p;
  p.num_experts = c.n_routed_experts;
  p.num_groups = c.topk_method == "greedy" ? 1 : c.n_group;
  p.topk_groups = c.topk_method == "greedy" ? 1 : c.topk_group;
  p.top_k = c.num_experts_per_tok;
  p.sigmoid = c.scoring_func == "sigmoid";
  p.norm_topk_prob = c.norm_topk_prob;
  p.scaling = static_cast<float>(c.routed_scaling_factor);
  return p;
}

void Route(const float* logits, const float* bias, int64_t T, const RouterParams& p, int32_t* ids,
           float* weights) {
  const int64_t E = p.num_experts, G = p.num_groups, per = E / G, K = p.top_k;
  std::vector<float> score(E), choice(E), gscore(G);
  std::vector<int32_t> order(E), gorder(G);
  for (int64_t t = 0; t < T; ++t) {
    const float* l = logits + t * E;
    if (p.sigmoid) {
      for (int64_t e = 0; e < E; ++e) score[e] = 1.0f / (1.0f + std::exp(-l[e]));
    } else {
      const float mx = *std::max_element(l, l + E);
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += (score[e] = std::exp(l[e] - mx));
      for (int64_t e = 0; e < E; ++e) score[e] = static_cast<float>(score[e] / sum);
    }
    for (int64_t e = 0; e < E; ++e) choice[e] = score[e] + (bias != nullptr ? bias[e] : 0.0f);
    if (G > 1) {
      for (int64_t g = 0; g < G; ++g) {
        float a = -std::numeric_limits<float>::infinity(), b = a;  // top-2 of the group
        for (int64_t e = g * per; e < (g + 1) * per; ++e) {
          if (choice[e] > a) {
            b = a;
            a = choice[e];
          } else if (choice[e] > b) {
            b = choice[e];
          }
        }
        gscore[g] = a + b;
      }
      std::iota(gorder.begin(), gorder.end(), 0);
      std::stable_sort(gorder.begin(), gorder.end(), [&](int32_t x, int32_t y) { return gscore[x] > gscore[y]; });
      std::vector<char> keep(G, 0);
      for (int64_t i = 0; i < p.topk_groups; ++i) keep[gorder[i]] = 1;
      for (int64_t e = 0; e < E; ++e) {
        if (!keep[e / per]) choice[e] = -std::numeric_limits<float>::infinity();
      }
    }
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int32_t x, int32_t y) {
      return choice[x] > choice[y] || (choice[x] == choice[y] && x < y);
    });
    double sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += score[order[k]];
    const double norm = (p.norm_topk_prob && K > 1) ? 1.0 / (sum + 1e-20) : 1.0;
    for (int64_t k = 0; k < K; ++k) {
      ids[t * K + k] = order[k];
      weights[t * K + k] = static_cast<float>(score[order[k]] * norm * p.scaling);
    }
  }
}

MlaShape MlaShape::FromConfig(const ModelConfig& c) {
  return {c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank,
          static_cast<float>(c.softmax_scale())};
}

namespace {
// In-place softmax over n values; returns nothing, values become probabilities.
void Softmax(float* x, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, x[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (x[i] = std::exp(x[i] - mx));
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}
}  // namespace

void MlaExpanded(const MlaShape& s, const float* q, int64_t Tq, const float* latent, const float* k_pe,
                 int64_t S, const float* w_kv_b, float* out, float* scratch) {
  const int64_t H = s.heads, dn = s.nope, dr = s.rope, dv = s.v, qd = dn + dr, kvd = dn + dv;
  const int ld_kv = static_cast<int>(H * kvd), ld_q = static_cast<int>(H * qd), ld_o = static_cast<int>(H * dv);
  float* kv = scratch;               // [S, H*(dn+dv)]: per head k_nope then v
  float* sc = scratch + S * H * kvd;  // [Tq, S] scores of one head
  Linear(latent, S, s.kv_lora, w_kv_b, H * kvd, kv);
  for (int64_t h = 0; h < H; ++h) {
    // scores = q_nope . k_nope^T + q_pe . k_pe^T
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(Tq), static_cast<int>(S),
                static_cast<int>(dn), s.softmax_scale, q + h * qd, ld_q, kv + h * kvd, ld_kv, 0.0f, sc,
                static_cast<int>(S));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(Tq), static_cast<int>(S),
                static_cast<int>(dr), s.softmax_scale, q + h * qd + dn, ld_q, k_pe, static_cast<int>(dr), 1.0f, sc,
                static_cast<int>(S));
    for (int64_t t = 0; t < Tq; ++t) {
      const int64_t visible = S - Tq + t + 1;
      float* row = sc + t * S;
      Softmax(row, visible);
      std::fill(row + visible, row + S, 0.0f);
    }
    // out_h = P . v_h
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(Tq), static_cast<int>(dv),
                static_cast<int>(S), 1.0f, sc, static_cast<int>(S), kv + h * kvd + dn, ld_kv, 0.0f, out + h * dv,
                ld_o);
  }
}

void MlaAbsorbed(const MlaShape& s, const float* q, int64_t Tq, const float* latent, const float* k_pe,
                 int64_t S, const float* w_kv_b, float* out, float* scratch) {
  const int64_t H = s.heads, dn = s.nope, dr = s.rope, dv = s.v, qd = dn + dr, kvd = dn + dv, L = s.kv_lora;
  // Rows (head h, query t), head-major: the latent cache is shared by all
  // heads (one KV head, as in MQA), so the scores and the latent outputs of
  // every head are one GEMM each against it; only W_uk and W_uv are per head.
  const int64_t R = H * Tq;
  float* qa = scratch;    // [R, L] absorbed queries
  float* ol = qa + R * L; // [R, L] latent outputs
  float* sc = ol + R * L; // [R, S] scores, then probabilities
  for (int64_t h = 0; h < H; ++h) {  // qa[h, t] = q_nope[t, h] . W_uk(h)  ([Tq, dn] x [dn, L])
    const float* wk = w_kv_b + h * kvd * L;
    if (Tq == 1) {
      cblas_sgemv(CblasRowMajor, CblasTrans, static_cast<int>(dn), static_cast<int>(L), 1.0f, wk,
                  static_cast<int>(L), q + h * qd, 1, 0.0f, qa + h * L, 1);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(Tq), static_cast<int>(L),
                  static_cast<int>(dn), 1.0f, q + h * qd, static_cast<int>(H * qd), wk, static_cast<int>(L), 0.0f,
                  qa + h * Tq * L, static_cast<int>(L));
    }
  }
  Linear(qa, R, L, latent, S, sc);  // scores = qa . latent^T, all heads at once
  for (int64_t h = 0; h < H; ++h) {  // += q_pe . k_pe^T
    if (Tq == 1) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(S), static_cast<int>(dr), 1.0f, k_pe,
                  static_cast<int>(dr), q + h * qd + dn, 1, 1.0f, sc + h * S, 1);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(Tq), static_cast<int>(S),
                  static_cast<int>(dr), 1.0f, q + h * qd + dn, static_cast<int>(H * qd), k_pe, static_cast<int>(dr),
                  1.0f, sc + h * Tq * S, static_cast<int>(S));
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t visible = S - Tq + r % Tq + 1;
    float* row = sc + r * S;
    for (int64_t j = 0; j < visible; ++j) row[j] *= s.softmax_scale;
    Softmax(row, visible);
    std::fill(row + visible, row + S, 0.0f);
  }
  // ol = P . latent ([R, S] x [S, L]), all heads at once
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(R), static_cast<int>(L),
              static_cast<int>(S), 1.0f, sc, static_cast<int>(S), latent, static_cast<int>(L), 0.0f, ol,
              static_cast<int>(L));
  for (int64_t h = 0; h < H; ++h) {  // out[t, h] = ol[h, t] . W_uv(h)^T
    const float* wv = w_kv_b + h * kvd * L + dn * L;  // [dv, L]
    if (Tq == 1) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(dv), static_cast<int>(L), 1.0f, wv,
                  static_cast<int>(L), ol + h * L, 1, 0.0f, out + h * dv, 1);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(Tq), static_cast<int>(dv),
                  static_cast<int>(L), 1.0f, ol + h * Tq * L, static_cast<int>(L), wv, static_cast<int>(L), 0.0f,
                  out + h * dv, static_cast<int>(H * dv));
    }
  }
}


int32_t Sample(const float* logits, int64_t V, const SamplingParams& p, uint64_t step) {
  if (p.temperature <= 0.0f) {
    return static_cast<int32_t>(std::max_element(logits, logits + V) - logits);
  }
  std::vector<int32_t> idx(V);
  std::iota(idx.begin(), idx.end(), 0);
  int64_t n = V;
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  if (p.top_k > 0 && p.top_k < V) {
    n = p.top_k;
    std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), by_logit);
  } else {
    std::sort(idx.begin(), idx.end(), by_logit);
  }
  std::vector<double> prob(n);
  const double mx = logits[idx[0]];
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (prob[i] = std::exp((logits[idx[i]] - mx) / p.temperature));
  for (auto& x : prob) x /= sum;
  if (p.top_p < 1.0f) {  // smallest prefix whose mass reaches top_p
    double cum = 0;
    int64_t keep = n;
    for (int64_t i = 0; i < n; ++i) {
      cum += prob[i];
      if (cum >= p.top_p) {
        keep = i + 1;
        break;
      }
    }
    n = keep;
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += prob[i];
    for (int64_t i = 0; i < n; ++i) prob[i] /= s;
  }
  const double u = UnitInterval(SplitMix64(SplitMix64(p.seed) ^ step));
  double cum = 0;
  for (int64_t i = 0; i < n; ++i) {
    cum += prob[i];
    if (u < cum) return idx[i];
  }
  return idx[n - 1];
}

// Both split their work over the pool's threads (BLAS itself is
// single-threaded, see common/thread_pool.h), so they measure what every core
// together reaches, as the kernels do.
double MeasureSgemmPeakGflops(int64_t n, double min_seconds) {
  std::vector<float> a(n * n, 0.5f), b(n * n, 0.25f), c(n * n, 0.0f);
  ThreadPool& pool = ThreadPool::Default();
  const int64_t rows = std::max<int64_t>(1, (n + pool.num_threads() - 1) / pool.num_threads());
  auto run = [&]() {
    pool.ParallelFor(n, rows, [&](int64_t r0, int64_t r1, int) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(r1 - r0), static_cast<int>(n),
                  static_cast<int>(n), 1.0f, a.data() + r0 * n, static_cast<int>(n), b.data(), static_cast<int>(n),
                  0.0f, c.data() + r0 * n, static_cast<int>(n));
    });
  };
  run();  // warm up
  double best = 0;
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    const auto t0 = std::chrono::steady_clock::now();
    run();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * n * n * n / dt / 1e9);
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > min_seconds) break;
  }
  return best;
}

double MeasureReadBandwidthGBps(int64_t bytes, double min_seconds) {
  const int64_t n = bytes / 4;
  std::vector<float> a(n, 1.0f);
  ThreadPool& pool = ThreadPool::Default();
  // Timed in slices of 32 MiB read in turn (each cold: the whole buffer is
  // far larger than the caches), so a preemption on a shared machine spoils
  // one slice, not the measurement.
  const int64_t slice = std::min<int64_t>(n, int64_t{8} << 20);
  const int64_t part = std::max<int64_t>(1, (slice + pool.num_threads() - 1) / pool.num_threads());
  std::atomic<float> sink{0.0f};
  auto run = [&](int64_t s0, int64_t s1) {
    pool.ParallelFor(s1 - s0, part, [&](int64_t b, int64_t e, int) {
      const float s = cblas_sasum(static_cast<int>(e - b), a.data() + s0 + b, 1);
      sink.store(sink.load(std::memory_order_relaxed) + s, std::memory_order_relaxed);
    });
  };
  run(0, n);  // warm up, fault the pages in
  double best = 0;
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    for (int64_t s0 = 0; s0 + slice <= n; s0 += slice) {
      const auto t0 = std::chrono::steady_clock::now();
      run(s0, s0 + slice);
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, static_cast<double>(slice) * 4.0 / dt / 1e9);
    }
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > min_seconds) break;
  }
  return best;
}

}  // namespace expertmesh::kernels
