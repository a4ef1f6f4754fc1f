// expertmesh bench moe-alltoall: the expert-parallel dispatch/combine engine
// (worker/dispatch.h) against the transport's own plain all-to-all-v of the
// identical byte matrices, measured in the same run, alternating step by step.
//
//   mpirun -np 4 expertmesh bench moe-alltoall --backend mpi --tokens 4096 --hidden 7168 --topk 8
//
// Each rank routes --tokens random tokens (DeepSeek-style group-limited: 4 of
// 8 expert groups, then top-k experts inside them) to --experts experts placed
// contiguously over the ranks. A step is: dispatch (layout, pack, counts +
// payload all-to-all-v, unpack) → identity experts (each record's token
// gathered — fp8 dequantised there, as an fp8 expert GEMM would take it — and
// its partial row = sum of its weights × token; not counted in dispatch or
// combine) →
// barrier → combine (all-to-all-v of partial rows, sum in token order). The ceiling is
// the same communicator's AllToAllV of the dispatch byte matrix plus that of
// the combine byte matrix, with counts known in advance:
//   ratio = raw_alltoallv_s / (dispatch_s + combine_s).
// Both backends bootstrap over MPI; --backend ucx moves the data over UCX.
// Without mpirun, UCX can bootstrap through a file store instead:
//   for r in 0 1 2 3; do expertmesh bench moe-alltoall --backend ucx \
//     --store_dir /tmp/run1 --rank $r --ranks 4 ... & done; wait
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
#include "worker/comm/bootstrap.h"
#include "worker/comm/mpi_communicator.h"
#include "worker/comm/registry.h"
#include "worker/dispatch.h"

ABSL_FLAG(std::string, backend, "mpi", "moe-alltoall: data plane, mpi or ucx (both bootstrap over MPI)");
ABSL_FLAG(int64_t, hidden, 7168, "moe-alltoall: values per token (hidden size)");
ABSL_FLAG(int64_t, topk, 8, "moe-alltoall: experts per token");
ABSL_FLAG(int64_t, experts, 256, "moe-alltoall: routed experts, placed contiguously over the ranks");
ABSL_FLAG(bool, fp8, false, "moe-alltoall: dispatch payload as fp8 e4m3 + one fp32 scale per 128 values");
ABSL_FLAG(std::string, store_dir, "",
          "moe-alltoall, ucx only: bootstrap through a file store in this folder instead of MPI, for N processes "
          "started without mpirun, each with --rank and --ranks");
ABSL_FLAG(int32_t, rank, -1, "moe-alltoall with --store_dir: this process's rank");
ABSL_FLAG(int32_t, ranks, 0, "moe-alltoall with --store_dir: number of processes");
ABSL_FLAG(bool, gather, true,
          "moe-alltoall: send the dispatch payload straight from the tokens (gathered sends); false: stage a copy");

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
    float* p = d->partial(i);
    d->GatherToken(i, p);  // the experts' input gather (dequantises fp8)
    for (int64_t h = 0; h < H; ++h) p[h] *= g;
  }
}

