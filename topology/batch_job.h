// Prediction of one batch job served end to end, the way `expertmesh bench
// serve` runs and measures it: N prompts of L tokens submitted at once, each
// generating M tokens, on a cluster of pp stages x ep lanes (continuous
// batching; docs/PLANNER.md, "Local calibration").
//
// The runtime's schedule, as modelled here: the coordinator spreads the
// prompts evenly over the stage-0 EP ranks (lanes): ceil(N / ep) per lane;
// each micro-batch takes at most ceil(live / pp) of a lane's sequences, so pp
// micro-batches are in flight. A sequence's prefill (all L prompt tokens in
// one step, first token sampled on the last stage) passes through the pp
// stages once; each of the M - 1 further tokens is one more pass, and with pp
// micro-batches in flight a pass takes pp stage steps of the slowest stage.
//
//   wall = pp x prefill_stage_step + (M - 1) x pp x decode_stage_step + job_overhead
//
// where the decode step is evaluated at the mean KV length of the decode
// steps, L + M / 2 (attention cost is linear in it), and the stage steps come
// from Simulate (so the same cost model, core sharing and all-to-all model).
//
//   BatchJob job{.prompts = 16, .prompt_len = 64, .max_new_tokens = 32};
//   ASSIGN_OR_RETURN(BatchJobResult r, SimulateBatchJob(cfg, cluster, Workload{}, 1, 2, 2, 0, job));
//   printf("%.1f generated tok/s\n", r.tokens_per_s);
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "common/config.h"
#include "nlohmann/json.hpp"
#include "topology/cluster.h"
#include "topology/simulator.h"
#include "topology/workload.h"

namespace expertmesh::topology {

struct BatchJob {
  int64_t prompts = 0;         // sequences in the job (submitted at once)
  int64_t prompt_len = 0;      // tokens per prompt
  int64_t max_new_tokens = 0;  // tokens generated per sequence (no stop tokens)
};

struct BatchJobOptions {
  // Time of one job outside its forward steps, milliseconds: the idle stage-0
  // ranks pick the job up at their next coordinator sync (they poll every ~5
  // ms while idle), the last tokens reach the coordinator at the next sync,
  // and `bench serve` polls GetJob every 20 ms (10 ms on average). A
  // documented estimate of the control plane's latency, not a fit.
  double job_overhead_ms = 20.0;
  SimOptions sim;
};

struct BatchJobResult {
  BatchJob job;
  int64_t pp = 1, ep = 1;
  int64_t sequences_per_lane = 0;
  int64_t sequences_per_micro_batch = 0;
  SimResult prefill_step;  // one prefill micro-batch per device (sequences_per_micro_batch x prompt_len tokens)
  SimResult decode_step;   // one decode micro-batch per device at KV length prompt_len + max_new_tokens / 2
  double prefill_s = 0;    // pp x prefill stage step
  double decode_s = 0;     // (M - 1) x pp x decode stage step
  double overhead_s = 0;
  double wall_s = 0;
  double generated_tokens = 0;
  double tokens_per_s = 0;         // generated tokens / wall, as `bench serve` reports it
  double prompt_tokens_per_s = 0;  // prompt tokens / wall
  double core_share = 1;           // share of a core per device (node.device.host_cores)
  nlohmann::json ToJson() const;
};

// `workload` supplies the expert-load distribution (and nothing else: the
// request shape is the job's). Prefill and decode run on the same devices.
absl::StatusOr<BatchJobResult> SimulateBatchJob(const ModelConfig& cfg, const Cluster& cluster,
                                                const Workload& workload, int64_t nodes, int64_t pp, int64_t ep,
                                                int64_t redundant_experts, const BatchJob& job,
                                                const BatchJobOptions& options = {});

}  // namespace expertmesh::topology
