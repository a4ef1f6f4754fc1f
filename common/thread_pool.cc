#include "common/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

// OpenBLAS, when the program links it (the kernels do): made single-threaded
// when a pool is created, so the pool's threads are the only compute threads.
extern "C" void openblas_set_num_threads(int num_threads) __attribute__((weak));

namespace expertmesh {

namespace {
thread_local bool t_in_task = false;

int DefaultThreads() {
  for (const char* var : {"EXPERTMESH_NUM_THREADS", "OPENBLAS_NUM_THREADS"}) {
    const char* v = std::getenv(var);
    if (v != nullptr && std::atoi(v) > 0) return std::atoi(v);
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

inline void CpuRelax() {
#if defined(__x86_64__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Sleeps while *word == expected (a futex on Linux; a short sleep elsewhere).
void WaitWhileEqual(std::atomic<uint32_t>* word, uint32_t expected) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
#else
  (void)word;
  (void)expected;
  std::this_thread::sleep_for(std::chrono::microseconds(50));
#endif
}
void WakeAll(std::atomic<uint32_t>* word) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#else
  (void)word;
#endif
}

// How long an idle worker spins on the generation counter before it sleeps:
// long enough to cover the single-threaded work between two kernels of a
// decode step (norms, attention of a few tokens), short enough not to burn a
// core when the engine is idle.
constexpr auto kSpin = std::chrono::microseconds(200);
}  // namespace

// Workers wait for a new `generation` (spinning for kSpin, then sleeping on
// it as a futex). A call publishes the job (fn, chunk count) with `open`,
// bumps the generation, wakes sleepers, and runs chunks itself as thread 0;
// chunks are claimed from the shared counter `next`. The caller returns once
// every chunk is done and no worker is still inside the job (`active`), so a
// worker that wakes late never sees a half-written next job: it registers in
// `active` first, then checks `open` (both seq_cst, against the caller's
// store of `open` and load of `active`).
struct ThreadPool::Impl {
  int n = 1;
  std::vector<std::thread> threads;
  std::mutex drive;  // one driver at a time

  std::atomic<uint32_t> generation{0};
  std::atomic<int> sleepers{0};
  std::atomic<bool> stop{false};
  std::atomic<bool> open{false};
  std::atomic<int> active{0};
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  // The job; written only while !open and active == 0.
  const Fn* fn = nullptr;
  int64_t total = 0, grain = 1, chunks = 0;

  void RunChunks(int thread) {
    const bool was = t_in_task;
    t_in_task = true;
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      const int64_t b = c * grain;
      (*fn)(b, std::min(total, b + grain), thread);
      done.fetch_add(1, std::memory_order_release);
    }
    t_in_task = was;
  }

  void Loop(int thread) {
    uint32_t seen = generation.load();
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + kSpin;
      for (int i = 0; generation.load(std::memory_order_acquire) == seen && !stop.load(std::memory_order_relaxed);
           ++i) {
        CpuRelax();
        if ((i & 63) == 63 && std::chrono::steady_clock::now() > spin_until) {
          sleepers.fetch_add(1);
          while (generation.load() == seen && !stop.load()) WaitWhileEqual(&generation, seen);
          sleepers.fetch_sub(1);
        }
      }
      if (stop.load()) return;
      seen = generation.load();
      active.fetch_add(1);
      if (open.load()) RunChunks(thread);
      active.fetch_sub(1);
    }
  }
};

ThreadPool& ThreadPool::Default() {
  static ThreadPool* pool = new ThreadPool(DefaultThreads());
  return *pool;
}

ThreadPool::ThreadPool(int num_threads) : impl_(new Impl) {
  static std::once_flag blas_once;
  std::call_once(blas_once, [] {
    if (openblas_set_num_threads != nullptr) openblas_set_num_threads(1);
  });
  impl_->n = std::max(1, num_threads);
  for (int t = 1; t < impl_->n; ++t) impl_->threads.emplace_back([this, t] { impl_->Loop(t); });
}

ThreadPool::~ThreadPool() {
  impl_->stop.store(true);
  impl_->generation.fetch_add(1);
  WakeAll(&impl_->generation);
  for (auto& t : impl_->threads) t.join();
  delete impl_;
}

int ThreadPool::num_threads() const { return impl_->n; }
bool ThreadPool::InTask() { return t_in_task; }

void ThreadPool::ParallelFor(int64_t n, int64_t grain, const Fn& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (t_in_task || impl_->n == 1 || n <= grain) {
    const bool was = t_in_task;
    t_in_task = true;
    fn(0, n, 0);
    t_in_task = was;
    return;
  }
  Impl& p = *impl_;
  std::lock_guard<std::mutex> drive(p.drive);
  p.fn = &fn;
  p.total = n;
  p.grain = grain;
  p.chunks = (n + grain - 1) / grain;
  p.next.store(0, std::memory_order_relaxed);
  p.done.store(0, std::memory_order_relaxed);
  p.open.store(true);
  p.generation.fetch_add(1);
  if (p.sleepers.load() > 0) WakeAll(&p.generation);
  p.RunChunks(0);
  for (int i = 0; p.done.load(std::memory_order_acquire) < p.chunks; ++i) {
    if (i < 4096) {
      CpuRelax();
    } else {
      std::this_thread::yield();
    }
  }
  p.open.store(false);
  while (p.active.load() != 0) CpuRelax();
}

}  // namespace expertmesh
