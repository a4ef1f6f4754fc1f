// Flags shared by the `bench` sub-benchmarks (defined in bench_flags.cc).
#pragma once

#include <cstdint>

#include "absl/flags/declare.h"

ABSL_DECLARE_FLAG(int64_t, tokens);
ABSL_DECLARE_FLAG(int64_t, iters);
ABSL_DECLARE_FLAG(double, min_seconds);

namespace expertmesh::launch {
// `expertmesh bench moe-alltoall` (launch/bench_alltoall.cc).
int BenchMoeAlltoall(int argc, char** argv);
// `expertmesh bench serve` (launch/bench_serve.cc).
int BenchServe();
// `expertmesh bench control-plane` (launch/bench_control_plane.cc).
int BenchControlPlane();
// `expertmesh bench gemv` (launch/bench_gemv.cc).
int BenchGemv();
// `expertmesh bench peer` (launch/bench_peer.cc).
int BenchPeer();
}  // namespace expertmesh::launch
