// expertmesh bench serve: a local cluster under mpirun serving a batch job,
// measured end to end, with a per-stage breakdown of where the time went
// (from the workers' own accounting, reported in heartbeats).
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/checkpoint.h"
#include "common/config.h"
#include "common/status.h"
#include "grpcpp/grpcpp.h"
#include "launch/bench_flags.h"
#include "launch/flags.h"
#include "nlohmann/json.hpp"
#include "proto/expertmesh.grpc.pb.h"
#include "proto/security.h"

extern char** environ;

ABSL_FLAG(int32_t, num_prompts, 32, "serve: prompts in the measured batch");
ABSL_FLAG(int32_t, prompt_len, 64, "serve: tokens per prompt");
ABSL_FLAG(std::string, mpirun, "mpirun", "serve: the mpirun to start the local cluster with");
ABSL_FLAG(std::string, bench_dir, "out/bench", "serve: where generated checkpoints and logs are kept");
ABSL_FLAG(bool, rebalance, false,
          "serve: measure a batch, a control batch of the same shape on the same placement, rebalance the experts "
          "live (EPLB on the load observed so far) and measure a batch after it; prints all three, the rebalance's "
          "own time and the per-rank expert time spread");
ABSL_DECLARE_FLAG(double, router_bias_std);
ABSL_DECLARE_FLAG(int32_t, redundant_experts);

namespace expertmesh::launch {

namespace {

namespace v1 = expertmesh::v1;

struct Cluster {
  pid_t pid = -1;
  std::string address, log;
};

int Fail(const std::string& msg) {
  std::fprintf(stderr, "expertmesh bench serve: %s\n", msg.c_str());
  return 1;
}

// Starts `mpirun ... expertmesh launch` in its own process group.
absl::StatusOr<Cluster> StartCluster(const std::string& ckpt, int pp, int ep, int redundant, const std::string& dir) {
  Cluster c;
  const std::string addr_file = dir + "/serve.address";
  c.log = dir + "/serve.log";
  std::filesystem::remove(addr_file);
  char self[4096] = {0};
  if (readlink("/proc/self/exe", self, sizeof(self) - 1) <= 0) return absl::InternalError("cannot find my own binary");
  std::vector<std::string> args = {absl::GetFlag(FLAGS_mpirun), "--allow-run-as-root", "--oversubscribe", "--mca",
                                   "btl", "self,vader", "-np", std::to_string(1 + pp * ep), self, "launch",
                                   "--checkpoint", ckpt, "--pp", std::to_string(pp), "--ep", std::to_string(ep),
                                   "--redundant-experts", std::to_string(redundant), "--listen", "127.0.0.1:0",
                                   "--address-file", addr_file};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  setenv("OPENBLAS_NUM_THREADS", "1", 1);  // ranks share the cores
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, c.log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attr, 0);
  const int rc = posix_spawnp(&c.pid, argv[0], &fa, &attr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) return absl::UnavailableError(absl::StrCat("cannot start ", args[0], ": ", std::strerror(rc)));
  const absl::Time deadline = absl::Now() + absl::Minutes(10);
  while (absl::Now() < deadline) {
    std::ifstream f(addr_file);
    if (f && std::getline(f, c.address) && !c.address.empty()) return c;
    int st = 0;
    if (waitpid(c.pid, &st, WNOHANG) == c.pid) {
      return absl::UnavailableError(absl::StrCat("the cluster exited during start-up; see ", c.log));
    }
    absl::SleepFor(absl::Milliseconds(100));
  }
  kill(-c.pid, SIGKILL);
  return absl::DeadlineExceededError(absl::StrCat("the cluster did not start in 10 minutes; see ", c.log));
}

absl::Status Check(const grpc::Status& s, const char* what) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), absl::StrCat(what, ": ", s.error_message()));
}

absl::StatusOr<v1::ClusterStatus> GetStatus(v1::ClusterService::Stub* stub) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::ClusterStatus st;
  RETURN_IF_ERROR(Check(stub->GetClusterStatus(&ctx, v1::GetClusterStatusRequest(), &st), "GetClusterStatus"));
  return st;
}

