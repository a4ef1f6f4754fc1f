#include "worker/comm/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <sched.h>

#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace expertmesh::comm {
namespace {

// At destruction, how long ncclCommFinalize may take before we abort instead.
constexpr absl::Duration kFinalizeGrace = absl::Seconds(10);

absl::Status CudaError(cudaError_t e, absl::string_view what) {
  return absl::InternalError(absl::StrCat(what, " failed: CUDA ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}

absl::Status NcclError(ncclResult_t r, absl::string_view what, ncclComm_t comm = nullptr) {
  const char* last = comm != nullptr ? ncclGetLastError(comm) : ncclGetLastError(nullptr);
  const absl::StatusCode code =
      r == ncclRemoteError || r == ncclSystemError ? absl::StatusCode::kUnavailable : absl::StatusCode::kInternal;
  return absl::Status(code, absl::StrCat(what, " failed: NCCL ", ncclGetErrorString(r),
                                         last != nullptr && *last ? absl::StrCat(" (", last, ")") : ""));
}

class NcclCommunicator : public Communicator {
 public:
  NcclCommunicator(int rank, int size, int device) : Communicator(rank, size), device_(device) {}

  ~NcclCommunicator() override {
    cudaSetDevice(device_);
    if (comm_ != nullptr) {
      bool finalized = false;
      if (health().ok() && ncclCommFinalize(comm_) != ncclSystemError) {
        finalized = WaitAsync(absl::Now() + kFinalizeGrace).ok();
      }
      if (finalized) {
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
      }
    }
    if (scratch_ != nullptr) cudaFree(scratch_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  absl::string_view backend() const override { return "nccl"; }
  Caps caps() const override {
    Caps c;
    c.device_memory = true;
    return c;
  }

  absl::Status Init(Bootstrap* boot, absl::Time deadline) {
    cudaError_t e = cudaSetDevice(device_);
    if (e != cudaSuccess) return CudaError(e, absl::StrCat("cudaSetDevice(", device_, ")"));
    e = cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking);
    if (e != cudaSuccess) return CudaError(e, "cudaStreamCreateWithFlags");
    e = cudaMalloc(&scratch_, static_cast<size_t>(size()) + 1);
    if (e != cudaSuccess) return CudaError(e, "cudaMalloc (barrier scratch)");

    ncclUniqueId id{};
    if (boot->rank() == 0) {
      const ncclResult_t r = ncclGetUniqueId(&id);
      if (r != ncclSuccess) return NcclError(r, "ncclGetUniqueId");
    }
    ASSIGN_OR_RETURN(std::string bytes,
                     boot->Broadcast(0, absl::string_view(reinterpret_cast<const char*>(&id), sizeof(id)), deadline));
    if (bytes.size() != sizeof(id)) {
      return absl::InternalError(absl::StrCat("nccl: bootstrap delivered a unique id of ", bytes.size(),
                                              " bytes, expected ", sizeof(id)));
    }
    std::memcpy(&id, bytes.data(), sizeof(id));

    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const ncclResult_t r = ncclCommInitRankConfig(&comm_, size(), id, rank(), &config);
    if (r != ncclSuccess && r != ncclInProgress) {
      comm_ = nullptr;
      return NcclError(r, "ncclCommInitRankConfig");
    }
    absl::Status s = WaitAsync(deadline);
    if (!s.ok()) {
      ncclCommAbort(comm_);
      comm_ = nullptr;
      return Annotate(s, "nccl communicator initialisation");
    }
    return absl::OkStatus();
  }

  absl::Status Barrier(absl::Time deadline) override {
    Batch b;
    b.memory = MemoryKind::kDevice;
    char* s = static_cast<char*>(scratch_);
    for (int p = 0; p < size(); ++p) {
      if (p == rank()) continue;
      b.Send(p, s + size(), 1);
      b.Recv(p, s + p, 1);
    }
    return Run(b, deadline);
  }

 protected:
  absl::Status RunRemote(const Batch& batch, absl::Time deadline, const RecvDoneFn* on_recv_done) override {
    if (comm_ == nullptr) return absl::FailedPreconditionError("nccl communicator was aborted");
    cudaError_t e = cudaSetDevice(device_);
    if (e != cudaSuccess) return CudaError(e, "cudaSetDevice");
    ncclResult_t r = ncclGroupStart();
    if (r != ncclSuccess) return NcclError(r, "ncclGroupStart", comm_);
    for (const Batch::Op& op : batch.recvs) {
      r = ncclRecv(op.data, op.bytes, ncclUint8, op.peer, comm_, stream_);
      if (r != ncclSuccess && r != ncclInProgress) break;
    }
    for (const Batch::Op& op : batch.sends) {
      if (r != ncclSuccess && r != ncclInProgress) break;
      r = ncclSend(op.data, op.bytes, ncclUint8, op.peer, comm_, stream_);
    }
    const ncclResult_t end = ncclGroupEnd();
    absl::Status s;
    if (r != ncclSuccess && r != ncclInProgress) {
      s = NcclError(r, "ncclSend/ncclRecv", comm_);
    } else if (end != ncclSuccess && end != ncclInProgress) {
      s = NcclError(end, "ncclGroupEnd", comm_);
    } else {
      s = WaitAsync(deadline);
    }
    // The group is enqueued; now the stream must drain.
    while (s.ok()) {
      e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) break;
      if (e != cudaErrorNotReady) {
        s = CudaError(e, "nccl batch on the stream");
        break;
      }
      ncclResult_t async = ncclSuccess;
      r = ncclCommGetAsyncError(comm_, &async);
      if (r != ncclSuccess || (async != ncclSuccess && async != ncclInProgress)) {
        s = NcclError(r != ncclSuccess ? r : async, "nccl batch", comm_);
        break;
      }
      if (aborted()) {
        s = abort_status();
        break;
      }
      if (absl::Now() >= deadline) {
        s = absl::DeadlineExceededError(absl::StrCat("nccl batch on rank ", rank(), " of ", size(),
                                                     ": deadline passed before the stream drained (",
                                                     batch.sends.size(), " sends, ", batch.recvs.size(),
                                                     " receives); a peer died or stalled"));
        break;
      }
      sched_yield();
    }
    if (!s.ok()) {
      // ncclCommAbort stops the kernels of this communicator; the stream drains.
      ncclCommAbort(comm_);
      comm_ = nullptr;
      cudaStreamSynchronize(stream_);
      return s;
    }
    // A group completes as a whole: every receive is done now.
    for (size_t i = 0; on_recv_done != nullptr && i < batch.recvs.size(); ++i) RETURN_IF_ERROR((*on_recv_done)(i));
    return s;
  }

 private:
  // Polls the non-blocking communicator until it leaves ncclInProgress.
  absl::Status WaitAsync(absl::Time deadline) {
    while (true) {
      ncclResult_t async = ncclSuccess;
      const ncclResult_t r = ncclCommGetAsyncError(comm_, &async);
      if (r != ncclSuccess) return NcclError(r, "ncclCommGetAsyncError", comm_);
      if (async == ncclSuccess) return absl::OkStatus();
      if (async != ncclInProgress) return NcclError(async, "nccl", comm_);
      if (aborted()) return abort_status();
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat("nccl on rank ", rank(), " of ", size(),
                                                        ": deadline passed while NCCL was in progress"));
      }
      sched_yield();
    }
  }

  const int device_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  void* scratch_ = nullptr;
};

}  // namespace

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(Bootstrap* bootstrap, int cuda_device,
                                                                     absl::Time deadline) {
  if (bootstrap == nullptr) return absl::InvalidArgumentError("nccl communicator needs a bootstrap");
  if (CudaDeviceCount() == 0) {
    return absl::FailedPreconditionError("nccl communicator: no CUDA device is visible to this process");
  }
  int device = cuda_device;
  if (device < 0) {
    const cudaError_t e = cudaGetDevice(&device);
    if (e != cudaSuccess) return CudaError(e, "cudaGetDevice");
  }
  auto comm = std::make_unique<NcclCommunicator>(bootstrap->rank(), bootstrap->size(), device);
  absl::Status s = comm->Init(bootstrap, deadline);
  if (!s.ok()) return Annotate(s, absl::StrCat("creating the nccl communicator (rank ", bootstrap->rank(), ")"));
  return std::unique_ptr<Communicator>(std::move(comm));
}

}  // namespace expertmesh::comm
