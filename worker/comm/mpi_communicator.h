// MPI backend (Open MPI): the communicator and the bootstrap of programs
// started by mpirun. Both work on duplicates of MPI_COMM_WORLD whose error
// handler returns codes (MPI_ERRORS_RETURN), so an MPI error becomes a Status
// instead of killing the job.
//
// Transfers are MPI_Isend/MPI_Irecv polled with MPI_Testsome against the
// deadline (the process yields the CPU between empty polls, which matters when
// ranks outnumber cores). Note that Open MPI's runtime (ORTE) terminates the
// whole job when one process dies, so on MPI a dead peer is seen by the
// launcher; the deadline covers a peer that is alive but stalled.
//
// Programs call InitMpi once before creating either, and FinalizeMpi at exit
// after destroying them. Under mpirun as root, Open MPI needs
// `mpirun --allow-run-as-root --oversubscribe`.
#pragma once

#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/comm/bootstrap.h"
#include "worker/comm/communicator.h"

namespace expertmesh::comm {

// MPI_Init_thread(MPI_THREAD_SERIALIZED) unless MPI is already initialised.
// argc and argv may both be null; a given argv must end with a null pointer.
absl::Status InitMpi(int* argc, char*** argv);
// True between MPI_Init and MPI_Finalize.
bool MpiInitialized();
// MPI_Finalize if initialised and not yet finalised.
absl::Status FinalizeMpi();
// Rank and size in MPI_COMM_WORLD (MPI must be initialised).
int MpiWorldRank();
int MpiWorldSize();

// Creates a communicator over a duplicate of MPI_COMM_WORLD. Collective:
// every rank calls it; blocks until the duplicate exists or the deadline.
absl::StatusOr<std::unique_ptr<Communicator>> CreateMpiCommunicator(absl::Time deadline);

// Creates a communicator over the given MPI_COMM_WORLD ranks (rank i of the
// new communicator is world_ranks[i]) with MPI_Comm_create_group: only the
// members call it, so a coordinator rank outside every group is not involved.
// Blocks until every member has called it (MPI offers no deadline here);
// groups created concurrently by overlapping processes need distinct tags.
absl::StatusOr<std::unique_ptr<Communicator>> CreateMpiGroupCommunicator(const std::vector<int>& world_ranks,
                                                                        int tag);

// Bootstrap over a duplicate of MPI_COMM_WORLD (non-blocking all-gathers
// polled against the deadline). Collective to create.
absl::StatusOr<std::unique_ptr<Bootstrap>> CreateMpiBootstrap(absl::Time deadline);

}  // namespace expertmesh::comm
