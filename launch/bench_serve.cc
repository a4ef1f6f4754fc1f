// expertmesh bench serve: a local cluster under mpirun serving a batch job,
// measured end to end, with a per-stage breakdown of where the time went
// (from the workers' own accounting, reported in heartbeats).
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <netinet/in.h>
#include <sys/socket.h>
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
#include "launch/openai_client.h"
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
ABSL_DECLARE_FLAG(bool, stream);  // launch/flags.cc: submit and bench serve
ABSL_FLAG(int32_t, concurrency, 1, "serve --stream: streams in flight at once");
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
absl::StatusOr<Cluster> StartCluster(const std::string& ckpt, int pp, int ep, int redundant, const std::string& dir,
                                     const std::vector<std::string>& extra = {}) {
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
  args.insert(args.end(), extra.begin(), extra.end());
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

// ---- bench serve --stream: time to first token and inter-token latency over HTTP.

int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return 0;
  sockaddr_in a = {};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  close(fd);
  return port;
}

// One streamed completion as the client saw it.
struct StreamSample {
  double ttft = 0;               // request sent -> first token's chunk
  std::vector<double> gaps;      // between consecutive tokens' chunks
  int64_t chunks = 0;            // chunks that carried a token
  int64_t chunk_tokens = 0;      // tokens in them (token_ids; 1 per text chunk)
  double last = 0;               // request sent -> last token's chunk
  int64_t completion_tokens = 0; // usage
  double wall = 0;
};

double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = static_cast<size_t>(std::ceil(q * static_cast<double>(v.size()))) ;
  return v[std::min(v.size() - 1, i == 0 ? 0 : i - 1)];  // nearest rank
}

absl::StatusOr<StreamSample> StreamOne(const OpenAiClient& client, const nlohmann::json& body) {
  StreamSample s;
  const absl::Time t0 = absl::Now();
  absl::Time last = t0;
  bool first = true;
  absl::Status st = client.Stream("/v1/completions", body, {}, [&](const nlohmann::json& chunk) {
    const absl::Time now = absl::Now();
    if (chunk.contains("usage") && chunk["usage"].is_object()) {
      s.completion_tokens = chunk["usage"].value("completion_tokens", int64_t{0});
    }
    auto choices = chunk.find("choices");
    if (choices == chunk.end() || !choices->is_array() || choices->empty()) return true;
    const nlohmann::json& c = (*choices)[0];
    // A chunk carries a token as text, or (a checkpoint without a tokenizer) as token_ids.
    const bool has_text = (c.contains("text") && c["text"].is_string() && !c["text"].get<std::string>().empty()) ||
                          (c.contains("token_ids") && c["token_ids"].is_array() && !c["token_ids"].empty());
    const bool terminator = c.contains("finish_reason") && !c["finish_reason"].is_null();
    if (!has_text && terminator) return true;  // the closing chunk carries no token
    ++s.chunks;
    s.chunk_tokens += c.contains("token_ids") && c["token_ids"].is_array() ? c["token_ids"].size() : 1;
    s.last = absl::ToDoubleSeconds(now - t0);
    if (first) {
      s.ttft = absl::ToDoubleSeconds(now - t0);
      first = false;
    } else {
      s.gaps.push_back(absl::ToDoubleSeconds(now - last));
    }
    last = now;
    return true;
  });
  if (!st.ok()) return st;
  s.wall = absl::ToDoubleSeconds(absl::Now() - t0);
  return s;
}

