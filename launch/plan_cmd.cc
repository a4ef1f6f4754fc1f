// `expertmesh plan`: the capacity planner. Evaluates one deployment, or
// searches all feasible ones under SLOs (ranked table + Pareto front), sizes a
// fleet for a daily token volume, discovers the local machine, prints the
// validation table against published DeepSeek-V3 figures, calibrates a CPU
// host's topology from `expertmesh bench` results and predicts a `bench
// serve` batch job (--phase job). See docs/PLANNER.md.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/config.h"
#include "common/status.h"
#include "launch/flags.h"
#include "launch/verbs.h"
#include "topology/batch_job.h"
#include "topology/calibration.h"
#include "topology/cluster.h"
#include "topology/discover.h"
#include "topology/search.h"
#include "topology/simulator.h"
#include "topology/svg_plot.h"
#include "topology/validation.h"
#include "topology/workload.h"

ABSL_FLAG(std::string, topology, "", "cluster topology YAML (examples/topologies/)");
ABSL_FLAG(std::string, workload, "", "workload YAML (examples/workloads/); default: 4K prompts, uniform load");
ABSL_FLAG(std::string, phase, "",
          "prefill | decode (default: the workload's phase; `both` searches both) | job: one batch job as `expertmesh "
          "bench serve` runs it and the generated tokens/s it reports: --num-prompts N --prompt-len L (the flags of "
          "`bench serve`, default 32 and 64) --max-new-tokens M on --pp x --ep, or the job of a --measured result "
          "(implies job)");
ABSL_FLAG(int64_t, nodes, 0, "evaluate one plan on this many nodes (with --ep, --pp, ...); 0: search");
// --pp, --ep and --redundant-experts are the shared cluster flags of launch/flags.cc; for `plan`, an
// unset --ep means nodes * devices per node / pp and an unset --redundant-experts the smallest count
// that makes the expert slots divide over the EP ranks.
ABSL_FLAG(double, batch_per_device, 0,
          "prefill: computed prompt tokens per device per step; decode: sequences per device (0: largest that fits)");
ABSL_FLAG(int64_t, context, 0, "prefill: prompt length; decode: KV length (0: from the workload)");
ABSL_FLAG(double, max_tpot_ms, -1, "search: decode latency SLO (-1: the workload's; 0: none)");
ABSL_FLAG(double, max_ttft_ms, -1, "search: prefill latency SLO (-1: the workload's; 0: none)");
ABSL_FLAG(int64_t, max_nodes, 0, "search: largest node count (0: the topology's)");
ABSL_FLAG(int64_t, top, 15, "search: rows of the ranked table");
ABSL_FLAG(double, daily_input_tokens, -1, "fleet sizing: prompt tokens per day (-1: the workload's)");
ABSL_FLAG(double, daily_output_tokens, -1, "fleet sizing: generated tokens per day (-1: the workload's)");
ABSL_FLAG(std::string, csv, "", "write every evaluated plan (search) or the result (one plan) as CSV");
ABSL_FLAG(std::string, plot, "", "write an SVG: throughput vs latency with the Pareto front (search), or the "
                                 "step-time breakdown (one plan)");
ABSL_FLAG(bool, discover, false, "print this machine's topology as YAML (hwloc or /proc, nvidia-smi when present)");
ABSL_FLAG(bool, validate, false, "print predicted vs published DeepSeek-V3 figures with relative errors");
ABSL_FLAG(std::vector<std::string>, calibrate_from, {},
          "bench result files (JSON of `expertmesh bench layer`, `bench moe-alltoall`, `bench serve`, or "
          "examples/planning/local-calibration/bench.json): fit the --topology CPU host's efficiency parameters and "
          "print the calibrated topology YAML (examples/planning/calibrate_local.sh)");
ABSL_FLAG(std::string, measured, "",
          "--phase job: a `bench serve --json` result (or a file wrapping it); predicts that job (preset, pp, ep, "
          "prompts, prompt length, new tokens taken from it unless given) and prints predicted vs measured");

