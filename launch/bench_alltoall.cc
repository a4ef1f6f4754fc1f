// expertmesh bench moe-alltoall: the expert-parallel dispatch/combine engine
// (worker/dispatch.h) against the transport's own plain all-to-all-v of the
// identical byte matrices, measured in the same run, alternating step by step.
//
//   mpirun -np 4 expertmesh bench moe-alltoall --backend mpi --tokens 4096 --hidden 7168 --topk 8
//
// Each rank routes --tokens random tokens (DeepSeek-style group-limited: 4 of
// 8 expert groups, then top-k experts inside them) to --experts experts placed
// contiguously over the ranks. A step is: dispatch (layout, pack, counts +
// payload all-to-all-v, unpack) → identity experts (each record's partial row
// = sum of its weights × its token; not counted in dispatch or combine) →
// combine (all-to-all-v of partial rows, sum in token order). The ceiling is
// the same communicator's AllToAllV of the dispatch byte matrix plus that of
// the combine byte matrix, with counts known in advance:
//   ratio = raw_alltoallv_s / (dispatch_s + combine_s).
// Both backends bootstrap over MPI; --backend ucx moves the data over UCX.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "launch/bench_flags.h"
#include "launch/flags.h"
#include "launch/verbs.h"
#include "nlohmann/json.hpp"
#include "topology/placement.h"
#include "worker/comm/mpi_communicator.h"
#include "worker/comm/registry.h"
#include "worker/dispatch.h"

ABSL_FLAG(std::string, backend, "mpi", "moe-alltoall: data plane, mpi or ucx (both bootstrap over MPI)");
ABSL_FLAG(int64_t, hidden, 7168, "moe-alltoall: values per token (hidden size)");
ABSL_FLAG(int64_t, topk, 8, "moe-alltoall: experts per token");
ABSL_FLAG(int64_t, experts, 256, "moe-alltoall: routed experts, placed contiguously over the ranks");
ABSL_FLAG(bool, fp8, false, "moe-alltoall: dispatch payload as fp8 e4m3 + one fp32 scale per 128 values");

namespace expertmesh::launch {
namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Group-limited random routing: topk_groups of n_groups groups, then k
// distinct experts inside them; weights positive, summing to 2.5.
void RandomRouting(int64_t T, int64_t E, int64_t K, uint64_t seed, std::vector<int32_t>* ids,
                   std::vector<float>* weights) {
  std::mt19937_64 rng(seed);
  const int64_t groups = E % 8 == 0 && E >= 64 ? 8 : 1, keep = groups == 8 ? 4 : 1, per = E / groups;
  std::vector<int32_t> g(static_cast<size_t>(groups)), pool;
  std::uniform_real_distribution<float> u(0.1f, 1.0f);
  ids->resize(static_cast<size_t>(T * K));
  weights->resize(static_cast<size_t>(T * K));
  for (int64_t t = 0; t < T; ++t) {
    std::iota(g.begin(), g.end(), 0);
    std::shuffle(g.begin(), g.end(), rng);
    pool.clear();
    for (int64_t i = 0; i < keep; ++i) {
      for (int64_t e = 0; e < per; ++e) pool.push_back(static_cast<int32_t>(g[i] * per + e));
    }
    for (int64_t k = 0; k < K; ++k) {  // partial Fisher-Yates: k distinct experts
      std::uniform_int_distribution<size_t> pick(static_cast<size_t>(k), pool.size() - 1);
      std::swap(pool[k], pool[pick(rng)]);
    }
    float sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      (*ids)[t * K + k] = pool[k];
      (*weights)[t * K + k] = u(rng);
      sum += (*weights)[t * K + k];
    }
    for (int64_t k = 0; k < K; ++k) (*weights)[t * K + k] *= 2.5f / sum;
  }
}

