#include "launch/signals.h"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <thread>

namespace expertmesh::launch {
namespace {
std::atomic<int> g_signal{0};
}  // namespace

const std::atomic<int>& TerminationSignal() { return g_signal; }

void WatchTerminationSignals(const std::atomic<bool>* graceful) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::thread([set, graceful] {
    while (true) {
      int signo = 0;
      if (sigwait(&set, &signo) != 0) continue;
      if (g_signal.load() != 0 || graceful == nullptr || !graceful->load()) {
        // stderr directly: glog may be mid-write in another thread.
        std::fprintf(stderr, "expertmesh: %s: exiting now\n", strsignal(signo));
        _exit(128 + signo);
      }
      std::fprintf(stderr, "expertmesh: %s: stopping cleanly (send it again to exit at once)\n", strsignal(signo));
      g_signal.store(signo);
    }
  }).detach();
}

}  // namespace expertmesh::launch
