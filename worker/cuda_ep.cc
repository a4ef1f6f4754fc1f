#include "worker/cuda_ep.h"

#include <cuda_runtime.h>

#include <chrono>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/engine_ops.h"
#include "worker/cuda_stage.h"
#include "worker/ep_layout.h"

namespace expertmesh::worker {

namespace cu = kernels::cuda;

namespace {

absl::Status Cuda(cudaError_t e, absl::string_view what) {
  if (e == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();
  return absl::InternalError(
      absl::StrCat("CUDA EP exchange: ", what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}

double Now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// A growable cudaMalloc'd (or pinned host) buffer.
struct Buf {
  bool host = false;
  void* p = nullptr;
  size_t cap = 0;
  ~Buf() {
    if (p == nullptr) return;
    if (host) {
      cudaFreeHost(p);
    } else {
      cudaFree(p);
    }
  }
  absl::Status Reserve(size_t bytes) {
    if (bytes <= cap) return absl::OkStatus();
    if (p != nullptr) {
      if (host) {
        cudaFreeHost(p);
      } else {
        cudaFree(p);
      }
      p = nullptr;
      cap = 0;
    }
    const size_t want = std::max(bytes, 2 * cap);
    RETURN_IF_ERROR(Cuda(host ? cudaMallocHost(&p, want) : cudaMalloc(&p, want), "buffer"));
    cap = want;
    return absl::OkStatus();
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

}  // namespace

struct CudaEpExchange::Impl {
  CudaEngine* engine = nullptr;
  comm::Communicator* comm = nullptr;
  const std::map<int64_t, topology::ExpertPlacement>* placements = nullptr;
  CudaEpOptions opts;
  CudaEpTimes times;
  bool device_comm = false;
  cudaStream_t stream = nullptr;

  // Host side of one layer.
  std::vector<int32_t> ids;
  std::vector<float> weights;
  EpLayout lay;  // records by destination (worker/ep_layout.h)

  // Device buffers.
  Buf d_upload, d_counts, d_xsend, d_xrecv, d_ids_recv, d_w_recv, d_out, d_back;
  Buf h_stage{true}, h_stage2{true}, h_ids{true}, h_w{true}, h_upload{true};

  absl::Status AllToAllV(const void* send, void* recv, const comm::AllToAllVLayout& l);
  absl::Status Run(const Layer& l);
};

CudaEpExchange::CudaEpExchange(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaEpExchange::~CudaEpExchange() = default;

absl::StatusOr<std::unique_ptr<CudaEpExchange>> CudaEpExchange::Create(
    CudaEngine* engine, comm::Communicator* comm, const std::map<int64_t, topology::ExpertPlacement>* placements,
    const CudaEpOptions& options) {
  for (const auto& [layer, p] : *placements) {
    if (p.num_ranks() != comm->size()) {
      return absl::InvalidArgumentError(absl::StrCat("CUDA EP: layer ", layer, " is placed over ", p.num_ranks(),
                                                     " ranks, the communicator has ", comm->size()));
    }
  }
  const comm::Caps caps = comm->caps();
  if (!caps.device_memory && !caps.host_memory) {
    return absl::InvalidArgumentError("CUDA EP: the communicator moves neither host nor device memory");
  }
  auto impl = std::make_unique<Impl>();
  impl->engine = engine;
  impl->comm = comm;
  impl->placements = placements;
  impl->opts = options;
  impl->device_comm = caps.device_memory;
  impl->stream = static_cast<cudaStream_t>(engine->stream());
  return std::unique_ptr<CudaEpExchange>(new CudaEpExchange(std::move(impl)));
}

const CudaEpTimes& CudaEpExchange::phase_times() const { return impl_->times; }
absl::Status CudaEpExchange::Run(const Layer& layer) { return impl_->Run(layer); }

// All-to-all-v of device buffers: directly on a device-memory communicator,
// else through pinned host copies.
absl::Status CudaEpExchange::Impl::AllToAllV(const void* send, void* recv, const comm::AllToAllVLayout& l) {
  const absl::Time deadline = absl::Now() + opts.timeout;
  if (device_comm) return comm->AllToAllV(send, recv, l, comm::MemoryKind::kDevice, deadline);
  size_t sb = 0, rb = 0;
  for (size_t p = 0; p < l.send_bytes.size(); ++p) {
    sb = std::max(sb, l.send_offsets[p] + l.send_bytes[p]);
    rb = std::max(rb, l.recv_offsets[p] + l.recv_bytes[p]);
  }
  RETURN_IF_ERROR(h_stage.Reserve(std::max<size_t>(sb, 1)));
  RETURN_IF_ERROR(h_stage2.Reserve(std::max<size_t>(rb, 1)));
  if (sb > 0) {
    RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(h_stage.p, send, sb, cudaMemcpyDeviceToHost, stream), "stage to host"));
    RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "stage to host"));
  }
  RETURN_IF_ERROR(comm->AllToAllV(h_stage.p, h_stage2.p, l, comm::MemoryKind::kHost, deadline));
  if (rb > 0) {
    RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(recv, h_stage2.p, rb, cudaMemcpyHostToDevice, stream), "stage to device"));
    RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "stage to device"));
  }
  return absl::OkStatus();
}

