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
#include <utility>

#include "absl/status/status.h"
#include "worker/cuda_engine.h"

namespace expertmesh::worker {

// Owns one sequence of a CudaEngine (move-only); its cache pages go back to
// the engine when the handle is destroyed.
class CudaSequence {
 public:
  CudaSequence() = default;
  explicit CudaSequence(CudaEngine* engine) : engine_(engine), id_(engine->NewSequence()) {}
  CudaSequence(CudaSequence&& o) noexcept : engine_(std::exchange(o.engine_, nullptr)), id_(o.id_) {}
  CudaSequence& operator=(CudaSequence&& o) noexcept {
    if (this != &o) {
      Reset();
      engine_ = std::exchange(o.engine_, nullptr);
      id_ = o.id_;
    }
    return *this;
  }
  CudaSequence(const CudaSequence&) = delete;
  CudaSequence& operator=(const CudaSequence&) = delete;
  ~CudaSequence() { Reset(); }

  CudaEngine::SeqId id() const { return id_; }
  int64_t length() const { return engine_ != nullptr ? engine_->SequenceLength(id_) : 0; }

 private:
  void Reset() {
    if (engine_ != nullptr) engine_->ReleaseSequence(id_);
    engine_ = nullptr;
  }
  CudaEngine* engine_ = nullptr;
  CudaEngine::SeqId id_ = -1;
};

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
