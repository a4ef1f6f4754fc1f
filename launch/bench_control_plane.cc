// expertmesh bench control-plane: the coordinator under control-plane load.
//
// Starts an in-process coordinator (CoordinatorServer, journal ON in a temp
// folder, so every accepted job and every result is fsync'd) with
// --cp-workers simulated stage-0 workers (pp=1, ep=N) that each Heartbeat and
// Sync over real gRPC every --cp-poll-ms, finishing every sequence they are
// handed at their next Sync. While they poll, --cp-jobs jobs (one sequence
// each) are submitted by --cp-submitters concurrent clients. Prints the
// latency of Sync, Heartbeat and SubmitJob (p50/p99/max) measured while the
// submits were arriving, the submit throughput, and how long until every job
// had SUCCEEDED. The journal's fsyncs land on the disk of --cp-dir.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/config.h"
#include "coordinator/server.h"
#include "grpcpp/grpcpp.h"
#include "launch/bench_flags.h"
#include "launch/flags.h"
#include "nlohmann/json.hpp"
#include "proto/expertmesh.grpc.pb.h"
#include "proto/security.h"

ABSL_FLAG(int32_t, cp_workers, 32, "control-plane: simulated stage-0 workers (each Heartbeat + Sync per poll)");
ABSL_FLAG(double, cp_poll_ms, 10, "control-plane: each worker's poll period in milliseconds");
ABSL_FLAG(int32_t, cp_jobs, 1000, "control-plane: jobs submitted (one sequence each)");
ABSL_FLAG(int32_t, cp_submitters, 1000, "control-plane: concurrent submitting clients");
ABSL_FLAG(std::string, cp_dir, "/tmp", "control-plane: folder for the temporary journal (its disk is measured)");

