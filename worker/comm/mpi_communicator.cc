#include "worker/comm/mpi_communicator.h"
#include "worker/comm/poll_backoff.h"

#include <mpi.h>
#include <sched.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

namespace expertmesh::comm {
namespace {

// Tag of every data-plane message; ordering between a pair comes from MPI's
// non-overtaking rule on one (communicator, tag).
constexpr int kDataTag = 7;
// Messages above this are split (MPI counts are int).
constexpr size_t kMaxChunk = size_t{1} << 30;
// After an error, how long cancelled requests may take to finish.
constexpr absl::Duration kCancelGrace = absl::Milliseconds(500);

absl::Status MpiError(int code, absl::string_view what) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) len = 0;
  return absl::InternalError(absl::StrCat(what, " failed: MPI error ", code, " (", std::string(text, len), ")"));
}

#define EM_MPI_RETURN_IF_ERROR(call)                       \
  do {                                                     \
    const int em_mpi_rc_ = (call);                         \
    if (em_mpi_rc_ != MPI_SUCCESS) return MpiError(em_mpi_rc_, #call); \
  } while (0)

// Polls `reqs` until all complete, the deadline passes, or `aborted` says so.
// `on_done(i, status)` runs once per completed request and may return an
// error. On any error the remaining requests are cancelled (or, if they cannot
// be, released) before returning. `describe(i)` names request i in errors.
template <typename OnDone, typename Aborted, typename Describe>
absl::Status WaitAll(std::vector<MPI_Request>& reqs, absl::Time deadline, OnDone on_done, Aborted aborted,
                     Describe describe, absl::string_view what, bool patient = false) {
  const int n = static_cast<int>(reqs.size());
  std::vector<int> idx(reqs.size());
  std::vector<MPI_Status> st(reqs.size());
  int remaining = n;
  absl::Status error;
  PollBackoff backoff;
  while (remaining > 0) {
    int count = 0;
    const int rc = MPI_Testsome(n, reqs.data(), &count, idx.data(), st.data());
    if (rc != MPI_SUCCESS && rc != MPI_ERR_IN_STATUS) {
      error = MpiError(rc, what);
      break;
    }
    if (count == MPI_UNDEFINED) break;  // every request is already MPI_REQUEST_NULL
    for (int j = 0; j < count && error.ok(); ++j) {
      if (rc == MPI_ERR_IN_STATUS && st[j].MPI_ERROR != MPI_SUCCESS) {
        error = MpiError(st[j].MPI_ERROR, absl::StrCat(what, ": ", describe(idx[j])));
      } else {
        error = on_done(idx[j], st[j]);
      }
    }
    remaining -= count;
    if (count > 0) backoff.Reset();
    if (!error.ok()) break;
    if (remaining == 0) break;
    if (aborted()) {
      error = absl::AbortedError("aborted");
      break;
    }
    if (count == 0) {
      if (absl::Now() >= deadline) {
        std::vector<std::string> pending;
        for (int i = 0; i < n; ++i) {
          if (reqs[i] != MPI_REQUEST_NULL) pending.push_back(describe(i));
        }
        error = absl::DeadlineExceededError(absl::StrCat(
            what, ": deadline passed with ", remaining, " of ", n, " transfers pending (",
            absl::StrJoin(pending.begin(), pending.begin() + std::min<size_t>(pending.size(), 8), ", "),
            pending.size() > 8 ? ", ..." : "", "); a peer died or stalled"));
        break;
      }
      if (patient) {
        backoff.Wait();
      } else {
        sched_yield();
      }
    }
  }
  if (error.ok()) return error;
  // Cancel what is left; give the transport a moment to confirm, then let go.
  for (MPI_Request& r : reqs) {
    if (r != MPI_REQUEST_NULL) MPI_Cancel(&r);
  }
  const absl::Time grace = absl::Now() + kCancelGrace;
  for (MPI_Request& r : reqs) {
    int done = 0;
    while (r != MPI_REQUEST_NULL && !done && absl::Now() < grace) {
      MPI_Test(&r, &done, MPI_STATUS_IGNORE);
      if (!done) sched_yield();
    }
    if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
  }
  return error;
}

absl::StatusOr<MPI_Comm> DupWorld(absl::Time deadline) {
  if (!MpiInitialized()) {
    return absl::FailedPreconditionError("MPI is not initialised: call InitMpi first (and run under mpirun)");
  }
  MPI_Comm dup = MPI_COMM_NULL;
  MPI_Request req = MPI_REQUEST_NULL;
  EM_MPI_RETURN_IF_ERROR(MPI_Comm_idup(MPI_COMM_WORLD, &dup, &req));
  std::vector<MPI_Request> reqs{req};
  RETURN_IF_ERROR(WaitAll(
      reqs, deadline, [](int, const MPI_Status&) { return absl::OkStatus(); }, [] { return false; },
      [](int) { return std::string("MPI_Comm_idup"); }, "duplicating MPI_COMM_WORLD"));
  EM_MPI_RETURN_IF_ERROR(MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN));
  return dup;
}

