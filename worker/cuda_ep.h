// Expert parallelism for the CUDA engine: the ExpertExchange (expert_exchange.h)
// that moves each MoE layer's tokens to the EP ranks holding their experts
// and the weighted expert outputs back, over a communicator.
//
// Per layer, on every rank of the stage (also with zero tokens), the same
// protocol as the CPU's EpDispatcher (dispatch.h):
//   1. the router's ids and weights come to the host (and to the route
//      observer); BuildEpLayout (ep_layout.h, the CPU's routine) picks each
//      pair's replica and makes one record per (token, destination rank)
//      listing that rank's (expert, weight) pairs;
//   2. record counts all-to-all, then the records' hidden rows (activation
//      type, gathered on the device), expert ids and weights all-to-all-v;
//   3. the destination runs its experts on the received rows
//      (CudaEngine::RunLocalExperts): one fp32 partial row per record, the
//      weights applied there;
//   4. the partial rows all-to-all-v back; each token's rows are summed in
//      rank order and added to the residual stream on the device.
// With a device-memory communicator (NCCL) the rows move GPU to GPU; with a
// host one (MPI, UCX) they are staged through pinned host buffers. Decode
// steps with an exchange are not captured in CUDA graphs (the counts come
// back to the host every layer).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "topology/placement.h"
#include "worker/comm/communicator.h"
#include "worker/cuda_engine.h"
#include "worker/expert_exchange.h"

namespace expertmesh::worker {

struct CudaEpOptions {
  absl::Duration timeout = absl::Seconds(60);  // deadline of each all-to-all
};

// Seconds spent per phase, accumulated over layers.
struct CudaEpTimes {
  double layout = 0;         // ids to the host, replica choice, records
  double dispatch_comm = 0;  // counts + rows/ids/weights all-to-alls
  double expert = 0;         // this rank's experts on the received rows
  double combine_comm = 0;   // partial rows back
  double combine = 0;        // summing them into the residual
};

class CudaEpExchange : public ExpertExchange {
 public:
  // `engine` runs this rank's experts; `comm` spans the stage's EP ranks
  // (rank i = EP rank i); `placements` maps each MoE layer of the stage to its
  // placement over comm->size() ranks. All must outlive the exchange.
  static absl::StatusOr<std::unique_ptr<CudaEpExchange>> Create(
      CudaEngine* engine, comm::Communicator* comm, const std::map<int64_t, topology::ExpertPlacement>* placements,
      const CudaEpOptions& options);
  ~CudaEpExchange() override;

  absl::Status Run(const Layer& layer) override;
  ExchangeTimes times() const override {
    const CudaEpTimes& t = phase_times();
    return ExchangeTimes{t.layout + t.dispatch_comm, t.expert, t.combine_comm + t.combine};
  }
  const CudaEpTimes& phase_times() const;

  struct Impl;

 private:
  explicit CudaEpExchange(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace expertmesh::worker
