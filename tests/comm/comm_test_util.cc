#include "tests/comm/comm_test_util.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/config.h"
#include "gtest/gtest.h"

namespace expertmesh::testing_util {
namespace {

int g_test_ranks = 0;

void Fill(std::vector<float>* v, int64_t n, float scale, std::mt19937_64* rng) {
  std::normal_distribution<float> dist(0.0f, scale);
  v->resize(static_cast<size_t>(n));
  for (float& x : *v) x = dist(*rng);
}

worker::MoeWeights BuildTiny() {
  const ModelConfig cfg = *ModelConfig::Preset("tiny");
  worker::MoeWeights w;
  w.hidden = cfg.hidden_size;
  w.expert_inter = cfg.moe_intermediate_size;
  w.shared_inter = cfg.moe_intermediate_size * cfg.n_shared_experts;
  w.router_params = kernels::RouterParams::FromConfig(cfg);
  const int64_t H = w.hidden, I = w.expert_inter, E = cfg.n_routed_experts;
  std::mt19937_64 rng(20240611);
  Fill(&w.router, E * H, 1.0f / std::sqrt(static_cast<float>(H)), &rng);
  Fill(&w.bias, E, 0.05f, &rng);
  w.experts.resize(static_cast<size_t>(E));
  for (auto& e : w.experts) {
    Fill(&e.gate_up, 2 * I * H, 1.0f / std::sqrt(static_cast<float>(H)), &rng);
    Fill(&e.down, H * I, 1.0f / std::sqrt(static_cast<float>(I)), &rng);
  }
  Fill(&w.shared.gate_up, 2 * w.shared_inter * H, 1.0f / std::sqrt(static_cast<float>(H)), &rng);
  Fill(&w.shared.down, H * w.shared_inter, 1.0f / std::sqrt(static_cast<float>(w.shared_inter)), &rng);
  return w;
}

}  // namespace

const worker::MoeWeights& TinyMoeWeights() {
  static const worker::MoeWeights* w = new worker::MoeWeights(BuildTiny());
  return *w;
}

std::vector<float> RandomVector(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> v;
  Fill(&v, n, 1.0f, &rng);
  return v;
}

double RelativeError(const float* a, const float* b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  if (den == 0) return std::sqrt(num);
  return std::sqrt(num / den);
}

int TestRanks() {
  if (g_test_ranks > 0) return g_test_ranks;
  if (const char* e = std::getenv("EM_TEST_RANKS")) return std::max(1, std::atoi(e));
  return 2;
}

void SetTestRanks(int n) { g_test_ranks = n; }

std::string MakeTempDir(const std::string& prefix) {
  const char* base = std::getenv("TMPDIR");
  std::string templ = absl::StrCat(base != nullptr && *base ? base : "/tmp", "/", prefix, "-XXXXXX");
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
