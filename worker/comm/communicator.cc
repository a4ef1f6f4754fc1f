#include "worker/comm/communicator.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace expertmesh::comm {

const char* MemoryKindName(MemoryKind kind) {
  return kind == MemoryKind::kHost ? "host" : "device";
}

std::string DeadlineString(absl::Time deadline) {
  const double s = absl::ToDoubleSeconds(deadline - absl::Now());
  return s >= 0 ? absl::StrFormat("in %.3gs", s) : absl::StrFormat("%.3gs ago", -s);
}

void Communicator::Abort(const absl::Status& reason) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (aborted_.load(std::memory_order_relaxed)) return;
    abort_reason_ = reason.ok() ? absl::AbortedError("aborted by the caller") : reason;
  }
  aborted_.store(true, std::memory_order_release);
  OnAbort(reason);
}

absl::Status Communicator::abort_status() const {
  std::lock_guard<std::mutex> lock(mu_);
  return absl::AbortedError(
      absl::StrCat(backend(), " communicator (rank ", rank_, " of ", size_, ") aborted: ", abort_reason_.message()));
}

absl::Status Communicator::health() const {
  if (aborted()) return abort_status();
  return broken_;
}

absl::Status Communicator::Validate(const Batch& batch) const {
  const Caps c = caps();
  if (batch.memory == MemoryKind::kHost && !c.host_memory) {
    return absl::InvalidArgumentError(
        absl::StrCat(backend(), " communicator moves device memory only; stage host data through device buffers"));
  }
  if (batch.memory == MemoryKind::kDevice && !c.device_memory) {
    return absl::InvalidArgumentError(absl::StrCat(
        backend(), " communicator moves host memory only; copy device data to the host or use the nccl backend"));
  }
  for (const Batch::Op& op : batch.recvs) {
    if (op.segs != nullptr) return absl::InvalidArgumentError("batch receives must be contiguous (no segments)");
  }
  for (const Batch::Op& op : batch.sends) {
    if (op.segs != nullptr && !c.gather_sends) {
      return absl::InvalidArgumentError(absl::StrCat(backend(), " communicator has no gathered sends; pack first"));
    }
  }
  for (const auto* ops : {&batch.sends, &batch.recvs}) {
    for (const Batch::Op& op : *ops) {
      if (op.peer < 0 || op.peer >= size_) {
        return absl::InvalidArgumentError(
            absl::StrCat("batch names peer ", op.peer, ", outside [0, ", size_, ")"));
      }
      if (op.data == nullptr && op.segs == nullptr && op.bytes > 0) {
        return absl::InvalidArgumentError(absl::StrCat("batch op with peer ", op.peer, " has a null buffer of ",
                                                       op.bytes, " bytes"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Communicator::Run(const Batch& batch, absl::Time deadline) { return Run(batch, deadline, nullptr); }

absl::Status Communicator::Run(const Batch& batch, absl::Time deadline, const RecvDoneFn& on_recv_done) {
  if (aborted()) return abort_status();
  if (!broken_.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat(backend(), " communicator is broken by an earlier error (", broken_.message(),
                     "); create a new one"));
  }
  if (absl::Status s = Validate(batch); !s.ok()) return s;

  const Batch* remote = &batch;
  bool mapped = false;
  std::vector<size_t> self_done;
  if (batch.memory == MemoryKind::kHost) {
    // Local transfers: the i-th send to self matches the i-th receive from self.
    remote_.Clear();
    remote_recv_index_.clear();
    remote_.memory = batch.memory;
    remote_.patient = batch.patient;
    mapped = true;
    std::vector<const Batch::Op*> self_sends;
    for (const Batch::Op& op : batch.sends) {
      if (op.peer == rank_) {
        self_sends.push_back(&op);
      } else {
        remote_.sends.push_back(op);
      }
    }
    size_t next = 0;
    for (size_t ri = 0; ri < batch.recvs.size(); ++ri) {
      const Batch::Op& op = batch.recvs[ri];
      if (op.peer != rank_) {
        remote_.recvs.push_back(op);
        remote_recv_index_.push_back(ri);
        continue;
      }
      self_done.push_back(ri);
      if (next >= self_sends.size()) {
        return absl::InvalidArgumentError(
            absl::StrCat("batch receives from self (rank ", rank_, ") more often than it sends to self"));
      }
      const Batch::Op& s = *self_sends[next++];
      if (s.bytes != op.bytes) {
        return absl::InvalidArgumentError(absl::StrCat("batch sends ", s.bytes, " bytes to self but receives ",
                                                       op.bytes, " bytes from self"));
      }
      if (s.segs != nullptr) {
        char* dst = static_cast<char*>(op.data);
        for (size_t i = 0; i < s.nsegs; ++i) {
          if (s.segs[i].bytes > 0) std::memmove(dst, s.segs[i].data, s.segs[i].bytes);
          dst += s.segs[i].bytes;
        }
      } else if (op.bytes > 0 && op.data != s.data) {
        std::memmove(op.data, s.data, op.bytes);
      }
    }
    if (next != self_sends.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch sends to self (rank ", rank_, ") more often than it receives from self"));
    }
    remote = &remote_;
  }
  absl::Status s;
  if (on_recv_done) {
    for (size_t ri : self_done) {
      s = on_recv_done(ri);
      if (!s.ok()) return s;  // nothing was posted yet: the communicator stays usable
    }
  }
  RecvDoneFn remote_done;
  if (on_recv_done) {
    remote_done = mapped ? RecvDoneFn([&](size_t i) { return on_recv_done(remote_recv_index_[i]); })
                         : on_recv_done;
  }
  if (!remote->sends.empty() || !remote->recvs.empty()) {
    s = RunRemote(*remote, deadline, on_recv_done ? &remote_done : nullptr);
  }
  if (!s.ok() && s.code() != absl::StatusCode::kInvalidArgument && s.code() != absl::StatusCode::kAborted) {
    broken_ = s;
  }
  return s;
}

absl::Status Communicator::AllToAllV(const void* send, void* recv, const AllToAllVLayout& l, MemoryKind memory,
                                     absl::Time deadline) {
  const size_t n = static_cast<size_t>(size_);
  if (l.send_bytes.size() != n || l.send_offsets.size() != n || l.recv_bytes.size() != n ||
      l.recv_offsets.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat("all-to-all-v layout needs ", n, " counts and offsets per side"));
  }
  Batch b;
  b.memory = memory;
  b.sends.reserve(n);
  b.recvs.reserve(n);
  // Start with the next peer so that not every rank targets rank 0 first.
  for (size_t i = 0; i < n; ++i) {
    const int p = static_cast<int>((static_cast<size_t>(rank_) + i) % n);
    b.Send(p, static_cast<const char*>(send) + l.send_offsets[p], l.send_bytes[p]);
  }
  for (size_t i = 0; i < n; ++i) {
    const int p = static_cast<int>((static_cast<size_t>(rank_) + n - i) % n);
    b.Recv(p, static_cast<char*>(recv) + l.recv_offsets[p], l.recv_bytes[p]);
  }
  return Run(b, deadline);
}

absl::Status Communicator::AllToAll(const void* send, void* recv, size_t bytes_per_peer, MemoryKind memory,
                                    absl::Time deadline) {
  AllToAllVLayout l;
  const size_t n = static_cast<size_t>(size_);
  l.send_bytes.assign(n, bytes_per_peer);
  l.recv_bytes.assign(n, bytes_per_peer);
  for (size_t p = 0; p < n; ++p) {
    l.send_offsets.push_back(p * bytes_per_peer);
    l.recv_offsets.push_back(p * bytes_per_peer);
  }
  return AllToAllV(send, recv, l, memory, deadline);
}

absl::Status Communicator::AllGather(const void* send, void* recv, size_t bytes, MemoryKind memory,
                                     absl::Time deadline) {
  Batch b;
  b.memory = memory;
  for (int p = 0; p < size_; ++p) {
    b.Send(p, send, bytes);
    b.Recv(p, static_cast<char*>(recv) + static_cast<size_t>(p) * bytes, bytes);
  }
  return Run(b, deadline);
}

absl::Status Communicator::Broadcast(int root, void* data, size_t bytes, MemoryKind memory, absl::Time deadline) {
  if (root < 0 || root >= size_) {
    return absl::InvalidArgumentError(absl::StrCat("broadcast root ", root, " outside [0, ", size_, ")"));
  }
  Batch b;
  b.memory = memory;
  if (rank_ == root) {
    for (int p = 0; p < size_; ++p) {
      if (p != root) b.Send(p, data, bytes);
    }
  } else {
    b.Recv(root, data, bytes);
  }
  return Run(b, deadline);
}

absl::Status Communicator::Barrier(absl::Time deadline) {
  // Every rank sends one byte to every other rank (O(P) messages; EP groups are small).
  std::vector<char> out(1, 1), in(static_cast<size_t>(size_), 0);
  Batch b;
  b.memory = MemoryKind::kHost;
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    b.Send(p, out.data(), 1);
    b.Recv(p, in.data() + p, 1);
  }
  return Run(b, deadline);
}

}  // namespace expertmesh::comm