class MpiCommunicator : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, int rank, int size) : Communicator(rank, size), comm_(comm) {}
  ~MpiCommunicator() override {
    // A broken communicator keeps its MPI context: a peer may still hold
    // unmatched messages of the failed batch, and a freed context id could be
    // reused by the next duplicate, where they would match the wrong receive.
    if (comm_ != MPI_COMM_NULL && MpiInitialized() && health().ok()) MPI_Comm_free(&comm_);
  }
  absl::string_view backend() const override { return "mpi"; }
  Caps caps() const override { return Caps::HostGather(); }

 protected:
  absl::Status RunRemote(const Batch& batch, absl::Time deadline, const RecvDoneFn* on_recv_done) override {
    reqs_.clear();
    ops_.clear();
    // Receives first, so that eager messages land in posted buffers.
    chunks_left_.assign(batch.recvs.size(), 0);
    for (size_t i = 0; i < batch.recvs.size(); ++i) {
      const size_t before = ops_.size();
      RETURN_IF_ERROR(Post(batch.recvs[i], /*send=*/false));
      for (size_t c = before; c < ops_.size(); ++c) ops_[c].recv_index = i;
      chunks_left_[i] = ops_.size() - before;
    }
    for (const Batch::Op& op : batch.sends) RETURN_IF_ERROR(Post(op, /*send=*/true));
    auto on_done = [&](int i, const MPI_Status& st) -> absl::Status {
      const Chunk& c = ops_[static_cast<size_t>(i)];
      if (c.send) return absl::OkStatus();
      int got = 0;
      MPI_Get_count(&st, MPI_BYTE, &got);
      if (static_cast<size_t>(got) != c.bytes) {
        return absl::InternalError(absl::StrCat("mpi: rank ", rank(), " expected ", c.bytes, " bytes from rank ",
                                                c.peer, " but got ", got, "; the ranks' batches disagree"));
      }
      if (--chunks_left_[c.recv_index] == 0 && on_recv_done != nullptr) return (*on_recv_done)(c.recv_index);
      return absl::OkStatus();
    };
    auto describe = [&](int i) {
      const Chunk& c = ops_[static_cast<size_t>(i)];
      return absl::StrCat(c.send ? "send to rank " : "receive from rank ", c.peer);
    };
    absl::Status s = WaitAll(reqs_, deadline, on_done, [this] { return aborted(); }, describe,
                             absl::StrCat("mpi batch on rank ", rank(), " of ", size()), batch.patient);
    if (s.code() == absl::StatusCode::kAborted) return abort_status();
    return s;
  }

 private:
  struct Chunk {
    int peer;
    size_t bytes;
    bool send;
    size_t recv_index = 0;  // receives: index in the batch
  };

  // A gathered send: one MPI message per kMaxChunk bytes of the message (the
  // receiver's contiguous chunks), each described by an hindexed datatype over
  // absolute addresses, so MPI reads the pieces in place.
  absl::Status PostGather(const Batch::Op& op) {
    size_t seg = 0, seg_off = 0, msg_off = 0;
    std::vector<int> lens;
    std::vector<MPI_Aint> displs;
    do {
      const size_t chunk = std::min(kMaxChunk, op.bytes - msg_off);
      lens.clear();
      displs.clear();
      for (size_t left = chunk; left > 0;) {
        const Segment& sg = op.segs[seg];
        const size_t take = std::min(left, sg.bytes - seg_off);
        if (take > 0) {
          MPI_Aint a = 0;
          MPI_Get_address(static_cast<const char*>(sg.data) + seg_off, &a);
          lens.push_back(static_cast<int>(take));
          displs.push_back(a);
        }
        seg_off += take;
        left -= take;
        if (seg_off == sg.bytes) {
          ++seg;
          seg_off = 0;
        }
      }
      MPI_Datatype type = MPI_BYTE;
      int count = 0;
      if (!lens.empty()) {
        EM_MPI_RETURN_IF_ERROR(MPI_Type_create_hindexed(static_cast<int>(lens.size()), lens.data(), displs.data(),
                                                        MPI_BYTE, &type));
        EM_MPI_RETURN_IF_ERROR(MPI_Type_commit(&type));
        count = 1;
      }
      MPI_Request r = MPI_REQUEST_NULL;
      const int rc = MPI_Isend(MPI_BOTTOM, count, type, op.peer, kDataTag, comm_, &r);
      // Freeing a datatype lets pending transfers that use it finish normally.
      if (type != MPI_BYTE) MPI_Type_free(&type);
      if (rc != MPI_SUCCESS) return MpiError(rc, "MPI_Isend (gathered)");
      reqs_.push_back(r);
      ops_.push_back({op.peer, chunk, true});
      msg_off += chunk;
    } while (msg_off < op.bytes);
    return absl::OkStatus();
  }

  absl::Status Post(const Batch::Op& op, bool send) {
    if (send && op.segs != nullptr) return PostGather(op);
    size_t off = 0;
    do {
      const size_t n = std::min(kMaxChunk, op.bytes - off);
      MPI_Request r = MPI_REQUEST_NULL;
      char* p = static_cast<char*>(op.data) + off;
      const int rc = send ? MPI_Isend(p, static_cast<int>(n), MPI_BYTE, op.peer, kDataTag, comm_, &r)
                          : MPI_Irecv(p, static_cast<int>(n), MPI_BYTE, op.peer, kDataTag, comm_, &r);
      if (rc != MPI_SUCCESS) {
        absl::Status s = MpiError(rc, send ? "MPI_Isend" : "MPI_Irecv");
        for (MPI_Request& q : reqs_) {
          MPI_Cancel(&q);
          MPI_Request_free(&q);
        }
        return s;
      }
      reqs_.push_back(r);
      ops_.push_back({op.peer, n, send});
      off += n;
    } while (off < op.bytes);
    return absl::OkStatus();
  }

  MPI_Comm comm_;
  std::vector<MPI_Request> reqs_;
  std::vector<Chunk> ops_;
  std::vector<size_t> chunks_left_;  // per receive: chunks not yet complete
};

