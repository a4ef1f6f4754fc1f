// The shared communicator and expert-parallel bodies over the UCX backend,
// without MPI: each test forks N processes (N from --ranks=N, set by ctest to
// 1, 2, 4, 8) that bootstrap through a FileStore in a fresh temporary folder.
// A forked process may also die on purpose, which mpirun would not allow:
// DeadPeerFailsWithinDeadline checks that its peers fail within their deadline.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "gtest/gtest.h"
#include "tests/comm/bodies.h"
#include "tests/comm/comm_test_util.h"
#include "worker/comm/bootstrap.h"
#include "worker/comm/registry.h"

namespace expertmesh {
namespace {

// --detect_peer_failure=1: UCP_ERR_HANDLING_MODE_PEER (TCP on one host).
bool g_detect_peer_failure = false;

// Seconds a forked test may run before its processes are killed (a hang).
constexpr double kForkTimeout = 90;

void RunOverUcx(void (*body)(comm::Communicator*)) {
  const int ranks = testing_util::TestRanks();
  const std::string dir = testing_util::MakeTempDir("em-ucx-test");
  testing_util::RunForked(ranks, kForkTimeout, [&](int rank) {
    comm::FileStore store(dir);
    comm::StoreBootstrap boot(&store, "ucx", rank, ranks);
    comm::CommOptions opts;
    opts.connect_timeout = absl::Seconds(30);
    opts.ucx_detect_peer_failure = g_detect_peer_failure;
    auto c = comm::CreateCommunicator("ucx", &boot, opts);
    ASSERT_OK(c) << "rank " << rank;
    body(c->get());
  });
  testing_util::RemoveTree(dir);
}

#define EM_UCX_TEST(Name) \
  TEST(CommUcx, Name) { RunOverUcx(&comm_bodies::Name); }
EM_COMM_BODIES(EM_UCX_TEST)
#undef EM_UCX_TEST

TEST(CommUcx, DeadPeerFailsWithinDeadline) { RunOverUcx(&comm_bodies::DeadPeerFailsWithinDeadline); }

}  // namespace
}  // namespace expertmesh

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  // Line-buffered, so that a rank that dies leaves its last lines behind.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--ranks=", 8) == 0) expertmesh::testing_util::SetTestRanks(std::atoi(argv[i] + 8));
    if (std::strcmp(argv[i], "--detect_peer_failure=1") == 0) expertmesh::g_detect_peer_failure = true;
  }
  // Built before any fork, so every rank shares the parent's copy.
  (void)expertmesh::testing_util::TinyMoeWeights();
  return RUN_ALL_TESTS();
}
