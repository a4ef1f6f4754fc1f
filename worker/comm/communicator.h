// Communicators: the data plane between the ranks of a group (the EP ranks of
// one pipeline stage).
//
// The interface is batch-first. A `Batch` is a list of point-to-point sends
// and receives of byte buffers that progress together; `Run` posts all of them
// and waits until every one has completed, the deadline passes or someone
// calls `Abort`. All-to-all-v, all-gather, broadcast and barrier are written
// once on top of `Run`, so a backend implements one data-moving method.
//
// Backends (see registry.h for how to create one):
//   * "mpi"  — Open MPI, non-blocking Isend/Irecv polled against the deadline;
//   * "ucx"  — UCX ucp tag API over host memory, bootstrapped through any
//              Bootstrap (file store, MPI), needs no MPI at run time;
//   * "nccl" — grouped ncclSend/ncclRecv over device memory (built whenever
//              NCCL is found);
//   * "inproc" — ranks as threads of one process, messages copied through
//              shared mailboxes (inproc_communicator.h; tests, experiments).
//
// Matching. Messages between one pair of ranks match in the order they are
// posted: the i-th send from rank a to rank b in a's sequence of batches
// matches the i-th receive from a in b's sequence. Every receive names its
// exact size; a message of another size is an error (kInternal on the
// receiver), never a silent truncation.
//
// Threads. A communicator has one owner thread that calls everything except
// `Abort`, which any thread may call at any time.
//
// Errors. Every method returns absl::Status. kDeadlineExceeded when the
// deadline passes (a peer died or stalled), kUnavailable when the transport
// reports a failed peer, kAborted after `Abort`, kInvalidArgument for a
// malformed batch. After any error other than kInvalidArgument the
// communicator is broken: the transfers of the failed batch were cancelled
// (their buffers are free again when Run returns; the one exception is an MPI
// send that its peer had already matched and that did not finish within a
// 0.5 s grace: MPI still owns it, so keep a failed batch's send buffers until
// the communicator is destroyed) and every later call fails with
// kFailedPrecondition naming the first error (kAborted after Abort). Build a
// new one to go on.
//
//   ASSIGN_OR_RETURN(auto comm, CreateCommunicator("mpi", nullptr, {}));
//   Batch b;
//   b.Send(peer, out.data(), out.size());
//   b.Recv(peer, in.data(), in.size());
//   RETURN_IF_ERROR(comm->Run(b, absl::Now() + absl::Seconds(30)));
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace expertmesh::comm {

// Where a buffer lives. Every buffer of one batch has the same kind.
enum class MemoryKind { kHost, kDevice };

const char* MemoryKindName(MemoryKind kind);

// What a backend can do; check it before building a batch it cannot run.
struct Caps {
  bool host_memory = false;    // Run accepts MemoryKind::kHost batches
  bool device_memory = false;  // Run accepts MemoryKind::kDevice batches (CUDA pointers)
  bool gather_sends = false;   // Batch::SendGather (one message from many pieces, no staging copy)
  // Host memory with gathered sends: the CPU transports (MPI, UCX, in-process).
  static Caps HostGather() {
    Caps c;
    c.host_memory = true;
    c.gather_sends = true;
    return c;
  }
};

// A piece of a gathered send.
struct Segment {
  const void* data = nullptr;
  size_t bytes = 0;
};

// One batch of point-to-point transfers. The batch does not own the buffers
// (nor the segment arrays of gathered sends): they must stay valid (sends
// unchanged, receives untouched) until Run returns. A zero-byte transfer is
// allowed and still matches a zero-byte peer operation.
struct Batch {
  struct Op {
    int peer = 0;          // rank in the communicator, may be this rank
    void* data = nullptr;  // may be null when bytes == 0 (or when segs is set)
    size_t bytes = 0;      // total bytes of the message
    const Segment* segs = nullptr;  // gathered send: nsegs pieces, in order
    size_t nsegs = 0;
  };
  MemoryKind memory = MemoryKind::kHost;
  // The wait may be long: a receive of what a peer sends after its whole
  // step, or when there is work (a pipeline stage's next micro-batch). After
  // 100 ms without progress the host transports (MPI, UCX) poll in sleeps
  // (comm/poll_backoff.h) instead of yielding, so a waiting rank does not keep
  // a core busy. Off for exchanges whose transfers are in flight (all-to-all):
  // large transfers need eager polling to progress.
  bool patient = false;
  std::vector<Op> sends;
  std::vector<Op> recvs;

  void Send(int peer, const void* data, size_t bytes) {
    Op op;
    op.peer = peer;
    op.data = const_cast<void*>(data);
    op.bytes = bytes;
    sends.push_back(op);
  }
  // One message made of the pieces segs[0..n), received by the peer as one
  // contiguous Recv of their total size. Needs caps().gather_sends.
  void SendGather(int peer, const Segment* segs, size_t n) {
    Op op;
    op.peer = peer;
    op.segs = segs;
    op.nsegs = n;
    for (size_t i = 0; i < n; ++i) op.bytes += segs[i].bytes;
    if (op.bytes == 0) op.segs = nullptr;  // an empty message needs no pieces
    sends.push_back(op);
  }
  void Recv(int peer, void* data, size_t bytes) {
    Op op;
    op.peer = peer;
    op.data = data;
    op.bytes = bytes;
    recvs.push_back(op);
  }
  void Clear() {
    sends.clear();
    recvs.clear();
    patient = false;
  }
};

// Byte counts and offsets of one all-to-all-v, per peer (each vector has
// size() entries). Offsets are in bytes from the start of the buffer.
struct AllToAllVLayout {
  std::vector<size_t> send_bytes, send_offsets;
  std::vector<size_t> recv_bytes, recv_offsets;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // "mpi", "ucx", "nccl" or "inproc".
  virtual absl::string_view backend() const = 0;
  virtual Caps caps() const = 0;

  // Posts every send and receive of `batch` and blocks until all have
  // completed, `deadline` passes, or Abort is called. Sends and receives with
  // this rank as peer are matched in order and copied locally (host memory)
  // or handed to the backend (device memory). Returns OK only when every
  // transfer completed with the expected size.
  absl::Status Run(const Batch& batch, absl::Time deadline);

  // Called by Run on the owner thread once per receive of the batch, with its
  // index in batch.recvs, as soon as that receive's data is complete (in
  // completion order; receives from this rank first). Lets the caller work on
  // one peer's data while the others are still arriving. It must not call the
  // communicator; an error it returns ends the batch like a transport error.
  using RecvDoneFn = std::function<absl::Status(size_t recv_index)>;
  // Run, calling on_recv_done (may be null) as receives complete.
  absl::Status Run(const Batch& batch, absl::Time deadline, const RecvDoneFn& on_recv_done);

  // All-to-all-v of bytes: the block [send_offsets[p], +send_bytes[p]) of
  // `send` goes to rank p, which receives it at recv_offsets[rank()] of its
  // `recv`. Every rank must call it (also with all counts zero). Blocking,
  // same errors as Run. `send` and `recv` must not overlap.
  absl::Status AllToAllV(const void* send, void* recv, const AllToAllVLayout& layout,
                         MemoryKind memory, absl::Time deadline);

  // Fixed-size all-to-all: `bytes_per_peer` bytes to each rank, blocks in
  // rank order in both buffers. Blocking; every rank must call it.
  absl::Status AllToAll(const void* send, void* recv, size_t bytes_per_peer, MemoryKind memory,
                        absl::Time deadline);

  // recv[r * bytes .. (r + 1) * bytes) = rank r's `send`. `send` may alias
  // this rank's block of `recv`. Blocking; every rank must call it.
  absl::Status AllGather(const void* send, void* recv, size_t bytes, MemoryKind memory,
                         absl::Time deadline);

  // Copies `bytes` at `data` on `root` into `data` on every rank. Blocking;
  // every rank must call it with the same root and size.
  absl::Status Broadcast(int root, void* data, size_t bytes, MemoryKind memory, absl::Time deadline);

  // Returns when every rank has entered the barrier, or with an error at the
  // deadline. Uses host memory where the backend has it, else device scratch.
  virtual absl::Status Barrier(absl::Time deadline);

  // Makes the Run in progress (if any) and every later call fail with
  // kAborted carrying `reason`. Safe to call from any thread, any number of
  // times (the first reason wins); does not block and does not wait for the
  // owner thread. The owner's next poll cancels the outstanding transfers.
  void Abort(const absl::Status& reason);

  // OK while usable; otherwise the error that broke the communicator.
  absl::Status health() const;

 protected:
  Communicator(int rank, int size) : rank_(rank), size_(size) {}

  // Runs the remote part of a validated batch: every op has peer != rank()
  // unless the memory is device memory. Must poll `aborted()` and the
  // deadline while waiting, call on_recv_done(i) (when not null) once receive
  // i is complete, and cancel or complete every posted transfer before
  // returning an error (the caller's buffers are free afterwards).
  virtual absl::Status RunRemote(const Batch& batch, absl::Time deadline, const RecvDoneFn* on_recv_done) = 0;
  // Called once by the first Abort (any thread, must not block): a backend
  // that wraps another communicator aborts it too.
  virtual void OnAbort(const absl::Status& reason) {}

  bool aborted() const { return aborted_.load(std::memory_order_acquire); }
  absl::Status abort_status() const;

 private:
  absl::Status Validate(const Batch& batch) const;

  const int rank_;
  const int size_;
  std::atomic<bool> aborted_{false};
  mutable std::mutex mu_;    // guards abort_reason_ (written by any thread)
  absl::Status abort_reason_;
  absl::Status broken_;      // owner thread only
  Batch remote_;             // scratch: the remote part of the current batch
  std::vector<size_t> remote_recv_index_;  // batch.recvs index of each remote_.recvs entry
};

// Converts a deadline to a short human string ("in 2.5s", "3.1s ago").
std::string DeadlineString(absl::Time deadline);

}  // namespace expertmesh::comm
