// NCCL backend: device-memory batches as grouped ncclSend/ncclRecv on the
// communicator's own CUDA stream. The communicator is non-blocking
// (ncclConfig_t::blocking = 0): creation, group launches and the stream are
// polled against the deadline, and a deadline or Abort ends in ncclCommAbort,
// so a dead peer never hangs the owner thread. Rank 0's ncclUniqueId travels
// through the Bootstrap. One rank per GPU (NCCL refuses two ranks on one
// device). Built only when NCCL is found (EXPERTMESH_HAVE_NCCL); create it
// through registry.h. No CUDA types appear here.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/comm/bootstrap.h"
#include "worker/comm/communicator.h"

namespace expertmesh::comm {

// Collective over the bootstrap's ranks. `cuda_device` < 0 keeps the current
// device. Blocks until the NCCL communicator is up or the deadline.
absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(Bootstrap* bootstrap, int cuda_device,
                                                                     absl::Time deadline);

// Number of CUDA devices this process sees (0 without a driver or device).
int CudaDeviceCount();

}  // namespace expertmesh::comm
