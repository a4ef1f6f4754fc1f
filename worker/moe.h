// The MoE feed-forward of one layer on one process: router, routed experts
// (grouped by expert, one GEMM pair per expert) and the shared expert.
// The expert-parallel engine (dispatch.h) computes the same function with the
// routed experts spread over ranks; this is its single-process reference.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "kernels/cpu/weight.h"

namespace expertmesh::worker {

// One SwiGLU expert: gate [I, H], up [I, H], down [H, I], each in the
// checkpoint's precision (mapped from the file when its dtype allows).
struct ExpertWeights {
  kernels::Weight gate, up, down;
  bool loaded() const { return !down.empty(); }
  // Owned fp32 weights from a fused gate_up [2I, H] (gate rows first) and
  // down [H, I] (tests, generated experts).
  static ExpertWeights FromFloat(const std::vector<float>& gate_up, std::vector<float> down, int64_t H, int64_t I);
};

struct MoeWeights {
  int64_t hidden = 0;
  int64_t expert_inter = 0;        // moe_intermediate_size
  int64_t shared_inter = 0;        // moe_intermediate_size * n_shared_experts (0: none)
  kernels::Weight router;          // [E, H]
  std::vector<float> bias;         // [E] e_score_correction_bias
  std::vector<ExpertWeights> experts;  // by logical id; empty() entries are not on this process
  ExpertWeights shared;
  kernels::RouterParams router_params;
};

// Router only: ids/weights [T, top_k].
void RouteTokens(const MoeWeights& w, const float* x, int64_t T, std::vector<int32_t>* ids,
                 std::vector<float>* weights);

// Routed experts for a token list grouped by expert:
// y[T,H] += sum over (t, k) of weights[t,k] * expert[ids[t,k]](x[t]).
// Every expert named in ids must be loaded.
void RoutedExpertsAccumulate(const MoeWeights& w, const float* x, int64_t T, const int32_t* ids,
                             const float* weights, int64_t top_k, float* y);

// Routed experts and the shared expert in one pass (routes given):
// y[T,H] += routed(x) + shared(x), per token the routed terms in k order,
// then the shared one (bitwise RoutedExpertsAccumulate followed by
// SharedExpertAccumulate, faster).
void MoeExpertsAccumulate(const MoeWeights& w, const float* x, int64_t T, const int32_t* ids, const float* weights,
                          int64_t top_k, float* y);

// Shared expert: y[T,H] += shared(x).
void SharedExpertAccumulate(const MoeWeights& w, const float* x, int64_t T, float* y);

// The whole layer on one process: y[T,H] = routed(x) + shared(x). x is the
// post-attention-normed hidden state.
void MoeForwardLocal(const MoeWeights& w, const float* x, int64_t T, float* y);

// Runs one expert on T contiguous tokens: out[T,H] (overwritten).
// scratch: 3*T*I floats. Its Linear calls use the thread pool at the top level
// and run single-threaded inside a pool task (the MoE layer's per-expert tasks).
void RunExpert(const ExpertWeights& e, int64_t H, int64_t I, const float* x, int64_t T, float* out,
               float* scratch);

}  // namespace expertmesh::worker