// What one rank measured in one timed step (seconds, bytes).
enum Field {
  kDispatch, kCombine, kRawDispatch, kRawCombine, kExpert, kLayout, kPack, kDispatchComm, kUnpack,
  kCombineComm, kCombineSum, kDispatchBytes, kCombineBytes, kFields
};

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

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
  const std::string store_dir = absl::GetFlag(FLAGS_store_dir);
  const bool use_mpi = store_dir.empty();
  if (!use_mpi && (backend != "ucx" || absl::GetFlag(FLAGS_rank) < 0 ||
                   absl::GetFlag(FLAGS_rank) >= absl::GetFlag(FLAGS_ranks))) {
    std::fprintf(stderr, "expertmesh bench moe-alltoall: --store_dir needs --backend ucx and 0 <= --rank < --ranks\n");
    return 2;
  }
  // MPI gets no arguments: the verb's argv is already parsed (and need not be
  // null-terminated, which MPI_Init expects of a real argv).
  if (use_mpi) {
    if (absl::Status s = comm::InitMpi(nullptr, nullptr); !s.ok()) return Fail(s);
  }
  const absl::Duration timeout = absl::Seconds(300);
  std::unique_ptr<comm::Store> store;
  std::unique_ptr<comm::Bootstrap> boot;
  if (!use_mpi) {
    store = std::make_unique<comm::FileStore>(store_dir);
    boot = std::make_unique<comm::StoreBootstrap>(store.get(), "bench", absl::GetFlag(FLAGS_rank),
                                                  absl::GetFlag(FLAGS_ranks));
  } else if (backend == "ucx") {
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
  o.gather_sends = absl::GetFlag(FLAGS_gather);
  o.timeout = timeout;
  worker::EpDispatcher d(comm.get(), &placement, o);

  // The raw all-to-all-v buffers (sized per step below).
  std::vector<char> raw_send, raw_recv;
  auto deadline = [&] { return absl::Now() + timeout; };
  std::vector<double> steps;  // kFields per timed step, this rank
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
    // The ranks finish their experts at different times; that skew is the
    // experts' and must not count as combine time.
    if (absl::Status s = comm->Barrier(deadline()); !s.ok()) return Fail(s);
    t0 = Clock::now();
    if (absl::Status s = d.Combine(y.data()); !s.ok()) return Fail(s);
    const double combine_s = Since(t0);
    // --- the transport's own all-to-all-v of the same byte matrices ---
    const auto& dl = d.dispatch_layout();
    const auto& cl = d.combine_layout();
    // raw_send sends the dispatch matrix and receives the combine one; raw_recv
    // the other way round (with fp8 the combine rows are the larger).
    const size_t need_send = static_cast<size_t>(
        std::max(d.dispatch_bytes_sent(), d.num_sent_records() * H * static_cast<int64_t>(sizeof(float))));
    const size_t need_recv = static_cast<size_t>(
        std::max(d.num_records() * d.record_bytes(), d.combine_bytes_sent()));
    if (raw_send.size() < need_send) raw_send.resize(need_send, 1);
    if (raw_recv.size() < need_recv) raw_recv.resize(need_recv, 0);
    if (absl::Status s = comm->Barrier(deadline()); !s.ok()) return Fail(s);
    t0 = Clock::now();
    if (absl::Status s = comm->AllToAllV(raw_send.data(), raw_recv.data(), dl, comm::MemoryKind::kHost, deadline());
        !s.ok()) {
      return Fail(s);
    }
    const double raw_d = Since(t0);
    if (absl::Status s = comm->Barrier(deadline()); !s.ok()) return Fail(s);  // as before the engine's combine
    t0 = Clock::now();
    if (absl::Status s = comm->AllToAllV(raw_recv.data(), raw_send.data(), cl, comm::MemoryKind::kHost, deadline());
        !s.ok()) {
      return Fail(s);
    }
    const double raw_c = Since(t0);
    if (!warmup) {
      const worker::DispatchTimes& tm = d.times();
      const double f[kFields] = {dispatch_s,      combine_s,
                                 raw_d,           raw_c,
                                 expert_s,        tm.layout,
                                 tm.pack,         tm.dispatch_comm,
                                 tm.unpack,       tm.combine_comm,
                                 tm.combine,      static_cast<double>(d.dispatch_bytes_sent()),
                                 static_cast<double>(d.combine_bytes_sent())};
      steps.insert(steps.end(), f, f + kFields);
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

  // Every rank's steps, gathered. A step's time is its slowest rank's (phase
  // breakdowns: the mean over ranks); reported values are medians over the
  // steps, robust to the bursts of other work on a shared host; the ratio is
  // the median of the per-step ratios (engine and raw run back to back).
  const size_t per_rank = steps.size();
  std::vector<double> all(per_rank * static_cast<size_t>(P));
  if (absl::Status s = comm->AllGather(steps.data(), all.data(), per_rank * sizeof(double), comm::MemoryKind::kHost,
                                       deadline());
      !s.ok()) {
    return Fail(s);
  }
  auto at = [&](int r, int64_t step, int f) {
    return all[static_cast<size_t>(r) * per_rank + static_cast<size_t>(step * kFields + f)];
  };
  auto step_max = [&](int64_t st, int f) {
    double m = 0;
    for (int r = 0; r < P; ++r) m = std::max(m, at(r, st, f));
    return m;
  };
  auto step_mean = [&](int64_t st, int f) {
    double m = 0;
    for (int r = 0; r < P; ++r) m += at(r, st, f);
    return m / P;
  };
  auto median_max = [&](int f) {
    std::vector<double> v;
    for (int64_t st = 0; st < timed; ++st) v.push_back(step_max(st, f));
    return Median(v);
  };
  auto median_mean = [&](int f) {
    std::vector<double> v;
    for (int64_t st = 0; st < timed; ++st) v.push_back(step_mean(st, f));
    return Median(v);
  };
  std::vector<double> ratios, shares;
  for (int64_t st = 0; st < timed; ++st) {
    const double raw = step_max(st, kRawDispatch) + step_max(st, kRawCombine);
    ratios.push_back(raw / (step_max(st, kDispatch) + step_max(st, kCombine)));
    const double arith = step_mean(st, kLayout) + step_mean(st, kPack) + step_mean(st, kUnpack) +
                         step_mean(st, kCombineSum);
    shares.push_back(arith / (step_mean(st, kDispatch) + step_mean(st, kCombine)));
  }
  const double dispatch_s = median_max(kDispatch), combine_s = median_max(kCombine);
  const double raw_d = median_max(kRawDispatch), raw_c = median_max(kRawCombine), raw_s = raw_d + raw_c;
  const double ratio = Median(ratios), share = Median(shares);
  const double dbytes = median_mean(kDispatchBytes), cbytes = median_mean(kCombineBytes);
  auto mean_of = [&](int f) { return median_mean(f); };
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
                          {"gather_sends", o.gather_sends},
                          {"steps", timed},
                          {"record_bytes", d.record_bytes()},
                          {"dispatch_bytes_per_rank", dbytes},
                          {"combine_bytes_per_rank", cbytes},
                          {"dispatch_s", dispatch_s},
                          {"combine_s", combine_s},
                          {"raw_alltoallv_s", raw_s},
                          {"raw_dispatch_s", raw_d},
                          {"raw_combine_s", raw_c},
                          {"ratio", ratio},
                          {"dispatch_gbps", dbytes / dispatch_s / 1e9},
                          {"combine_gbps", cbytes / combine_s / 1e9},
                          {"raw_gbps", (dbytes + cbytes) / raw_s / 1e9},
                          {"layout_s", mean_of(kLayout)},
                          {"pack_s", mean_of(kPack)},
                          {"dispatch_comm_s", mean_of(kDispatchComm)},
                          {"unpack_s", mean_of(kUnpack)},
                          {"combine_comm_s", mean_of(kCombineComm)},
                          {"combine_sum_s", mean_of(kCombineSum)},
                          {"arithmetic_share", share},
                          {"identity_experts_s", mean_of(kExpert)}};
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
      std::printf("ratio raw / (dispatch + combine) = %.3f (median of %lld steps)\n", ratio,
                  static_cast<long long>(timed));
      std::printf("phases (mean over ranks), ms: layout %.2f, pack %.2f, dispatch comm %.2f, unpack %.2f, combine "
                  "comm %.2f, combine sum %.2f; arithmetic share %.1f%%; identity experts (not counted) %.2f\n",
                  mean_of(kLayout) * 1e3, mean_of(kPack) * 1e3, mean_of(kDispatchComm) * 1e3, mean_of(kUnpack) * 1e3,
                  mean_of(kCombineComm) * 1e3, mean_of(kCombineSum) * 1e3, 100 * share, mean_of(kExpert) * 1e3);
    }
  }
  comm.reset();
  boot.reset();
  (void)comm::FinalizeMpi();
  return 0;
}

}  // namespace expertmesh::launch
