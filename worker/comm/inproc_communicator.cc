#include "worker/comm/inproc_communicator.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "glog/logging.h"

namespace expertmesh::comm {

// Mailboxes: one per destination rank, holding a FIFO per sender.
class InprocFabric {
 public:
  explicit InprocFabric(int n) : boxes_(static_cast<size_t>(n)) {
    for (Mailbox& b : boxes_) b.from.resize(static_cast<size_t>(n));
  }

  // Appends a message from `src` to `dst`'s mailbox and wakes `dst`.
  void Deliver(int src, int dst, std::vector<char> msg) {
    Mailbox& b = boxes_[static_cast<size_t>(dst)];
    {
      std::lock_guard<std::mutex> lock(b.mu);
      b.from[static_cast<size_t>(src)].push_back(std::move(msg));
    }
    b.cv.notify_all();
  }

  // Marks `rank` as gone and wakes everyone who may wait for it.
  void Leave(int rank) {
    for (Mailbox& b : boxes_) {
      {
        std::lock_guard<std::mutex> lock(b.mu);
        if (b.left.empty()) b.left.assign(boxes_.size(), false);
        b.left[static_cast<size_t>(rank)] = true;
      }
      b.cv.notify_all();
    }
  }

  struct Mailbox {
    std::mutex mu;
    std::condition_variable cv;
    std::vector<std::deque<std::vector<char>>> from;  // from[src]: messages in posting order
    std::vector<bool> left;                           // left[src]: src's communicator is gone (empty: none)
  };
  Mailbox& box(int rank) { return boxes_[static_cast<size_t>(rank)]; }

 private:
  std::vector<Mailbox> boxes_;
};

namespace {

// Longest sleep between checks of Abort while a receive waits.
constexpr absl::Duration kAbortPoll = absl::Milliseconds(2);

class InprocCommunicator : public Communicator {
 public:
  InprocCommunicator(std::shared_ptr<InprocFabric> fabric, int rank, int size)
      : Communicator(rank, size), fabric_(std::move(fabric)) {}
  ~InprocCommunicator() override { fabric_->Leave(rank()); }

  absl::string_view backend() const override { return "inproc"; }
  Caps caps() const override {
    Caps c;
    c.host_memory = true;
    c.gather_sends = true;
    return c;
  }

 protected:
  absl::Status RunRemote(const Batch& batch, absl::Time deadline, const RecvDoneFn* on_recv_done) override {
    // Sends first: each is a copy into the peer's mailbox, done at once.
    for (const Batch::Op& op : batch.sends) {
      std::vector<char> msg(op.bytes);
      if (op.segs != nullptr) {
        char* dst = msg.data();
        for (size_t i = 0; i < op.nsegs; ++i) {
          if (op.segs[i].bytes > 0) std::memcpy(dst, op.segs[i].data, op.segs[i].bytes);
          dst += op.segs[i].bytes;
        }
      } else if (op.bytes > 0) {
        std::memcpy(msg.data(), op.data, op.bytes);
      }
      fabric_->Deliver(rank(), op.peer, std::move(msg));
    }
    // Receives: per sender in posting order, as their messages arrive.
    const size_t n = batch.recvs.size();
    std::vector<bool> done(n, false);
    size_t remaining = n;
    InprocFabric::Mailbox& box = fabric_->box(rank());
    while (remaining > 0) {
      std::vector<std::pair<size_t, std::vector<char>>> got;
      absl::Status gone;
      {
        std::unique_lock<std::mutex> lock(box.mu);
        std::vector<bool> blocked(static_cast<size_t>(size()), false);  // an earlier receive from src waits
        for (size_t i = 0; i < n; ++i) {
          if (done[i]) continue;
          const size_t src = static_cast<size_t>(batch.recvs[i].peer);
          if (blocked[src]) continue;
          auto& q = box.from[src];
          if (q.empty()) {
            blocked[src] = true;
            if (!box.left.empty() && box.left[src] && gone.ok()) {
              gone = absl::UnavailableError(
                  absl::StrCat("inproc: rank ", rank(), " waits for rank ", src, ", whose communicator is gone"));
            }
            continue;
          }
          got.emplace_back(i, std::move(q.front()));
          q.pop_front();
        }
        if (got.empty() && gone.ok() && !aborted() && absl::Now() < deadline) {
          const absl::Time wake = std::min(deadline, absl::Now() + kAbortPoll);
          box.cv.wait_until(lock, absl::ToChronoTime(wake));
          continue;
        }
      }
      for (auto& [i, msg] : got) {
        const Batch::Op& op = batch.recvs[i];
        if (msg.size() != op.bytes) {
          return absl::InternalError(absl::StrCat("inproc: rank ", rank(), " expected ", op.bytes, " bytes from rank ",
                                                  op.peer, " but got ", msg.size(), "; the ranks' batches disagree"));
        }
        if (op.bytes > 0) std::memcpy(op.data, msg.data(), op.bytes);
        done[i] = true;
        --remaining;
        if (on_recv_done != nullptr) {
          if (absl::Status s = (*on_recv_done)(i); !s.ok()) return s;
        }
      }
      if (!got.empty()) continue;
      if (!gone.ok()) return gone;
      if (aborted()) return abort_status();
      if (absl::Now() >= deadline) {
        std::vector<std::string> pending;
        for (size_t i = 0; i < n && pending.size() < 8; ++i) {
          if (!done[i]) pending.push_back(absl::StrCat("recv from rank ", batch.recvs[i].peer));
        }
        return absl::DeadlineExceededError(absl::StrCat(
            "inproc: rank ", rank(), ": deadline passed with ", remaining, " of ", n, " receives pending (",
            absl::StrJoin(pending, ", "), remaining > pending.size() ? ", ..." : "", "); a peer died or stalled"));
      }
    }
    return absl::OkStatus();
  }

 private:
  std::shared_ptr<InprocFabric> fabric_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> CreateInprocGroup(int n) {
  CHECK_GE(n, 1) << "an in-process group needs at least one rank";
  auto fabric = std::make_shared<InprocFabric>(n);
  std::vector<std::unique_ptr<Communicator>> comms;
  comms.reserve(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) comms.push_back(std::make_unique<InprocCommunicator>(fabric, r, n));
  return comms;
}

}  // namespace expertmesh::comm