// Submits and waits; returns wall seconds from submit to SUCCEEDED.
absl::StatusOr<double> RunJob(v1::JobService::Stub* jobs, const v1::SubmitJobRequest& req, int64_t* generated) {
  const absl::Time t0 = absl::Now();
  v1::SubmitJobResponse sub;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    RETURN_IF_ERROR(Check(jobs->SubmitJob(&ctx, req, &sub), "SubmitJob"));
  }
  while (true) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::GetJobRequest g;
    g.set_job_id(sub.job_id());
    v1::Job job;
    RETURN_IF_ERROR(Check(jobs->GetJob(&ctx, g, &job), "GetJob"));
    if (job.state() == v1::JOB_STATE_SUCCEEDED) {
      *generated = job.generated_tokens();
      return absl::ToDoubleSeconds(absl::Now() - t0);
    }
    if (job.state() == v1::JOB_STATE_FAILED || job.state() == v1::JOB_STATE_CANCELLED) {
      return absl::AbortedError(absl::StrCat("job ", job.job_id(), " ended ", v1::JobState_Name(job.state()), ": ",
                                             job.error()));
    }
    if (absl::Now() - t0 > absl::Minutes(30)) return absl::DeadlineExceededError("job did not finish in 30 minutes");
    absl::SleepFor(absl::Milliseconds(20));
  }
}

// Per stage: the mean over its EP ranks of each kind of time in the window,
// and each rank's expert seconds (their spread is the expert-load imbalance).
struct Row {
  double attention = 0, dense = 0, expert = 0, dispatch = 0, combine = 0, transfer = 0, idle = 0, embed_head = 0,
         control = 0, wall = 0;
  std::vector<double> rank_expert;
};

struct Measured {
  double wall = 0;
  int64_t generated = 0;
  std::vector<Row> rows;
  double tokens_per_s() const { return generated / wall; }
};

// Runs one job between two status snapshots (heartbeats carry the workers' times).
absl::StatusOr<Measured> Measure(v1::JobService::Stub* jobs, v1::ClusterService::Stub* clus,
                                 const v1::SubmitJobRequest& req, int pp, int ep) {
  ASSIGN_OR_RETURN(v1::ClusterStatus before, GetStatus(clus));
  std::fprintf(stderr, "bench serve: measuring %d prompts x %d tokens, %d new tokens each...\n",
               req.sequences_size(), req.sequences(0).tokens_size(), req.sequences(0).max_new_tokens());
  Measured m;
  ASSIGN_OR_RETURN(m.wall, RunJob(jobs, req, &m.generated));
  absl::SleepFor(absl::Milliseconds(1500));
  ASSIGN_OR_RETURN(v1::ClusterStatus after, GetStatus(clus));
  m.rows.assign(pp, Row());
  for (Row& r : m.rows) r.rank_expert.assign(ep, 0.0);
  for (int i = 0; i < after.workers_size(); ++i) {
    const auto& a = after.workers(i).times();
    const auto& b = before.workers(i).times();
    Row& r = m.rows[after.workers(i).stage()];
    r.attention += (a.attention_s() - b.attention_s()) / ep;
    r.dense += (a.dense_s() - b.dense_s()) / ep;
    r.expert += (a.expert_s() - b.expert_s()) / ep;
    r.dispatch += (a.dispatch_s() - b.dispatch_s()) / ep;
    r.combine += (a.combine_s() - b.combine_s()) / ep;
    r.transfer += (a.transfer_s() - b.transfer_s()) / ep;
    r.embed_head += (a.embed_head_s() - b.embed_head_s()) / ep;
    r.control += (a.control_s() - b.control_s()) / ep;
    r.rank_expert[after.workers(i).ep_rank()] = a.expert_s() - b.expert_s();
  }
  // Busy time only accrues during the job (the cluster is idle around it), so
  // each stage's idle share is the job's wall time minus everything else.
  for (Row& r : m.rows) {
    const double busy = r.attention + r.dense + r.expert + r.dispatch + r.combine + r.transfer + r.embed_head +
                        r.control;
    r.wall = m.wall;
    r.idle = std::max(0.0, m.wall - busy);
  }
  return m;
}