class MpiBootstrap : public Bootstrap {
 public:
  MpiBootstrap(MPI_Comm comm, int rank, int size) : comm_(comm), rank_(rank), size_(size) {}
  ~MpiBootstrap() override {
    if (comm_ != MPI_COMM_NULL && MpiInitialized()) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  absl::StatusOr<std::vector<std::string>> AllGather(absl::string_view mine, absl::Time deadline) override {
    if (mine.size() > static_cast<size_t>(INT_MAX)) {
      return absl::InvalidArgumentError("mpi bootstrap: value over 2 GiB");
    }
    const int n = size_;
    int my_len = static_cast<int>(mine.size());
    std::vector<int> lens(static_cast<size_t>(n));
    RETURN_IF_ERROR(Collective(deadline, [&](MPI_Request* r) {
      return MPI_Iallgather(&my_len, 1, MPI_INT, lens.data(), 1, MPI_INT, comm_, r);
    }));
    std::vector<int> displs(static_cast<size_t>(n));
    int64_t total = 0;
    for (int r = 0; r < n; ++r) {
      displs[r] = static_cast<int>(total);
      total += lens[r];
    }
    if (total > INT_MAX) return absl::InvalidArgumentError("mpi bootstrap: values add up to over 2 GiB");
    std::string all(static_cast<size_t>(total), '\0');
    std::string in(mine);
    RETURN_IF_ERROR(Collective(deadline, [&](MPI_Request* r) {
      return MPI_Iallgatherv(in.data(), my_len, MPI_BYTE, all.data(), lens.data(), displs.data(), MPI_BYTE, comm_,
                             r);
    }));
    std::vector<std::string> out(static_cast<size_t>(n));
    for (int r = 0; r < n; ++r) out[r] = all.substr(static_cast<size_t>(displs[r]), static_cast<size_t>(lens[r]));
    return out;
  }

 private:
  template <typename Start>
  absl::Status Collective(absl::Time deadline, Start start) {
    MPI_Request req = MPI_REQUEST_NULL;
    EM_MPI_RETURN_IF_ERROR(start(&req));
    std::vector<MPI_Request> reqs{req};
    return WaitAll(
        reqs, deadline, [](int, const MPI_Status&) { return absl::OkStatus(); }, [] { return false; },
        [](int) { return std::string("all-gather"); },
        absl::StrCat("mpi bootstrap all-gather on rank ", rank_, " of ", size_));
  }

  MPI_Comm comm_;
  int rank_, size_;
};

}  // namespace

