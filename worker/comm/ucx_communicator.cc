#include "worker/comm/ucx_communicator.h"
#include "worker/comm/poll_backoff.h"

#include <sched.h>
#include <ucp/api/ucp.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

namespace expertmesh::comm {
namespace {

// After an error, how long cancelled requests may take to finish; at
// destruction, how long a flush may take.
constexpr absl::Duration kCancelGrace = absl::Milliseconds(500);
constexpr absl::Duration kFlushGrace = absl::Seconds(5);

absl::Status UcsError(ucs_status_t s, absl::string_view what) {
  return absl::InternalError(absl::StrCat(what, " failed: UCX ", ucs_status_string(s)));
}

uint64_t Tag(int source, uint32_t seq) { return (static_cast<uint64_t>(source) << 32) | seq; }

class UcxCommunicator : public Communicator {
 public:
  UcxCommunicator(int rank, int size)
      : Communicator(rank, size),
        eps_(static_cast<size_t>(size), nullptr),
        peer_status_(static_cast<size_t>(size), UCS_OK),
        send_seq_(static_cast<size_t>(size), 0),
        recv_seq_(static_cast<size_t>(size), 0) {}

  ~UcxCommunicator() override {
    if (worker_ != nullptr && health().ok()) {
      // Everything this rank sent must reach its peer before the endpoints go.
      ucp_request_param_t p{};
      void* req = ucp_worker_flush_nbx(worker_, &p);
      WaitRequest(req, absl::Now() + kFlushGrace);
    }
    CloseEndpoints(absl::Now() + kCancelGrace);
    if (worker_ != nullptr) ucp_worker_destroy(worker_);
    if (context_ != nullptr) ucp_cleanup(context_);
  }

  absl::string_view backend() const override { return "ucx"; }
  Caps caps() const override { return Caps::HostGather(); }

  absl::Status Init(Bootstrap* boot, absl::Time deadline, const UcxOptions& options) {
    ucp_config_t* config = nullptr;
    ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
    if (s != UCS_OK) return UcsError(s, "ucp_config_read");
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_ESTIMATED_NUM_EPS;
    params.features = UCP_FEATURE_TAG;
    params.estimated_num_eps = static_cast<size_t>(size());
    s = ucp_init(&params, config, &context_);
    ucp_config_release(config);
    if (s != UCS_OK) return UcsError(s, "ucp_init");

    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    s = ucp_worker_create(context_, &wp, &worker_);
    if (s != UCS_OK) return UcsError(s, "ucp_worker_create");

    ucp_address_t* addr = nullptr;
    size_t len = 0;
    s = ucp_worker_get_address(worker_, &addr, &len);
    if (s != UCS_OK) return UcsError(s, "ucp_worker_get_address");
    std::string mine(reinterpret_cast<const char*>(addr), len);
    ucp_worker_release_address(worker_, addr);
    ASSIGN_OR_RETURN(std::vector<std::string> all, boot->AllGather(mine, deadline));

    ep_args_.resize(static_cast<size_t>(size()));
    for (int p = 0; p < size(); ++p) {
      if (p == rank()) continue;
      ep_args_[p] = EpArg{this, p};
      ucp_ep_params_t ep{};
      ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep.address = reinterpret_cast<const ucp_address_t*>(all[p].data());
      ep.err_mode = options.detect_peer_failure ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
      ep.err_handler.cb = &UcxCommunicator::OnEndpointError;
      ep.err_handler.arg = &ep_args_[p];
      s = ucp_ep_create(worker_, &ep, &eps_[p]);
      if (s != UCS_OK) return UcsError(s, absl::StrCat("ucp_ep_create to rank ", p));
    }
    // Wire up every endpoint now, within the creation deadline.
    return Barrier(deadline);
  }

