// `expertmesh`: one command, many verbs (see verbs.h and `expertmesh --help`).
#include <cstdio>
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "absl/strings/str_cat.h"
#include "expertmesh/build_config.h"
#include "glog/logging.h"
#include "launch/verbs.h"

namespace expertmesh::launch {
namespace {

const Verb kVerbs[] = {
    {"checkpoint", "launch/checkpoint_cmd.cc", "write a random checkpoint in the HF DeepSeek-V3 layout",
     "expertmesh checkpoint --preset tiny|tiny-text|small|deepseek-v3 --dtype fp32|bf16|fp8 --seed S --out DIR "
     "[--shard-size BYTES] [--tokenizer deepseek-v3|r1-distill-qwen|r1-distill-llama|...|DIR] [--gguf FILE]\n"
     "expertmesh checkpoint --checkpoint DIR --gguf FILE\n\nWrites config.json, model-0000i-of-0000n.safetensors "
     "shards and model.safetensors.index.json with random weights; deterministic for a seed. --tokenizer copies "
     "tokenizer.json and tokenizer_config.json next to them (the vocabulary must fit vocab_size: tiny-text has "
     "DeepSeek-V3's 129280, tiny-qwen2-text the Qwen2.5 / r1-distill-qwen one, tiny-llama-text the Llama-3.1 / "
     "r1-distill-llama one). --gguf also writes the checkpoint (or converts an existing one, --checkpoint DIR) as a "
     "GGUF file of llama.cpp's deepseek2 architecture (F32 / BF16 as stored, fp8 dequantised to BF16, a placeholder "
     "vocabulary: drive it with token ids); `bench peer` uses it.",
     CheckpointMain},
    {"generate", "launch/generate_cmd.cc", "run a batch of prompts through the model in one process",
     "expertmesh generate --checkpoint DIR --prompts FILE --max-new-tokens N [--temperature T --top-k K "
     "--top-p P --seed S] [--dump-logits FILE] [--speculative mtp]\n\nPrompts are JSON lines {\"tokens\":[...]}; "
     "prints one JSON line {\"index\":i,\"tokens\":[...]} per prompt (generated ids only), in input order. "
     "--speculative mtp drafts one token per step with the MTP layer and verifies it (same tokens). Weights are memory-mapped and read in the checkpoint's precision; "
     "compute threads: EXPERTMESH_NUM_THREADS (else OPENBLAS_NUM_THREADS, else one per core).",
     GenerateMain},
    {"bench", "launch/bench", "benchmarks: layer, moe-alltoall, serve, control-plane, tokenizer, gemv, peer (each beside its limit, same run)",
     "expertmesh bench layer --preset small --tokens T [--json]\n"
     "mpirun -np E expertmesh bench moe-alltoall --backend mpi|ucx --tokens T --hidden H --topk K [--fp8] [--json]\n"
     "expertmesh bench tokenizer [--tokenizer deepseek-v3|DIR] [--corpus FILE]\n"
     "expertmesh bench serve [--preset small] --pp P --ep E --num-prompts N --prompt-len L --max-new-tokens M "
     "[--redundant-experts R] [--router-bias-std S] [--rebalance | --stream [--concurrency C]] [--json]\n"
     "expertmesh bench control-plane [--cp-workers N --cp-poll-ms MS --cp-jobs J --cp-submitters C --cp-dir DIR] "
     "[--json]\n"
     "expertmesh bench gemv [--preset small] [--min_seconds S] [--json]\n"
     "expertmesh bench peer [--preset small --dtype fp32|bf16|fp8 | --checkpoint DIR] [--threads 2] "
     "[--batch-sizes 1,8] [--prompt-tokens 32] [--new-tokens 64] [--runs 7] [--llama-kv f16|f32] [--json]\n\n"
     "layer: one MoE and one MLA layer on "
     "the CPU kernels, GFLOP/s beside the SGEMM peak and memory bandwidth of the same run. moe-alltoall: "
     "dispatch/combine beside the transport's raw all-to-all-v of the same bytes. tokenizer: encode MB/s on one "
     "thread beside HF tokenizers (node) on the same corpus. serve: a local mpirun cluster "
     "serving a batch job, tokens/s and where each stage's time went; --rebalance: a second batch after a live "
     "expert rebalance, with the imbalance before and after (1 = balanced) and the speed-up; --stream: the same "
     "cluster with --http-listen streams --num-prompts completions over HTTP, --concurrency at a time: time to first "
     "token and inter-token latency p50/p99 beside the decode step time the workers report. control-plane: an "
     "in-process coordinator (journal on) with N simulated workers polling Heartbeat + Sync over gRPC while J jobs "
     "are submitted concurrently; Sync/Heartbeat/SubmitJob latency p50/p99 and submit throughput. gemv: "
     "kernels::Linear on the preset's weight shapes in fp32/bf16/fp8 for 1/8/64/512 tokens, the reference "
     "implementation beside the kernels, weight GB/s beside the read bandwidth and GFLOP/s beside the SGEMM peak. "
     "peer: `expertmesh generate` beside llama.cpp (node-llama-cpp's prebuilt library, "
     "tools/llama_peer.mjs) on the same checkpoint converted to GGUF (checkpoint --gguf), same threads, token-id "
     "prompts, greedy, new tokens; runs alternate; medians of prefill and decode tokens/s, wall time with load, time "
     "to first token and peak RSS, the ratios, and how many greedy tokens agree.",
     BenchMain},
    {"worker", "launch/worker_cmd.cc", "one worker of a standalone cluster (registers with a coordinator)",
     "expertmesh worker --coordinator HOST:PORT [--worker-id N]\n\nRegisters with the coordinator, loads the "
     "layers and experts the plan gives it, joins the UCX data plane and serves until shutdown. Started while "
     "a worker is MISSING, it takes that worker's place; after a lost peer it keeps its shard and rejoins "
     "(--rejoin-timeout-s). SIGTERM: leaves the cluster cleanly.",
     WorkerMain},
    {"launch", "launch/launch_cmd.cc", "the whole cluster under mpirun (rank 0 coordinator, ranks 1..P*E workers)",
     "mpirun -np 1+P*E expertmesh launch --checkpoint DIR --pp P --ep E [--redundant-experts R] "
     "[--layers-per-stage a,b,..] [--listen HOST:PORT] [--journal FILE] [--address-file FILE] "
     "[--http-listen HOST:PORT]\n\nRank 0 serves the coordinator's gRPC API (docs/API.md) and, with "
     "--http-listen, the OpenAI-compatible HTTP API; the workers use MPI as their data plane. Also accepts "
     "`expertmesh coordinator`'s flags (see `expertmesh coordinator --help`). Ends after `expertmesh shutdown`.",
     LaunchMain},
    {"coordinator", "launch/coordinator_cmd.cc", "the coordinator of a standalone cluster (jobs, plan, health)",
     "expertmesh coordinator --checkpoint DIR --pp P --ep E [--redundant-experts R] [--layers-per-stage a,b,..] "
     "--listen HOST:PORT --journal FILE [--metrics-listen HOST:PORT] [--http-listen HOST:PORT "
     "[--served-model-name NAME] [--chat-template NAME] [--reasoning-field reasoning_content|reasoning]]\n\n"
     "Serves JobService, ClusterService and WorkerService (docs/API.md) until `expertmesh shutdown` (or SIGTERM: "
     "stops, workers wait for its successor); jobs in the journal survive a restart; Prometheus metrics on "
     "--metrics-listen; the OpenAI-compatible HTTP API (chat and completions, streamed) on --http-listen.",
     CoordinatorMain},
    {"submit", "launch/client_cmd.cc", "submit a batch of prompts to a coordinator and print the results",
     "expertmesh submit --server HOST:PORT --prompts FILE --max-new-tokens N [--temperature T --top-k K --top-p P "
     "--seed S --stop-token-ids a,b] [--request-id ID] [--detach] [--stream]\n\nPrints one JSON line {\"index\":i,"
     "\"tokens\":[...]} per prompt in input order, like `expertmesh generate`; with --stream, lines "
     "{\"index\":i,\"offset\":o,\"new_tokens\":[...]} as tokens are generated come first.",
     SubmitMain},
    {"status", "launch/client_cmd.cc", "show a coordinator's plan, workers, health and expert load",
     "expertmesh status --server HOST:PORT [--json]", StatusMain},
    {"jobs", "launch/client_cmd.cc", "list a coordinator's most recent jobs",
     "expertmesh jobs --server HOST:PORT [--limit N] [--json]", JobsMain},
    {"cancel", "launch/client_cmd.cc", "cancel a job", "expertmesh cancel --server HOST:PORT --job ID", CancelMain},
    {"shutdown", "launch/client_cmd.cc", "stop a cluster: workers first, then the coordinator",
     "expertmesh shutdown --server HOST:PORT [--wait-s S]", ShutdownMain},
    {"rebalance", "launch/client_cmd.cc", "rebalance the experts over the EP ranks from the observed load, live",
     "expertmesh rebalance --server HOST:PORT [--force] [--wait-s S]\n\nEPLB on the expert load observed since "
     "the last rebalance; the workers load the experts they gain next to the ones in use and every stage switches "
     "at one step, without stopping. Prints {\"outcome\": committed|pending|unchanged, \"reason\", "
     "\"placement_version\", \"imbalance_before\", \"imbalance_after\", \"experts_to_load\"}. Automatic with the coordinator's "
     "--eplb-interval-s.",
     RebalanceMain},
    {"tokenize", "launch/text_cmd.cc", "text <-> token ids with a checkpoint's HF tokenizer; chat rendering",
     "expertmesh tokenize --tokenizer DIR|deepseek-v3|llama3|llama3.1|qwen2.5|qwen3|r1-distill-qwen|r1-distill-llama [--text T] [--add-bos] [--decode] [--jsonl] "
     "[--chat-template deepseek-v3|deepseek-r1|deepseek-r1-distill]\n\nEncodes --text (or all of stdin) and prints {\"tokens\":[...]}; "
     "--decode prints the text of ids (a JSON array or comma-separated). --jsonl: each stdin line is {\"text\": s}, "
     "{\"tokens\": [...]} or {\"messages\": [...], \"add_generation_prompt\": true} (rendered with the chat "
     "template, then encoded). Invalid UTF-8 input is an error. docs/TEXT.md.",
     TokenizeMain},
    {"chat", "launch/chat_cmd.cc", "chat with a served model over its OpenAI-compatible HTTP API, streaming",
     "expertmesh chat --server HOST:PORT [--message TEXT] [--system TEXT] [--max-tokens N] [--temperature T "
     "--top-p P --top-k K --seed S] [--model NAME] [--api-key KEY] [--show-reasoning] [--no-stream]\n\n"
     "POST /v1/chat/completions (stream=true) to a coordinator started with --http-listen HOST:PORT (docs/API.md) "
     "and prints the answer as it arrives. One-shot with --message, or with the message on stdin when stdin is "
     "not a terminal; otherwise an interactive prompt that keeps the conversation (/exit or Ctrl-D ends it, "
     "Ctrl-C stops an answer). Sampling flags are sent only when given (else the server's defaults); --model "
     "defaults to the first of GET /v1/models; $EXPERTMESH_API_KEY is the default --api-key. An HTTP error "
     "prints the server's OpenAI error message and exits 1.",
     ChatMain},
    {"plan", "launch/plan", "capacity planner: predict throughput, latency and memory of a plan",
     "expertmesh plan --model PRESET|config.json --topology FILE [--workload FILE] [...]", PlanMain},
};

const Verb* g_verb = nullptr;

void PrintTopHelp() {
  std::printf("expertmesh %s: serve DeepSeek-V3-architecture MoE models across a cluster\n\n",
              EXPERTMESH_VERSION);
  std::printf("usage: expertmesh <verb> [flags]   (expertmesh <verb> --help for its flags)\n\nverbs:\n");
  for (const Verb& v : kVerbs) std::printf("  %-12s %s\n", v.name, v.summary);
  std::printf("\nflags may be written --max-new-tokens or --max_new_tokens.\n");
  std::printf("\nbuild: CUDA=%d NCCL=%d UCX=%d\n", EXPERTMESH_HAVE_CUDA, EXPERTMESH_HAVE_NCCL,
              EXPERTMESH_HAVE_UCX);
}

}  // namespace

std::vector<char*> ParseVerbFlags(int argc, char** argv) {
  // Idempotent: a verb may hand its arguments to a sub-command that parses again.
  static bool parsed = false;
  static std::vector<char*> positional;
  if (parsed) return positional;
  parsed = true;
  absl::FlagsUsageConfig config;
  const std::string file = g_verb != nullptr ? g_verb->file : "launch/";
  auto filter = [file](absl::string_view path) {
    return absl::StrContains(path, file) || absl::EndsWith(path, "launch/flags.cc");
  };
  config.contains_help_flags = filter;
  config.contains_helpshort_flags = filter;
  config.normalize_filename = [](absl::string_view f) {
    auto pos = f.rfind("launch/");
    return std::string(pos == absl::string_view::npos ? f : f.substr(pos));
  };
  absl::SetFlagsUsageConfig(config);
  if (g_verb != nullptr) absl::SetProgramUsageMessage(g_verb->usage);
  positional = absl::ParseCommandLine(argc, argv);
  return positional;
}

}  // namespace expertmesh::launch

