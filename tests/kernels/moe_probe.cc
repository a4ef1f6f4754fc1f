// moe_probe: runs worker::MoeForwardLocal (router + routed experts + shared
// expert, the single-process reference of the expert-parallel engine) on
// random tiny-preset weights and writes weights, input and output to a
// safetensors file for tests/kernels/test_kernels.py.
//
//   em_moe_probe --out moe.safetensors [--seed 7] [--tokens 40]
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/safetensors.h"
#include "worker/moe.h"

namespace em = expertmesh;

int main(int argc, char** argv) {
  std::string out;
  uint64_t seed = 7;
  int64_t T = 40;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--out") == 0) out = argv[i + 1];
    else if (std::strcmp(argv[i], "--seed") == 0) seed = std::strtoull(argv[i + 1], nullptr, 10);
    else if (std::strcmp(argv[i], "--tokens") == 0) T = std::strtoll(argv[i + 1], nullptr, 10);
  }
  if (out.empty()) {
    std::fprintf(stderr, "usage: %s --out FILE [--seed S] [--tokens T]\n", argv[0]);
    return 2;
  }
  const em::ModelConfig cfg = *em::ModelConfig::Preset("tiny");
  const int64_t H = cfg.hidden_size, I = cfg.moe_intermediate_size, E = cfg.n_routed_experts;
  std::mt19937_64 rng(seed);
  auto normal = [&](size_t n, float std) {
    std::normal_distribution<float> d(0.0f, std);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
  };
  em::worker::MoeWeights w;
  w.hidden = H;
  w.expert_inter = I;
  w.shared_inter = I * cfg.n_shared_experts;
  w.router_params = em::kernels::RouterParams::FromConfig(cfg);
  const std::vector<float> router = normal(E * H, 1.0f / std::sqrt(static_cast<float>(H)));
  w.router = em::kernels::Weight::FromFloat(router, E, H);
  w.bias = normal(E, 0.05f);
  w.experts.resize(E);
  std::vector<float> all_gate_up, all_down;
  for (auto& e : w.experts) {
    const std::vector<float> gate_up = normal(2 * I * H, 0.08f), down = normal(H * I, 0.2f);
    e = em::worker::ExpertWeights::FromFloat(gate_up, down, H, I);
    all_gate_up.insert(all_gate_up.end(), gate_up.begin(), gate_up.end());
    all_down.insert(all_down.end(), down.begin(), down.end());
  }
  const std::vector<float> shared_gate_up = normal(2 * w.shared_inter * H, 0.08f),
                           shared_down = normal(H * w.shared_inter, 0.2f);
  w.shared = em::worker::ExpertWeights::FromFloat(shared_gate_up, shared_down, H, w.shared_inter);
  const std::vector<float> x = normal(T * H, 1.0f);
  std::vector<float> y(T * H, 0.0f);
  em::worker::MoeForwardLocal(w, x.data(), T, y.data());
  std::vector<int32_t> ids;
  std::vector<float> wts;
  em::worker::RouteTokens(w, x.data(), T, &ids, &wts);

  em::SafetensorsWriter st;
  st.AddF32("router", {E, H}, router);
  st.AddF32("bias", {E}, w.bias);
  st.AddF32("experts.gate_up", {E, 2 * I, H}, all_gate_up);
  st.AddF32("experts.down", {E, H, I}, all_down);
  st.AddF32("shared.gate_up", {2 * w.shared_inter, H}, shared_gate_up);
  st.AddF32("shared.down", {H, w.shared_inter}, shared_down);
  st.AddF32("x", {T, H}, x);
  st.AddF32("y", {T, H}, y);
  st.AddF32("ids", {T, w.router_params.top_k}, std::vector<float>(ids.begin(), ids.end()));
  st.AddF32("weights", {T, w.router_params.top_k}, wts);
  absl::Status s = st.Write(out);
  if (!s.ok()) {
    std::fprintf(stderr, "moe_probe: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
