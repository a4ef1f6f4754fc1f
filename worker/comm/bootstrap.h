// Bootstrap: moves a few opaque bytes between the ranks of a group before a
// communicator exists (NCCL's unique id, UCX worker addresses). Separate from
// the data plane and deliberately tiny: one all-gather of byte strings.
//
// Implementations:
//   * StoreBootstrap over a key-value Store (values framed with a length and
//     a checksum, so a damaged or forged value is DATA_LOSS, not a crash) — FileStore (a folder every rank
//     can read: one host, or a shared file system); a TCP store or the
//     coordinator's gRPC service are other Stores;
//   * MpiBootstrap (mpi_communicator.h) over MPI_COMM_WORLD under mpirun.
//
//   FileStore store("/tmp/em-run-42");
//   StoreBootstrap boot(&store, "layer0", rank, size);
//   ASSIGN_OR_RETURN(std::vector<std::string> all,
//                    boot.AllGather(my_address, absl::Now() + absl::Seconds(30)));
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace expertmesh::comm {

class Bootstrap {
 public:
  virtual ~Bootstrap() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // Blocks until every rank of the group has called AllGather with its bytes
  // and returns them, indexed by rank (this rank's own included). Every rank
  // calls it the same number of times, in the same order. kDeadlineExceeded
  // names the ranks that did not contribute in time.
  virtual absl::StatusOr<std::vector<std::string>> AllGather(absl::string_view mine, absl::Time deadline) = 0;

  // Rank `root`'s bytes, on every rank (`mine` is ignored elsewhere). Built on
  // AllGather; blocking with the same errors.
  absl::StatusOr<std::string> Broadcast(int root, absl::string_view mine, absl::Time deadline);
};

// StoreBootstrap's values in the store: "EMB1", the payload's length and
// CRC-32 (u32 little endian each), the payload. Unframe answers DATA_LOSS for
// anything else (damaged, truncated, or written by someone else).
inline constexpr size_t kMaxBootstrapValueBytes = 1 << 20;
std::string FrameBootstrapValue(absl::string_view payload);
absl::StatusOr<std::string> UnframeBootstrapValue(absl::string_view framed);

// A key-value store that several processes share. Keys are short printable
// strings ([A-Za-z0-9._/-]); values are opaque bytes. Set never overwrites
// keys another rank wrote (the bootstraps give each rank its own keys).
class Store {
 public:
  virtual ~Store() = default;
  // Publishes value under key; visible to every process once it returns.
  virtual absl::Status Set(absl::string_view key, absl::string_view value) = 0;
  // Blocks until key exists, then returns its value; kDeadlineExceeded if it
  // does not appear before the deadline.
  virtual absl::StatusOr<std::string> Get(absl::string_view key, absl::Time deadline) = 0;
};

// A Store in a folder: each key is one file, written to a temporary name and
// renamed, so readers never see partial values. Readers poll (every 1 ms at
// first, backing off to 20 ms). The folder is created if missing and never
// deleted by the store.
class FileStore : public Store {
 public:
  explicit FileStore(std::string dir) : dir_(std::move(dir)) {}
  absl::Status Set(absl::string_view key, absl::string_view value) override;
  absl::StatusOr<std::string> Get(absl::string_view key, absl::Time deadline) override;
  const std::string& dir() const { return dir_; }

 private:
  std::string PathOf(absl::string_view key) const;
  std::string dir_;
};

// Bootstrap of `size` ranks over a Store: round n of AllGather sets
// "<prefix>/<n>/<rank>" and reads every other rank's key of that round.
// The store must outlive the bootstrap.
class StoreBootstrap : public Bootstrap {
 public:
  StoreBootstrap(Store* store, std::string prefix, int rank, int size)
      : store_(store), prefix_(std::move(prefix)), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  absl::StatusOr<std::vector<std::string>> AllGather(absl::string_view mine, absl::Time deadline) override;

 private:
  Store* store_;
  std::string prefix_;
  int rank_, size_;
  int round_ = 0;
};

}  // namespace expertmesh::comm
