// The coordinator's journal: an append-only file of records. A record is
// acknowledged only once it is durable (written and fdatasync'd), so that an
// accepted job survives a crash of the coordinator (SIGKILL, power loss).
//
// On-disk record: magic u32 "EMJ1" | payload length u32 | CRC-32C u32 of the
// payload | payload bytes (all integers little-endian). Replay reads records
// until the end; an incomplete or corrupt record at the very end (a write torn
// by a crash) is dropped with a warning and the file is truncated to the last
// good record before new records are appended. A corrupt record followed by
// more data is DATA_LOSS: the journal was damaged by something else.
//
// Group commit. Enqueue() only queues records (never touches the disk) and
// returns a ticket; tickets, and so records in the file, follow the order of
// the Enqueue calls. Wait(ticket) returns once that ticket's records are
// durable: the first waiter that finds no write in progress becomes the
// writer and writes everything queued so far with one write() and one
// fdatasync, without holding the journal's lock; the other waiters sleep
// until a write covers their ticket. Callers enqueue under their own lock
// (fixing the order of records against their state) and wait after releasing
// it, so no caller lock is held across the disk. Append() = Wait(Enqueue()).
// A batch that fails (write or fdatasync) is truncated away when possible and
// every ticket in it answers the error; the caller must not acknowledge.
//
// Compaction: BeginSnapshot() (called under the caller's lock, where its
// state matches the records enqueued so far) returns the ticket T the
// snapshot covers; RewriteSnapshot(records, T) then, without the caller's lock,
// replaces the whole file with the snapshot followed by the records enqueued
// after T that were already written (so none is lost). It writes them to
// "<path>.compact" (one write, fsync), renames that over <path>, fsyncs the
// folder, and appends to the new file from then on. Whatever the crash point,
// <path> is either the old or the new journal, each complete; a
// "<path>.compact" left by a crash before the rename is deleted by the next
// Open. While it writes, appenders wait for it (they hold no caller lock).
//
// Threads and locks: every method is thread-safe; one internal mutex guards
// the queue and the counters, never held during I/O; one writer at a time
// (a batch or a rewrite) owns the file descriptor.
//
//   ASSIGN_OR_RETURN(auto journal, Journal::Open("coord.journal", &records));
//   for (const std::string& r : records) Replay(r);
//   RETURN_IF_ERROR(journal->Append({payload}));        // durable on OK
//   ASSIGN_OR_RETURN(uint64_t t, journal->Enqueue({p})); // under the caller's lock
//   RETURN_IF_ERROR(journal->Wait(t));                   // after releasing it
//   RETURN_IF_ERROR(journal->Rewrite(live_records));     // compaction
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace expertmesh::coordinator {

class Journal {
 public:
  // Opens (creating if needed) the journal at `path`, returns the payloads of
  // its intact records in `records`, and positions for appending. Errors:
  // INVALID_ARGUMENT for an empty path, the errno as a status for I/O
  // failures, DATA_LOSS for corruption before the last record. A leftover
  // "<path>.compact" (a compaction interrupted before its rename) is deleted.
  static absl::StatusOr<std::unique_ptr<Journal>> Open(const std::string& path, std::vector<std::string>* records);
  ~Journal();
  Journal(const Journal&) = delete;
  Journal& operator=(const Journal&) = delete;

  // Queues the payloads as consecutive records and returns their ticket
  // (> 0). Never blocks on the disk. INVALID_ARGUMENT for a record over
  // 1 GiB, UNAVAILABLE after Close().
  absl::StatusOr<uint64_t> Enqueue(std::vector<std::string> payloads);
  // Blocks until the records of `ticket` (and of every earlier ticket) are
  // durable: OK, or the error of the batch that failed to write them
  // (UNAVAILABLE when Close() came first).
  absl::Status Wait(uint64_t ticket);
  // Wait(Enqueue(payloads)): consecutive records, durable on OK.
  absl::Status Append(const std::vector<std::string>& payloads);

  // One record of a compaction snapshot. A record with `unless_failed` > 0
  // is kept only if the batch of that ticket was written (a job whose
  // submission was still being written when the snapshot was taken).
  struct SnapshotRecord {
    std::string payload;
    uint64_t unless_failed = 0;
  };
  // The ticket a snapshot taken now covers (every ticket enqueued so far).
  // From here until the matching RewriteSnapshot or EndSnapshot, written
  // records of later tickets are kept in memory for it. One snapshot at a time.
  uint64_t BeginSnapshot();
  void EndSnapshot();  // a snapshot abandoned without RewriteSnapshot
  // Replaces the journal's content with `records` (the state as of ticket
  // `covers`, from BeginSnapshot) followed by the records of later tickets
  // already written, crash-safely (see the top of this file); ends the
  // snapshot. On an error before the rename the old file stays in use,
  // unchanged, and "<path>.compact" is removed. If only the final fsync of
  // the folder fails, the new file is in use (appends go there) but the
  // rename may not survive a power loss; the error says so.
  absl::Status RewriteSnapshot(const std::vector<SnapshotRecord>& records, uint64_t covers);
  // BeginSnapshot + RewriteSnapshot of plain records (tests, start-up).
  absl::Status Rewrite(const std::vector<std::string>& payloads);

  // Fails every record not yet being written with UNAVAILABLE, refuses new
  // ones, and waits for a write in progress to end: no write happens after
  // it returns. Idempotent.
  void Close();

  // Test hook: runs in the writer after a batch is written and before its
  // fdatasync, outside every lock (a slow disk). Set before concurrent use.
  void SetBeforeSyncHookForTest(std::function<void()> hook) { before_sync_hook_ = std::move(hook); }

  const std::string& path() const { return path_; }
  std::string compact_path() const { return path_ + ".compact"; }
  int64_t size_bytes() const;
  // Batches written (each one write + one fdatasync) since Open.
  int64_t batches_written() const;

  // Bytes a record takes on disk besides its payload.
  static constexpr int64_t kRecordHeaderBytes = 12;

  // Encoding of one record; exposed for tests that write torn records.
  static std::string EncodeRecord(const std::string& payload);
  static uint32_t Crc32c(const void* data, size_t n);

 private:
  Journal(std::string path, int fd, int64_t size) : path_(std::move(path)), fd_(fd), size_(size) {}
  // The writer role: with mu_ held in `lock`, waits until no one writes and
  // takes it (writing_ = true); the caller clears it and notifies.
  void BecomeWriter(std::unique_lock<std::mutex>& lock);
  // As the writer: writes and syncs every queued ticket (releases mu_ meanwhile).
  void WriteQueuedLocked(std::unique_lock<std::mutex>& lock);
  // The error of the batch that held `ticket`, OK if it was written.
  absl::Status OutcomeLocked(uint64_t ticket) const;

  const std::string path_;
  std::function<void()> before_sync_hook_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  int fd_ = -1;                // owned by the writer (writing_) while it writes
  int64_t size_ = 0;
  bool writing_ = false, closed_ = false;
  uint64_t last_ticket_ = 0;   // the last ticket handed out
  uint64_t done_ticket_ = 0;   // every ticket up to this one is written or failed
  std::vector<std::pair<uint64_t, std::string>> queue_;   // (ticket, encoded records), not yet written
  std::vector<std::pair<std::pair<uint64_t, uint64_t>, absl::Status>> failed_;  // ([first, last] tickets, error)
  bool snapshot_open_ = false;
  uint64_t snapshot_ticket_ = 0;
  std::vector<std::pair<uint64_t, std::string>> since_snapshot_;  // written records of tickets > snapshot_ticket_
  int64_t batches_ = 0;
};

}  // namespace expertmesh::coordinator