 protected:
  absl::Status RunRemote(const Batch& batch, absl::Time deadline, const RecvDoneFn* on_recv_done) override {
    on_recv_done_ = on_recv_done;
    const size_t n = batch.sends.size() + batch.recvs.size();
    pending_.resize(n);  // keeps each entry's iov capacity from batch to batch
    size_t k = 0;
    absl::Status error;
    for (size_t ri = 0; ri < batch.recvs.size(); ++ri) {
      const Batch::Op& op = batch.recvs[ri];
      if (!error.ok()) break;
      Pending& q = pending_[k++];
      q.recv_index = ri;
      q.req = nullptr;
      q.peer = op.peer;
      q.bytes = op.bytes;
      q.send = false;
      q.info = ucp_tag_recv_info_t{};
      q.done = true;
      ucp_request_param_t p{};
      // The received length arrives through the callback. Immediate
      // completion is turned off: UCX 1.13 left recv_info unset on that path.
      p.op_attr_mask = UCP_OP_ATTR_FIELD_DATATYPE | UCP_OP_ATTR_FIELD_MEMORY_TYPE | UCP_OP_ATTR_FIELD_CALLBACK |
                       UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
      p.datatype = ucp_dt_make_contig(1);
      p.memory_type = UCS_MEMORY_TYPE_HOST;
      p.cb.recv = &UcxCommunicator::OnRecvDone;
      p.user_data = &q;
      const uint64_t tag = Tag(op.peer, recv_seq_[op.peer]++);
      ucs_status_ptr_t r = ucp_tag_recv_nbx(worker_, op.data, op.bytes, tag, ~uint64_t{0}, &p);
      if (UCS_PTR_IS_ERR(r)) {
        error = UcsError(UCS_PTR_STATUS(r), absl::StrCat("ucp_tag_recv_nbx from rank ", op.peer));
      } else if (r == nullptr) {
        error = Finish(q, UCS_OK);
      } else {
        q.req = r;
        q.done = false;
      }
    }
    for (const Batch::Op& op : batch.sends) {
      if (!error.ok()) break;
      Pending& q = pending_[k++];
      q.req = nullptr;
      q.peer = op.peer;
      q.bytes = op.bytes;
      q.send = true;
      q.done = true;
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_DATATYPE | UCP_OP_ATTR_FIELD_MEMORY_TYPE;
      p.memory_type = UCS_MEMORY_TYPE_HOST;
      const void* buffer = op.data;
      size_t count = op.bytes;
      p.datatype = ucp_dt_make_contig(1);
      if (op.segs != nullptr) {
        // Gathered send: UCX reads the pieces in place (iov datatype); the
        // iov array lives in q until the request completes.
        q.iov.clear();
        for (size_t i = 0; i < op.nsegs; ++i) {
          if (op.segs[i].bytes > 0) q.iov.push_back({const_cast<void*>(op.segs[i].data), op.segs[i].bytes});
        }
        p.datatype = ucp_dt_make_iov();
        buffer = q.iov.data();
        count = q.iov.size();
      }
      const uint64_t tag = Tag(rank(), send_seq_[op.peer]++);
      ucs_status_ptr_t r = ucp_tag_send_nbx(eps_[op.peer], buffer, count, tag, &p);
      if (UCS_PTR_IS_ERR(r)) {
        error = PeerError(op.peer, UCS_PTR_STATUS(r), "send to");
      } else if (r != nullptr) {
        q.req = r;
        q.done = false;
      }
    }
    size_t remaining = 0;
    for (const Pending& q : pending_) remaining += q.done ? 0 : 1;
    PollBackoff backoff;
    while (error.ok() && remaining > 0) {
      const unsigned progressed = ucp_worker_progress(worker_);
      size_t completed = 0;
      for (Pending& q : pending_) {
        if (q.done) continue;
        const ucs_status_t st = ucp_request_check_status(q.req);
        if (st == UCS_INPROGRESS) {
          if (peer_status_[q.peer] != UCS_OK) {
            error = PeerError(q.peer, peer_status_[q.peer], q.send ? "send to" : "receive from");
            break;
          }
          continue;
        }
        ucp_request_free(q.req);
        q.req = nullptr;
        ++completed;
        error = Finish(q, st);
        if (!error.ok()) break;
      }
      remaining -= completed;
      if (!error.ok() || remaining == 0) break;
      if (aborted()) {
        error = abort_status();
        break;
      }
      // Checked whether or not UCX made progress: a transport may report
      // progress (retries, keepalive) forever without completing anything.
      if (absl::Now() >= deadline) {
        error = DeadlineError(remaining);
        break;
      }
      if (completed > 0 || progressed > 0) {
        backoff.Reset();
      } else if (batch.patient) {
        backoff.Wait();
      } else {
        sched_yield();
      }
    }
    if (!error.ok()) CancelPending();
    return error;
  }

 private:
  struct EpArg {
    UcxCommunicator* self = nullptr;
    int peer = 0;
  };
  struct Pending {
    void* req = nullptr;
    int peer = 0;
    size_t bytes = 0;
    bool send = false;
    ucp_tag_recv_info_t info{};
    bool done = true;
    size_t recv_index = 0;          // receives: index in the batch
    std::vector<ucp_dt_iov_t> iov;  // gathered sends
  };

  static void OnRecvDone(void* /*request*/, ucs_status_t /*status*/, const ucp_tag_recv_info_t* info,
                         void* user_data) {
    if (info != nullptr) static_cast<Pending*>(user_data)->info = *info;
  }

  static void OnEndpointError(void* arg, ucp_ep_h /*ep*/, ucs_status_t status) {
    const EpArg* a = static_cast<const EpArg*>(arg);
    a->self->peer_status_[a->peer] = status;
  }