int main(int argc, char** argv) {
  using expertmesh::launch::kVerbs;
  google::InitGoogleLogging(argv[0]);
  FLAGS_logtostderr = true;
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") ||
      !std::strcmp(argv[1], "help")) {
    expertmesh::launch::PrintTopHelp();
    return argc < 2 ? 1 : 0;
  }
  if (!std::strcmp(argv[1], "--version")) {
    std::printf("expertmesh %s\n", EXPERTMESH_VERSION);
    return 0;
  }
  for (const auto& v : kVerbs) {
    if (std::strcmp(argv[1], v.name) == 0) {
      expertmesh::launch::g_verb = &v;
      std::string name = std::string("expertmesh ") + v.name;
      std::vector<char*> args;
      args.push_back(name.data());
      // Accept --max-new-tokens as well as abseil's --max_new_tokens.
      static std::vector<std::string> storage;
      storage.reserve(argc);
      for (int i = 2; i < argc; ++i) {
        std::string a = argv[i];
        if (a.rfind("--", 0) == 0) {
          const size_t end = std::min(a.find('='), a.size());
          for (size_t k = 2; k < end; ++k) {
            if (a[k] == '-') a[k] = '_';
          }
        }
        storage.push_back(std::move(a));
      }
      for (auto& a : storage) args.push_back(a.data());
      return v.main(static_cast<int>(args.size()), args.data());
    }
  }
  std::fprintf(stderr, "expertmesh: unknown verb \"%s\"; run `expertmesh --help` for the list\n", argv[1]);
  return 2;
}
