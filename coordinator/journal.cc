#include "coordinator/journal.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "glog/logging.h"

namespace expertmesh::coordinator {
namespace {

constexpr uint32_t kMagic = 0x314a4d45;  // "EMJ1" little-endian
constexpr size_t kHeader = Journal::kRecordHeaderBytes;
constexpr uint32_t kMaxRecord = 1u << 30;

absl::Status ErrnoStatus(int err, const std::string& what) {
  const std::string msg = absl::StrCat(what, ": ", std::strerror(err));
  switch (err) {
    case ENOENT:
      return absl::NotFoundError(msg);
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(msg);
    case ENOSPC:
    case EDQUOT:
      return absl::ResourceExhaustedError(msg);
    default:
      return absl::InternalError(msg);
  }
}

void PutU32(std::string* s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint32_t GetU32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}

absl::Status WriteAll(int fd, const std::string& data, const std::string& path) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, absl::StrCat(path, ": write"));
    }
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

std::string DirOf(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
}

// Makes creations and renames in the folder of `path` durable.
absl::Status FsyncDir(const std::string& path) {
  const std::string dir = DirOf(path);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return ErrnoStatus(errno, absl::StrCat(dir, ": open folder"));
  const int rc = ::fsync(dfd);
  const int err = errno;
  ::close(dfd);
  if (rc != 0) return ErrnoStatus(err, absl::StrCat(dir, ": fsync folder"));
  return absl::OkStatus();
}

std::string EncodeAll(const std::vector<std::string>& payloads, absl::Status* status) {
  std::string data;
  size_t total = 0;
  for (const auto& p : payloads) total += kHeader + p.size();
  data.reserve(total);
  for (const auto& p : payloads) {
    if (p.size() > kMaxRecord) {
      *status = absl::InvalidArgumentError("journal: record larger than 1 GiB");
      return {};
    }
    data += Journal::EncodeRecord(p);
  }
  return data;
}

}  // namespace

uint32_t Journal::Crc32c(const void* data, size_t n) {
  static uint32_t table[256];
  static const bool init = [] {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0x82f63b78u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    return true;
  }();
  (void)init;
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t c = 0xffffffffu;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

std::string Journal::EncodeRecord(const std::string& payload) {
  std::string r;
  r.reserve(kHeader + payload.size());
  PutU32(&r, kMagic);
  PutU32(&r, static_cast<uint32_t>(payload.size()));
  PutU32(&r, Crc32c(payload.data(), payload.size()));
  r += payload;
  return r;
}

namespace {
// The offset of the first complete, checksummed record that starts at or
// after `from`, or npos. Used only on the damaged path.
size_t FindRecordAfter(const std::string& data, size_t from) {
  for (size_t p = from; p + kHeader <= data.size(); ++p) {
    if (GetU32(data.data() + p) != kMagic) continue;
    const uint32_t len = GetU32(data.data() + p + 4);
    if (len > kMaxRecord || len > data.size() - p - kHeader) continue;
    if (Journal::Crc32c(data.data() + p + kHeader, len) == GetU32(data.data() + p + 8)) return p;
  }
  return std::string::npos;
}
}  // namespace

absl::StatusOr<std::unique_ptr<Journal>> Journal::Open(const std::string& path, std::vector<std::string>* records) {
  records->clear();
  if (path.empty()) return absl::InvalidArgumentError("journal: empty path");
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat(path, ": cannot open journal"));
  std::unique_ptr<Journal> j(new Journal(path, fd, 0));
  // A compaction that crashed before its rename: the journal itself is the
  // complete old one, the half-written copy is garbage.
  const std::string leftover = j->compact_path();
  if (::unlink(leftover.c_str()) == 0) {
    LOG(WARNING) << leftover << ": deleted the leftover of a compaction interrupted by a crash; " << path
                 << " is complete";
  } else if (errno != ENOENT) {
    return ErrnoStatus(errno, absl::StrCat(leftover, ": cannot delete the leftover of an interrupted compaction"));
  }
  // Make a newly created file's directory entry (and the unlink) durable too.
  FsyncDir(path).IgnoreError();
  // Read the whole file; journals of batch jobs are small next to memory.
  std::string data;
  char buf[1 << 16];
  while (true) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, absl::StrCat(path, ": read"));
    }
    if (n == 0) break;
    data.append(buf, static_cast<size_t>(n));
  }
  size_t off = 0;
  while (off < data.size()) {
    const size_t left = data.size() - off;
    std::string problem;
    bool at_end = false;  // the damaged record reaches the end of the file
    if (left < kHeader) {
      problem = absl::StrCat("incomplete header (", left, " bytes)");
      at_end = true;
    } else if (GetU32(data.data() + off) != kMagic) {
      problem = "bad magic";
    } else {
      const uint32_t len = GetU32(data.data() + off + 4);
      const uint32_t crc = GetU32(data.data() + off + 8);
      if (len > kMaxRecord || len > left - kHeader) {
        problem = absl::StrCat("record of ", len, " bytes runs past the end");
        at_end = true;
      } else if (Crc32c(data.data() + off + kHeader, len) != crc) {
        problem = "checksum mismatch";
        at_end = off + kHeader + len == data.size();
      } else {
        records->emplace_back(data.data() + off + kHeader, len);
        off += kHeader + len;
        continue;
      }
    }
    // A genuine torn tail is the last record cut short by a crash: nothing
    // after it. Damage that merely looks like one (a length field overwritten
    // to run past the end, a record that ends at EOF with a bad checksum)
    // while whole records follow it, or a complete record whose length field
    // alone is wrong, is data loss, not a tail to drop.
    if (at_end) {
      const size_t next = FindRecordAfter(data, off + 1);
      if (next != std::string::npos) {
        at_end = false;
        problem = absl::StrCat(problem, "; a valid record follows at byte ", next);
      } else if (left >= kHeader && GetU32(data.data() + off) == kMagic &&
                 Crc32c(data.data() + off + kHeader, left - kHeader) == GetU32(data.data() + off + 8) &&
                 GetU32(data.data() + off + 4) != left - kHeader) {
        at_end = false;
        problem = absl::StrCat(problem, "; the record is complete, only its length field is wrong");
      }
    }
    if (!at_end) {
      return absl::DataLossError(absl::StrCat(path, ": corrupt journal record at byte ", off, " (", problem,
                                              ") followed by more data; move the file away to start empty"));
    }
    LOG(WARNING) << path << ": ignoring a torn last record at byte " << off << " (" << problem << ", "
                 << left << " bytes); the write was interrupted by a crash";
    if (::ftruncate(fd, static_cast<off_t>(off)) != 0) {
      return ErrnoStatus(errno, absl::StrCat(path, ": truncate torn record"));
    }
    if (::fsync(fd) != 0) return ErrnoStatus(errno, absl::StrCat(path, ": fsync"));
    break;
  }
  j->size_ = static_cast<int64_t>(off);
  if (::lseek(fd, static_cast<off_t>(off), SEEK_SET) < 0) return ErrnoStatus(errno, absl::StrCat(path, ": seek"));
  return j;
}