  absl::Status PeerError(int peer, ucs_status_t s, absl::string_view what) const {
    return absl::UnavailableError(absl::StrCat("ucx: rank ", rank(), " of ", size(), ": ", what, " rank ", peer,
                                               " failed: ", ucs_status_string(s),
                                               " (the peer process died or its endpoint broke)"));
  }

  // Marks q done with transport status st; checks a receive's length.
  absl::Status Finish(Pending& q, ucs_status_t st) {
    q.done = true;
    if (st != UCS_OK) {
      if (peer_status_[q.peer] != UCS_OK) return PeerError(q.peer, peer_status_[q.peer], q.send ? "send to" : "receive from");
      return UcsError(st, absl::StrCat("ucx: rank ", rank(), (q.send ? " send to rank " : " receive from rank "),
                                       q.peer, " (", q.bytes, " bytes)"));
    }
    if (!q.send && q.info.length != q.bytes) {
      return absl::InternalError(absl::StrCat("ucx: rank ", rank(), " expected ", q.bytes, " bytes from rank ",
                                              q.peer, " but got ", q.info.length, "; the ranks' batches disagree"));
    }
    if (!q.send && on_recv_done_ != nullptr) return (*on_recv_done_)(q.recv_index);
    return absl::OkStatus();
  }

  absl::Status DeadlineError(size_t remaining) const {
    std::vector<std::string> what;
    for (const Pending& q : pending_) {
      if (!q.done && what.size() < 8) {
        what.push_back(absl::StrCat(q.send ? "send to rank " : "receive from rank ", q.peer));
      }
    }
    return absl::DeadlineExceededError(absl::StrCat("ucx batch on rank ", rank(), " of ", size(),
                                                    ": deadline passed with ", remaining, " of ", pending_.size(),
                                                    " transfers pending (", absl::StrJoin(what, ", "),
                                                    remaining > what.size() ? ", ..." : "",
                                                    "); a peer died or stalled"));
  }

  // Cancels what is still pending and closes the endpoints (the communicator
  // is broken after this), so that no transfer touches the caller's buffers
  // once RunRemote returns. Takes at most kCancelGrace in all: the endpoint
  // closes and the cancelled requests share one grace window.
  void CancelPending() {
    for (Pending& q : pending_) {
      if (!q.done && !q.send) ucp_request_cancel(worker_, q.req);
    }
    const absl::Time grace = absl::Now() + kCancelGrace;
    CloseEndpoints(grace);
    for (Pending& q : pending_) {
      if (q.done) continue;
      while (ucp_request_check_status(q.req) == UCS_INPROGRESS && absl::Now() < grace) {
        if (ucp_worker_progress(worker_) == 0) sched_yield();
      }
      ucp_request_free(q.req);  // released now, or by UCX when it completes
      q.done = true;
    }
  }

  // Waits for a request from a non-blocking call (null or error: nothing to wait for).
  void WaitRequest(void* req, absl::Time deadline) {
    if (req == nullptr || UCS_PTR_IS_ERR(req)) return;
    while (ucp_request_check_status(req) == UCS_INPROGRESS && absl::Now() < deadline) {
      if (ucp_worker_progress(worker_) == 0) sched_yield();
    }
    ucp_request_free(req);
  }

  // Closes every endpoint at once (force: no goodbye to the peer), waiting
  // for the closes until `grace` at the latest.
  void CloseEndpoints(absl::Time grace) {
    std::vector<void*> reqs;
    for (ucp_ep_h& ep : eps_) {
      if (ep == nullptr) continue;
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;
      void* r = ucp_ep_close_nbx(ep, &p);
      if (r != nullptr && !UCS_PTR_IS_ERR(r)) reqs.push_back(r);
      ep = nullptr;
    }
    for (void* r : reqs) WaitRequest(r, grace);
  }

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::vector<ucp_ep_h> eps_;
  std::vector<EpArg> ep_args_;          // stable addresses for the error callbacks
  std::vector<ucs_status_t> peer_status_;
  std::vector<uint32_t> send_seq_, recv_seq_;
  std::vector<Pending> pending_;
  const RecvDoneFn* on_recv_done_ = nullptr;  // of the batch in progress
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> CreateUcxCommunicator(Bootstrap* bootstrap, absl::Time deadline,
                                                                    const UcxOptions& options) {
  if (bootstrap == nullptr) return absl::InvalidArgumentError("ucx communicator needs a bootstrap");
  auto comm = std::make_unique<UcxCommunicator>(bootstrap->rank(), bootstrap->size());
  absl::Status s = comm->Init(bootstrap, deadline, options);
  if (!s.ok()) return Annotate(s, absl::StrCat("creating the ucx communicator (rank ", bootstrap->rank(), ")"));
  return std::unique_ptr<Communicator>(std::move(comm));
}

}  // namespace expertmesh::comm
