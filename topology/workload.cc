#include "topology/workload.h"

#include <algorithm>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "topology/yaml_reader.h"

namespace expertmesh::topology {

using internal::MapReader;
using internal::ParseYamlDocument;

absl::StatusOr<std::vector<std::vector<double>>> LoadExpertLoadJson(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open expert-load file"));
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  const std::string want =
      "expected {\"layers\": [[count per expert], ...]} (the runtime's load report) or the output of "
      "`expertmesh status --json` (its expert_load)";
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON; ", want));
  if (j.is_object() && !j.contains("layers") && j.contains("expert_load") && j["expert_load"].is_array()) {
    // `expertmesh status --json`: [{"layer": L, "tokens_per_expert": [...]}, ...] in layer order.
    std::vector<std::pair<int64_t, nlohmann::json>> rows;
    for (const auto& l : j["expert_load"]) {
      if (!l.is_object() || !l.contains("tokens_per_expert")) continue;
      nlohmann::json counts = nlohmann::json::array();
      for (const auto& c : l["tokens_per_expert"]) {
        // protobuf's JSON writes int64 as strings
        counts.push_back(c.is_string() ? nlohmann::json(std::stod(c.get<std::string>())) : c);
      }
      rows.push_back({l.value("layer", int64_t{0}), std::move(counts)});
    }
    std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    nlohmann::json layers = nlohmann::json::array();
    for (auto& [layer, counts] : rows) layers.push_back(std::move(counts));
    j = {{"layers", std::move(layers)}};
  }
  if (!j.is_object() || !j.contains("layers") || !j["layers"].is_array() || j["layers"].empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", want));
  }
  std::vector<std::vector<double>> layers;
  for (size_t l = 0; l < j["layers"].size(); ++l) {
    const auto& row = j["layers"][l];
    if (!row.is_array() || row.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": layers[", l, "] must be a non-empty array; ", want));
    }
    std::vector<double> v;
    for (size_t e = 0; e < row.size(); ++e) {
      if (!row[e].is_number() || row[e].get<double>() < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": layers[", l, "][", e, "] must be a non-negative number"));
      }
      v.push_back(row[e].get<double>());
    }
    if (!layers.empty() && v.size() != layers[0].size()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": layers[", l, "] has ", v.size(),
                                                     " experts but layers[0] has ", layers[0].size()));
    }
    layers.push_back(std::move(v));
  }
  return layers;
}

absl::StatusOr<std::vector<std::vector<double>>> LoadDistribution::Loads(int64_t num_moe_layers,
                                                                         int64_t num_experts) const {
  std::vector<std::vector<double>> out;
  if (kind == Kind::kUniform) {
    out.assign(num_moe_layers, std::vector<double>(num_experts, 1.0 / static_cast<double>(num_experts)));
    return out;
  }
  if (kind == Kind::kZipf) {
    std::mt19937_64 rng(seed);
    for (int64_t l = 0; l < num_moe_layers; ++l) {
      std::vector<int64_t> rank(num_experts);
      std::iota(rank.begin(), rank.end(), 0);
      // Fisher-Yates with our own index draw so results do not depend on the
      // standard library's shuffle.
      for (int64_t i = num_experts - 1; i > 0; --i) {
        const int64_t j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
        std::swap(rank[i], rank[j]);
      }
      std::vector<double> w(num_experts);
      double sum = 0;
      for (int64_t e = 0; e < num_experts; ++e) {
        w[e] = 1.0 / std::pow(static_cast<double>(rank[e] + 1), zipf_exponent);
        sum += w[e];
      }
      for (double& v : w) v /= sum;
      out.push_back(std::move(w));
    }
    return out;
  }
  if (file_layers.empty()) return absl::FailedPreconditionError("expert-load file not loaded");
  if (static_cast<int64_t>(file_layers[0].size()) != num_experts) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": has loads for ", file_layers[0].size(),
                                                   " experts but the model has ", num_experts, " routed experts"));
  }
  if (file_layers.size() != 1 && static_cast<int64_t>(file_layers.size()) != num_moe_layers) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": has ", file_layers.size(), " layers; expected 1 or ",
                                                   num_moe_layers, " (the model's MoE layers)"));
  }
  for (int64_t l = 0; l < num_moe_layers; ++l) {
    std::vector<double> w = file_layers[file_layers.size() == 1 ? 0 : l];
    double sum = std::accumulate(w.begin(), w.end(), 0.0);
    if (sum <= 0) return absl::InvalidArgumentError(absl::StrCat(file, ": layer ", l, " has zero total load"));
    for (double& v : w) v /= sum;
    out.push_back(std::move(w));
  }
  return out;
}