// `bench serve`'s job flags (launch/bench_serve.cc), read by --phase job.
ABSL_DECLARE_FLAG(int32_t, num_prompts);
ABSL_DECLARE_FLAG(int32_t, prompt_len);

namespace expertmesh::launch {
namespace {

using topology::Deployment;
using topology::Phase;
using topology::SimResult;

// Flags given on the command line (this abseil keeps that bit private).
std::vector<std::string> g_given;

bool IsSet(const std::string& name) {
  std::string dashed = name;
  std::replace(dashed.begin(), dashed.end(), '_', '-');
  for (const auto& a : g_given) {
    if (a == name || a == dashed) return true;
  }
  return false;
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "expertmesh plan: %s\n", std::string(s.message()).c_str());
  return 1;
}

absl::StatusOr<topology::Workload> LoadWorkload() {
  const std::string path = absl::GetFlag(FLAGS_workload);
  if (!path.empty()) return topology::LoadWorkloadFile(path);
  topology::Workload w;
  w.name = "default";
  w.description = "4K-token prompts, 1K outputs, uniform expert load";
  return w;
}

std::string Row(const SimResult& r, bool pareto) {
  const auto& d = r.deployment;
  return absl::StrFormat("%5d %3d %4d %4d %7g %10.0f %11.0f %9.1f %7.1f %6.1f  %-24s%s", d.nodes, d.pp, d.ep,
                         d.redundant_experts, d.batch_per_device, r.tokens_per_s_per_device, r.tokens_per_s_per_node,
                         topology::LatencyMs(r), r.memory_gib_per_device, r.expert_imbalance, r.bottleneck,
                         pareto ? "  *" : "");
}

std::string Header(Phase p) {
  return absl::StrFormat("%5s %3s %4s %4s %7s %10s %11s %9s %7s %6s  %-24s%s", "nodes", "pp", "ep", "red",
                         p == Phase::kDecode ? "seqs" : "tokens", "tok/s/dev", "tok/s/node",
                         p == Phase::kDecode ? "TPOT ms" : "TTFT ms", "mem GiB", "imbal", "bottleneck", "  pareto");
}

absl::Status WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  if (!out) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot write (check the folder exists)"));
  out << text;
  return out.good() ? absl::OkStatus() : absl::DataLossError(absl::StrCat(path, ": write failed"));
}

std::string CsvHeader() {
  return "phase,nodes,pp,ep,redundant_experts,batch_per_device,context,tokens_per_s_per_device,"
         "tokens_per_s_per_node,ttft_ms,tpot_ms,memory_gib_per_device,fits,expert_imbalance,bottleneck\n";
}

std::string CsvRow(const SimResult& r) {
  const auto& d = r.deployment;
  return absl::StrFormat("%s,%d,%d,%d,%d,%g,%d,%.1f,%.1f,%.3f,%.3f,%.3f,%d,%.4f,%s\n", topology::PhaseName(d.phase),
                         d.nodes, d.pp, d.ep, d.redundant_experts, d.batch_per_device, d.context,
                         r.tokens_per_s_per_device, r.tokens_per_s_per_node, r.ttft_ms, r.tpot_ms,
                         r.memory_gib_per_device, r.fits ? 1 : 0, r.expert_imbalance, r.bottleneck);
}

absl::StatusOr<Phase> ParsePhase(const std::string& s) {
  if (s == "prefill") return Phase::kPrefill;
  if (s == "decode") return Phase::kDecode;
  return absl::InvalidArgumentError(absl::StrCat("--phase ", s, ": expected prefill or decode"));
}

