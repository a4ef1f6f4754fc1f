// The MoE feed-forward of one layer on one process: router, routed experts
// (grouped by expert, one GEMM pair per expert) and the shared expert.
// The expert-parallel engine (dispatch.h) computes the same function with the
// routed experts spread over ranks; this is its single-process reference.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu/kernels.h"

namespace expertmesh::worker {

// One SwiGLU expert: gate and up fused into one [2I, H] matrix (gate rows
// first), down [H, I].
struct ExpertWeights {
  std::vector<float> gate_up;
  std::vector<float> down;
  bool loaded() const { return !down.empty(); }
};

struct MoeWeights {
  int64_t hidden = 0;
  int64_t expert_inter = 0;        // moe_intermediate_size
  int64_t shared_inter = 0;        // moe_intermediate_size * n_shared_experts (0: none)
  std::vector<float> router;       // [E, H]
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

// Runs one expert (gate_up fused) on T contiguous tokens: out[T,H] (overwritten).
// scratch: 3*T*I floats. A GEMM with T <= kernels::kLinearFewRowsMax rows runs on
// kernels::LinearFewRows when BLAS is single-threaded (OPENBLAS_NUM_THREADS=1,
// or inside the MoE layer's own threads), on BLAS otherwise.
void RunExpert(const ExpertWeights& e, int64_t H, int64_t I, const float* x, int64_t T, float* out,
               float* scratch);

}  // namespace expertmesh::worker