double MaxOverMean(const std::vector<double>& v) {
  double mx = 0, sum = 0;
  for (double x : v) {
    mx = std::max(mx, x);
    sum += x;
  }
  return sum > 0 ? mx * static_cast<double>(v.size()) / sum : 1.0;
}

nlohmann::json Json(const Measured& m, const std::string& preset, int pp, int ep, int n, int len, int64_t new_tokens) {
  nlohmann::json j = {{"preset", preset}, {"pp", pp}, {"ep", ep}, {"prompts", n}, {"prompt_len", len},
                      {"max_new_tokens", new_tokens}, {"generated_tokens", m.generated}, {"wall_s", m.wall},
                      {"tokens_per_s", m.tokens_per_s()},
                      {"prompt_tokens_per_s", static_cast<double>(n) * len / m.wall}};
  for (int s = 0; s < pp; ++s) {
    const Row& r = m.rows[s];
    j["stages"].push_back({{"stage", s}, {"attention_s", r.attention}, {"dense_s", r.dense}, {"expert_s", r.expert},
                           {"dispatch_s", r.dispatch}, {"combine_s", r.combine}, {"transfer_s", r.transfer},
                           {"idle_s", r.idle}, {"embed_head_s", r.embed_head}, {"control_s", r.control},
                           {"wall_s", r.wall}, {"rank_expert_s", r.rank_expert},
                           {"expert_max_over_mean", MaxOverMean(r.rank_expert)}});
  }
  return j;
}

void Print(const Measured& m, const std::string& title, const std::string& preset, int pp, int ep, int n, int len,
           int64_t new_tokens) {
  if (absl::GetFlag(FLAGS_json)) {
    std::printf("%s\n", Json(m, preset, pp, ep, n, len, new_tokens).dump().c_str());
    return;
  }
  if (!title.empty()) std::printf("%s\n", title.c_str());
  std::printf("preset %s, PP%d x EP%d, %d prompts x %d tokens, %lld generated tokens in %.2f s: "
              "%.1f generated tokens/s (%.1f prompt tokens/s)\n",
              preset.c_str(), pp, ep, n, len, static_cast<long long>(m.generated), m.wall, m.tokens_per_s(),
              static_cast<double>(n) * len / m.wall);
  std::printf("per stage, mean over its EP ranks: seconds of the job (%% of its wall time); idle = the rest\n");
  std::printf("%-6s %15s %15s %15s %15s %15s %15s %15s %15s %15s   %s\n", "stage", "attention", "dense", "experts",
              "dispatch", "combine", "pp-transfer", "idle", "embed+head", "control", "experts max/mean rank");
  auto cell = [](double v, double w) { return absl::StrFormat("%.2f (%2.0f%%)", v, w > 0 ? 100 * v / w : 0.0); };
  for (int s = 0; s < pp; ++s) {
    const Row& r = m.rows[s];
    std::printf("%-6d %15s %15s %15s %15s %15s %15s %15s %15s %15s   %.2f\n", s, cell(r.attention, r.wall).c_str(),
                cell(r.dense, r.wall).c_str(), cell(r.expert, r.wall).c_str(), cell(r.dispatch, r.wall).c_str(),
                cell(r.combine, r.wall).c_str(), cell(r.transfer, r.wall).c_str(), cell(r.idle, r.wall).c_str(),
                cell(r.embed_head, r.wall).c_str(), cell(r.control, r.wall).c_str(), MaxOverMean(r.rank_expert));
  }
}