// One plan: --nodes N [--pp --ep --redundant-experts --batch-per-device --context].
int EvaluateOne(const ModelConfig& cfg, const topology::Cluster& c, const topology::Workload& w, Phase phase) {
  Deployment d;
  d.phase = phase;
  d.nodes = absl::GetFlag(FLAGS_nodes);
  d.pp = absl::GetFlag(FLAGS_pp);
  d.ep = IsSet("ep") ? absl::GetFlag(FLAGS_ep) : 0;
  const int64_t devices = d.nodes == 1 && d.ep > 0 ? d.ep * d.pp : d.nodes * c.devices_per_node();
  if (d.ep <= 0) d.ep = std::max<int64_t>(1, devices / std::max<int64_t>(d.pp, 1));
  d.redundant_experts = IsSet("redundant_experts") ? absl::GetFlag(FLAGS_redundant_experts) : -1;
  if (d.redundant_experts < 0) {
    d.redundant_experts = 0;
    while ((cfg.n_routed_experts + d.redundant_experts) % d.ep != 0) ++d.redundant_experts;
  }
  d.context = absl::GetFlag(FLAGS_context);
  d.batch_per_device = absl::GetFlag(FLAGS_batch_per_device);
  const bool auto_batch = d.batch_per_device <= 0;
  if (auto_batch) d.batch_per_device = 1;
  auto r = topology::Simulate(cfg, c, w, d);
  if (!r.ok()) return Fail(r.status());
  if (auto_batch) {
    // The largest batch that fits (whole sequences / tokens).
    d.batch_per_device = std::max(1.0, std::floor(r->max_batch_per_device));
    r = topology::Simulate(cfg, c, w, d);
    if (!r.ok()) return Fail(r.status());
  }
  if (!absl::GetFlag(FLAGS_csv).empty()) {
    const absl::Status s = WriteFile(absl::GetFlag(FLAGS_csv), CsvHeader() + CsvRow(*r));
    if (!s.ok()) return Fail(s);
  }
  if (!absl::GetFlag(FLAGS_plot).empty()) {
    const absl::Status s = WriteFile(absl::GetFlag(FLAGS_plot), topology::BreakdownSvg(*r, c.name));
    if (!s.ok()) return Fail(s);
  }
  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json j = r->ToJson();
    j["model"] = absl::GetFlag(FLAGS_model);
    j["topology"] = c.name;
    j["workload"] = w.name;
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("plan: %s on %s (%s), workload %s\n", d.ToString().c_str(), c.name.c_str(), c.node.device.kind.c_str(),
              w.name.c_str());
  if (phase == Phase::kDecode) {
    std::printf("  TPOT %.2f ms   %.0f output tok/s per device   %.0f per node\n", r->tpot_ms,
                r->tokens_per_s_per_device, r->tokens_per_s_per_node);
  } else {
    std::printf("  TTFT %.1f ms   %.0f input tok/s per device (%.0f computed)   %.0f per node\n", r->ttft_ms,
                r->tokens_per_s_per_device, r->computed_tokens_per_s_per_device, r->tokens_per_s_per_node);
  }
  std::printf("  memory %.1f of %.1f GiB per device (weights %.1f, KV %.1f, activations %.1f, comm %.1f, reserved "
              "%.1f)%s; largest batch %.0f\n",
              r->memory_gib_per_device, r->hbm_gib, r->memory.weights / 1073741824.0,
              r->memory.kv_cache / 1073741824.0, r->memory.activations / 1073741824.0,
              r->memory.comm_buffers / 1073741824.0, r->memory.reserved / 1073741824.0,
              r->fits ? "" : "  DOES NOT FIT", r->max_batch_per_device);
  if (r->idle_devices_per_node > 0) {
    std::printf("  uses %lld of the node's %lld devices (%lld idle; per-node throughput counts the used ones)\n",
                static_cast<long long>(r->devices_used_per_node), static_cast<long long>(c.devices_per_node()),
                static_cast<long long>(r->idle_devices_per_node));
  }
  if (cfg.num_moe_layers() > 0) {
    std::printf("  expert imbalance %.3f (max/mean rank load after EPLB), dispatch %.0f us, combine %.0f us per layer "
                "and micro-batch\n",
                r->expert_imbalance, r->dispatch_us, r->combine_us);
  } else {
    std::printf("  %s: dense, no experts (the %lld EP ranks of a stage are data-parallel lanes)\n",
                cfg.architecture().c_str(), static_cast<long long>(d.ep));
  }
  std::printf("  bottleneck: %s\n  critical path per step (ms):", r->bottleneck.c_str());
  for (const auto& [k, v] : r->critical_path_ms) std::printf("  %s %.2f", k.c_str(), v);
  std::printf("\n");
  return r->fits ? 0 : 4;
}

