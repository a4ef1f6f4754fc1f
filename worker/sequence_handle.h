// A move-only handle that owns one sequence of an engine and gives its cache
// back when destroyed: StageSequence (worker/stage_engine.h) and CudaSequence
// (worker/cuda_stage.h). EngineT has SeqId, NewSequence(), ReleaseSequence(id)
// and SequenceLength(id). Not thread safe (the engine's owner thread).
#pragma once

#include <cstdint>
#include <utility>

namespace expertmesh::worker {

template <class EngineT>
class SequenceHandle {
 public:
  using SeqId = typename EngineT::SeqId;

  SequenceHandle() = default;
  explicit SequenceHandle(EngineT* engine) : engine_(engine), id_(engine->NewSequence()) {}
  SequenceHandle(SequenceHandle&& o) noexcept : engine_(std::exchange(o.engine_, nullptr)), id_(o.id_) {}
  SequenceHandle& operator=(SequenceHandle&& o) noexcept {
    if (this != &o) {
      Reset();
      engine_ = std::exchange(o.engine_, nullptr);
      id_ = o.id_;
    }
    return *this;
  }
  SequenceHandle(const SequenceHandle&) = delete;
  SequenceHandle& operator=(const SequenceHandle&) = delete;
  ~SequenceHandle() { Reset(); }

  SeqId id() const { return id_; }
  int64_t length() const { return engine_ != nullptr ? engine_->SequenceLength(id_) : 0; }  // tokens cached

 private:
  void Reset() {
    if (engine_ != nullptr) engine_->ReleaseSequence(id_);
    engine_ = nullptr;
  }
  EngineT* engine_ = nullptr;
  SeqId id_ = -1;
};

}  // namespace expertmesh::worker