int RunServe() {
  const std::string preset = absl::GetFlag(FLAGS_preset);
  const int pp = absl::GetFlag(FLAGS_pp), ep = absl::GetFlag(FLAGS_ep);
  const int n = absl::GetFlag(FLAGS_num_prompts), len = absl::GetFlag(FLAGS_prompt_len);
  const int64_t new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  if (pp < 1 || ep < 1 || n < 1 || len < 1 || new_tokens < 1) {
    return Fail("need --pp, --ep, --num-prompts, --prompt-len and --max-new-tokens >= 1");
  }
  const std::string dir = absl::GetFlag(FLAGS_bench_dir);
  std::filesystem::create_directories(dir);
  std::string ckpt = absl::GetFlag(FLAGS_checkpoint);
  if (ckpt.empty()) {
    const double bias_std = absl::GetFlag(FLAGS_router_bias_std);
    ckpt = absl::StrCat(dir, "/", preset, "-fp8-seed0", bias_std != 0.05 ? absl::StrCat("-bias", bias_std) : "");
    if (!std::filesystem::exists(ckpt + "/config.json")) {
      auto cfg = ModelConfig::Preset(preset);
      if (!cfg.ok()) return Fail(std::string(cfg.status().message()));
      std::fprintf(stderr, "bench serve: generating the %s checkpoint (fp8) in %s (once)...\n", preset.c_str(),
                   ckpt.c_str());
      GenerateOptions o;
      o.out_dir = ckpt;
      o.dtype = "fp8";
      o.shard_size_bytes = 1ull << 30;
      o.router_bias_std = static_cast<float>(bias_std);
      o.progress = [](const std::string& m) { std::fprintf(stderr, "bench serve: %s\n", m.c_str()); };
      absl::Status s = GenerateCheckpoint(*cfg, o);
      if (!s.ok()) return Fail(std::string(s.message()));
    }
  }
  auto cfg = ModelConfig::FromFile(ckpt + "/config.json");
  if (!cfg.ok()) return Fail(std::string(cfg.status().message()));
  std::fprintf(stderr, "bench serve: starting PP%d x EP%d (%d processes) on %s...\n", pp, ep, 1 + pp * ep,
               ckpt.c_str());
  auto cluster = StartCluster(ckpt, pp, ep, absl::GetFlag(FLAGS_redundant_experts), dir);
  if (!cluster.ok()) return Fail(std::string(cluster.status().message()));
  auto channel = rpc::MakeChannel(cluster->address, rpc::ClientSecurity(), grpc::ChannelArguments());
  auto jobs = v1::JobService::NewStub(channel);
  auto clus = v1::ClusterService::NewStub(channel);
  auto finish = [&](int code) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::ShutdownResponse r;
    clus->Shutdown(&ctx, v1::ShutdownRequest(), &r);
    int st = 0;
    for (int i = 0; i < 600 && waitpid(cluster->pid, &st, WNOHANG) == 0; ++i) absl::SleepFor(absl::Milliseconds(100));
    if (waitpid(cluster->pid, &st, WNOHANG) == 0) {
      kill(-cluster->pid, SIGKILL);
      waitpid(cluster->pid, &st, 0);
    }
    return code;
  };
  for (int i = 0;; ++i) {
    auto st = GetStatus(clus.get());
    if (st.ok() && st->serving()) break;
    if (i > 3000) return finish(Fail(absl::StrCat("cluster not serving after 10 minutes; see ", cluster->log)));
    absl::SleepFor(absl::Milliseconds(200));
  }
  std::mt19937 rng(1);
  auto make = [&](int count, int plen, int64_t gen) {
    v1::SubmitJobRequest req;
    for (int i = 0; i < count; ++i) {
      auto* s = req.add_sequences();
      for (int t = 0; t < plen; ++t) s->add_tokens(static_cast<int32_t>(rng() % cfg->vocab_size));
      s->set_max_new_tokens(static_cast<int32_t>(gen));
    }
    return req;
  };
  int64_t generated = 0;
  std::fprintf(stderr, "bench serve: warm-up job...\n");
  auto warm = RunJob(jobs.get(), make(pp * ep, 8, 2), &generated);
  if (!warm.ok()) return finish(Fail(std::string(warm.status().message())));
  absl::SleepFor(absl::Milliseconds(1500));  // heartbeats carry the times
  auto m = Measure(jobs.get(), clus.get(), make(n, len, new_tokens), pp, ep);
  if (!m.ok()) return finish(Fail(std::string(m.status().message())));
  if (!absl::GetFlag(FLAGS_rebalance)) {
    Print(*m, "", preset, pp, ep, n, len, new_tokens);
    return finish(0);
  }
  // Control: a second batch on the same placement (what a second batch gains by itself).
  auto control = Measure(jobs.get(), clus.get(), make(n, len, new_tokens), pp, ep);
  if (!control.ok()) return finish(Fail(std::string(control.status().message())));
  // Rebalance live on the load observed so far, then the same shape again.
  const absl::Time t0 = absl::Now();
  v1::RebalanceExpertsResponse rb;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::RebalanceExpertsRequest req;
    req.set_force(true);
    absl::Status s = Check(clus->RebalanceExperts(&ctx, req, &rb), "RebalanceExperts");
    if (!s.ok()) return finish(Fail(std::string(s.message())));
  }
  if (!rb.started()) return finish(Fail(absl::StrCat("the coordinator did not rebalance: ", rb.reason())));
  while (true) {
    auto st = GetStatus(clus.get());
    if (!st.ok()) return finish(Fail(std::string(st.status().message())));
    if (st->rebalance().placement_version() >= rb.pending_version()) break;
    if (st->rebalance().pending_version() != rb.pending_version()) {
      return finish(Fail(absl::StrCat("the rebalance was dropped: ", st->rebalance().last_error())));
    }
    if (absl::Now() - t0 > absl::Minutes(10)) return finish(Fail("the rebalance did not commit in 10 minutes"));
    absl::SleepFor(absl::Milliseconds(20));
  }
  const double commit_s = absl::ToDoubleSeconds(absl::Now() - t0);
  auto m2 = Measure(jobs.get(), clus.get(), make(n, len, new_tokens), pp, ep);
  if (!m2.ok()) return finish(Fail(std::string(m2.status().message())));
  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json j = {{"before", Json(*m, preset, pp, ep, n, len, new_tokens)},
                        {"control", Json(*control, preset, pp, ep, n, len, new_tokens)},
                        {"after", Json(*m2, preset, pp, ep, n, len, new_tokens)},
                        {"imbalance_before", rb.imbalance_before()}, {"imbalance_after", rb.imbalance_after()},
                        {"rebalance_commit_s", commit_s}, {"experts_to_load", rb.experts_to_load()},
                        {"speedup", m2->tokens_per_s() / m->tokens_per_s()},
                        {"control_ratio", control->tokens_per_s() / m->tokens_per_s()}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    Print(*m, "placement version 1 (built at start)", preset, pp, ep, n, len, new_tokens);
    std::printf("\ncontrol: the same shape again on placement version 1: %.1f generated tokens/s (%.3f x)\n",
                control->tokens_per_s(), control->tokens_per_s() / m->tokens_per_s());
    std::printf("\nrebalance: expert-load imbalance (max/mean EP-rank load, mean over MoE layers) %.3f -> %.3f; "
                "%lld experts to load; committed %.2f s after the request (workers load the experts they gain while "
                "serving, then switch at one step)\n\n",
                rb.imbalance_before(), rb.imbalance_after(), static_cast<long long>(rb.experts_to_load()), commit_s);
    Print(*m2, absl::StrCat("placement version ", rb.pending_version(), " (rebalanced)"), preset, pp, ep, n, len,
          new_tokens);
    std::printf("\nafter / before: %.3f x generated tokens/s (control, no rebalance: %.3f x)\n",
                m2->tokens_per_s() / m->tokens_per_s(), control->tokens_per_s() / m->tokens_per_s());
  }
  return finish(0);
}

}  // namespace

int BenchServe() { return RunServe(); }

}  // namespace expertmesh::launch
