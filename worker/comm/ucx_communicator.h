// UCX backend: ucp tag messages between host buffers, one ucp worker per
// communicator, endpoints to every peer created from worker addresses that a
// Bootstrap exchanges (so it runs without MPI: a FileStore is enough).
//
// Tags carry (source rank, per-pair sequence number), so messages between a
// pair match in posting order whatever the transport does. Endpoints use
// UCP_ERR_HANDLING_MODE_PEER: a peer whose process died is reported as
// kUnavailable as soon as UCX notices; the deadline covers the rest. Transport
// selection follows the usual UCX_* environment variables (UCX_TLS, ...).
// Built only when UCX is found (EXPERTMESH_HAVE_UCX); create it through
// registry.h.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/comm/bootstrap.h"
#include "worker/comm/communicator.h"

namespace expertmesh::comm {

// Collective over the bootstrap's ranks: exchanges worker addresses, connects
// to every peer and runs a barrier; blocks until done or the deadline.
// The bootstrap is used only during the call.
absl::StatusOr<std::unique_ptr<Communicator>> CreateUcxCommunicator(Bootstrap* bootstrap, absl::Time deadline);

}  // namespace expertmesh::comm
