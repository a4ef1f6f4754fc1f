// The shared communicator and expert-parallel bodies over the in-process
// backend: each test runs N threads (N from --ranks=N, set by ctest to 1, 2,
// 3, 4, 8), one per rank of a fresh CreateInprocGroup(N). No mpirun, no fork:
// fast, and race-checkable with -fsanitize=thread. A body that hangs past
// kTimeout fails the test, and its communicators are aborted so that every
// thread returns. DeadPeerFailsWithinDeadline is not here: a rank "dies" by
// ending its process.
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/comm/bodies.h"
#include "tests/comm/comm_test_util.h"
#include "worker/comm/inproc_communicator.h"

namespace expertmesh {
namespace {

// How long one body may run on all ranks before it counts as a hang.
constexpr absl::Duration kTimeout = absl::Seconds(90);

void RunThreaded(void (*body)(comm::Communicator*)) {
  const int ranks = testing_util::TestRanks();
  std::vector<std::unique_ptr<comm::Communicator>> comms = comm::CreateInprocGroup(ranks);
  std::mutex mu;
  std::condition_variable cv;
  int finished = 0;
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] {
      {
        SCOPED_TRACE("rank " + std::to_string(r));
        body(comms[static_cast<size_t>(r)].get());
      }
      std::lock_guard<std::mutex> lock(mu);
      ++finished;
      cv.notify_all();
    });
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_until(lock, absl::ToChronoTime(absl::Now() + kTimeout), [&] { return finished == ranks; })) {
      ADD_FAILURE() << finished << " of " << ranks << " ranks finished within " << kTimeout
                    << "; aborting the others";
      for (auto& c : comms) c->Abort(absl::DeadlineExceededError("test timeout"));
    }
  }
  for (std::thread& t : threads) t.join();
}

#define EM_INPROC_TEST(Name) \
  TEST(CommInproc, Name) { RunThreaded(&comm_bodies::Name); }
EM_COMM_BODIES(EM_INPROC_TEST)
#undef EM_INPROC_TEST

// A rank whose communicator is gone is a dead peer: kUnavailable at once,
// not at the deadline.
TEST(CommInproc, DestroyedPeerIsUnavailable) {
  std::vector<std::unique_ptr<comm::Communicator>> comms = comm::CreateInprocGroup(2);
  char c = 0;
  comm::Batch b;
  b.Recv(1, &c, 1);
  comms[1].reset();
  const absl::Time t0 = absl::Now();
  const absl::Status s = comms[0]->Run(b, absl::Now() + absl::Seconds(20));
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_LT(absl::Now() - t0, absl::Seconds(5));
  EXPECT_EQ(comms[0]->health().code(), absl::StatusCode::kUnavailable);
}

// A message sent before the sender went away is still delivered.
TEST(CommInproc, MessageOutlivesItsSender) {
  std::vector<std::unique_ptr<comm::Communicator>> comms = comm::CreateInprocGroup(2);
  const char out = 42;
  char in = 0;
  comm::Batch send;
  send.Send(0, &out, 1);
  ASSERT_TRUE(comms[1]->Run(send, absl::Now() + absl::Seconds(5)).ok());
  comms[1].reset();
  comm::Batch recv;
  recv.Recv(1, &in, 1);
  const absl::Status s = comms[0]->Run(recv, absl::Now() + absl::Seconds(5));
  EXPECT_OK(s);
  EXPECT_EQ(in, 42);
}

}  // namespace
}  // namespace expertmesh

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--ranks=", 8) == 0) expertmesh::testing_util::SetTestRanks(std::atoi(argv[i] + 8));
  }
  // Built before the rank threads start, so they share one copy.
  (void)expertmesh::testing_util::TinyMoeWeights();
  return RUN_ALL_TESTS();
}