// --phase job: one batch job of `expertmesh bench serve`, predicted (and
// compared with a measured result when --measured is given).
int EvaluateJob(const topology::Cluster& c, const topology::Workload& w) {
  nlohmann::json measured;
  if (!absl::GetFlag(FLAGS_measured).empty()) {
    auto found = topology::ReadBenchResults({absl::GetFlag(FLAGS_measured)});
    if (!found.ok()) return Fail(found.status());
    // A file of several runs: the one with the --pp / --ep given (else the first).
    for (const auto& j : *found) {
      if (!j.contains("stages") || !j.contains("tokens_per_s")) continue;
      if (IsSet("pp") && j.value("pp", 0) != absl::GetFlag(FLAGS_pp)) continue;
      if (IsSet("ep") && j.value("ep", 0) != absl::GetFlag(FLAGS_ep)) continue;
      measured = j;
      break;
    }
    if (measured.is_null()) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat(absl::GetFlag(FLAGS_measured), ": no `expertmesh bench serve --json` result in it")));
    }
  }
  auto num = [&](const char* key) { return measured.contains(key) ? measured[key].get<double>() : 0.0; };
  const bool from_file = !measured.is_null();
  std::string model = absl::GetFlag(FLAGS_model);
  if (from_file && !IsSet("model")) model = measured.value("preset", model);
  auto cfg = ModelConfig::FromPresetOrPath(model);
  if (!cfg.ok()) return Fail(cfg.status());
  topology::BatchJob job;
  job.prompts = from_file && !IsSet("num_prompts") ? static_cast<int64_t>(num("prompts"))
                                                    : absl::GetFlag(FLAGS_num_prompts);
  job.prompt_len = from_file && !IsSet("prompt_len") ? static_cast<int64_t>(num("prompt_len"))
                                                      : absl::GetFlag(FLAGS_prompt_len);
  if (from_file && !IsSet("max_new_tokens")) {
    job.max_new_tokens = measured.contains("max_new_tokens")
                             ? static_cast<int64_t>(num("max_new_tokens"))
                             : static_cast<int64_t>(std::llround(num("generated_tokens") / std::max(1.0, num("prompts"))));
  } else {
    job.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  }
  const int64_t pp = from_file && !IsSet("pp") ? static_cast<int64_t>(num("pp")) : absl::GetFlag(FLAGS_pp);
  const int64_t ep = from_file && !IsSet("ep") ? static_cast<int64_t>(num("ep")) : absl::GetFlag(FLAGS_ep);
  int64_t red = IsSet("redundant_experts") ? absl::GetFlag(FLAGS_redundant_experts) : 0;
  while (!IsSet("redundant_experts") && (cfg->n_routed_experts + red) % ep != 0) ++red;
  const int64_t nodes = std::max<int64_t>(1, absl::GetFlag(FLAGS_nodes));
  auto r = topology::SimulateBatchJob(*cfg, c, w, nodes, pp, ep, red, job);
  if (!r.ok()) return Fail(r.status());
  const double err = from_file ? (r->tokens_per_s - num("tokens_per_s")) / num("tokens_per_s") : 0.0;
  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json j = r->ToJson();
    j["phase"] = "job";
    j["model"] = model;
    j["topology"] = c.name;
    // The required keys of every `plan --json`: the job's devices and decode step.
    const double devices = static_cast<double>(pp * ep);
    j["tokens_per_s_per_device"] = r->tokens_per_s / devices;
    j["tokens_per_s_per_node"] = r->tokens_per_s / static_cast<double>(nodes);
    j["bottleneck"] = r->decode_step.bottleneck;
    if (from_file) {
      j["measured"] = {{"tokens_per_s", num("tokens_per_s")}, {"wall_s", num("wall_s")},
                       {"generated_tokens", num("generated_tokens")}};
      j["relative_error"] = err;
    }
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("job: %lld prompts x %lld tokens, %lld new tokens each, on PP%lld x EP%lld (%s, %s; core share %.2f)\n",
              static_cast<long long>(job.prompts), static_cast<long long>(job.prompt_len),
              static_cast<long long>(job.max_new_tokens), static_cast<long long>(pp), static_cast<long long>(ep),
              model.c_str(), c.name.c_str(), r->core_share);
  std::printf("  %lld sequences per lane, %lld per micro-batch\n", static_cast<long long>(r->sequences_per_lane),
              static_cast<long long>(r->sequences_per_micro_batch));
  std::printf("  prefill %.3f s (stage step %.1f ms) + decode %.3f s (%lld x %lld stage steps of %.1f ms) + "
              "overhead %.3f s = %.3f s\n",
              r->prefill_s, r->prefill_step.stage_time_ms, r->decode_s,
              static_cast<long long>(job.max_new_tokens - 1), static_cast<long long>(pp), r->decode_step.stage_time_ms,
              r->overhead_s, r->wall_s);
  std::printf("  predicted: %.1f generated tokens/s (%.1f prompt tokens/s)\n", r->tokens_per_s,
              r->prompt_tokens_per_s);
  if (from_file) {
    std::printf("  measured:  %.1f generated tokens/s in %.3f s   error %+.1f%%\n", num("tokens_per_s"),
                num("wall_s"), 100 * err);
  }
  std::printf("  decode stage step (ms):");
  for (const auto& [k, v] : r->decode_step.breakdown_ms) std::printf("  %s %.2f", k.c_str(), v);
  std::printf("\n");
  return 0;
}

