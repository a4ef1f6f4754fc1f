#include "worker/comm/bootstrap.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "worker/comm/communicator.h"

namespace expertmesh::comm {

absl::StatusOr<std::string> Bootstrap::Broadcast(int root, absl::string_view mine, absl::Time deadline) {
  if (root < 0 || root >= size()) {
    return absl::InvalidArgumentError(absl::StrCat("bootstrap broadcast root ", root, " outside [0, ", size(), ")"));
  }
  ASSIGN_OR_RETURN(std::vector<std::string> all,
                   AllGather(rank() == root ? mine : absl::string_view(), deadline));
  return std::move(all[static_cast<size_t>(root)]);
}

namespace {

absl::Status ErrnoError(absl::string_view what, const std::string& path) {
  const int e = errno;
  return absl::UnavailableError(absl::StrCat("file store: ", what, " ", path, ": ", std::strerror(e)));
}

bool ValidKey(absl::string_view key) {
  if (key.empty()) return false;
  for (char c : key) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == '-' || c == '/';
    if (!ok) return false;
  }
  return key.front() != '/' && key.find("..") == absl::string_view::npos;
}

}  // namespace

std::string FileStore::PathOf(absl::string_view key) const { return absl::StrCat(dir_, "/", key); }

absl::Status FileStore::Set(absl::string_view key, absl::string_view value) {
  if (!ValidKey(key)) return absl::InvalidArgumentError(absl::StrCat("file store: bad key '", key, "'"));
  const std::string path = PathOf(key);
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("file store: cannot create the folder of ", path, ": ", ec.message()));
  }
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) return ErrnoError("cannot create", tmp);
  const bool written = std::fwrite(value.data(), 1, value.size(), f) == value.size();
  if (std::fclose(f) != 0 || !written) return ErrnoError("cannot write", tmp);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) return ErrnoError("cannot rename into", path);
  return absl::OkStatus();
}

absl::StatusOr<std::string> FileStore::Get(absl::string_view key, absl::Time deadline) {
  if (!ValidKey(key)) return absl::InvalidArgumentError(absl::StrCat("file store: bad key '", key, "'"));
  const std::string path = PathOf(key);
  absl::Duration wait = absl::Milliseconds(1);
  while (true) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      std::string value;
      char buf[4096];
      while (true) {
        const ssize_t n = ::read(fd, buf, sizeof(buf));
        if (n == 0) break;
        if (n < 0) {
          if (errno == EINTR) continue;
          absl::Status s = ErrnoError("cannot read", path);
          ::close(fd);
          return s;
        }
        value.append(buf, static_cast<size_t>(n));
      }
      ::close(fd);
      return value;
    }
    if (errno != ENOENT) return ErrnoError("cannot open", path);
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("file store: key ", key, " did not appear in ", dir_, " before the deadline"));
    }
    std::this_thread::sleep_for(absl::ToChronoNanoseconds(std::min(wait, deadline - absl::Now())));
    wait = std::min(wait * 2, absl::Milliseconds(20));
  }
}

namespace {
constexpr char kFrameMagic[4] = {'E', 'M', 'B', '1'};
constexpr size_t kFrameHeader = 12;  // magic, u32 length, u32 CRC-32 (zlib's), little endian

void PutU32(std::string* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint32_t GetU32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}
uint32_t Crc(absl::string_view bytes) {
  return static_cast<uint32_t>(
      crc32(crc32(0L, Z_NULL, 0), reinterpret_cast<const Bytef*>(bytes.data()), static_cast<uInt>(bytes.size())));
}
}  // namespace

std::string FrameBootstrapValue(absl::string_view payload) {
  std::string out(kFrameMagic, sizeof(kFrameMagic));
  PutU32(&out, static_cast<uint32_t>(payload.size()));
  PutU32(&out, Crc(payload));
  out.append(payload.data(), payload.size());
  return out;
}

absl::StatusOr<std::string> UnframeBootstrapValue(absl::string_view framed) {
  if (framed.size() < kFrameHeader || framed.substr(0, 4) != absl::string_view(kFrameMagic, 4)) {
    return absl::DataLossError(absl::StrCat(framed.size(), " bytes without the expertmesh bootstrap header"));
  }
  const uint32_t len = GetU32(framed.data() + 4);
  if (len != framed.size() - kFrameHeader || len > kMaxBootstrapValueBytes) {
    return absl::DataLossError(absl::StrCat("the header says ", len, " bytes, ", framed.size() - kFrameHeader,
                                            " follow (at most ", kMaxBootstrapValueBytes, " allowed)"));
  }
  const absl::string_view payload = framed.substr(kFrameHeader);
  if (Crc(payload) != GetU32(framed.data() + 8)) return absl::DataLossError("checksum mismatch");
  return std::string(payload);
}

absl::StatusOr<std::vector<std::string>> StoreBootstrap::AllGather(absl::string_view mine, absl::Time deadline) {
  const std::string round = absl::StrCat(prefix_, "/", round_++);
  if (mine.size() > kMaxBootstrapValueBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("bootstrap ", round, ": ", mine.size(), " bytes exceed ", kMaxBootstrapValueBytes));
  }
  RETURN_IF_ERROR(store_->Set(absl::StrCat(round, "/", rank_), FrameBootstrapValue(mine)));
  std::vector<std::string> all(static_cast<size_t>(size_));
  std::vector<int> missing;
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) {
      all[static_cast<size_t>(r)] = std::string(mine);
      continue;
    }
    absl::StatusOr<std::string> v = store_->Get(absl::StrCat(round, "/", r), deadline);
    if (v.ok()) {
      // Framed with a length and a checksum: a damaged or forged value (e.g.
      // garbage written to the coordinator's store) is an error here, never
      // bytes handed to UCX or NCCL.
      absl::StatusOr<std::string> payload = UnframeBootstrapValue(*v);
      if (!payload.ok()) {
        return absl::DataLossError(absl::StrCat("bootstrap ", round, " (rank ", rank_, " of ", size_,
                                                "): the bytes of rank ", r, " are damaged or not from an "
                                                "expertmesh rank (",
                                                payload.status().message(), ")"));
      }
      all[static_cast<size_t>(r)] = *std::move(payload);
    } else if (v.status().code() == absl::StatusCode::kDeadlineExceeded) {
      missing.push_back(r);
    } else {
      return v.status();
    }
  }
  if (!missing.empty()) {
    return absl::DeadlineExceededError(absl::StrCat("bootstrap ", round, " (rank ", rank_, " of ", size_,
                                                    "): no bytes from rank(s) ", absl::StrJoin(missing, ","),
                                                    " before the deadline; are they running?"));
  }
  return all;
}

}  // namespace expertmesh::comm
