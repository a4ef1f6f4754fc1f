// Helpers shared by the communicator and dispatch tests: tiny-preset MoE
// weights (random, seeded), random tokens, error norms, and the fork-based
// launcher that runs one test body in N processes.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/comm/communicator.h"
#include "worker/moe.h"

namespace expertmesh::testing_util {

// MoE weights with the tiny preset's shapes: hidden 160, 256 experts of
// width 24, top-8 in 8 groups keeping 4, sigmoid scores, one shared expert.
// Built once per process from a fixed seed (every rank gets the same).
const worker::MoeWeights& TinyMoeWeights();

// n values ~ N(0, 1) from `seed`.
std::vector<float> RandomVector(int64_t n, uint64_t seed);

// ||a - b|| / ||b|| over n values.
double RelativeError(const float* a, const float* b, int64_t n);

// Ranks of the current multi-rank test run (--ranks=N or EM_TEST_RANKS).
int TestRanks();
void SetTestRanks(int n);

// Runs body(rank) in `ranks` forked processes and waits for all of them,
// at most `timeout_s` seconds (then kills them). Each child exits 0 unless
// the body recorded a gtest failure; the parent turns every non-zero exit,
// signal or timeout into a test failure naming the rank. Call from a TEST
// body of a process that has not started UCX, CUDA or threads.
void RunForked(int ranks, double timeout_s, const std::function<void(int rank)>& body);

// A fresh empty folder under $TMPDIR (or /tmp) for a FileStore.
std::string MakeTempDir(const std::string& prefix);
void RemoveTree(const std::string& dir);

}  // namespace expertmesh::testing_util
