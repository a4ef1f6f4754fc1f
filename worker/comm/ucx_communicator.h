// UCX backend: ucp tag messages between host buffers, one ucp worker per
// communicator, endpoints to every peer created from worker addresses that a
// Bootstrap exchanges (so it runs without MPI: a FileStore is enough).
//
// Tags carry (source rank, per-pair sequence number), so messages between a
// pair match in posting order whatever the transport does. With
// UcxOptions::detect_peer_failure, endpoints use UCP_ERR_HANDLING_MODE_PEER: a
// peer whose process died is reported as kUnavailable as soon as UCX notices;
// the deadline covers the rest. Transport selection follows the usual UCX_*
// environment variables (UCX_TLS, ...).
// Built only when UCX is found (EXPERTMESH_HAVE_UCX); create it through
// registry.h.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/comm/bootstrap.h"
#include "worker/comm/communicator.h"

namespace expertmesh::comm {

struct UcxOptions {
  // UCP_ERR_HANDLING_MODE_PEER on every endpoint: a dead peer is reported
  // (kUnavailable) within about a second instead of at the deadline. UCX 1.13
  // then uses only transports that can report peer failure — on one host that
  // is TCP over loopback instead of shared memory, several times slower for
  // large messages. Off: shared memory (posix/sysv + cma) where possible, and
  // the deadline is what turns a dead peer into an error.
  bool detect_peer_failure = false;
};

// Collective over the bootstrap's ranks: exchanges worker addresses, connects
// to every peer and runs a barrier; blocks until done or the deadline.
// The bootstrap is used only during the call.
absl::StatusOr<std::unique_ptr<Communicator>> CreateUcxCommunicator(Bootstrap* bootstrap, absl::Time deadline,
                                                                    const UcxOptions& options);

}  // namespace expertmesh::comm