std::string LoadDistribution::Describe() const {
  switch (kind) {
    case Kind::kUniform:
      return "uniform";
    case Kind::kZipf:
      return absl::StrFormat("zipf(s=%g, seed=%d)", zipf_exponent, seed);
    case Kind::kFile:
      return absl::StrCat("file(", file, ")");
  }
  return "?";
}

absl::StatusOr<Workload> ParseWorkloadYaml(const std::string& text, const std::string& source,
                                           const std::string& base_dir) {
  ASSIGN_OR_RETURN(const YAML::Node root, ParseYamlDocument(text, source));
  MapReader r(root, "", source);
  RETURN_IF_ERROR(r.CheckIsMap());
  Workload w;
  RETURN_IF_ERROR(r.String("name", true, &w.name));
  RETURN_IF_ERROR(r.String("description", false, &w.description));
  RETURN_IF_ERROR(r.String("phase", false, &w.phase, {"prefill", "decode", "both"}));
  RETURN_IF_ERROR(r.Int("prompt_tokens", true, &w.prompt_tokens, 1));
  RETURN_IF_ERROR(r.Double("cache_hit_rate", false, &w.cache_hit_rate));
  if (w.cache_hit_rate >= 1) return r.Error("`cache_hit_rate` must be in [0, 1)");
  RETURN_IF_ERROR(r.Int("output_tokens", true, &w.output_tokens, 0));
  RETURN_IF_ERROR(r.Int("decode_context_tokens", false, &w.decode_context_tokens, 0));
  RETURN_IF_ERROR(r.Double("daily_input_tokens", false, &w.daily_input_tokens));
  RETURN_IF_ERROR(r.Double("daily_output_tokens", false, &w.daily_output_tokens));
  std::string overlap = "two_micro_batch";
  RETURN_IF_ERROR(r.String("overlap", false, &overlap, {"two_micro_batch", "five_stage", "none"}));
  w.overlap = overlap == "none"         ? Workload::Overlap::kNone
              : overlap == "five_stage" ? Workload::Overlap::kFiveStage
                                        : Workload::Overlap::kTwoMicroBatch;
  RETURN_IF_ERROR(r.String("kv_cache_dtype", false, &w.kv_cache_dtype, {"bf16", "fp8", "fp32"}));

  ASSIGN_OR_RETURN(MapReader slo, r.Child("slo", false));
  RETURN_IF_ERROR(slo.Double("max_ttft_ms", false, &w.max_ttft_ms));
  RETURN_IF_ERROR(slo.Double("max_tpot_ms", false, &w.max_tpot_ms));
  RETURN_IF_ERROR(slo.CheckNoUnknownKeys());

  ASSIGN_OR_RETURN(MapReader load, r.Child("expert_load", false));
  std::string dist = "uniform";
  RETURN_IF_ERROR(load.String("distribution", false, &dist, {"uniform", "zipf", "file"}));
  LoadDistribution& d = w.expert_load;
  int64_t seed = 1;
  RETURN_IF_ERROR(load.Double("zipf_exponent", false, &d.zipf_exponent));
  RETURN_IF_ERROR(load.Int("seed", false, &seed, 0));
  d.seed = static_cast<uint64_t>(seed);
  RETURN_IF_ERROR(load.String("file", dist == "file", &d.file));
  RETURN_IF_ERROR(load.CheckNoUnknownKeys());
  if (dist == "zipf") d.kind = LoadDistribution::Kind::kZipf;
  if (dist == "file") {
    d.kind = LoadDistribution::Kind::kFile;
    std::filesystem::path p(d.file);
    if (p.is_relative() && !base_dir.empty()) p = std::filesystem::path(base_dir) / p;
    d.file = p.string();
    auto layers = LoadExpertLoadJson(d.file);
    if (!layers.ok()) return Annotate(layers.status(), absl::StrCat(source, ": expert_load.file"));
    d.file_layers = *std::move(layers);
  }
  RETURN_IF_ERROR(r.CheckNoUnknownKeys());
  return w;
}

absl::StatusOr<Workload> LoadWorkloadFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat(path, ": cannot open workload file (pass --workload FILE; examples in examples/workloads/)"));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseWorkloadYaml(ss.str(), path, std::filesystem::path(path).parent_path().string());
}

}  // namespace expertmesh::topology
