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

ABSL_FLAG(std::string, dump_logits, "",
          "write the logits after each prompt's last token to this safetensors file (tensor \"logits\", "
          "float32 [num_prompts, vocab_size])");

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
    auto shard = worker::ModelShard::Load(dir, ShardFilter{});
    if (!shard.ok()) return Fail(shard.status());
    worker::Engine engine(shard->get());
    results = worker::GenerateBatch(&engine, reqs, &stats);
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