// Identity experts: partial row of record i = (sum of its weights) * token(i).
void IdentityExperts(worker::EpDispatcher* d, int64_t H, std::vector<float>* sumw) {
  sumw->assign(static_cast<size_t>(d->num_records()), 0.0f);
  for (int64_t s = 0; s < d->num_local_slots(); ++s) {
    for (const auto& e : d->slot_entries(s)) (*sumw)[e.record] += e.weight;
  }
  for (int64_t i = 0; i < d->num_records(); ++i) {
    const float g = (*sumw)[i];
    const float* x = d->token(i);
    float* p = d->partial(i);
    for (int64_t h = 0; h < H; ++h) p[h] = g * x[h];
  }
}

// Sums over timed steps, per rank.
struct Sums {
  double dispatch = 0, combine = 0, raw_dispatch = 0, raw_combine = 0, expert = 0;
  double layout = 0, pack = 0, dispatch_comm = 0, unpack = 0, combine_comm = 0, combine_sum = 0;
  double dispatch_bytes = 0, combine_bytes = 0;
  static constexpr int kFields = 13;
  const double* data() const { return &dispatch; }
};

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "expertmesh bench moe-alltoall: %s\n", s.ToString().c_str());
  (void)comm::FinalizeMpi();
  return 1;
}

}  // namespace

