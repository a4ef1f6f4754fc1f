// The coordinator's journal: an append-only file of records, each written
// with one write() and fsync'd before Append returns, so that an accepted job
// survives a crash of the coordinator (SIGKILL, power loss).
//
// On-disk record: magic u32 "EMJ1" | payload length u32 | CRC-32C u32 of the
// payload | payload bytes (all integers little-endian). Replay reads records
// until the end; an incomplete or corrupt record at the very end (a write torn
// by a crash) is dropped with a warning and the file is truncated to the last
// good record before new records are appended. A corrupt record followed by
// more data is DATA_LOSS: the journal was damaged by something else.
//
// Compaction: Rewrite(records) replaces the whole file with the given
// records. It writes them to "<path>.compact" (one write, fsync), renames that
// over <path>, fsyncs the folder, and appends to the new file from then on.
// Whatever the crash point, <path> is either the old or the new journal, each
// complete; a "<path>.compact" left by a crash before the rename is deleted by
// the next Open.
//
//   ASSIGN_OR_RETURN(auto journal, Journal::Open("coord.journal", &records));
//   for (const std::string& r : records) Replay(r);
//   RETURN_IF_ERROR(journal->Append({payload}));   // durable on OK
//   RETURN_IF_ERROR(journal->Rewrite(live_records));  // compaction
#pragma once

#include <cstdint>
#include <memory>
#include <string>
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

  // Appends the payloads as consecutive records with one write and one
  // fsync. On error nothing is considered written (a partial write is
  // truncated away when possible) and the caller must not acknowledge.
  absl::Status Append(const std::vector<std::string>& payloads);

  // Replaces the journal's content with these records (see the top of this
  // file), crash-safely. On an error before the rename the old file stays in
  // use, unchanged, and "<path>.compact" is removed. If only the final fsync
  // of the folder fails, the new file is in use (appends go there) but the
  // rename may not survive a power loss; the error says so.
  absl::Status Rewrite(const std::vector<std::string>& payloads);

  const std::string& path() const { return path_; }
  std::string compact_path() const { return path_ + ".compact"; }
  int64_t size_bytes() const { return size_; }

  // Bytes a record takes on disk besides its payload.
  static constexpr int64_t kRecordHeaderBytes = 12;

  // Encoding of one record; exposed for tests that write torn records.
  static std::string EncodeRecord(const std::string& payload);
  static uint32_t Crc32c(const void* data, size_t n);

 private:
  Journal(std::string path, int fd, int64_t size) : path_(std::move(path)), fd_(fd), size_(size) {}
  std::string path_;
  int fd_ = -1;
  int64_t size_ = 0;
};

}  // namespace expertmesh::coordinator
