// Small helpers around the CUDA engine: a sequence handle that releases its
// latent cache when it goes away (for code that holds a CudaEngine itself,
// e.g. its tests; the worker holds a StageEngine and its StageSequence), and
// a device buffer that grows on demand (the CUDA StageEngine's buffer for
// hidden states received from the previous stage over NCCL,
// StageEngine::DeviceHiddenBuffer). No CUDA types; in builds without CUDA
// the buffer reports that there is none.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "worker/cuda_engine.h"
#include "worker/sequence_handle.h"

namespace expertmesh::worker {

// Owns one sequence of a CudaEngine (move-only); its cache pages go back to
// the engine when the handle is destroyed.
using CudaSequence = SequenceHandle<CudaEngine>;

// A cudaMalloc'd buffer that grows on demand (contents not kept).
class CudaDeviceBuffer {
 public:
  CudaDeviceBuffer() = default;
  CudaDeviceBuffer(const CudaDeviceBuffer&) = delete;
  CudaDeviceBuffer& operator=(const CudaDeviceBuffer&) = delete;
  ~CudaDeviceBuffer();
  absl::Status Reserve(size_t bytes);
  void* data() const { return data_; }

 private:
  void* data_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace expertmesh::worker
