// expertmesh bench peer: `expertmesh generate` beside llama.cpp (node-llama-cpp's
// prebuilt library, tools/llama_peer.mjs) on the same checkpoint converted to GGUF,
// same threads, same token-id prompts, greedy, same number of new tokens; runs
// alternate between the two; medians.
#include <fcntl.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/checkpoint.h"
#include "common/config.h"
#include "common/gguf.h"
#include "common/status.h"
#include "launch/bench_flags.h"
#include "launch/flags.h"
#include "nlohmann/json.hpp"

#ifndef EXPERTMESH_SOURCE_DIR
#define EXPERTMESH_SOURCE_DIR "."
#endif

extern char** environ;

ABSL_DECLARE_FLAG(std::string, dtype);  // launch/checkpoint_cmd.cc

ABSL_FLAG(int64_t, threads, 2, "peer: threads of both engines (EXPERTMESH_NUM_THREADS / OPENBLAS_NUM_THREADS "
                               "for expertmesh, llama.cpp's n_threads)");
ABSL_FLAG(std::string, batch_sizes, "1,8", "peer: comma-separated numbers of prompts run at once (one sequence each)");
ABSL_FLAG(int64_t, prompt_tokens, 32, "peer: tokens per prompt (random ids, the same for both engines)");
ABSL_FLAG(int64_t, new_tokens, 64, "peer: new tokens per prompt (greedy; end-of-text does not stop either engine)");
ABSL_FLAG(int64_t, runs, 7, "peer: runs of each engine per batch size (alternating); medians are printed");
ABSL_FLAG(std::string, work_dir, "",
          "peer: where the generated checkpoint, its GGUF and the prompts go (default "
          "/tmp/expertmesh-peer-<preset>-<dtype>; reused when present)");
ABSL_FLAG(std::string, llama_kv, "f16", "peer: llama.cpp's KV cache type, f16 (its default) or f32");
ABSL_FLAG(std::string, node, "node", "peer: the node binary that runs tools/llama_peer.mjs");

