// The shared communicator and expert-parallel bodies over the MPI backend.
// Run by ctest as `mpirun -np N comm_mpi_test` (N = 1, 2, 4, 8): every rank
// runs every test on a fresh duplicate of MPI_COMM_WORLD. Ranks other than 0
// print only failures, prefixed with their rank.
#include <cstdio>
#include <memory>

#include "gtest/gtest.h"
#include "tests/comm/bodies.h"
#include "worker/comm/mpi_communicator.h"
#include "worker/comm/registry.h"

namespace expertmesh {
namespace {

std::unique_ptr<comm::Communicator> NewComm() {
  auto c = comm::CreateCommunicator("mpi", nullptr, comm::CommOptions());
  EXPECT_OK(c);
  return c.ok() ? *std::move(c) : nullptr;
}

#define EM_MPI_TEST(Name)                  \
  TEST(CommMpi, Name) {                    \
    auto comm = NewComm();                 \
    ASSERT_NE(comm, nullptr);              \
    comm_bodies::Name(comm.get());         \
  }
EM_COMM_BODIES(EM_MPI_TEST)
#undef EM_MPI_TEST

// Prints failed assertions of a non-zero rank, tagged with the rank.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_, r.file_name() ? r.file_name() : "?",
                 r.line_number(), r.summary());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed()) {
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
    }
  }

 private:
  int rank_;
};

}  // namespace
}  // namespace expertmesh

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  // Line-buffered, so that a rank that dies leaves its last lines behind.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const absl::Status s = expertmesh::comm::InitMpi(&argc, &argv);
  if (!s.ok()) {
    std::fprintf(stderr, "comm_mpi_test: %s\n", s.ToString().c_str());
    return 2;
  }
  const int rank = expertmesh::comm::MpiWorldRank();
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new expertmesh::RankFailurePrinter(rank));
  }
  const int rc = RUN_ALL_TESTS();
  (void)expertmesh::comm::FinalizeMpi();
  return rc;
}