namespace expertmesh::launch {

namespace {

namespace v1 = expertmesh::v1;

double NowS() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// One latency sample: when the call started and how long it took (seconds).
struct Sample {
  double start, seconds;
};

struct Stats {
  size_t n = 0;
  double p50 = 0, p99 = 0, max = 0;
};

Stats Summarize(std::vector<double> v) {
  Stats s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  s.n = v.size();
  s.p50 = v[v.size() / 2];
  s.p99 = v[std::min(v.size() - 1, static_cast<size_t>(static_cast<double>(v.size()) * 0.99))];
  s.max = v.back();
  return s;
}

// Samples that started inside [t0, t1].
std::vector<double> Window(const std::vector<Sample>& all, double t0, double t1) {
  std::vector<double> v;
  for (const Sample& s : all) {
    if (s.start >= t0 && s.start <= t1) v.push_back(s.seconds);
  }
  return v;
}

int Fail(const std::string& msg) {
  std::fprintf(stderr, "expertmesh bench control-plane: %s\n", msg.c_str());
  return 1;
}

}  // namespace

int BenchControlPlane() {
  const int nw = absl::GetFlag(FLAGS_cp_workers), njobs = absl::GetFlag(FLAGS_cp_jobs);
  const int nsub = std::max(1, std::min(absl::GetFlag(FLAGS_cp_submitters), njobs));
  const double poll_s = absl::GetFlag(FLAGS_cp_poll_ms) / 1000.0;
  if (nw < 1 || njobs < 1 || !(poll_s > 0)) return Fail("--cp-workers, --cp-jobs and --cp-poll-ms must be > 0");
  std::string templ = absl::GetFlag(FLAGS_cp_dir) + "/em_bench_cp_XXXXXX";
  if (mkdtemp(templ.data()) == nullptr) return Fail(absl::StrCat(templ, ": cannot create a temp folder"));
  const std::string dir = templ;
  struct Cleanup {
    std::string dir;
    ~Cleanup() { std::filesystem::remove_all(dir); }
  } cleanup{dir};
  ModelConfig cfg = *ModelConfig::Preset("tiny");
  std::ofstream(dir + "/config.json") << cfg.ToJson().dump(2);

  coordinator::CoordinatorOptions o;
  o.checkpoint = dir;
  o.pp = 1;
  o.ep = nw;
  o.journal_path = dir + "/coordinator.journal";
  o.max_queued_sequences = std::max(65536, njobs);
  auto server = coordinator::CoordinatorServer::Start(o);
  if (!server.ok()) return Fail(std::string(server.status().message()));
  const std::string addr = (*server)->address();
  std::fprintf(stderr, "bench control-plane: coordinator on %s, journal %s, %d workers polling every %.1f ms\n",
               addr.c_str(), o.journal_path.c_str(), nw, poll_s * 1e3);

  // Workers: register (blocks until all are there), then poll.
  std::atomic<bool> stop{false};
  std::atomic<int> registered{0}, failures{0};
  std::vector<std::vector<Sample>> sync_lat(nw), hb_lat(nw);
  std::vector<std::thread> workers;
  for (int i = 0; i < nw; ++i) {
    workers.emplace_back([&, i] {
      auto ch = rpc::MakeChannel(addr, rpc::ClientSecurity(), grpc::ChannelArguments());
      auto stub = v1::WorkerService::NewStub(ch);
      v1::RegisterRequest rr;
      rr.set_worker_id(i);
      rr.set_host("bench");
      rr.set_pid(1000 + i);
      v1::RegisterResponse reg;
      {
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
        grpc::Status s = stub->Register(&ctx, rr, &reg);
        if (!s.ok()) {
          std::fprintf(stderr, "worker %d: Register: %s\n", i, s.error_message().c_str());
          ++failures;
          return;
        }
      }
      ++registered;
      std::vector<v1::SequenceAssignment> held;
      double next = NowS();
      while (!stop.load()) {
        {
          v1::HeartbeatRequest hb;
          hb.set_worker_id(i);
          hb.set_host("bench");
          hb.set_pid(1000 + i);
          hb.set_active_sequences(static_cast<int32_t>(held.size()));
          v1::HeartbeatResponse resp;
          grpc::ClientContext ctx;
          ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
          const double t0 = NowS();
          grpc::Status s = stub->Heartbeat(&ctx, hb, &resp);
          hb_lat[i].push_back({t0, NowS() - t0});
          if (!s.ok()) ++failures;
        }
        {
          v1::SyncRequest sr;
          sr.set_worker_id(i);
          sr.set_epoch(reg.epoch());
          sr.set_generation(reg.generation());
          sr.set_free_slots(8);
          for (const v1::SequenceAssignment& a : held) {  // every held sequence finishes now
            v1::SequenceUpdate* u = sr.add_updates();
            u->set_seq_id(a.seq_id());
            for (int t = 0; t < a.request().max_new_tokens(); ++t) u->add_new_tokens(t + 1);
            u->set_finish_reason(v1::FINISH_REASON_LENGTH);
          }
          held.clear();
          v1::SyncResponse resp;
          grpc::ClientContext ctx;
          ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
          const double t0 = NowS();
          grpc::Status s = stub->Sync(&ctx, sr, &resp);
          sync_lat[i].push_back({t0, NowS() - t0});
          if (!s.ok()) {
            ++failures;
          } else {
            held.assign(resp.assign().begin(), resp.assign().end());
          }
        }
        next += poll_s;
        const double wait = next - NowS();
        if (wait > 0) {
          std::this_thread::sleep_for(std::chrono::duration<double>(wait));
        } else {
          next = NowS();
        }
      }
    });
  }
  const double reg_deadline = NowS() + 60;
  while (registered.load() + failures.load() < nw && NowS() < reg_deadline) absl::SleepFor(absl::Milliseconds(10));
  if (registered.load() < nw) {
    stop = true;
    for (auto& t : workers) t.join();
    return Fail("the workers did not all register");
  }
  absl::SleepFor(absl::Seconds(1));  // steady polling before the submits

  // Submits: njobs jobs from nsub concurrent clients (a few shared channels).
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (int c = 0; c < 8; ++c) channels.push_back(rpc::MakeChannel(addr, rpc::ClientSecurity(), grpc::ChannelArguments()));
  std::vector<std::vector<double>> sub_lat(nsub);
  std::atomic<int> next_job{0}, submit_failures{0};
  const double sub_t0 = NowS();
  std::vector<std::thread> submitters;
  for (int c = 0; c < nsub; ++c) {
    submitters.emplace_back([&, c] {
      auto stub = v1::JobService::NewStub(channels[static_cast<size_t>(c) % channels.size()]);
      for (int k = next_job++; k < njobs; k = next_job++) {
        v1::SubmitJobRequest req;
        req.set_client_request_id(absl::StrCat("bench-", k));
        v1::SequenceRequest* s = req.add_sequences();
        for (int t = 0; t < 8; ++t) s->add_tokens((k * 8 + t) % 1000 + 1);
        s->set_max_new_tokens(4);
        v1::SubmitJobResponse resp;
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
        const double t0 = NowS();
        grpc::Status st = stub->SubmitJob(&ctx, req, &resp);
        sub_lat[c].push_back(NowS() - t0);
        if (!st.ok()) {
          if (submit_failures++ == 0) std::fprintf(stderr, "SubmitJob: %s\n", st.error_message().c_str());
        }
      }
    });
  }
  for (auto& t : submitters) t.join();
  const double sub_t1 = NowS();
  // Until every job has SUCCEEDED.
  coordinator::Coordinator* coord = (*server)->coordinator();
  const double done_deadline = NowS() + 60;
  int64_t succeeded = 0;
  while (NowS() < done_deadline) {
    auto counts = coord->JobCountsByState();
    succeeded = counts[v1::JOB_STATE_SUCCEEDED];
    if (succeeded >= njobs - submit_failures.load()) break;
    absl::SleepFor(absl::Milliseconds(5));
  }
  const double done_t = NowS();
  stop = true;
  for (auto& t : workers) t.join();
  const coordinator::Coordinator::JournalStats js = coord->journal_stats();
  // A heartbeat stuck behind the disk for heartbeat_timeout_s makes its
  // worker MISSING and restarts the data plane (a new generation): this
  // bench's workers do not rebuild, so the jobs stall.
  const v1::ClusterStatus cs = coord->GetClusterStatus();
  (*server)->Stop();

  std::vector<Sample> sync_all, hb_all;
  for (int i = 0; i < nw; ++i) {
    sync_all.insert(sync_all.end(), sync_lat[i].begin(), sync_lat[i].end());
    hb_all.insert(hb_all.end(), hb_lat[i].begin(), hb_lat[i].end());
  }
  std::vector<double> subs;
  for (auto& v : sub_lat) subs.insert(subs.end(), v.begin(), v.end());
  const Stats sync = Summarize(Window(sync_all, sub_t0, sub_t1)), hb = Summarize(Window(hb_all, sub_t0, sub_t1));
  const Stats sub = Summarize(subs);
  const double submit_s = sub_t1 - sub_t0;
  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json j = {
        {"workers", nw},
        {"poll_ms", poll_s * 1e3},
        {"jobs", njobs},
        {"submitters", nsub},
        {"submit_failures", submit_failures.load()},
        {"rpc_failures", failures.load()},
        {"sync_ms", {{"n", sync.n}, {"p50", sync.p50 * 1e3}, {"p99", sync.p99 * 1e3}, {"max", sync.max * 1e3}}},
        {"heartbeat_ms", {{"n", hb.n}, {"p50", hb.p50 * 1e3}, {"p99", hb.p99 * 1e3}, {"max", hb.max * 1e3}}},
        {"submit_ms", {{"n", sub.n}, {"p50", sub.p50 * 1e3}, {"p99", sub.p99 * 1e3}, {"max", sub.max * 1e3}}},
        {"submit_jobs_per_s", njobs / submit_s},
        {"all_succeeded_s", done_t - sub_t0},
        {"journal_bytes", js.size_bytes},
        {"workers_lost", cs.workers_lost()}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf(
        "control plane: %d workers polling every %.1f ms (Heartbeat + Sync), %d jobs from %d concurrent "
        "clients, journal on %s\n",
        nw, poll_s * 1e3, njobs, nsub, absl::GetFlag(FLAGS_cp_dir).c_str());
    std::printf("%-30s %8s %10s %10s %10s\n", "while submits arrive", "calls", "p50 ms", "p99 ms", "max ms");
    std::printf("%-30s %8zu %10.2f %10.2f %10.2f\n", "Sync", sync.n, sync.p50 * 1e3, sync.p99 * 1e3, sync.max * 1e3);
    std::printf("%-30s %8zu %10.2f %10.2f %10.2f\n", "Heartbeat", hb.n, hb.p50 * 1e3, hb.p99 * 1e3, hb.max * 1e3);
    std::printf("%-30s %8zu %10.2f %10.2f %10.2f\n", "SubmitJob", sub.n, sub.p50 * 1e3, sub.p99 * 1e3, sub.max * 1e3);
    std::printf(
        "submit throughput: %.0f jobs/s (%d jobs in %.2f s, %d failed); %lld SUCCEEDED %.2f s after the "
        "first submit; journal %lld bytes; %d failed worker RPCs; %lld workers declared MISSING\n",
        njobs / submit_s, njobs, submit_s, submit_failures.load(), static_cast<long long>(succeeded), done_t - sub_t0,
        static_cast<long long>(js.size_bytes), failures.load(), static_cast<long long>(cs.workers_lost()));
  }
  return submit_failures.load() == 0 && failures.load() == 0 && succeeded >= njobs ? 0 : 1;
}

}  // namespace expertmesh::launch