std::string SloText(Phase phase, const topology::SearchOptions& o) {
  const double v = phase == Phase::kDecode ? o.max_tpot_ms : o.max_ttft_ms;
  if (v <= 0) return "none set";
  return absl::StrFormat("%s <= %g ms", phase == Phase::kDecode ? "TPOT" : "TTFT", v);
}

int SearchPhase(const ModelConfig& cfg, const topology::Cluster& c, const topology::Workload& w, Phase phase,
                nlohmann::json* json, std::string* csv, std::vector<SimResult>* best_out,
                std::vector<topology::SearchResult>* all) {
  topology::SearchOptions o;
  o.phase = phase;
  o.max_nodes = absl::GetFlag(FLAGS_max_nodes);
  o.context = absl::GetFlag(FLAGS_context);
  o.max_tpot_ms = absl::GetFlag(FLAGS_max_tpot_ms) >= 0 ? absl::GetFlag(FLAGS_max_tpot_ms) : w.max_tpot_ms;
  o.max_ttft_ms = absl::GetFlag(FLAGS_max_ttft_ms) >= 0 ? absl::GetFlag(FLAGS_max_ttft_ms) : w.max_ttft_ms;
  auto s = topology::SearchPlans(cfg, c, w, o);
  if (!s.ok()) return Fail(s.status());
  for (const auto& r : s->all) *csv += CsvRow(r);
  const std::string name = topology::PhaseName(phase);
  if (json != nullptr) {
    nlohmann::json ranked = nlohmann::json::array(), front = nlohmann::json::array();
    for (size_t i = 0; i < s->ranked.size() && i < static_cast<size_t>(absl::GetFlag(FLAGS_top)); ++i) {
      ranked.push_back(s->ranked[i].ToJson());
    }
    for (const auto& r : s->pareto) front.push_back(r.ToJson());
    (*json)[name] = {{"evaluated", s->evaluated}, {"over_memory", s->over_memory}, {"over_slo", s->over_slo},
                     {"feasible", s->ranked.size()}, {"ranked", ranked}, {"pareto", front},
                     {"slo", {{"max_ttft_ms", o.max_ttft_ms}, {"max_tpot_ms", o.max_tpot_ms}}}};
    if (!s->ranked.empty()) (*json)[name]["best"] = s->ranked[0].ToJson();
  } else {
    std::printf("\n%s on %s: %lld plans evaluated, %lld over memory, %lld over the SLO (%s), %zu feasible\n",
                name.c_str(), c.name.c_str(), static_cast<long long>(s->evaluated),
                static_cast<long long>(s->over_memory), static_cast<long long>(s->over_slo),
                SloText(phase, o).c_str(),
                s->ranked.size());
    std::printf("%s\n", Header(phase).c_str());
    for (size_t i = 0; i < s->ranked.size() && i < static_cast<size_t>(absl::GetFlag(FLAGS_top)); ++i) {
      bool on_front = false;
      for (const auto& p : s->pareto) {
        on_front |= p.deployment.ToString() == s->ranked[i].deployment.ToString();
      }
      std::printf("%s\n", Row(s->ranked[i], on_front).c_str());
    }
    std::printf("Pareto front (latency vs tokens/s per device):\n");
    for (const auto& p : s->pareto) std::printf("%s\n", Row(p, true).c_str());
  }
  if (!s->ranked.empty()) best_out->push_back(s->ranked[0]);
  all->push_back(*std::move(s));
  return 0;
}

