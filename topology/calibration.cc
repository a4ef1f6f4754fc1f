#include "topology/calibration.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/config.h"
#include "common/status.h"
#include "topology/batch_job.h"
#include "topology/cost_model.h"

namespace expertmesh::topology {

namespace {

using nlohmann::json;

bool IsLayer(const json& j) { return j.is_object() && j.contains("moe_layer_s") && j.contains("mla_layer_s"); }
bool IsAllToAll(const json& j) {
  return j.is_object() && j.contains("dispatch_s") && j.contains("combine_s") && j.contains("dispatch_bytes_per_rank");
}
bool IsServe(const json& j) { return j.is_object() && j.contains("tokens_per_s") && j.contains("stages"); }

// `busy`: the wrapper's "busy_processes" (benchmarks run while that many
// other busy processes shared the cores).
void Collect(const json& j, const std::string& command, double busy, std::vector<json>* out) {
  if (IsLayer(j) || IsAllToAll(j) || IsServe(j)) {
    json r = j;
    if (!command.empty()) r["_command"] = command;
    if (busy > 0) r["_busy_processes"] = busy;
    out->push_back(std::move(r));
    return;
  }
  if (j.is_array()) {
    for (const auto& e : j) Collect(e, command, busy, out);
  } else if (j.is_object()) {
    const std::string cmd = j.contains("command") && j["command"].is_string() ? j["command"].get<std::string>()
                                                                              : command;
    const double b = j.contains("busy_processes") && j["busy_processes"].is_number() ? j["busy_processes"].get<double>()
                                                                                     : busy;
    for (const auto& [k, v] : j.items()) {
      if (v.is_object() || v.is_array()) Collect(v, cmd, b, out);
    }
  }
}

double Num(const json& j, const char* key) {
  return j.contains(key) && j[key].is_number() ? j[key].get<double>() : 0.0;
}

// Solves f(x) = target for x in [lo, hi], f monotone; returns the bound when
// the target is out of reach.
double Solve(const std::function<double(double)>& f, double lo, double hi, double target, bool* clamped) {
  const double flo = f(lo), fhi = f(hi);
  const bool increasing = fhi > flo;
  auto below = [&](double v) { return increasing ? v < target : v > target; };
  if (below(fhi)) {
    *clamped = true;
    return hi;
  }
  if (!below(flo)) {
    *clamped = true;
    return lo;
  }
  for (int i = 0; i < 100; ++i) {
    const double mid = std::sqrt(lo * hi);  // the parameters span decades: bisect in log space
    (below(f(mid)) ? lo : hi) = mid;
    if (hi / lo < 1 + 1e-9) break;
  }
  return std::sqrt(lo * hi);
}

// The MoE layer `bench layer` times: MoeForwardLocal on T tokens of one rank
// holding every expert (router, routed experts with uniform expected load,
// shared expert, weighted sum).
std::vector<OpCost> MoeLayerOps(const ModelConfig& c, const DeviceSpec& d, double T) {
  const DeviceCostModel dev(d);
  const double E = static_cast<double>(c.n_routed_experts);
  std::vector<double> per(static_cast<size_t>(c.n_routed_experts), T * static_cast<double>(c.num_experts_per_tok) / E);
  std::vector<OpCost> ops = RouterOps(c, dev, T);
  for (const auto& o : RoutedExpertOps(c, dev, per, T)) ops.push_back(o);
  for (const auto& o : SharedExpertOps(c, dev, T)) ops.push_back(o);
  return ops;
}

// The MLA layer `bench layer` times: Engine::Attention on one fresh sequence
// of T tokens (T = 1 takes the runtime's absorbed decode path), without the
// layer's two RMSNorms.
std::vector<OpCost> MlaLayerOps(const ModelConfig& c, const DeviceSpec& d, double T) {
  const DeviceCostModel dev(d);
  const BatchShape b = T <= 1 ? BatchShape{true, 1, 1, 1} : BatchShape{false, T, 1, 0};
  std::vector<OpCost> ops;
  for (const auto& o : AttentionOps(c, dev, b, KvBytesPerTokenLayer(c, "fp32"))) {
    if (o.name != "input_norm" && o.name != "residual_post_norm") ops.push_back(o);
  }
  return ops;
}

double Kernels(const std::vector<OpCost>& ops) {
  double k = 0;
  for (const auto& o : ops) k += o.kernels;
  return k;
}

struct LayerMeasurement {
  std::string preset;
  int64_t tokens = 0;
  double moe_s = 0, mla_s = 0, sgemm_gflops = 0;
  int copies = 0;
  std::vector<double> moe_copy_s, mla_copy_s;  // each concurrent copy's own time
  std::vector<std::string> commands;
};

std::string Fmt(double v) { return absl::StrFormat("%.4g", v); }

}  // namespace

absl::StatusOr<std::vector<json>> ReadBenchResults(const std::vector<std::string>& paths) {
  std::vector<json> out;
  for (const std::string& p : paths) {
    std::ifstream in(p);
    if (!in) return absl::NotFoundError(absl::StrCat(p, ": cannot open bench results"));
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string text = ss.str();
    json whole = json::parse(text, nullptr, /*allow_exceptions=*/false);
    const size_t before = out.size();
    if (!whole.is_discarded()) {
      Collect(whole, "", 0, &out);
    } else {
      // JSON lines (e.g. several `bench layer --json` copies printed by one mpirun).
      int line_no = 0;
      for (absl::string_view line : absl::StrSplit(text, '\n')) {
        ++line_no;
        if (line.find_first_not_of(" \t\r") == absl::string_view::npos) continue;
        json j = json::parse(line, nullptr, false);
        if (j.is_discarded()) {
          return absl::InvalidArgumentError(absl::StrCat(p, ":", line_no, ": neither a JSON document nor JSON lines"));
        }
        Collect(j, "", 0, &out);
      }
    }
    if (out.size() == before) {
      return absl::InvalidArgumentError(absl::StrCat(
          p, ": no bench results found (expected the --json output of `expertmesh bench layer`, `bench moe-alltoall` "
             "or `bench serve`)"));
    }
  }
  return out;
}

absl::StatusOr<Calibration> CalibrateCpuHost(const Cluster& base, const std::vector<json>& benches) {
  if (!base.node.device.cpu_path()) {
    return absl::InvalidArgumentError(absl::StrCat("--calibrate-from fits CPU hosts; topology \"", base.name,
                                                   "\" is not a CPU-path device (node.device.runtime_path: cpu)"));
  }
  Calibration cal;
  cal.cluster = base;
  DeviceSpec& d = cal.cluster.node.device;
  Efficiency& e = d.efficiency;
  // The fitted bandwidth is the streaming rate itself: efficiency 1 against it.
  e.hbm = 1.0;
  e.attention_decode_memory = 1.0;

  // Layer results, averaged per (preset, tokens).
  std::map<std::pair<std::string, int64_t>, LayerMeasurement> layers;
  std::vector<json> a2a, a2a_shared, serve;
  for (const json& j : benches) {
    if (IsLayer(j)) {
      const std::string preset = j.value("preset", std::string("small"));
      const int64_t T = static_cast<int64_t>(Num(j, "tokens"));
      LayerMeasurement& m = layers[{preset, T}];
      m.preset = preset;
      m.tokens = T;
      m.moe_s += Num(j, "moe_layer_s");
      m.mla_s += Num(j, "mla_layer_s");
      m.moe_copy_s.push_back(Num(j, "moe_layer_s"));
      m.mla_copy_s.push_back(Num(j, "mla_layer_s"));
      m.sgemm_gflops += Num(j, "sgemm_peak_gflops");
      ++m.copies;
      if (j.contains("_command")) m.commands.push_back(j["_command"].get<std::string>());
    } else if (IsAllToAll(j)) {
      (j.contains("_busy_processes") ? a2a_shared : a2a).push_back(j);
    } else if (IsServe(j)) {
      serve.push_back(j);
    }
  }
  for (auto& [k, m] : layers) {
    m.moe_s /= m.copies;
    m.mla_s /= m.copies;
    m.sgemm_gflops /= m.copies;
  }
  auto describe = [](const LayerMeasurement& m) {
    return absl::StrCat("bench layer --preset ", m.preset, " --tokens ", m.tokens, " (mean of ", m.copies,
                        m.copies == 1 ? " copy" : " concurrent copies", ")");
  };

  // The main preset: the non-tiny one with the most token counts.
  std::map<std::string, std::vector<int64_t>> by_preset;
  for (const auto& [k, m] : layers) {
    if (m.preset != "tiny") by_preset[m.preset].push_back(m.tokens);
  }
  std::string main_preset;
  for (const auto& [p, ts] : by_preset) {
    if (main_preset.empty() || ts.size() > by_preset[main_preset].size()) main_preset = p;
  }
  if (main_preset.empty() || by_preset[main_preset].size() < 2) {
    return absl::InvalidArgumentError(
        "calibration needs `bench layer` results of one preset (e.g. small) at two token counts: a decode-sized one "
        "(e.g. --tokens 16) for the memory bandwidth and a prefill-sized one (e.g. --tokens 512) for the GEMM "
        "efficiency; examples/planning/calibrate_local.sh runs them");
  }
  ASSIGN_OR_RETURN(const ModelConfig mc, ModelConfig::Preset(main_preset));
  std::vector<int64_t> ts = by_preset[main_preset];
  std::sort(ts.begin(), ts.end());
  // Decode-sized: the smallest count above 1 (T = 1 is the absorbed-attention
  // path and a cache-resident layer); prefill-sized: the largest.
  int64_t t_small = ts.front();
  for (int64_t t : ts) {
    if (t > 1) {
      t_small = t;
      break;
    }
  }
  const int64_t t_big = ts.back();
  if (t_small == t_big) {
    return absl::InvalidArgumentError(absl::StrCat("calibration needs two token counts of preset ", main_preset,
                                                   " above 1; got only ", t_big));
  }
  const LayerMeasurement& ms = layers[{main_preset, t_small}];
  const LayerMeasurement& mb = layers[{main_preset, t_big}];
  auto moe_time = [&](const DeviceSpec& dd, double T) { return SumSeconds(MoeLayerOps(mc, dd, T)); };
  auto mla_time = [&](const DeviceSpec& dd, double T) { return SumSeconds(MlaLayerOps(mc, dd, T)); };

  // 1. Fixed cost per BLAS call, from the tiny preset at one token (weights in
  // cache: no memory term).
  const auto tiny = layers.find({"tiny", 1});
  if (tiny != layers.end()) {
    ASSIGN_OR_RETURN(const ModelConfig tc, ModelConfig::Preset("tiny"));
    DeviceSpec cached = d;
    cached.hbm_gbytes_per_s = 1e9;  // cache-resident: memory time ~0
    cached.efficiency.kernel_overhead_us = 0;
    const auto moe = MoeLayerOps(tc, cached, 1), mla = MlaLayerOps(tc, cached, 1);
    const double t0 = SumSeconds(moe) + SumSeconds(mla), calls = Kernels(moe) + Kernels(mla);
    const double measured = tiny->second.moe_s + tiny->second.mla_s;
    e.kernel_overhead_us = std::max(0.05, (measured - t0) / calls * 1e6);
    cal.parameters.push_back(
        {"node.device.efficiency.kernel_overhead_us", e.kernel_overhead_us,
         absl::StrCat(describe(tiny->second), ": MoE + MLA layer ", Fmt((measured) * 1e6), " us over ",
                      Fmt(calls), " BLAS calls and loops of the cost model (weights cache-resident)")});
  }

  // 2 + 3. Streaming bandwidth and SGEMM efficiency, solved together.
  bool clamp_b = false, clamp_g = false;
  for (int it = 0; it < 40; ++it) {
    clamp_b = clamp_g = false;
    d.hbm_gbytes_per_s = Solve(
        [&](double bw) {
          DeviceSpec x = d;
          x.hbm_gbytes_per_s = bw;
          return moe_time(x, static_cast<double>(t_small));
        },
        0.01, 1e4, ms.moe_s, &clamp_b);
    e.gemm_fp32 = Solve(
        [&](double g) {
          DeviceSpec x = d;
          x.efficiency.gemm_fp32 = g;
          return moe_time(x, static_cast<double>(t_big));
        },
        1e-4, 1.0, mb.moe_s, &clamp_g);
  }
  cal.parameters.push_back(
      {"node.device.hbm_gbytes_per_s", d.hbm_gbytes_per_s,
       absl::StrCat(describe(ms), ": MoE layer ", Fmt(ms.moe_s * 1e3), " ms streaming the touched experts' fp32 ",
                    "weights (SGEMM with ~", Fmt(static_cast<double>(t_small * mc.num_experts_per_tok) /
                                                 static_cast<double>(mc.n_routed_experts)),
                    " rows per expert)", clamp_b ? "; CLAMPED: out of the fit's range" : "")});
  const double datasheet = d.tflops_fp32_dense * 1e3;
  cal.parameters.push_back(
      {"node.device.efficiency.gemm_fp32", e.gemm_fp32,
       absl::StrCat(describe(mb), ": MoE layer ", Fmt(mb.moe_s * 1e3), " ms (", Fmt(mb.sgemm_gflops),
                    " GFLOP/s SGEMM 2048^3 in the same run = ", Fmt(mb.sgemm_gflops / datasheet),
                    " of the datasheet peak ", Fmt(datasheet), " GFLOP/s)", clamp_g ? "; CLAMPED" : "")});

  // 4. Causal prefill attention.
  bool clamp_a = false;
  e.attention_prefill = Solve(
      [&](double a) {
        DeviceSpec x = d;
        x.efficiency.attention_prefill = a;
        return mla_time(x, static_cast<double>(t_big));
      },
      1e-4, 1.0, mb.mla_s, &clamp_a);
  cal.parameters.push_back({"node.device.efficiency.attention_prefill", e.attention_prefill,
                            absl::StrCat(describe(mb), ": MLA layer ", Fmt(mb.mla_s * 1e3), " ms",
                                         clamp_a ? "; CLAMPED" : "")});
  // attention_decode_compute: the absorbed decode path runs the same SGEMMs.
  e.attention_decode_compute = e.gemm_fp32;
  cal.parameters.push_back({"node.device.efficiency.attention_decode_compute", e.attention_decode_compute,
                            "= gemm_fp32 (the CPU decode attention is SGEMMs of one row; its memory side runs at "
                            "hbm_gbytes_per_s: attention_decode_memory = hbm = 1)"});

  // Checks: every other layer measurement of the main preset.
  for (const auto& [k, m] : layers) {
    if (m.preset != main_preset) continue;
    if (m.tokens != t_small && m.tokens != t_big) {
      cal.checks.push_back({absl::StrCat(describe(m), ": MoE layer s"), m.moe_s,
                            moe_time(d, static_cast<double>(m.tokens))});
    }
    if (m.tokens != t_big) {
      cal.checks.push_back({absl::StrCat(describe(m), ": MLA layer s"), m.mla_s,
                            mla_time(d, static_cast<double>(m.tokens))});
    }
  }

  // 4b. Rank skew: concurrent copies of the same layer benchmark are
  // processes doing identical work at the same time on this host, as the EP
  // ranks of a stage do between two all-to-alls; their spread is the spread
  // of a rank's speed. Pooled relative variance over every layer (MoE and
  // MLA) of the main preset's runs (the tiny preset's cache-resident
  // microsecond layers are left out: the serving ranks stream their weights
  // from memory for milliseconds between all-to-alls). Each copy's time is
  // its mean over >= MIN_SECONDS, so this is the persistent part of the
  // spread: a lower bound of the spread over one stretch of compute.
  {
    double sum_rel_var = 0;
    int samples = 0, runs = 0;
    for (const auto& [k, m] : layers) {
      if (m.preset != main_preset || m.copies < 2) continue;
      ++runs;
      for (const std::vector<double>* v : {&m.moe_copy_s, &m.mla_copy_s}) {
        double mean = 0;
        for (double x : *v) mean += x;
        mean /= static_cast<double>(v->size());
        if (mean <= 0) continue;
        double var = 0;
        for (double x : *v) var += (x - mean) * (x - mean);
        var /= static_cast<double>(v->size() - 1);
        sum_rel_var += var / (mean * mean);
        ++samples;
      }
    }
    if (samples > 0) {
      e.rank_speed_cv = std::sqrt(sum_rel_var / samples);
      cal.parameters.push_back(
          {"node.device.efficiency.rank_speed_cv", e.rank_speed_cv,
           absl::StrCat("spread of concurrent copies of bench layer --preset ", main_preset, " (", runs,
                        " runs, MoE and MLA layers: ", samples,
                        " samples): standard deviation of a copy's time over the mean, pooled")});
    }
  }

  // 5. The all-to-all over MPI shared memory: t = 2 x latency + bytes / bandwidth
  // for dispatch + combine.
  if (!a2a.empty()) {
    std::sort(a2a.begin(), a2a.end(), [](const json& a, const json& b) {
      return Num(a, "dispatch_bytes_per_rank") < Num(b, "dispatch_bytes_per_rank");
    });
    // The line goes through the two smallest runs (the most timed steps, the
    // least exposed to a descheduled rank); larger runs are checks.
    const json& lo = a2a[0];
    const json& hi = a2a.size() > 1 ? a2a[1] : a2a[0];
    const double t_lo = Num(lo, "dispatch_s") + Num(lo, "combine_s"), t_hi = Num(hi, "dispatch_s") + Num(hi, "combine_s");
    const double b_lo = Num(lo, "dispatch_bytes_per_rank") + Num(lo, "combine_bytes_per_rank");
    const double b_hi = Num(hi, "dispatch_bytes_per_rank") + Num(hi, "combine_bytes_per_rank");
    FabricSpec& f = cal.cluster.node.intra_node;
    auto name = [](const json& j) {
      return absl::StrCat("bench moe-alltoall --backend ", j.value("backend", std::string("?")), " (",
                          static_cast<int64_t>(Num(j, "ranks")), " ranks, --tokens ",
                          static_cast<int64_t>(Num(j, "tokens")), ", --hidden ", static_cast<int64_t>(Num(j, "hidden")),
                          ")");
    };
    if (a2a.size() >= 2 && b_hi > b_lo && t_hi > t_lo) {
      const double bw = (b_hi - b_lo) / (t_hi - t_lo);
      const double lat = std::max(0.0, (t_lo - b_lo / bw) / 2);
      f.gbytes_per_s_per_direction = bw / 1e9;
      f.latency_us = lat * 1e6;
      f.alltoall_efficiency = 1.0;
      cal.parameters.push_back({"node.intra_node.gbytes_per_s_per_direction", f.gbytes_per_s_per_direction,
                                absl::StrCat("slope of dispatch + combine time over their bytes per rank from ",
                                             name(lo), " to ", name(hi), " (alltoall_efficiency = 1 against it)")});
      cal.parameters.push_back({"node.intra_node.latency_us", f.latency_us,
                                absl::StrCat("half the intercept of that line (one dispatch or one combine): ",
                                             name(lo), " took ", Fmt(t_lo * 1e3), " ms for ", Fmt(b_lo / 1e3),
                                             " kB")});
      for (size_t i = 2; i < a2a.size(); ++i) {
        const json& m = a2a[i];
        const double b = Num(m, "dispatch_bytes_per_rank") + Num(m, "combine_bytes_per_rank");
        cal.checks.push_back({absl::StrCat(name(m), ": dispatch + combine s"),
                              Num(m, "dispatch_s") + Num(m, "combine_s"), 2 * lat + b / bw});
      }
    } else {
      return absl::InvalidArgumentError(
          "calibration needs `bench moe-alltoall` results at two different token counts (e.g. --tokens 16 and 512)");
    }
  }

  // 5b. Shared cores: the same all-to-all while as many busy processes as
  // ranks share the cores. Not a fit: the model does not charge waits for a
  // descheduled peer (busy processes that never block are their worst case;
  // the serving processes block often); reported as a bound.
  if (!a2a_shared.empty()) {
    const json& m = a2a_shared.front();
    const FabricSpec& f = cal.cluster.node.intra_node;
    const double bytes = Num(m, "dispatch_bytes_per_rank") + Num(m, "combine_bytes_per_rank");
    cal.notes.push_back(absl::StrCat(
        "bench moe-alltoall --backend mpi (", static_cast<int64_t>(Num(m, "ranks")), " ranks, --tokens ",
        static_cast<int64_t>(Num(m, "tokens")), ") while ", Num(m, "_busy_processes"),
        " busy processes share the cores: dispatch ", Fmt(Num(m, "dispatch_s") * 1e3), " ms + combine ",
        Fmt(Num(m, "combine_s") * 1e3), " ms (alone: ",
        Fmt((2 * f.latency_us * 1e-6 + bytes / (f.gbytes_per_s_per_direction * 1e9)) * 1e3),
        " ms): the worst case of waiting for a descheduled peer, not charged by the model"));
  }

  // 6. Host work per stage step, from one `bench serve` run (the others are checks).
  if (!serve.empty()) {
    const json& s = serve.front();
    auto mcfg = ModelConfig::Preset(s.value("preset", std::string("tiny")));
    if (!mcfg.ok()) return mcfg.status();
    BatchJob job;
    job.prompts = static_cast<int64_t>(Num(s, "prompts"));
    job.prompt_len = static_cast<int64_t>(Num(s, "prompt_len"));
    job.max_new_tokens = s.contains("max_new_tokens")
                             ? static_cast<int64_t>(Num(s, "max_new_tokens"))
                             : static_cast<int64_t>(std::llround(Num(s, "generated_tokens") / std::max(1.0, Num(s, "prompts"))));
    const int64_t pp = static_cast<int64_t>(Num(s, "pp")), ep = static_cast<int64_t>(Num(s, "ep"));
    absl::Status err;
    auto predict = [&](double step_ms) {
      Cluster c = cal.cluster;
      c.node.device.efficiency.step_overhead_ms = step_ms;
      auto r = SimulateBatchJob(*mcfg, c, Workload{}, 1, pp, ep, 0, job);
      if (!r.ok()) {
        err = r.status();
        return 0.0;
      }
      return r->wall_s;
    };
    bool clamp_s = false;
    const double measured_wall = Num(s, "wall_s");
    predict(0);
    if (!err.ok()) return err;
    e.step_overhead_ms = predict(0) >= measured_wall ? 0.0 : Solve(predict, 1e-3, 1e4, measured_wall, &clamp_s);
    cal.parameters.push_back(
        {"node.device.efficiency.step_overhead_ms", e.step_overhead_ms,
         absl::StrCat("bench serve --preset ", s.value("preset", std::string("?")), " --pp ", pp, " --ep ", ep,
                      " --num-prompts ", job.prompts, " --prompt-len ", job.prompt_len, " --max-new-tokens ",
                      job.max_new_tokens, ": wall ", Fmt(measured_wall), " s matched by the job model",
                      clamp_s ? "; CLAMPED" : "")});
  }
  return cal;
}

std::string Calibration::Yaml() const {
  std::string s;
  absl::StrAppend(&s, "# Calibrated from `expertmesh bench` results on this host by\n",
                  "#   expertmesh plan --topology BASE.yaml --calibrate-from RESULTS.json\n",
                  "# (examples/planning/calibrate_local.sh; docs/PLANNER.md, \"Local calibration\").\n",
                  "# Fitted parameters (every other value comes from the base topology):\n");
  for (const auto& p : parameters) {
    absl::StrAppend(&s, "#   ", p.key, " = ", Fmt(p.value), "\n#       from ", p.source, "\n");
  }
  if (!checks.empty()) {
    absl::StrAppend(&s, "# Checks (measurements no fit used), measured vs predicted:\n");
    for (const auto& c : checks) {
      absl::StrAppend(&s, "#   ", c.what, ": ", Fmt(c.measured), " vs ", Fmt(c.predicted), " (",
                      absl::StrFormat("%+.1f%%", 100 * (c.predicted - c.measured) / c.measured), ")\n");
    }
  }
  if (!notes.empty()) {
    absl::StrAppend(&s, "# Notes (measured, not in the model):\n");
    for (const auto& n : notes) absl::StrAppend(&s, "#   ", n, "\n");
  }
  return s + ClusterToYaml(cluster);
}

}  // namespace expertmesh::topology
