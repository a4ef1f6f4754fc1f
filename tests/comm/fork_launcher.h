// Multi-process test launcher: runs a test body in N forked processes and
// turns their exits into gtest results; temporary folders for file stores.
// Depends on gtest only (the NCCL test uses it without the MoE helpers).
#pragma once

#include <functional>
#include <string>

namespace expertmesh::testing_util {

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
