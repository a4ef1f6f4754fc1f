// Creating communicators by backend name. The only file that tests which
// optional backends this build has (EXPERTMESH_HAVE_UCX / _NCCL).
//
//   ASSIGN_OR_RETURN(auto boot, CreateMpiBootstrap(deadline));
//   CommOptions opts;
//   ASSIGN_OR_RETURN(auto comm, CreateCommunicator("ucx", boot.get(), opts));
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "worker/comm/bootstrap.h"
#include "worker/comm/communicator.h"

namespace expertmesh::comm {

struct CommOptions {
  // Bound on creation (bootstrap exchange, connection set-up).
  absl::Duration connect_timeout = absl::Seconds(60);
  // nccl only: the CUDA device of this rank; < 0 keeps the current device.
  int cuda_device = -1;
  // ucx only: report a dead peer as soon as UCX notices (see UcxOptions in
  // ucx_communicator.h: on one host this trades shared memory for TCP).
  bool ucx_detect_peer_failure = false;
};

// Backends compiled into this build, e.g. {"mpi", "ucx", "nccl"}.
std::vector<std::string> AvailableBackends();

// Creates a communicator of `backend` ("mpi", "ucx" or "nccl"). Collective:
// every rank of the group calls it. "mpi" spans MPI_COMM_WORLD (InitMpi must
// have run; `bootstrap` may be null); "ucx" and "nccl" span the bootstrap's
// ranks. kUnimplemented names a backend this build lacks and how to get it.
absl::StatusOr<std::unique_ptr<Communicator>> CreateCommunicator(absl::string_view backend, Bootstrap* bootstrap,
                                                                 const CommOptions& options);

}  // namespace expertmesh::comm