int BenchMoeAlltoall(int argc, char** argv) {
  ParseVerbFlags(argc, argv);
  const std::string backend = absl::GetFlag(FLAGS_backend);
  const int64_t T = absl::GetFlag(FLAGS_tokens), H = absl::GetFlag(FLAGS_hidden), K = absl::GetFlag(FLAGS_topk),
                E = absl::GetFlag(FLAGS_experts);
  const bool fp8 = absl::GetFlag(FLAGS_fp8), json = absl::GetFlag(FLAGS_json);
  if (backend != "mpi" && backend != "ucx") {
    std::fprintf(stderr, "expertmesh bench moe-alltoall: --backend must be mpi or ucx, not '%s'\n", backend.c_str());
    return 2;
  }
  if (T < 0 || H <= 0 || K <= 0 || E < K) {
    std::fprintf(stderr, "expertmesh bench moe-alltoall: need --tokens >= 0, --hidden > 0, 0 < --topk <= --experts\n");
    return 2;
  }
  if (absl::Status s = comm::InitMpi(&argc, &argv); !s.ok()) return Fail(s);
  const absl::Duration timeout = absl::Seconds(300);
  std::unique_ptr<comm::Bootstrap> boot;
  if (backend == "ucx") {
    auto b = comm::CreateMpiBootstrap(absl::Now() + timeout);
    if (!b.ok()) return Fail(b.status());
    boot = *std::move(b);
  }
  comm::CommOptions copts;
  copts.connect_timeout = timeout;
  auto made = comm::CreateCommunicator(backend, boot.get(), copts);
  if (!made.ok()) return Fail(made.status());
  std::unique_ptr<comm::Communicator> comm = *std::move(made);
  const int P = comm->size(), me = comm->rank();
  if (E < P) return Fail(absl::InvalidArgumentError("--experts must be at least the number of ranks"));

  const auto placement = topology::ExpertPlacement::Uniform(E, P);
  std::vector<int32_t> ids;
  std::vector<float> weights;
  RandomRouting(T, E, K, 1234 + static_cast<uint64_t>(me), &ids, &weights);
  std::vector<float> x(static_cast<size_t>(T * H)), y(static_cast<size_t>(T * H)), sumw;
  {
    std::mt19937 rng(99 + me);
    std::normal_distribution<float> n(0.0f, 1.0f);
    for (float& v : x) v = n(rng);
  }
  worker::DispatchOptions o;
  o.hidden = H;
  o.top_k = K;
  o.fp8 = fp8;
  o.timeout = timeout;
  worker::EpDispatcher d(comm.get(), &placement, o);

  // The raw all-to-all-v buffers: as large as the dispatch byte matrix (the
  // combine matrix is never larger: H floats per record vs header + payload).
  std::vector<char> raw_send, raw_recv;
  auto deadline = [&] { return absl::Now() + timeout; };
  Sums sums;
  const int64_t iters = absl::GetFlag(FLAGS_iters);
  const double min_s = absl::GetFlag(FLAGS_min_seconds);
  const auto start = Clock::now();
  int64_t timed = 0;
  for (int64_t step = 0;; ++step) {
    const bool warmup = step == 0;
    // --- engine ---
    if (absl::Status s = comm->Barrier(deadline()); !s.ok()) return Fail(s);
    auto t0 = Clock::now();
    if (absl::Status s = d.Dispatch(x.data(), T, ids.data(), weights.data()); !s.ok()) return Fail(s);
    const double dispatch_s = Since(t0);
    t0 = Clock::now();
    IdentityExperts(&d, H, &sumw);
    const double expert_s = Since(t0);
    t0 = Clock::now();
    if (absl::Status s = d.Combine(y.data()); !s.ok()) return Fail(s);
    const double combine_s = Since(t0);
    // --- the transport's own all-to-all-v of the same byte matrices ---
    const auto& dl = d.dispatch_layout();
    const auto& cl = d.combine_layout();
    const size_t need_send = static_cast<size_t>(d.dispatch_bytes_sent());
    const size_t need_recv = static_cast<size_t>(d.num_records() * d.record_bytes());
    if (raw_send.size() < need_send) raw_send.resize(need_send, 1);
    if (raw_recv.size() < need_recv) raw_recv.resize(need_recv, 0);
    if (absl::Status s = comm->Barrier(deadline()); !s.ok()) return Fail(s);
    t0 = Clock::now();
    if (absl::Status s = comm->AllToAllV(raw_send.data(), raw_recv.data(), dl, comm::MemoryKind::kHost, deadline());
        !s.ok()) {
      return Fail(s);
    }
    const double raw_d = Since(t0);
    t0 = Clock::now();
    if (absl::Status s = comm->AllToAllV(raw_recv.data(), raw_send.data(), cl, comm::MemoryKind::kHost, deadline());
        !s.ok()) {
      return Fail(s);
    }
    const double raw_c = Since(t0);
    if (!warmup) {
      const worker::DispatchTimes& tm = d.times();
      sums.dispatch += dispatch_s;
      sums.combine += combine_s;
      sums.raw_dispatch += raw_d;
      sums.raw_combine += raw_c;
      sums.expert += expert_s;
      sums.layout += tm.layout;
      sums.pack += tm.pack;
      sums.dispatch_comm += tm.dispatch_comm;
      sums.unpack += tm.unpack;
      sums.combine_comm += tm.combine_comm;
      sums.combine_sum += tm.combine;
      sums.dispatch_bytes += static_cast<double>(d.dispatch_bytes_sent());
      sums.combine_bytes += static_cast<double>(d.combine_bytes_sent());
      ++timed;
    }
    // Every rank must agree on when to stop: rank 0 decides.
    int64_t more = 0;
    if (me == 0) {
      more = iters > 0 ? timed < iters : (Since(start) < min_s || timed < 3);
    }
    if (absl::Status s = comm->Broadcast(0, &more, sizeof(more), comm::MemoryKind::kHost, deadline()); !s.ok()) {
      return Fail(s);
    }
    if (!more) break;
  }

  // Per-rank means, gathered; the step's times are the slowest rank's.
  std::vector<double> mine(Sums::kFields), all(static_cast<size_t>(Sums::kFields * P));
  for (int i = 0; i < Sums::kFields; ++i) mine[i] = sums.data()[i] / static_cast<double>(timed);
  if (absl::Status s = comm->AllGather(mine.data(), all.data(), sizeof(double) * Sums::kFields,
                                       comm::MemoryKind::kHost, deadline());
      !s.ok()) {
    return Fail(s);
  }
  auto max_of = [&](int f) {
    double m = 0;
    for (int r = 0; r < P; ++r) m = std::max(m, all[static_cast<size_t>(r * Sums::kFields + f)]);
    return m;
  };
  auto mean_of = [&](int f) {
    double m = 0;
    for (int r = 0; r < P; ++r) m += all[static_cast<size_t>(r * Sums::kFields + f)];
    return m / P;
  };
  enum { kD, kC, kRd, kRc, kX, kLay, kPack, kDcomm, kUnp, kCcomm, kCsum, kDb, kCb };
  const double dispatch_s = max_of(kD), combine_s = max_of(kC), raw_s = max_of(kRd) + max_of(kRc);
  const double arith = mean_of(kLay) + mean_of(kPack) + mean_of(kUnp) + mean_of(kCsum);
  const double step = mean_of(kD) + mean_of(kC);
  const double dbytes = mean_of(kDb), cbytes = mean_of(kCb);
  const unsigned cores = std::thread::hardware_concurrency();
  if (me == 0) {
    if (json) {
      nlohmann::json j = {{"backend", backend},
                          {"ranks", P},
                          {"cores", cores},
                          {"oversubscribed", static_cast<unsigned>(P) > cores},
                          {"tokens", T},
                          {"hidden", H},
                          {"topk", K},
                          {"experts", E},
                          {"fp8", fp8},
                          {"steps", timed},
                          {"record_bytes", d.record_bytes()},
                          {"dispatch_bytes_per_rank", dbytes},
                          {"combine_bytes_per_rank", cbytes},
                          {"dispatch_s", dispatch_s},
                          {"combine_s", combine_s},
                          {"raw_alltoallv_s", raw_s},
                          {"raw_dispatch_s", max_of(kRd)},
                          {"raw_combine_s", max_of(kRc)},
                          {"ratio", raw_s / (dispatch_s + combine_s)},
                          {"dispatch_gbps", dbytes / dispatch_s / 1e9},
                          {"combine_gbps", cbytes / combine_s / 1e9},
                          {"raw_gbps", (dbytes + cbytes) / raw_s / 1e9},
                          {"layout_s", mean_of(kLay)},
                          {"pack_s", mean_of(kPack)},
                          {"dispatch_comm_s", mean_of(kDcomm)},
                          {"unpack_s", mean_of(kUnp)},
                          {"combine_comm_s", mean_of(kCcomm)},
                          {"combine_sum_s", mean_of(kCsum)},
                          {"arithmetic_share", arith / step},
                          {"identity_experts_s", mean_of(kX)}};
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("moe-alltoall over %s: %d ranks (%u cores%s), %lld tokens/rank, hidden %lld, top-%lld of %lld "
                  "experts, %s dispatch (%lld B/record); %lld timed steps\n",
                  backend.c_str(), P, cores, static_cast<unsigned>(P) > cores ? ", oversubscribed" : "",
                  static_cast<long long>(T), static_cast<long long>(H), static_cast<long long>(K),
                  static_cast<long long>(E), fp8 ? "fp8" : "fp32", static_cast<long long>(d.record_bytes()),
                  static_cast<long long>(timed));
      std::printf("%-28s %10s %12s %10s\n", "", "ms", "MB/rank", "GB/s");
      std::printf("%-28s %10.2f %12.1f %10.2f\n", "dispatch", dispatch_s * 1e3, dbytes / 1e6,
                  dbytes / dispatch_s / 1e9);
      std::printf("%-28s %10.2f %12.1f %10.2f\n", "combine", combine_s * 1e3, cbytes / 1e6, cbytes / combine_s / 1e9);
      std::printf("%-28s %10.2f %12.1f %10.2f\n", "raw all-to-all-v (ceiling)", raw_s * 1e3, (dbytes + cbytes) / 1e6,
                  (dbytes + cbytes) / raw_s / 1e9);
      std::printf("ratio raw / (dispatch + combine) = %.3f\n", raw_s / (dispatch_s + combine_s));
      std::printf("per-rank means, ms: layout %.2f, pack %.2f, dispatch comm %.2f, unpack %.2f, combine comm %.2f, "
                  "combine sum %.2f; arithmetic share %.1f%%; identity experts (not counted) %.2f\n",
                  mean_of(kLay) * 1e3, mean_of(kPack) * 1e3, mean_of(kDcomm) * 1e3, mean_of(kUnp) * 1e3,
                  mean_of(kCcomm) * 1e3, mean_of(kCsum) * 1e3, 100 * arith / step, mean_of(kX) * 1e3);
    }
  }
  comm.reset();
  boot.reset();
  (void)comm::FinalizeMpi();
  return 0;
}

}  // namespace expertmesh::launch
