// The NCCL communicator on device memory. Every check runs in forked
// processes (the parent never touches CUDA, so children can). Needs a GPU;
// without one each test skips with one line. With one GPU it runs a one-rank
// communicator (NCCL allows one rank per device); with G >= 2 GPUs it also
// runs min(G, 4) ranks, one per GPU.
#include <cuda_runtime.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/comm/bodies.h"
#include "tests/comm/fork_launcher.h"
#include "worker/comm/bootstrap.h"
#include "worker/comm/nccl_communicator.h"
#include "worker/comm/registry.h"

namespace expertmesh {
namespace {

using comm::MemoryKind;

// CUDA devices, counted in a child so that this process stays CUDA-free.
int DeviceCountInChild() {
  const pid_t pid = fork();
  if (pid == 0) _exit(std::min(comm::CudaDeviceCount(), 100));
  int st = 0;
  if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st)) return 0;
  return WEXITSTATUS(st);
}

uint8_t Pattern(int src, int dst, size_t i) { return static_cast<uint8_t>(src * 29 + dst * 11 + i * 7); }
size_t Bytes(int src, int dst) { return static_cast<size_t>((src * 5 + dst * 3) % 4) * 4096 + 100; }

// All-to-all-v, all-gather, broadcast and barrier on device buffers, then a
// host batch (refused) and an abort.
void DeviceBody(comm::Communicator* c) {
  const int P = c->size(), me = c->rank();
  EXPECT_FALSE(c->caps().host_memory);
  EXPECT_TRUE(c->caps().device_memory);
  comm::AllToAllVLayout l;
  size_t sb = 0, rb = 0;
  for (int p = 0; p < P; ++p) {
    l.send_offsets.push_back(sb);
    l.send_bytes.push_back(Bytes(me, p));
    sb += Bytes(me, p);
    l.recv_offsets.push_back(rb);
    l.recv_bytes.push_back(Bytes(p, me));
    rb += Bytes(p, me);
  }
  std::vector<uint8_t> hs(sb), hr(rb, 0);
  for (int p = 0; p < P; ++p) {
    for (size_t i = 0; i < l.send_bytes[p]; ++i) hs[l.send_offsets[p] + i] = Pattern(me, p, i);
  }
  void *ds = nullptr, *dr = nullptr;
  ASSERT_EQ(cudaMalloc(&ds, sb), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dr, rb), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(ds, hs.data(), sb, cudaMemcpyHostToDevice), cudaSuccess);
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  ASSERT_OK(c->AllToAllV(ds, dr, l, MemoryKind::kDevice, deadline));
  ASSERT_EQ(cudaMemcpy(hr.data(), dr, rb, cudaMemcpyDeviceToHost), cudaSuccess);
  for (int p = 0; p < P; ++p) {
    for (size_t i = 0; i < l.recv_bytes[p]; ++i) {
      ASSERT_EQ(hr[l.recv_offsets[p] + i], Pattern(p, me, i)) << "from " << p << " byte " << i;
    }
  }
  // All-gather of one int per rank, broadcast from the last rank, barrier.
  int* dg = nullptr;
  ASSERT_EQ(cudaMalloc(&dg, sizeof(int) * (P + 1)), cudaSuccess);
  const int mine = 40 + me;
  ASSERT_EQ(cudaMemcpy(dg + P, &mine, sizeof(int), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_OK(c->AllGather(dg + P, dg, sizeof(int), MemoryKind::kDevice, deadline));
  std::vector<int> all(P);
  ASSERT_EQ(cudaMemcpy(all.data(), dg, sizeof(int) * P, cudaMemcpyDeviceToHost), cudaSuccess);
  for (int p = 0; p < P; ++p) EXPECT_EQ(all[p], 40 + p);
  ASSERT_OK(c->Broadcast(P - 1, dg, sizeof(int), MemoryKind::kDevice, deadline));
  int b = 0;
  ASSERT_EQ(cudaMemcpy(&b, dg, sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(b, 40 + P - 1);
  ASSERT_OK(c->Barrier(deadline));
  // Host memory is refused without breaking the communicator.
  std::vector<char> h(4);
  comm::Batch hb;
  hb.Send(me, h.data(), 4);
  hb.Recv(me, h.data(), 4);
  EXPECT_EQ(c->Run(hb, deadline).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(c->health().ok());
  c->Abort(absl::CancelledError("test abort"));
  EXPECT_EQ(c->Barrier(deadline).code(), absl::StatusCode::kAborted);
  cudaFree(ds);
  cudaFree(dr);
  cudaFree(dg);
}

void RunNccl(int ranks) {
  const std::string dir = testing_util::MakeTempDir("em-nccl-test");
  testing_util::RunForked(ranks, 120, [&](int rank) {
    comm::FileStore store(dir);
    comm::StoreBootstrap boot(&store, "nccl", rank, ranks);
    comm::CommOptions opts;
    opts.cuda_device = rank;
    auto c = comm::CreateCommunicator("nccl", &boot, opts);
    ASSERT_OK(c) << "rank " << rank;
    DeviceBody(c->get());
  });
  testing_util::RemoveTree(dir);
}

TEST(CommNccl, OneRankOnDevice) {
  if (DeviceCountInChild() == 0) GTEST_SKIP() << "no CUDA device visible: NCCL communicator test skipped";
  RunNccl(1);
}

TEST(CommNccl, OneRankPerGpu) {
  const int g = DeviceCountInChild();
  if (g < 2) GTEST_SKIP() << "fewer than 2 CUDA devices (" << g << "): multi-rank NCCL test skipped";
  RunNccl(std::min(g, 4));
}

}  // namespace
}  // namespace expertmesh
