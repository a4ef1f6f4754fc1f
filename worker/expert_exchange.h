// The MoE exchange seam: how an engine hands one MoE layer's routed tokens to
// the expert-parallel machinery that runs them on the EP ranks holding their
// experts and brings the weighted outputs back.
//
// The engine routes each MoE layer ONCE (router GEMM + group-limited top-k)
// and calls Run with the routes, on every rank of the stage for every MoE
// layer, also with T == 0 (every rank joins every all-to-all). The exchange
// does not route again. Two implementations, one protocol (the host-side
// layout of worker/ep_layout.h):
//   * CpuEpExchange (worker/dispatch.h): host memory, the CPU Engine
//     (worker/model.h), experts run with RunExpert;
//   * CudaEpExchange (worker/cuda_ep.h): device memory, the CudaEngine
//     (worker/cuda_engine.h), experts run with CudaEngine::RunLocalExperts.
// The pointers of a Layer live where the engine computes: host memory for
// the CPU engine, device memory (produced on the engine's stream, not yet
// synchronised) for the CUDA engine. The shared expert is the engine's.
//
// Expert load (tokens routed to each expert) is counted from the same routes:
// a RouteObserver sees every MoE layer's routes once, on the host. The CPU
// engine, whose routes are host memory, calls it itself; the CUDA engine
// passes it down in Layer::on_route and the exchange calls it when it has
// brought the routes to the host (a CUDA engine without an exchange keeps
// its routes on the device and reports none).
#pragma once

#include <cstdint>
#include <functional>

#include "absl/status/status.h"

namespace expertmesh::worker {

// Called with one MoE layer's routed logical experts (host memory, n = T *
// top_k ids, token-major) on the engine's thread; must not block for long.
using RouteObserver = std::function<void(int64_t layer, const int32_t* ids, int64_t n)>;

// Seconds an exchange spent, accumulated over layers and steps.
struct ExchangeTimes {
  double dispatch = 0;  // layout, packing and the dispatch all-to-alls
  double expert = 0;    // this rank's experts on the records it received
  double combine = 0;   // the combine all-to-all and the summing
};

class ExpertExchange {
 public:
  virtual ~ExpertExchange() = default;

  // One MoE layer of this rank's step (see above for where the pointers live).
  struct Layer {
    int64_t layer = 0;               // model layer index
    int64_t T = 0;                   // this rank's tokens
    const void* x = nullptr;         // [T, H] post-attention-normed hidden states (fp32; bf16 on a bf16 CUDA engine)
    const int32_t* ids = nullptr;    // [T, top_k] routed logical experts
    const float* weights = nullptr;  // [T, top_k] routing weights (scaled, as the router returns them)
    float* y = nullptr;              // [T, H] fp32: y[t] += sum over k of weights[t,k] * expert[ids[t,k]](x[t])
    const RouteObserver* on_route = nullptr;  // non-null: call it once with the routes on the host
  };

  // Blocking and collective over the stage's EP ranks; x, ids and weights
  // are not used after it returns. Errors: the communicator's (a deadline per
  // all-to-all), a route outside the placement (kInvalidArgument), a missing
  // local expert (kFailedPrecondition, before any exchange).
  virtual absl::Status Run(const Layer& layer) = 0;
  // Run on a Layer made of these fields (the engines' call).
  absl::Status RunLayer(int64_t layer, int64_t T, const void* x, const int32_t* ids, const float* weights, float* y,
                        const RouteObserver* on_route = nullptr) {
    Layer l;
    l.layer = layer;
    l.T = T;
    l.x = x;
    l.ids = ids;
    l.weights = weights;
    l.y = y;
    l.on_route = on_route;
    return Run(l);
  }

  // Time spent so far (cumulative).
  virtual ExchangeTimes times() const = 0;
};

}  // namespace expertmesh::worker