Journal::~Journal() {
  Close();
  if (fd_ >= 0) ::close(fd_);
}

int64_t Journal::size_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return size_;
}

int64_t Journal::batches_written() const {
  std::lock_guard<std::mutex> lock(mu_);
  return batches_;
}

absl::StatusOr<uint64_t> Journal::Enqueue(std::vector<std::string> payloads) {
  absl::Status s;
  std::string data = EncodeAll(payloads, &s);  // the CRCs, before taking the lock
  if (!s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) return absl::UnavailableError(absl::StrCat(path_, ": the journal is closed"));
  const uint64_t ticket = ++last_ticket_;
  queue_.emplace_back(ticket, std::move(data));
  return ticket;
}

absl::Status Journal::OutcomeLocked(uint64_t ticket) const {
  for (const auto& [range, status] : failed_) {
    if (ticket >= range.first && ticket <= range.second) return status;
  }
  return absl::OkStatus();
}

void Journal::BecomeWriter(std::unique_lock<std::mutex>& lock) {
  cv_.wait(lock, [this] { return !writing_; });
  writing_ = true;
}

void Journal::WriteQueuedLocked(std::unique_lock<std::mutex>& lock) {
  if (queue_.empty()) return;
  std::vector<std::pair<uint64_t, std::string>> batch;
  batch.swap(queue_);
  const uint64_t first = batch.front().first, last = batch.back().first;
  if (closed_) {
    failed_.push_back({{first, last}, absl::UnavailableError(absl::StrCat(path_, ": the journal is closed"))});
    done_ticket_ = last;
    return;
  }
  const int fd = fd_;
  const int64_t size = size_;
  lock.unlock();
  std::string data;
  if (batch.size() == 1) {
    data.swap(batch.front().second);
  } else {
    size_t total = 0;
    for (const auto& b : batch) total += b.second.size();
    data.reserve(total);
    for (const auto& b : batch) data += b.second;
  }
  absl::Status s = WriteAll(fd, data, path_);
  if (s.ok() && before_sync_hook_) before_sync_hook_();
  if (s.ok() && ::fdatasync(fd) != 0) s = ErrnoStatus(errno, absl::StrCat(path_, ": fdatasync"));
  if (!s.ok()) {
    // Drop whatever part reached the file so the next append starts clean.
    if (::ftruncate(fd, static_cast<off_t>(size)) != 0 || ::lseek(fd, static_cast<off_t>(size), SEEK_SET) < 0) {
      LOG(ERROR) << path_ << ": cannot roll back a failed append: " << std::strerror(errno);
    }
  }
  lock.lock();
  if (s.ok()) {
    size_ += static_cast<int64_t>(data.size());
    ++batches_;
    if (snapshot_open_ && last > snapshot_ticket_) {
      // Records after the snapshot's ticket: RewriteSnapshot copies them into the new file.
      if (batch.size() == 1) batch.front().second.swap(data);
      for (auto& b : batch) {
        if (b.first > snapshot_ticket_) since_snapshot_.push_back(std::move(b));
      }
    }
  } else {
    failed_.push_back({{first, last}, s});
  }
  done_ticket_ = last;
}