int RunStream(const HttpEndpoint& http, v1::ClusterService::Stub* clus, const std::string& preset, int pp, int ep) {
  const int n = absl::GetFlag(FLAGS_num_prompts), len = absl::GetFlag(FLAGS_prompt_len);
  const int64_t new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  const int concurrency = std::max(1, absl::GetFlag(FLAGS_concurrency));
  OpenAiClient client(http, "", 600);
  auto models = client.Get("/v1/models");
  if (!models.ok()) return Fail(std::string(models.status().message()));
  const std::string model = (*models)["data"][0].value("id", "");
  std::mt19937 rng(1);
  auto body = [&](int plen, int64_t gen) {
    std::vector<int> ids;
    for (int t = 0; t < plen; ++t) ids.push_back(static_cast<int>(rng() % 128000));
    return nlohmann::json{{"model", model}, {"prompt", ids}, {"max_tokens", gen}, {"temperature", 0},
                          {"stream", true}, {"stream_options", {{"include_usage", true}}}};
  };
  std::fprintf(stderr, "bench serve --stream: warm-up stream...\n");
  auto warm = StreamOne(client, body(8, 4));
  if (!warm.ok()) return Fail(absl::StrCat("warm-up stream: ", warm.status().message()));
  absl::SleepFor(absl::Milliseconds(1500));  // heartbeats carry the workers' times
  auto before = GetStatus(clus);
  if (!before.ok()) return Fail(std::string(before.status().message()));
  std::vector<nlohmann::json> bodies;
  for (int i = 0; i < n; ++i) bodies.push_back(body(len, new_tokens));
  std::fprintf(stderr, "bench serve --stream: %d streams, %d at a time, %d prompt tokens, %lld new tokens each...\n",
               n, concurrency, len, static_cast<long long>(new_tokens));
  std::vector<StreamSample> samples(n);
  std::atomic<int> next{0};
  std::mutex mu;
  absl::Status error;
  const absl::Time t0 = absl::Now();
  std::vector<std::thread> threads;
  for (int c = 0; c < concurrency; ++c) {
    threads.emplace_back([&] {
      for (int i = next++; i < n; i = next++) {
        auto s = StreamOne(client, bodies[i]);
        std::lock_guard<std::mutex> l(mu);
        if (!s.ok()) {
          if (error.ok()) error = s.status();
          return;
        }
        samples[i] = *s;
      }
    });
  }
  for (auto& t : threads) t.join();
  const double wall = absl::ToDoubleSeconds(absl::Now() - t0);
  if (!error.ok()) return Fail(absl::StrCat("stream: ", error.message()));
  absl::SleepFor(absl::Milliseconds(1500));
  auto after = GetStatus(clus);
  if (!after.ok()) return Fail(std::string(after.status().message()));

  // ttft: to the first token's chunk; itl: between consecutive chunks; tpot: per request, (last chunk - first
  // chunk) / (tokens - 1), the mean time per token after the first however the tokens were grouped in chunks.
  std::vector<double> ttft, itl, tpot;
  int64_t chunks = 0, tokens = 0, chunk_tokens = 0;
  for (const StreamSample& s : samples) {
    ttft.push_back(s.ttft);
    itl.insert(itl.end(), s.gaps.begin(), s.gaps.end());
    if (s.completion_tokens > 1) tpot.push_back((s.last - s.ttft) / static_cast<double>(s.completion_tokens - 1));
    chunks += s.chunks;
    chunk_tokens += s.chunk_tokens;
    tokens += s.completion_tokens;
  }
  // The decode step as the workers account it: per stage, busy seconds (wall - idle) per step, mean over the
  // stage's EP ranks; a token crosses every stage, so the pipeline's step is their sum.
  std::vector<double> busy(pp, 0.0), steps(pp, 0.0);
  for (int i = 0; i < after->workers_size() && i < before->workers_size(); ++i) {
    const auto& a = after->workers(i);
    const auto& b = before->workers(i);
    const double d_busy = (a.times().wall_s() - a.times().idle_s()) - (b.times().wall_s() - b.times().idle_s());
    busy[a.stage()] += d_busy / ep;
    steps[a.stage()] += static_cast<double>(a.steps() - b.steps()) / ep;
  }
  double step_s = 0;
  std::vector<double> stage_step_ms;
  for (int s = 0; s < pp; ++s) {
    const double per = steps[s] > 0 ? busy[s] / steps[s] : 0;
    stage_step_ms.push_back(per * 1e3);
    step_s += per;
  }
  const double itl50 = Percentile(itl, 0.5), itl99 = Percentile(itl, 0.99);
  const double ttft50 = Percentile(ttft, 0.5), ttft99 = Percentile(ttft, 0.99);
  const double tpot50 = Percentile(tpot, 0.5), tpot99 = Percentile(tpot, 0.99);
  const double per_chunk = chunks > 0 ? static_cast<double>(chunk_tokens) / static_cast<double>(chunks) : 0;
  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json j = {{"preset", preset}, {"pp", pp}, {"ep", ep}, {"streams", n}, {"concurrency", concurrency},
                        {"prompt_len", len}, {"max_new_tokens", new_tokens}, {"completion_tokens", tokens},
                        {"token_chunks", chunks}, {"wall_s", wall}, {"tokens_per_s", tokens / wall},
                        {"ttft_p50_ms", ttft50 * 1e3}, {"ttft_p99_ms", ttft99 * 1e3}, {"itl_p50_ms", itl50 * 1e3},
                        {"itl_p99_ms", itl99 * 1e3}, {"tpot_p50_ms", tpot50 * 1e3}, {"tpot_p99_ms", tpot99 * 1e3},
                        {"tokens_per_chunk", per_chunk}, {"stage_step_ms", stage_step_ms},
                        {"pipeline_step_ms", step_s * 1e3},
                        {"itl_p50_over_step", step_s > 0 ? itl50 / step_s : 0.0},
                        {"tpot_p50_over_step", step_s > 0 ? tpot50 / step_s : 0.0}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("preset %s, PP%d x EP%d, %d streams (%d at a time) x %d prompt tokens, %lld completion tokens in "
              "%.2f s (%.1f tokens/s), in %lld chunks (%.2f tokens per chunk)\n",
              preset.c_str(), pp, ep, n, concurrency, len, static_cast<long long>(tokens), wall, tokens / wall,
              static_cast<long long>(chunks), per_chunk);
  std::printf("time to first token: p50 %.1f ms, p99 %.1f ms\n", ttft50 * 1e3, ttft99 * 1e3);
  std::printf("inter-chunk latency: p50 %.2f ms, p99 %.2f ms\n", itl50 * 1e3, itl99 * 1e3);
  std::printf("time per output token after the first (per stream): p50 %.2f ms, p99 %.2f ms\n", tpot50 * 1e3,
              tpot99 * 1e3);
  std::string per_stage;
  for (int s = 0; s < pp; ++s) absl::StrAppend(&per_stage, s ? " + " : "", absl::StrFormat("%.2f", stage_step_ms[s]));
  std::printf("decode step (workers' busy time per step, per stage): %s = %.2f ms; per-token p50 / step = %.2f\n",
              per_stage.c_str(), step_s * 1e3, step_s > 0 ? tpot50 / step_s : 0.0);
  return 0;
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
  const bool stream = absl::GetFlag(FLAGS_stream);
  if (stream && absl::GetFlag(FLAGS_rebalance)) return Fail("--stream and --rebalance are separate benchmarks");
  if (absl::GetFlag(FLAGS_concurrency) < 1) return Fail("--concurrency must be >= 1");
  std::string ckpt = absl::GetFlag(FLAGS_checkpoint);
  if (ckpt.empty()) {
    const double bias_std = absl::GetFlag(FLAGS_router_bias_std);
    auto preset_cfg = ModelConfig::Preset(preset);
    if (!preset_cfg.ok()) return Fail(std::string(preset_cfg.status().message()));
    const char* dtype = preset_cfg->dense_arch() ? "bf16" : "fp8";  // dense architectures have no fp8 layout
    ckpt = absl::StrCat(dir, "/", preset, stream ? "-v129280" : "", "-", dtype, "-seed0",
                        bias_std != 0.05 ? absl::StrCat("-bias", bias_std) : "");
    if (!std::filesystem::exists(ckpt + "/config.json")) {
      ModelConfig* cfg = &*preset_cfg;
      // --stream: the preset with DeepSeek-V3's vocabulary (its lm_head), but no tokenizer: prompts and
      // streamed completions are token ids, so each token is counted where it arrives (text may hold back part
      // of a character, and random weights also pick the 465 ids past the tokenizer's 128815, without text).
      if (stream) cfg->vocab_size = std::max<int64_t>(cfg->vocab_size, 129280);
      std::fprintf(stderr, "bench serve: generating the %s checkpoint (%s) in %s (once)...\n", preset.c_str(), dtype,
                   ckpt.c_str());
      GenerateOptions o;
      o.out_dir = ckpt;
      o.dtype = dtype;
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
  HttpEndpoint http{"127.0.0.1", stream ? FreePort() : 0};
  std::vector<std::string> extra;
  if (stream) extra = {"--http-listen", absl::StrCat("127.0.0.1:", http.port)};
  auto cluster = StartCluster(ckpt, pp, ep, absl::GetFlag(FLAGS_redundant_experts), dir, extra);
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
  if (stream) return finish(RunStream(http, clus.get(), preset, pp, ep));
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