absl::Status InitMpi(int* argc, char*** argv) {
  if (MpiInitialized()) return absl::OkStatus();
  int provided = 0;
  const int rc = MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided);
  if (rc != MPI_SUCCESS) return MpiError(rc, "MPI_Init_thread");
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  return absl::OkStatus();
}

bool MpiInitialized() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

absl::Status FinalizeMpi() {
  if (!MpiInitialized()) return absl::OkStatus();
  EM_MPI_RETURN_IF_ERROR(MPI_Finalize());
  return absl::OkStatus();
}

int MpiWorldRank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int MpiWorldSize() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateMpiCommunicator(absl::Time deadline) {
  ASSIGN_OR_RETURN(MPI_Comm comm, DupWorld(deadline));
  int rank = 0, size = 0;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  return std::unique_ptr<Communicator>(new MpiCommunicator(comm, rank, size));
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateMpiGroupCommunicator(const std::vector<int>& world_ranks,
                                                                        int tag) {
  if (!MpiInitialized()) {
    return absl::FailedPreconditionError("MPI is not initialised: call InitMpi first (and run under mpirun)");
  }
  const int world = MpiWorldSize();
  for (int r : world_ranks) {
    if (r < 0 || r >= world) {
      return absl::InvalidArgumentError(absl::StrCat("MPI group: rank ", r, " outside MPI_COMM_WORLD of size ", world,
                                                     " (started with too few processes?)"));
    }
  }
  MPI_Group world_group = MPI_GROUP_NULL, group = MPI_GROUP_NULL;
  EM_MPI_RETURN_IF_ERROR(MPI_Comm_group(MPI_COMM_WORLD, &world_group));
  EM_MPI_RETURN_IF_ERROR(MPI_Group_incl(world_group, static_cast<int>(world_ranks.size()), world_ranks.data(), &group));
  MPI_Comm comm = MPI_COMM_NULL;
  const int rc = MPI_Comm_create_group(MPI_COMM_WORLD, group, tag, &comm);
  MPI_Group_free(&group);
  MPI_Group_free(&world_group);
  EM_MPI_RETURN_IF_ERROR(rc);
  if (comm == MPI_COMM_NULL) return absl::InvalidArgumentError("MPI group: this rank is not in the group");
  EM_MPI_RETURN_IF_ERROR(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN));
  int rank = 0, size = 0;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  return std::unique_ptr<Communicator>(new MpiCommunicator(comm, rank, size));
}

absl::StatusOr<std::unique_ptr<Bootstrap>> CreateMpiBootstrap(absl::Time deadline) {
  ASSIGN_OR_RETURN(MPI_Comm comm, DupWorld(deadline));
  int rank = 0, size = 0;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  return std::unique_ptr<Bootstrap>(new MpiBootstrap(comm, rank, size));
}

}  // namespace expertmesh::comm