absl::Status Journal::Wait(uint64_t ticket) {
  std::unique_lock<std::mutex> lock(mu_);
  while (done_ticket_ < ticket) {
    if (writing_) {
      cv_.wait(lock);
      continue;
    }
    // The first waiter without a writer in front of it writes the whole queue.
    writing_ = true;
    WriteQueuedLocked(lock);
    writing_ = false;
    cv_.notify_all();
  }
  return OutcomeLocked(ticket);
}

absl::Status Journal::Append(const std::vector<std::string>& payloads) {
  if (payloads.empty()) return absl::OkStatus();
  absl::StatusOr<uint64_t> ticket = Enqueue(payloads);
  if (!ticket.ok()) return ticket.status();
  return Wait(*ticket);
}

uint64_t Journal::BeginSnapshot() {
  std::lock_guard<std::mutex> lock(mu_);
  snapshot_open_ = true;
  snapshot_ticket_ = last_ticket_;
  since_snapshot_.clear();
  return snapshot_ticket_;
}

void Journal::EndSnapshot() {
  std::lock_guard<std::mutex> lock(mu_);
  snapshot_open_ = false;
  since_snapshot_.clear();
}

absl::Status Journal::Rewrite(const std::vector<std::string>& payloads) {
  std::vector<SnapshotRecord> records;
  records.reserve(payloads.size());
  for (const std::string& p : payloads) records.push_back({p, 0});
  return RewriteSnapshot(records, BeginSnapshot());
}

absl::Status Journal::RewriteSnapshot(const std::vector<SnapshotRecord>& records, uint64_t covers) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!snapshot_open_ || snapshot_ticket_ != covers) {
    return absl::FailedPreconditionError("journal: RewriteSnapshot without its BeginSnapshot");
  }
  // The writer role, once every ticket the snapshot covers is written (or failed).
  while (true) {
    BecomeWriter(lock);
    if (done_ticket_ >= covers) break;
    WriteQueuedLocked(lock);
    writing_ = false;
    cv_.notify_all();
  }
  auto finish = [&] {
    snapshot_open_ = false;
    since_snapshot_.clear();
    writing_ = false;
    cv_.notify_all();
  };
  if (closed_) {
    finish();
    return absl::UnavailableError(absl::StrCat(path_, ": the journal is closed"));
  }
  std::vector<bool> keep(records.size(), true);
  for (size_t i = 0; i < records.size(); ++i) {
    if (records[i].unless_failed > 0) keep[i] = OutcomeLocked(records[i].unless_failed).ok();
  }
  std::vector<std::pair<uint64_t, std::string>> tail;
  tail.swap(since_snapshot_);
  lock.unlock();

  std::vector<std::string> payloads;
  payloads.reserve(records.size());
  for (size_t i = 0; i < records.size(); ++i) {
    if (keep[i]) payloads.push_back(records[i].payload);
  }
  absl::Status s;
  std::string data = EncodeAll(payloads, &s);
  for (const auto& t : tail) data += t.second;  // already encoded
  const std::string tmp = compact_path();
  int fd = -1;
  if (s.ok()) {
    fd = ::open(tmp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) s = ErrnoStatus(errno, absl::StrCat(tmp, ": cannot create the compacted journal"));
  }
  if (s.ok()) s = WriteAll(fd, data, tmp);
  if (s.ok() && ::fsync(fd) != 0) s = ErrnoStatus(errno, absl::StrCat(tmp, ": fsync"));
  // Until the rename succeeds the old journal is the journal.
  if (s.ok() && ::rename(tmp.c_str(), path_.c_str()) != 0) {
    s = ErrnoStatus(errno, absl::StrCat("rename ", tmp, " to ", path_));
  }
  if (!s.ok()) {
    if (fd >= 0) {
      ::close(fd);
      ::unlink(tmp.c_str());
    }
    lock.lock();
    finish();
    return s;
  }
  // The renamed file is the journal now: append to it whatever happens next.
  // The descriptor still points at it (same inode), so there is nothing to
  // reopen that could fail.
  const absl::Status dir = FsyncDir(path_);
  lock.lock();
  ::close(fd_);
  fd_ = fd;
  size_ = static_cast<int64_t>(data.size());
  finish();
  if (!dir.ok()) {
    return absl::Status(dir.code(), absl::StrCat("compacted journal ", path_, " is in use, but the rename may not "
                                                 "survive a power loss: ", dir.message()));
  }
  return absl::OkStatus();
}

void Journal::Close() {
  std::unique_lock<std::mutex> lock(mu_);
  closed_ = true;
  BecomeWriter(lock);  // the write in progress ends first
  WriteQueuedLocked(lock);  // closed: fails the queue without writing
  writing_ = false;
  cv_.notify_all();
}

}  // namespace expertmesh::coordinator