absl::Status CudaEpExchange::Impl::Run(const Layer& l) {
  auto pit = placements->find(l.layer);
  if (pit == placements->end()) return absl::InternalError(absl::StrCat("CUDA EP: no placement for layer ", l.layer));
  const topology::ExpertPlacement& pl = pit->second;
  const int P = comm->size(), me = comm->rank();
  const int64_t T = l.T, K = engine->config().num_experts_per_tok, H = engine->config().hidden_size;
  const size_t ab = engine->bf16() ? 2 : 4;
  const cu::Act act = engine->bf16() ? cu::Act::kBf16 : cu::Act::kF32;
  double t0 = Now();

  // 1. Routing to the host; records by destination rank.
  ids.resize(T * K);
  weights.resize(T * K);
  if (T > 0) {
    RETURN_IF_ERROR(h_ids.Reserve(T * K * sizeof(int32_t)));
    RETURN_IF_ERROR(h_w.Reserve(T * K * sizeof(float)));
    RETURN_IF_ERROR(
        Cuda(cudaMemcpyAsync(h_ids.p, l.ids, T * K * sizeof(int32_t), cudaMemcpyDeviceToHost, stream), "ids to host"));
    RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(h_w.p, l.weights, T * K * sizeof(float), cudaMemcpyDeviceToHost, stream),
                         "weights to host"));
    RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "routing to host"));
    std::memcpy(ids.data(), h_ids.p, T * K * sizeof(int32_t));
    std::memcpy(weights.data(), h_w.p, T * K * sizeof(float));
    if (l.on_route != nullptr && *l.on_route) (*l.on_route)(l.layer, ids.data(), T * K);
  }
  RETURN_IF_ERROR(BuildEpLayout(pl, ids.data(), weights.data(), T, K, &lay));
  const int64_t ns = lay.num_sent();
  // Host arrays to the device in one copy: send_token | meta ids | meta weights | tok_start | tok_rec.
  const size_t n_up = ns + 2 * ns * K + (T + 1) + ns;
  RETURN_IF_ERROR(h_upload.Reserve(n_up * 4));
  RETURN_IF_ERROR(d_upload.Reserve(n_up * 4));
  int32_t* hu = h_upload.as<int32_t>();
  std::memcpy(hu, lay.send_token.data(), ns * 4);
  std::memcpy(hu + ns, lay.entry_expert.data(), ns * K * 4);
  float* hw = reinterpret_cast<float*>(hu + ns + ns * K);
  for (int64_t i = 0; i < ns * K; ++i) hw[i] = lay.entries[i].weight;
  std::memcpy(hu + ns + 2 * ns * K, lay.token_start.data(), (T + 1) * 4);
  std::memcpy(hu + ns + 2 * ns * K + T + 1, lay.token_record.data(), ns * 4);
  RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(d_upload.p, hu, n_up * 4, cudaMemcpyHostToDevice, stream), "records"));
  const int32_t* du = d_upload.as<int32_t>();
  const int32_t* d_send_token = du;
  const int32_t* d_meta_ids = du + ns;
  const float* d_meta_w = reinterpret_cast<const float*>(du + ns + ns * K);
  const int32_t* d_tok_start = du + ns + 2 * ns * K;
  const int32_t* d_tok_rec = d_tok_start + T + 1;
  // The rows of every record, gathered in destination order.
  RETURN_IF_ERROR(d_xsend.Reserve(std::max<size_t>(ns * H * ab, 1)));
  RETURN_IF_ERROR(cu::GatherRows(l.x, act, H, d_send_token, ns, d_xsend.p, stream));
  RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "records"));
  times.layout += Now() - t0;

  // 2. Counts, then rows, expert ids and weights.
  t0 = Now();
  lay.recv_count.assign(P, 0);
  {
    // The counts travel like the payload (device memory on a device-only communicator).
    const absl::Time deadline = absl::Now() + opts.timeout;
    if (device_comm && !comm->caps().host_memory) {
      RETURN_IF_ERROR(d_counts.Reserve(2 * P * sizeof(int64_t)));
      int64_t* dc = d_counts.as<int64_t>();
      RETURN_IF_ERROR(Cuda(
          cudaMemcpyAsync(dc, lay.send_count.data(), P * sizeof(int64_t), cudaMemcpyHostToDevice, stream), "counts"));
      RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "counts"));
      RETURN_IF_ERROR(comm->AllToAll(dc, dc + P, sizeof(int64_t), comm::MemoryKind::kDevice, deadline));
      RETURN_IF_ERROR(Cuda(
          cudaMemcpyAsync(lay.recv_count.data(), dc + P, P * sizeof(int64_t), cudaMemcpyDeviceToHost, stream),
          "counts"));
      RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "counts"));
    } else {
      RETURN_IF_ERROR(comm->AllToAll(lay.send_count.data(), lay.recv_count.data(), sizeof(int64_t),
                                     comm::MemoryKind::kHost, deadline));
    }
  }
  RETURN_IF_ERROR(lay.SetRecvCounts(me, "CUDA EP"));
  const int64_t nr = lay.num_received();
  RETURN_IF_ERROR(d_xrecv.Reserve(std::max<size_t>(nr * H * ab, 1)));
  RETURN_IF_ERROR(d_ids_recv.Reserve(std::max<size_t>(nr * K * 4, 1)));
  RETURN_IF_ERROR(d_w_recv.Reserve(std::max<size_t>(nr * K * 4, 1)));
  RETURN_IF_ERROR(AllToAllV(d_xsend.p, d_xrecv.p, lay.DispatchBytes(H * ab)));
  RETURN_IF_ERROR(AllToAllV(d_meta_ids, d_ids_recv.p, lay.DispatchBytes(K * 4)));
  RETURN_IF_ERROR(AllToAllV(d_meta_w, d_w_recv.p, lay.DispatchBytes(K * 4)));
  times.dispatch_comm += Now() - t0;

  // 3. This rank's experts on the received records.
  t0 = Now();
  RETURN_IF_ERROR(d_out.Reserve(std::max<size_t>(nr * H * 4, 1)));
  RETURN_IF_ERROR(engine->RunLocalExperts(l.layer, d_xrecv.p, nr, d_ids_recv.as<int32_t>(), d_w_recv.as<float>(), K,
                                          d_out.as<float>()));
  RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "local experts"));
  times.expert += Now() - t0;

  // 4. Partial rows back, summed per token into the residual.
  t0 = Now();
  RETURN_IF_ERROR(d_back.Reserve(std::max<size_t>(ns * H * 4, 1)));
  RETURN_IF_ERROR(AllToAllV(d_out.p, d_back.p, lay.CombineBytes(H * 4)));
  times.combine_comm += Now() - t0;
  t0 = Now();
  RETURN_IF_ERROR(cu::AddRecordRows(d_back.as<float>(), H, d_tok_start, d_tok_rec, T, l.y, stream));
  times.combine += Now() - t0;
  return absl::OkStatus();
}

CudaDeviceBuffer::~CudaDeviceBuffer() {
  if (data_ != nullptr) cudaFree(data_);
}

absl::Status CudaDeviceBuffer::Reserve(size_t bytes) {
  if (bytes <= capacity_) return absl::OkStatus();
  if (data_ != nullptr) cudaFree(data_);
  data_ = nullptr;
  capacity_ = 0;
  RETURN_IF_ERROR(Cuda(cudaMalloc(&data_, bytes), "device buffer"));
  capacity_ = bytes;
  return absl::OkStatus();
}

}  // namespace expertmesh::worker