namespace expertmesh::launch {

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct ProcResult {
  int exit_code = -1;
  double wall_s = 0;
  int64_t max_rss_bytes = 0;  // the child's peak resident set (wait4's ru_maxrss)
  std::string out, err;
};

std::string ReadAll(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Runs argv with `env` added to ours; stdout / stderr go to files under dir.
absl::StatusOr<ProcResult> Run(const std::vector<std::string>& args, const std::map<std::string, std::string>& env,
                               const std::string& dir) {
  std::vector<std::string> envs;
  for (char** e = environ; *e; ++e) {
    const std::string kv = *e;
    const std::string key = kv.substr(0, kv.find('='));
    if (!env.count(key)) envs.push_back(kv);
  }
  for (const auto& [k, v] : env) envs.push_back(k + "=" + v);
  std::vector<char*> argv, envp;
  std::vector<std::string> a = args;
  for (auto& s : a) argv.push_back(s.data());
  argv.push_back(nullptr);
  for (auto& s : envs) envp.push_back(s.data());
  envp.push_back(nullptr);
  const std::string out = dir + "/proc.out", err = dir + "/proc.err";
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid;
  const double t0 = Now();
  const int rc = posix_spawnp(&pid, argv[0], &fa, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) return absl::UnavailableError(absl::StrCat("cannot start ", args[0], ": ", std::strerror(rc)));
  int status = 0;
  struct rusage ru;
  std::memset(&ru, 0, sizeof(ru));
  if (wait4(pid, &status, 0, &ru) != pid) return absl::InternalError(absl::StrCat("wait4: ", std::strerror(errno)));
  ProcResult r;
  r.wall_s = Now() - t0;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.max_rss_bytes = static_cast<int64_t>(ru.ru_maxrss) * 1024;
  r.out = ReadAll(out);
  r.err = ReadAll(err);
  return r;
}

struct Sample {
  double prefill_tok_s = 0, decode_tok_s = 0, wall_s = 0, ttft_s = 0, load_s = 0;
  int64_t rss = 0;
  std::vector<std::vector<int32_t>> tokens;
};

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string Tail(const std::string& s) { return s.size() > 2000 ? s.substr(s.size() - 2000) : s; }

// expertmesh generate: its stdout (one JSON line per prompt) and its stderr summary
// "generate: N prompts, P prompt tokens in X s; G new tokens in S decode steps, D s".
absl::StatusOr<Sample> RunExpertmesh(const std::string& self, const std::string& ckpt, const std::string& prompts,
                                     int64_t B, const std::string& dir) {
  const std::string th = std::to_string(absl::GetFlag(FLAGS_threads));
  ASSIGN_OR_RETURN(ProcResult r,
                   Run({self, "generate", "--checkpoint", ckpt, "--prompts", prompts, "--max-new-tokens",
                        std::to_string(absl::GetFlag(FLAGS_new_tokens)), "--temperature", "0"},
                       {{"EXPERTMESH_NUM_THREADS", th}, {"OPENBLAS_NUM_THREADS", th}, {"OMP_NUM_THREADS", th}}, dir));
  if (r.exit_code != 0) {
    return absl::InternalError(absl::StrCat("expertmesh generate exited ", r.exit_code, ":\n", Tail(r.err)));
  }
  std::smatch m;
  static const std::regex re(
      R"(generate: (\d+) prompts, (\d+) prompt tokens in ([0-9.]+) s; (\d+) new tokens in (\d+) decode steps, ([0-9.]+) s)");
  if (!std::regex_search(r.err, m, re)) {
    return absl::InternalError(absl::StrCat("expertmesh generate printed no timing line:\n", Tail(r.err)));
  }
  Sample s;
  const double prefill = std::stod(m[3]), decode = std::stod(m[6]);
  const int64_t ptoks = std::stoll(m[2]);
  int64_t gen = 0;
  for (const auto& line : absl::StrSplit(r.out, '\n', absl::SkipWhitespace())) {
    auto j = nlohmann::json::parse(std::string(line), nullptr, false);
    if (j.is_discarded() || !j.contains("tokens")) continue;
    s.tokens.push_back(j["tokens"].get<std::vector<int32_t>>());
    gen += static_cast<int64_t>(s.tokens.back().size());
  }
  if (static_cast<int64_t>(s.tokens.size()) != B) {
    return absl::InternalError(absl::StrCat("expertmesh generate printed ", s.tokens.size(), " results for ", B,
                                            " prompts"));
  }
  s.prefill_tok_s = prefill > 0 ? ptoks / prefill : 0;
  s.decode_tok_s = decode > 0 ? (gen - B) / decode : 0;  // each sequence's first token comes from the prefill
  s.wall_s = r.wall_s;
  s.ttft_s = r.wall_s - decode;  // start to the first tokens (includes the process's exit, ~ms)
  s.load_s = r.wall_s - prefill - decode;
  s.rss = r.max_rss_bytes;
  return s;
}

absl::StatusOr<Sample> RunLlama(const std::string& script, const std::string& gguf, const std::string& prompts,
                                const std::string& dir, bool* skipped) {
  ASSIGN_OR_RETURN(ProcResult r,
                   Run({absl::GetFlag(FLAGS_node), script, "--model", gguf, "--prompts", prompts, "--threads",
                        std::to_string(absl::GetFlag(FLAGS_threads)), "--new-tokens",
                        std::to_string(absl::GetFlag(FLAGS_new_tokens)), "--kv", absl::GetFlag(FLAGS_llama_kv)},
                       {}, dir));
  if (r.exit_code == 3) {
    *skipped = true;
    return absl::UnavailableError(Tail(r.err));
  }
  if (r.exit_code != 0) return absl::InternalError(absl::StrCat("llama_peer.mjs exited ", r.exit_code, ":\n", Tail(r.err)));
  auto j = nlohmann::json::parse(r.out, nullptr, false);
  if (j.is_discarded()) return absl::InternalError(absl::StrCat("llama_peer.mjs printed no JSON:\n", Tail(r.out)));
  Sample s;
  s.prefill_tok_s = j.value("prefill_tok_s", 0.0);
  s.decode_tok_s = j.value("decode_tok_s", 0.0);
  s.wall_s = r.wall_s;
  s.ttft_s = j.value("ttft_s", 0.0);
  s.load_s = j.value("load_s", 0.0);
  s.rss = r.max_rss_bytes;
  s.tokens = j["tokens"].get<std::vector<std::vector<int32_t>>>();
  return s;
}

}  // namespace

int BenchPeer() {
  auto fail = [](const std::string& m, int code = 1) {
    std::fprintf(stderr, "expertmesh bench peer: %s\n", m.c_str());
    return code;
  };
  std::vector<int64_t> batches;
  for (const auto& b : absl::StrSplit(absl::GetFlag(FLAGS_batch_sizes), ',', absl::SkipWhitespace())) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(b, &v) || v <= 0) return fail(absl::StrCat("--batch-sizes: \"", b, "\" is not a count > 0"), 2);
    batches.push_back(v);
  }
  const int64_t runs = absl::GetFlag(FLAGS_runs), T = absl::GetFlag(FLAGS_prompt_tokens),
                N = absl::GetFlag(FLAGS_new_tokens), threads = absl::GetFlag(FLAGS_threads);
  if (batches.empty() || runs <= 0 || T <= 0 || N <= 0 || threads <= 0) {
    return fail("--batch-sizes, --runs, --prompt-tokens, --new-tokens and --threads must be > 0", 2);
  }
  const std::string kv = absl::GetFlag(FLAGS_llama_kv);
  if (kv != "f16" && kv != "f32") return fail("--llama-kv must be f16 or f32", 2);
  namespace fs = std::filesystem;
  std::string ckpt = absl::GetFlag(FLAGS_checkpoint);
  const std::string preset = absl::GetFlag(FLAGS_preset), dtype = absl::GetFlag(FLAGS_dtype);
  std::string work = absl::GetFlag(FLAGS_work_dir);
  if (work.empty()) {
    work = ckpt.empty() ? absl::StrCat("/tmp/expertmesh-peer-", preset, "-", dtype)
                        : absl::StrCat("/tmp/expertmesh-peer-", fs::path(ckpt).filename().string());
  }
  std::error_code ec;
  fs::create_directories(work, ec);
  if (ec) return fail(absl::StrCat(work, ": ", ec.message()));
  if (ckpt.empty()) {
    ckpt = work + "/ckpt";
    if (!fs::exists(ckpt + "/model.safetensors.index.json")) {
      auto cfg = ModelConfig::FromPresetOrPath(preset);
      if (!cfg.ok()) return fail(std::string(cfg.status().message()), 2);
      GenerateOptions o;
      o.out_dir = ckpt;
      o.dtype = dtype;
      o.seed = absl::GetFlag(FLAGS_seed);
      o.progress = [](const std::string& m) { std::fprintf(stderr, "bench peer: checkpoint: %s\n", m.c_str()); };
      absl::Status s = GenerateCheckpoint(*cfg, o);
      if (!s.ok()) return fail(std::string(s.message()));
    }
  }
  auto cfg = ModelConfig::FromFile(ckpt + "/config.json");
  if (!cfg.ok()) return fail(std::string(cfg.status().message()), 2);
  const std::string gguf = work + "/model.gguf";
  if (!fs::exists(gguf) || fs::last_write_time(gguf) < fs::last_write_time(ckpt + "/config.json")) {
    GgufConvertOptions go;
    go.progress = [](const std::string& m) { std::fprintf(stderr, "bench peer: gguf: %s\n", m.c_str()); };
    absl::Status s = ConvertCheckpointToGguf(ckpt, gguf, go);
    if (!s.ok()) return fail(std::string(s.message()));
  }
  char self[4096] = {0};
  if (readlink("/proc/self/exe", self, sizeof(self) - 1) <= 0) return fail("cannot find my own binary");
  const std::string script = std::string(EXPERTMESH_SOURCE_DIR) + "/tools/llama_peer.mjs";

  nlohmann::json results = nlohmann::json::array();
  for (int64_t B : batches) {
    // B prompts of T random token ids (the same for both engines and every run).
    std::mt19937_64 rng(absl::GetFlag(FLAGS_seed) * 1000003 + B);
    std::uniform_int_distribution<int64_t> id(3, cfg->vocab_size - 1);
    const std::string prompts = absl::StrCat(work, "/prompts-", B, "x", T, ".jsonl");
    {
      std::ofstream f(prompts);
      for (int64_t i = 0; i < B; ++i) {
        nlohmann::json toks = nlohmann::json::array();
        for (int64_t t = 0; t < T; ++t) toks.push_back(id(rng));
        f << nlohmann::json{{"tokens", toks}}.dump() << "\n";
      }
    }
    std::vector<Sample> em, ll;
    for (int64_t r = 0; r < runs; ++r) {
      std::fprintf(stderr, "bench peer: batch %lld, run %lld/%lld\n", static_cast<long long>(B),
                   static_cast<long long>(r + 1), static_cast<long long>(runs));
      // Alternate which engine goes first, so that neither always runs on a warmer page cache.
      for (int k = 0; k < 2; ++k) {
        const bool em_turn = (k == 0) == (r % 2 == 0);
        if (em_turn) {
          auto s = RunExpertmesh(self, ckpt, prompts, B, work);
          if (!s.ok()) return fail(std::string(s.status().message()));
          em.push_back(*s);
        } else {
          bool skipped = false;
          auto s = RunLlama(script, gguf, prompts, work, &skipped);
          if (skipped) {
            std::fprintf(stderr, "SKIP: %s\n", std::string(s.status().message()).c_str());
            return 77;
          }
          if (!s.ok()) return fail(std::string(s.status().message()));
          ll.push_back(*s);
        }
      }
    }
    // Greedy tokens of the first run: how many leading tokens agree, per sequence.
    int64_t agree_min = N, agree_sum = 0;
    for (int64_t i = 0; i < B; ++i) {
      const auto& a = em[0].tokens[i];
      const auto& b = ll[0].tokens[i];
      int64_t k = 0;
      while (k < static_cast<int64_t>(std::min(a.size(), b.size())) && a[k] == b[k]) ++k;
      agree_min = std::min(agree_min, k);
      agree_sum += k;
    }
    auto med = [](const std::vector<Sample>& v, double Sample::*f) {
      std::vector<double> x;
      for (const auto& s : v) x.push_back(s.*f);
      return Median(x);
    };
    auto med_rss = [](const std::vector<Sample>& v) {
      std::vector<double> x;
      for (const auto& s : v) x.push_back(static_cast<double>(s.rss));
      return Median(x);
    };
    nlohmann::json row = {{"batch", B},
                          {"prompt_tokens", T},
                          {"new_tokens", N},
                          {"runs", runs},
                          {"tokens_agree_min", agree_min},
                          {"tokens_agree_mean", static_cast<double>(agree_sum) / B}};
    for (const auto& [name, v] : {std::pair<const char*, const std::vector<Sample>*>{"expertmesh", &em},
                                  {"llama_cpp", &ll}}) {
      row[name] = {{"prefill_tok_s", med(*v, &Sample::prefill_tok_s)}, {"decode_tok_s", med(*v, &Sample::decode_tok_s)},
                   {"wall_s", med(*v, &Sample::wall_s)},            {"ttft_s", med(*v, &Sample::ttft_s)},
                   {"load_s", med(*v, &Sample::load_s)},            {"peak_rss_bytes", med_rss(*v)}};
    }
    auto ratio = [&](const char* k) {
      const double d = row["llama_cpp"][k].get<double>();
      return d > 0 ? row["expertmesh"][k].get<double>() / d : 0.0;
    };
    row["ratio"] = {{"prefill_tok_s", ratio("prefill_tok_s")}, {"decode_tok_s", ratio("decode_tok_s")},
                    {"wall_s", ratio("wall_s")},               {"ttft_s", ratio("ttft_s")},
                    {"peak_rss_bytes", ratio("peak_rss_bytes")}};
    results.push_back(row);
  }
  nlohmann::json all = {{"checkpoint", ckpt}, {"gguf", gguf},           {"dtype", dtype}, {"threads", threads},
                        {"llama_kv", kv},     {"results", results}};
  if (absl::GetFlag(FLAGS_json)) {
    std::printf("%s\n", all.dump().c_str());
    return 0;
  }
  std::printf("bench peer: %s (%s), %lld threads each, %lld-token prompts, %lld new tokens greedy, medians of %lld "
              "alternating runs; llama.cpp = node-llama-cpp's prebuilt library, KV cache %s\n",
              ckpt.c_str(), dtype.c_str(), static_cast<long long>(threads), static_cast<long long>(T),
              static_cast<long long>(N), static_cast<long long>(runs), kv.c_str());
  std::printf("%-6s %-11s %12s %12s %9s %9s %10s %13s\n", "batch", "engine", "prefill t/s", "decode t/s", "wall s",
              "ttft s", "load s", "peak RSS MB");
  for (const auto& row : results) {
    for (const char* name : {"expertmesh", "llama_cpp"}) {
      const auto& e = row[name];
      std::printf("%-6lld %-11s %12.1f %12.1f %9.2f %9.2f %10.2f %13.0f\n", row["batch"].get<long long>(),
                  name, e["prefill_tok_s"].get<double>(), e["decode_tok_s"].get<double>(), e["wall_s"].get<double>(),
                  e["ttft_s"].get<double>(), e["load_s"].get<double>(), e["peak_rss_bytes"].get<double>() / 1e6);
    }
    const auto& q = row["ratio"];
    std::printf("%-6lld %-11s %12.2f %12.2f %9.2f %9.2f %10s %13.2f   (expertmesh / llama.cpp)\n",
                row["batch"].get<long long>(), "ratio", q["prefill_tok_s"].get<double>(),
                q["decode_tok_s"].get<double>(), q["wall_s"].get<double>(), q["ttft_s"].get<double>(), "",
                q["peak_rss_bytes"].get<double>());
    std::printf("%-6lld greedy tokens agreeing from the start (run 1): min %lld, mean %.1f of %lld per sequence\n",
                row["batch"].get<long long>(), row["tokens_agree_min"].get<long long>(),
                row["tokens_agree_mean"].get<double>(), static_cast<long long>(N));
  }
  return 0;
}

}  // namespace expertmesh::launch
