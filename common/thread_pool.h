// A persistent pool of compute threads for the CPU engine: created once per
// process, reused by every ParallelFor, never spawned per call.
//
// Threads of the default pool: EXPERTMESH_NUM_THREADS if set (> 0), else
// OPENBLAS_NUM_THREADS, else one per core (std::thread::hardware_concurrency).
// Creating a pool makes OpenBLAS single-threaded (openblas_set_num_threads(1),
// once per process, when the program links OpenBLAS): the pool's threads are
// then the only compute threads, and the kernels partition large GEMMs over
// them, each part one single-threaded SGEMM.
//
// ParallelFor(n, fn) runs fn(begin, end, thread) over a partition of [0, n)
// in chunks (at least `grain` items each) on the pool's threads, the caller
// being thread 0, and returns when all are done. A ParallelFor started from
// inside a pool task runs inline on that thread (thread index kept), so
// kernels may call it unconditionally: at the top level they use every core,
// inside the MoE layer's per-expert tasks they run single-threaded.
// `thread` is in [0, num_threads()) and unique among concurrently running
// chunks, for per-thread scratch buffers.
//
// Chunks are exactly `grain` items (the last one the rest), handed out
// dynamically; n <= grain runs inline as one chunk. Idle workers spin on a
// generation counter for ~200 us after their last chunk, then sleep on a
// futex: an empty ParallelFor over 2 threads costs ~2 us (tests/common,
// ThreadPool.DispatchTime; ~22 us with the condition-variable pool before).
// fn must not throw.
//
// Only one thread may drive the pool at a time (the engine's step thread);
// a second caller's ParallelFor waits for the first to finish.
#pragma once

#include <cstdint>
#include <functional>

namespace expertmesh {

class ThreadPool {
 public:
  using Fn = std::function<void(int64_t begin, int64_t end, int thread)>;

  // The process-wide pool (created on first use).
  static ThreadPool& Default();

  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const;
  // True on a pool thread while it runs a task (nested calls run inline).
  static bool InTask();

  void ParallelFor(int64_t n, int64_t grain, const Fn& fn);

  struct Impl;

 private:
  Impl* impl_;
};

// ThreadPool::Default().ParallelFor(n, grain, fn).
inline void ParallelFor(int64_t n, int64_t grain, const ThreadPool::Fn& fn) {
  ThreadPool::Default().ParallelFor(n, grain, fn);
}

}  // namespace expertmesh
