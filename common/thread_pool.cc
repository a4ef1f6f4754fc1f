#include "common/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

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
}  // namespace

// Reference implementation: workers sleep on a condition variable between
// calls; each call hands out chunks from a shared counter.
struct ThreadPool::Impl {
  int n = 1;
  std::vector<std::thread> threads;
  std::mutex drive;  // one driver at a time
  std::mutex mu;
  std::condition_variable cv, done_cv;
  uint64_t generation = 0;
  bool stop = false;
  const Fn* fn = nullptr;
  int64_t total = 0, grain = 1;
  std::atomic<int64_t> next{0};
  int running = 0;

  void RunChunks(int thread) {
    const bool was = t_in_task;
    t_in_task = true;
    for (int64_t b; (b = next.fetch_add(grain)) < total;) (*fn)(b, std::min(total, b + grain), thread);
    t_in_task = was;
  }
  void Loop(int thread) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> l(mu);
        cv.wait(l, [&] { return stop || generation != seen; });
        if (stop) return;
        seen = generation;
      }
      RunChunks(thread);
      std::lock_guard<std::mutex> l(mu);
      if (--running == 0) done_cv.notify_all();
    }
  }
};

ThreadPool& ThreadPool::Default() {
  static ThreadPool* pool = new ThreadPool(DefaultThreads());
  return *pool;
}

ThreadPool::ThreadPool(int num_threads) : impl_(new Impl) {
  impl_->n = std::max(1, num_threads);
  for (int t = 1; t < impl_->n; ++t) impl_->threads.emplace_back([this, t] { impl_->Loop(t); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> l(impl_->mu);
    impl_->stop = true;
  }
  impl_->cv.notify_all();
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
  std::lock_guard<std::mutex> drive(impl_->drive);
  {
    std::lock_guard<std::mutex> l(impl_->mu);
    impl_->fn = &fn;
    impl_->total = n;
    impl_->grain = grain;
    impl_->next = 0;
    impl_->running = impl_->n - 1;
    ++impl_->generation;
  }
  impl_->cv.notify_all();
  impl_->RunChunks(0);
  std::unique_lock<std::mutex> l(impl_->mu);
  impl_->done_cv.wait(l, [&] { return impl_->running == 0; });
}

}  // namespace expertmesh
