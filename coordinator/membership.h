// Membership: one part of the Coordinator (coordinator/coordinator.h is the
// facade; the methods are in membership.cc).
//
// Owns: the worker registry (places, health STARTING/READY/MISSING/EXITED,
// heartbeats and their statistics and expert load), the data-plane
// generation, shutdown progress, the cluster status, and the key-value store
// the workers rendezvous through (KeyValueStore below). WorkerService's
// Register / Heartbeat / StoreSet / StoreGet and ClusterService's
// GetClusterStatus / Shutdown are answered here; the health monitor's part of
// Tick (workers going MISSING) too.
//
// Threads and locks:
//  * The registry and the generation are guarded by the Coordinator's mutex
//    mu_, shared with the job store and the scheduler (see job_store.h): a
//    worker lost requeues the sequences it held and a new generation
//    requeues every running one, atomically with the health change.
//    Heartbeat holds mu_ only in memory (no journal write, except when it
//    commits a rebalanced placement: rebalance.cc, rare); Register waits on
//    the condition variable with a deadline.
//  * The key-value store has its own mutex: StoreSet never takes mu_;
//    StoreGet takes it only to read the epoch and generation (released
//    before the store's): a key of an older generation of this epoch
//    ("<epoch>/g<N>/...") answers ABORTED, so a worker bootstrapping a data
//    plane of a generation that moved on gives up at once instead of waiting
//    for a peer that was lost. A new generation drops the keys of older ones
//    with mu_ held (lock order: mu_, then the store's; the store never takes
//    another lock).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "absl/status/statusor.h"

namespace expertmesh::coordinator {

// Small opaque values (data-plane bootstrap ids, addresses) by key. Thread-safe.
class KeyValueStore {
 public:
  static constexpr int64_t kMaxBytes = int64_t{64} << 20;  // keys + values
  static constexpr size_t kMaxValueBytes = size_t{4} << 20;

  // INVALID_ARGUMENT (empty key, value too large), RESOURCE_EXHAUSTED (full).
  absl::Status Set(const std::string& key, const std::string& value);
  // nullopt for a missing key; INVALID_ARGUMENT for an empty one.
  absl::StatusOr<std::optional<std::string>> Get(const std::string& key) const;
  // Drops every key that does not start with `prefix`.
  void KeepOnly(const std::string& prefix);

 private:
  mutable std::mutex mu_;
  std::map<std::string, std::string> map_;
  int64_t bytes_ = 0;
};

}  // namespace expertmesh::coordinator
