// Helpers shared by the communicator and dispatch tests: tiny-preset MoE
// weights (random, seeded), random tokens, error norms; and (through
// fork_launcher.h) the launcher that runs one test body in N processes.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tests/comm/fork_launcher.h"
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

}  // namespace expertmesh::testing_util
