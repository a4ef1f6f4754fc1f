// Multi-rank test bodies shared by every transport. Each body runs on every
// rank of a fresh communicator (any size >= 1) and checks with gtest
// assertions; the harnesses run them over MPI (mpirun, mpi_test.cc) and over
// UCX (forked processes and a file-store bootstrap, ucx_test.cc).
#pragma once

#include "tests/common/status_matchers.h"
#include "worker/comm/communicator.h"

// X-macro of the shared bodies: X(Name) for each.
#define EM_COMM_BODIES(X)          \
  X(BatchOrderingAndCollectives)   \
  X(SizeMismatchIsAnError)         \
  X(AbortFromAnotherThread)        \
  X(SilentPeerHitsDeadline)        \
  X(MoeRandomRouting)              \
  X(MoeRedundantReplicas)          \
  X(MoeRankWithoutSlots)           \
  X(MoeAllTokensToOneRank)         \
  X(MoeZeroLocalTokens)            \
  X(MoeFp8Dispatch)                \
  X(MoeStagedSends)

namespace expertmesh::comm_bodies {

#define EM_DECLARE_BODY(Name) void Name(comm::Communicator* comm);
EM_COMM_BODIES(EM_DECLARE_BODY)
#undef EM_DECLARE_BODY

// Rank size-1 sends part of an all-to-all and then dies (_exit); the others
// must fail with kUnavailable or kDeadlineExceeded within their deadline.
// Only where a dead process does not end the whole job (not under mpirun).
void DeadPeerFailsWithinDeadline(comm::Communicator* comm);

}  // namespace expertmesh::comm_bodies
