// The scheduler: one part of the Coordinator (coordinator/coordinator.h is
// the facade; the methods are in scheduler.cc).
//
// Owns: the queue of sequences waiting for a stage-0 worker (oldest job
// first; a requeued sequence goes to the front), the queued/running counts,
// and Sync: applying a stage-0 worker's updates (tokens, finishes, given-back
// sequences), handing out its pending cancellations, and assigning queued
// sequences up to its free slots and its fair share (FairShare below).
//
// Threads and locks: guarded by the Coordinator's mutex mu_, shared with the
// job store and the membership (see job_store.h for why one lock remains).
// Sync holds mu_ only for the in-memory step; the results it journals are
// enqueued under mu_ and waited for after releasing it, so a Sync never
// holds mu_ across the disk, and answers once its results are durable.
// Requeue and RevokeSequences run with mu_ held (callers: Sync, the health
// monitor, Register, generation changes).
//
// Pull, not push: workers poll Sync every step. A server-streaming
// assignment RPC was considered and not built: with group commit a Sync
// costs ~2.5 ms p50 under 1,000 concurrent submits (docs/PERFORMANCE.md),
// and a step needs a Sync anyway to report its tokens.
#pragma once

#include <algorithm>
#include <cstdint>

namespace expertmesh::coordinator {

// A stage-0 worker's fair share of the sequences: ceil((queued + held by
// live stage-0 workers) / live stage-0 workers).
inline int64_t FairShare(int64_t queued, int64_t held, int64_t live_workers) {
  return (queued + held + live_workers - 1) / std::max<int64_t>(live_workers, 1);
}

}  // namespace expertmesh::coordinator