int Search(const ModelConfig& cfg, const topology::Cluster& c, const topology::Workload& w,
           const std::string& phase_flag) {
  std::vector<Phase> phases;
  if (phase_flag == "both") {
    phases = {Phase::kPrefill, Phase::kDecode};
  } else {
    auto p = ParsePhase(phase_flag);
    if (!p.ok()) return Fail(p.status());
    phases = {*p};
  }
  const bool json = absl::GetFlag(FLAGS_json);
  nlohmann::json j = {{"model", absl::GetFlag(FLAGS_model)}, {"topology", c.name}, {"workload", w.name}};
  std::string csv = CsvHeader();
  std::vector<SimResult> best;
  std::vector<topology::SearchResult> all;
  for (Phase p : phases) {
    const int rc = SearchPhase(cfg, c, w, p, json ? &j : nullptr, &csv, &best, &all);
    if (rc != 0) return rc;
  }
  const SimResult* bp = nullptr;
  const SimResult* bd = nullptr;
  for (const auto& r : best) (r.deployment.phase == Phase::kPrefill ? bp : bd) = &r;
  const double din = absl::GetFlag(FLAGS_daily_input_tokens) >= 0 ? absl::GetFlag(FLAGS_daily_input_tokens)
                                                                   : w.daily_input_tokens;
  const double dout = absl::GetFlag(FLAGS_daily_output_tokens) >= 0 ? absl::GetFlag(FLAGS_daily_output_tokens)
                                                                     : w.daily_output_tokens;
  if (din > 0 || dout > 0) {
    const topology::Fleet f = topology::SizeFleet(din, dout, bp, bd);
    if (json) {
      j["fleet"] = {{"input_tokens_per_s", f.input_tokens_per_s}, {"output_tokens_per_s", f.output_tokens_per_s},
                    {"prefill_nodes", f.prefill_nodes},           {"decode_nodes", f.decode_nodes},
                    {"total_nodes", f.total_nodes},               {"prefill_units", f.prefill_units},
                    {"decode_units", f.decode_units},             {"total_nodes_whole_units", f.total_nodes_whole_units}};
    } else {
      std::printf("\nfleet for %.3g input + %.3g output tokens/day: %.1f prefill + %.1f decode = %.1f busy nodes on "
                  "average (%lld nodes in whole units of the best plans)\n",
                  din, dout, f.prefill_nodes, f.decode_nodes, f.total_nodes,
                  static_cast<long long>(f.total_nodes_whole_units));
    }
  }
  if (json) {
    // The required top-level keys describe the best plan of the (last) phase searched.
    const SimResult* top = bd != nullptr ? bd : bp;
    if (top != nullptr) {
      const nlohmann::json tj = top->ToJson();
      for (const char* k : {"tokens_per_s_per_node", "tokens_per_s_per_device", "ttft_ms", "tpot_ms",
                            "memory_gib_per_device", "bottleneck", "plan"}) {
        if (tj.contains(k)) j[k] = tj[k];
      }
    } else {
      j["bottleneck"] = "no feasible plan";
    }
    std::printf("%s\n", j.dump(2).c_str());
  }
  if (!absl::GetFlag(FLAGS_csv).empty()) {
    const absl::Status s = WriteFile(absl::GetFlag(FLAGS_csv), csv);
    if (!s.ok()) return Fail(s);
  }
  if (!absl::GetFlag(FLAGS_plot).empty()) {
    const absl::Status s = WriteFile(absl::GetFlag(FLAGS_plot), topology::ParetoSvg(all, c.name, w.name));
    if (!s.ok()) return Fail(s);
  }
  return best.empty() ? 5 : 0;
}

}  // namespace

