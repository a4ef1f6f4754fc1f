// expertmesh generate: runs a batch of prompts through the whole model in one process.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "common/safetensors.h"
#include "launch/flags.h"
#include "launch/prompts.h"
#include "launch/verbs.h"
#include "nlohmann/json.hpp"
#include "worker/cuda_engine.h"
#include "worker/generation.h"
#include "worker/model.h"
#include "worker/mtp.h"

ABSL_FLAG(std::string, dump_logits, "",
          "write the logits after each prompt's last token to this safetensors file (tensor \"logits\", "
          "float32 [num_prompts, vocab_size])");

ABSL_FLAG(std::string, speculative, "",
          "speculative decoding: \"mtp\" drafts one token per step with the checkpoint's multi-token-prediction "
          "layer and verifies it with the main model (CPU engine only; same tokens as without it, greedy or "
          "sampled); prints the acceptance rate on stderr. Empty (default): off");
ABSL_FLAG(std::string, dump_mtp_logits, "",
          "with --speculative mtp: write the MTP module's logits at every prompt position to this safetensors "
          "file (tensor \"mtp_logits.<i>\" float32 [prompt length, vocab_size] for prompt i; row j predicts token "
          "j+2, the last row uses the first generated token)");

namespace expertmesh::launch {

namespace {
int Fail(const absl::Status& s, int code = 1) {
  std::fprintf(stderr, "expertmesh generate: %s\n", std::string(s.message()).c_str());
  return code;
}
}  // namespace

int GenerateMain(int argc, char** argv) {
  ParseVerbFlags(argc, argv);
  const std::string dir = absl::GetFlag(FLAGS_checkpoint), prompts_path = absl::GetFlag(FLAGS_prompts);
  if (dir.empty() || prompts_path.empty()) {
    return Fail(absl::InvalidArgumentError("--checkpoint DIR and --prompts FILE are required (see --help)"), 2);
  }
  kernels::SamplingParams sp;
  sp.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
  sp.top_k = absl::GetFlag(FLAGS_top_k);
  sp.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
  if (!(sp.temperature >= 0)) {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--temperature ", sp.temperature, ": must be >= 0 (0 = greedy)")), 2);
  }
  if (sp.top_k < 0) {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--top-k ", sp.top_k, ": must be >= 0 (0 = no top-k filter)")), 2);
  }
  if (!(sp.top_p > 0 && sp.top_p <= 1)) {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--top-p ", sp.top_p, ": must be in (0, 1] (1 = no top-p filter)")), 2);
  }
  if (absl::GetFlag(FLAGS_max_new_tokens) < 0) {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--max-new-tokens ", absl::GetFlag(FLAGS_max_new_tokens), ": must be >= 0")), 2);
  }
  std::vector<int32_t> stop;
  for (const auto& s : absl::GetFlag(FLAGS_stop_token_ids)) {
    try {
      stop.push_back(std::stoi(s));
    } catch (...) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("--stop_token_ids: \"", s, "\" is not an integer")), 2);
    }
  }
  const std::string speculative = absl::GetFlag(FLAGS_speculative), mtp_dump = absl::GetFlag(FLAGS_dump_mtp_logits);
  if (!speculative.empty() && speculative != "mtp") {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--speculative ", speculative,
                                                        ": unknown method (the one supported is \"mtp\"; "
                                                        "leave it out for plain decoding)")), 2);
  }
  if (!mtp_dump.empty() && speculative.empty()) {
    return Fail(absl::InvalidArgumentError("--dump-mtp-logits needs --speculative mtp (the MTP layer runs only "
                                           "in speculative decoding)"), 2);
  }
  if (!speculative.empty() && absl::GetFlag(FLAGS_device) != "cpu") {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--speculative mtp runs on the CPU engine only; leave out "
                                                        "--device ", absl::GetFlag(FLAGS_device),
                                                        " or --speculative")), 2);
  }
  auto prompts = ReadPrompts(prompts_path);
  if (!prompts.ok()) return Fail(prompts.status());
  if (!std::filesystem::is_directory(dir)) {
    return Fail(absl::NotFoundError(absl::StrCat("--checkpoint ", dir, ": no such folder")));
  }
  auto cfg = ModelConfig::FromFile(dir + "/config.json");
  if (!cfg.ok()) return Fail(cfg.status());
  const int64_t max_new = absl::GetFlag(FLAGS_max_new_tokens);
  std::vector<worker::GenerationRequest> reqs;
  for (size_t i = 0; i < prompts->size(); ++i) {
    absl::Status s = worker::ValidatePrompt(*cfg, (*prompts)[i], max_new, absl::StrCat(prompts_path, ": prompt index ", i));
    if (!s.ok()) return Fail(s);
    worker::GenerationRequest r;
    r.prompt = (*prompts)[i];
    r.max_new_tokens = max_new;
    r.sampling = sp;
    r.sampling.seed = absl::GetFlag(FLAGS_seed) + i;  // one seed per sequence
    r.stop_token_ids = stop;
    reqs.push_back(std::move(r));
  }
  worker::CudaEngineOptions cuda_opts;
  auto use_cuda = DeviceFromFlags(&cuda_opts);
  if (!use_cuda.ok()) return Fail(use_cuda.status(), 2);
  worker::GenerationStats stats;
  worker::SpeculativeStats spec_stats;
  absl::StatusOr<std::vector<worker::GenerationResult>> results;
  std::string device = "cpu";
  if (*use_cuda) {
    auto engine = worker::CudaEngine::Load(dir, ShardFilter{}, cuda_opts);
    if (!engine.ok()) return Fail(engine.status());
    device = (*engine)->Describe();
    results = worker::GenerateBatchCuda(engine->get(), reqs, &stats);
    const auto& es = (*engine)->stats();
    device += absl::StrCat("; ", es.graph_captures, " graphs captured, ", es.graph_replays, " replays, ",
                           es.eager_steps, " eager steps");
  } else {
    auto shard = worker::ModelShard::Load(
        dir, ShardFilter{},
        worker::ProgressLines(dir, [](const std::string& line) { std::fprintf(stderr, "generate: %s\n", line.c_str()); }));
    if (!shard.ok()) return Fail(shard.status());
    worker::Engine engine(shard->get());
    if (speculative.empty()) {
      results = worker::GenerateBatch(&engine, reqs, &stats);
    } else {
      auto mtp = worker::MtpModule::Load(dir);
      if (!mtp.ok()) return Fail(mtp.status());
      results = worker::GenerateBatchSpeculative(&engine, mtp->get(), reqs, &stats, &spec_stats, !mtp_dump.empty());
    }
  }
  if (!results.ok()) return Fail(results.status());
  const std::string dump = absl::GetFlag(FLAGS_dump_logits);
  if (!dump.empty()) {
    SafetensorsWriter w;
    std::vector<float> all;
    for (const auto& r : *results) all.insert(all.end(), r.prefill_logits.begin(), r.prefill_logits.end());
    w.AddF32("logits", {static_cast<int64_t>(results->size()), cfg->vocab_size}, all);
    absl::Status s = w.Write(dump);
    if (!s.ok()) return Fail(s);
  }
  if (!mtp_dump.empty()) {
    SafetensorsWriter w;
    for (size_t i = 0; i < results->size(); ++i) {
      w.AddF32(absl::StrCat("mtp_logits.", i), {static_cast<int64_t>(reqs[i].prompt.size()), cfg->vocab_size},
               (*results)[i].mtp_prompt_logits);
    }
    absl::Status s = w.Write(mtp_dump);
    if (!s.ok()) return Fail(s);
  }
  for (size_t i = 0; i < results->size(); ++i) {
    nlohmann::json j = {{"index", i}, {"tokens", (*results)[i].tokens}};
    std::printf("%s\n", j.dump().c_str());
  }
  std::fflush(stdout);
  std::fprintf(stderr,
               "generate: %zu prompts, %lld prompt tokens in %.3f s; %lld new tokens in %lld decode steps, %.3f s\n",
               results->size(), static_cast<long long>(stats.prompt_tokens), stats.prefill_s,
               static_cast<long long>(stats.generated_tokens), static_cast<long long>(stats.decode_steps),
               stats.decode_s);
  if (!speculative.empty()) {
    std::fprintf(stderr,
                 "generate: speculative mtp: %lld drafts, %lld accepted (acceptance rate %.3f); %.3f tokens per "
                 "sequence per main-model decode step (1 without speculation), %lld main-model decode steps\n",
                 static_cast<long long>(spec_stats.drafts), static_cast<long long>(spec_stats.accepted),
                 spec_stats.acceptance_rate(), spec_stats.tokens_per_step(),
                 static_cast<long long>(stats.decode_steps));
  }
  if (*use_cuda) {
    int64_t decoded = 0;  // tokens made by decode steps (each sequence's first comes from the prefill)
    for (const auto& r : *results) decoded += std::max<int64_t>(0, static_cast<int64_t>(r.tokens.size()) - 1);
    std::fprintf(stderr, "generate: device %s; decode %.1f tokens/s (%.3f ms per step)\n", device.c_str(),
                 stats.decode_s > 0 ? decoded / stats.decode_s : 0.0,
                 stats.decode_steps > 0 ? 1e3 * stats.decode_s / stats.decode_steps : 0.0);
  }
  return 0;
}

}  // namespace expertmesh::launch
