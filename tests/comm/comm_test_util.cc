#include "tests/comm/comm_test_util.h"

#include <cmath>
#include <random>

#include "common/config.h"
#include "gtest/gtest.h"

namespace expertmesh::testing_util {
namespace {

void Fill(std::vector<float>* v, int64_t n, float scale, std::mt19937_64* rng) {
  std::normal_distribution<float> dist(0.0f, scale);
  v->resize(static_cast<size_t>(n));
  for (float& x : *v) x = dist(*rng);
}

worker::MoeWeights BuildTiny() {
  const ModelConfig cfg = *ModelConfig::Preset("tiny");
  worker::MoeWeights w;
  w.hidden = cfg.hidden_size;
  w.expert_inter = cfg.moe_intermediate_size;
  w.shared_inter = cfg.moe_intermediate_size * cfg.n_shared_experts;
  w.router_params = kernels::RouterParams::FromConfig(cfg);
  const int64_t H = w.hidden, I = w.expert_inter, E = cfg.n_routed_experts;
  std::mt19937_64 rng(20240611);
  std::vector<float> router, gate_up, down;
  Fill(&router, E * H, 1.0f / std::sqrt(static_cast<float>(H)), &rng);
  w.router = kernels::Weight::FromFloat(std::move(router), E, H);
  Fill(&w.bias, E, 0.05f, &rng);
  w.experts.resize(static_cast<size_t>(E));
  for (auto& e : w.experts) {
    Fill(&gate_up, 2 * I * H, 1.0f / std::sqrt(static_cast<float>(H)), &rng);
    Fill(&down, H * I, 1.0f / std::sqrt(static_cast<float>(I)), &rng);
    e = worker::ExpertWeights::FromFloat(gate_up, down, H, I);
  }
  Fill(&gate_up, 2 * w.shared_inter * H, 1.0f / std::sqrt(static_cast<float>(H)), &rng);
  Fill(&down, H * w.shared_inter, 1.0f / std::sqrt(static_cast<float>(w.shared_inter)), &rng);
  w.shared = worker::ExpertWeights::FromFloat(gate_up, down, H, w.shared_inter);
  return w;
}

}  // namespace

const worker::MoeWeights& TinyMoeWeights() {
  static const worker::MoeWeights* w = new worker::MoeWeights(BuildTiny());
  return *w;
}

std::vector<float> RandomVector(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> v;
  Fill(&v, n, 1.0f, &rng);
  return v;
}

double RelativeError(const float* a, const float* b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  if (den == 0) return std::sqrt(num);
  return std::sqrt(num / den);
}

}  // namespace expertmesh::testing_util