int PlanMain(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) continue;
    a = a.substr(2, a.find('=') == std::string::npos ? std::string::npos : a.find('=') - 2);
    g_given.push_back(a);
  }
  ParseVerbFlags(argc, argv);
  if (absl::GetFlag(FLAGS_discover)) {
    auto c = topology::DiscoverLocalMachine();
    if (!c.ok()) return Fail(c.status());
    std::printf("%s", topology::ClusterToYaml(*c).c_str());
    return 0;
  }
  if (absl::GetFlag(FLAGS_validate)) {
    auto rows = topology::RunValidation(topology::ValidationOptions{});
    if (!rows.ok()) return Fail(rows.status());
    if (absl::GetFlag(FLAGS_json)) {
      std::printf("%s\n", topology::ValidationJson(*rows).dump(2).c_str());
    } else {
      std::printf("%s", topology::ValidationMarkdown(*rows).c_str());
    }
    return topology::ValidationWithinBounds(*rows) ? 0 : 6;
  }
  if (!absl::GetFlag(FLAGS_calibrate_from).empty()) {
    if (absl::GetFlag(FLAGS_topology).empty()) {
      return Fail(absl::InvalidArgumentError(
          "--calibrate-from needs --topology BASE.yaml: the CPU host to calibrate (e.g. "
          "examples/topologies/cpu-2core.yaml)"));
    }
    auto base = topology::LoadClusterFile(absl::GetFlag(FLAGS_topology));
    if (!base.ok()) return Fail(base.status());
    auto benches = topology::ReadBenchResults(absl::GetFlag(FLAGS_calibrate_from));
    if (!benches.ok()) return Fail(benches.status());
    auto cal = topology::CalibrateCpuHost(*base, *benches);
    if (!cal.ok()) return Fail(cal.status());
    std::printf("%s", cal->Yaml().c_str());
    return 0;
  }
  if (absl::GetFlag(FLAGS_topology).empty()) {
    return Fail(absl::InvalidArgumentError(
        "--topology FILE is required (examples/topologies/*.yaml, or write one with `expertmesh plan --discover`)"));
  }
  auto cfg = ModelConfig::FromPresetOrPath(absl::GetFlag(FLAGS_model));
  if (!cfg.ok()) return Fail(cfg.status());
  auto cluster = topology::LoadClusterFile(absl::GetFlag(FLAGS_topology));
  if (!cluster.ok()) return Fail(cluster.status());
  auto w = LoadWorkload();
  if (!w.ok()) return Fail(w.status());
  std::string phase = absl::GetFlag(FLAGS_phase);
  if (phase == "job" || (phase.empty() && !absl::GetFlag(FLAGS_measured).empty())) {
    return EvaluateJob(*cluster, *w);
  }
  if (phase.empty()) phase = w->phase;
  if (absl::GetFlag(FLAGS_nodes) > 0) {
    if (phase == "both") phase = "decode";
    auto p = ParsePhase(phase);
    if (!p.ok()) return Fail(p.status());
    return EvaluateOne(*cfg, *cluster, *w, *p);
  }
  return Search(*cfg, *cluster, *w, phase);
}

}  // namespace expertmesh::launch
