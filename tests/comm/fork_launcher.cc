#include "tests/comm/fork_launcher.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace expertmesh::testing_util {
namespace {

int g_test_ranks = 0;

}  // namespace

int TestRanks() {
  if (g_test_ranks > 0) return g_test_ranks;
  if (const char* e = std::getenv("EM_TEST_RANKS")) return std::max(1, std::atoi(e));
  return 2;
}

void SetTestRanks(int n) { g_test_ranks = n; }

std::string MakeTempDir(const std::string& prefix) {
  const char* base = std::getenv("TMPDIR");
  std::string templ = std::string(base != nullptr && *base ? base : "/tmp") + "/" + prefix + "-XXXXXX";
  if (mkdtemp(templ.data()) == nullptr) {
    ADD_FAILURE() << "mkdtemp " << templ << " failed";
    return "/tmp";
  }
  return templ;
}

void RemoveTree(const std::string& dir) {
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

void RunForked(int ranks, double timeout_s, const std::function<void(int rank)>& body) {
  std::fflush(stdout);
  std::fflush(stderr);
  std::vector<pid_t> pids(static_cast<size_t>(ranks), -1);
  for (int r = 0; r < ranks; ++r) {
    const pid_t pid = fork();
    if (pid < 0) {
      ADD_FAILURE() << "fork failed for rank " << r;
      break;
    }
    if (pid == 0) {
      body(r);
      std::fflush(stdout);
      std::fflush(stderr);
      // _exit: no gtest teardown, no static destructors of the parent's state.
      _exit(::testing::Test::HasFailure() ? 1 : 0);
    }
    pids[r] = pid;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  int left = 0;
  for (pid_t p : pids) left += p > 0 ? 1 : 0;
  std::vector<int> status(static_cast<size_t>(ranks), 0);
  while (left > 0) {
    bool reaped = false;
    for (int r = 0; r < ranks; ++r) {
      if (pids[r] <= 0) continue;
      int st = 0;
      const pid_t got = waitpid(pids[r], &st, WNOHANG);
      if (got == pids[r]) {
        status[r] = st;
        pids[r] = 0;  // reaped
        --left;
        reaped = true;
        if (WIFEXITED(st) && WEXITSTATUS(st) != 0) {
          ADD_FAILURE() << "rank " << r << " of " << ranks << " exited with status " << WEXITSTATUS(st)
                        << " (its failures are printed above)";
        } else if (WIFSIGNALED(st)) {
          ADD_FAILURE() << "rank " << r << " of " << ranks << " was killed by signal " << WTERMSIG(st);
        }
      }
    }
    if (left == 0) break;
    if (std::chrono::steady_clock::now() > deadline) {
      for (int r = 0; r < ranks; ++r) {
        if (pids[r] > 0) {
          ADD_FAILURE() << "rank " << r << " of " << ranks << " still running after " << timeout_s
                        << " s: killed (a hang)";
          kill(pids[r], SIGKILL);
          waitpid(pids[r], nullptr, 0);
          pids[r] = 0;
        }
      }
      break;
    }
    if (!reaped) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

}  // namespace expertmesh::testing_util
