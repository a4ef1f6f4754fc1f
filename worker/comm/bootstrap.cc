#include "worker/comm/bootstrap.h"

#include <fcntl.h>
#include <unistd.h>

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

absl::StatusOr<std::vector<std::string>> StoreBootstrap::AllGather(absl::string_view mine, absl::Time deadline) {
  const std::string round = absl::StrCat(prefix_, "/", round_++);
  RETURN_IF_ERROR(store_->Set(absl::StrCat(round, "/", rank_), mine));
  std::vector<std::string> all(static_cast<size_t>(size_));
  std::vector<int> missing;
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) {
      all[static_cast<size_t>(r)] = std::string(mine);
      continue;
    }
    absl::StatusOr<std::string> v = store_->Get(absl::StrCat(round, "/", r), deadline);
    if (v.ok()) {
      all[static_cast<size_t>(r)] = *std::move(v);
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
