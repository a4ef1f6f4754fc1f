// Step-time simulation of a deployment: the runtime's Plan (pipeline stages x
// EP ranks, from BuildPlan, with EPLB expert placement) on a Cluster, serving
// a Workload. For each layer of the slowest stage it times the operations of
// cost_model.h for one micro-batch, the dispatch/combine all-to-all on the
// two-level fabric (routing sampled with group-limited top-k over the expert
// load distribution, replicas chosen as the runtime does), and composes them
// with the two-micro-batch overlap schedule; adds embedding/head, pipeline
// transfers and host overhead; and sizes memory per device.
//
//   Deployment d{.phase = Phase::kDecode, .nodes = 16, .ep = 128, .batch_per_device = 128, .context = 4096};
//   ASSIGN_OR_RETURN(SimResult r, Simulate(cfg, cluster, workload, d));
//   printf("%.0f tok/s/node, TPOT %.1f ms\n", r.tokens_per_s_per_node, r.tpot_ms);
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/config.h"
#include "nlohmann/json.hpp"
#include "topology/cluster.h"
#include "topology/cost_model.h"
#include "topology/plan.h"
#include "topology/workload.h"

namespace expertmesh::topology {

enum class Phase { kPrefill, kDecode };
const char* PhaseName(Phase p);

// One candidate deployment of one phase (prefill and decode are disaggregated).
struct Deployment {
  Phase phase = Phase::kDecode;
  int64_t nodes = 1;
  int64_t pp = 1;                 // pipeline stages
  int64_t ep = 1;                 // EP ranks per stage = data-parallel attention ranks
  int64_t redundant_experts = 0;  // extra expert slots per MoE layer (EPLB replicas)
  // Prefill: computed prompt tokens per device per step. Decode: sequences per
  // device in one pipeline group (with pp > 1 each device holds pp groups).
  double batch_per_device = 0;
  int64_t context = 0;            // prefill: prompt length; decode: KV length; 0: from the workload

  int64_t devices() const { return pp * ep; }
  std::string ToString() const;
  nlohmann::json ToJson() const;
};

// pp * ep devices on `nodes` whole nodes (or part of a single node, any EP
// size: the rest of the node is idle); on several nodes a stage's EP ranks
// divide one node or fill whole nodes (an EP group larger than a node is a
// multiple of it); (experts + redundant) divisible by ep. Messages say which
// flag to change.
absl::Status ValidateDeployment(const Deployment& d, const Cluster& c, const ModelConfig& cfg);

struct MemoryBreakdown {
  double weights = 0, kv_cache = 0, activations = 0, comm_buffers = 0, reserved = 0;  // bytes per device
  double Total() const { return weights + kv_cache + activations + comm_buffers + reserved; }
};

// Expected destinations of one token's dispatch (sampled routing).
struct Fanout {
  double remote_nodes = 0;       // distinct other nodes receiving a copy (one NIC transfer each)
  double all_nodes = 0;          // distinct nodes, the source's included
  double nvlink_forwards = 0;    // copies moved over the intra-node fabric after dedup per node
  double distinct_ranks = 0;     // distinct ranks, the source's included
  double copies_remote = 0;      // of the top-k copies: on another node
  double copies_local_other = 0; // of the top-k copies: another rank of the source's node
};

// Expert loads, EPLB placements and dispatch fan-out of one (ep, nodes,
// redundancy) layout; independent of the batch, so a search computes it once.
struct PreparedPlacement {
  std::vector<std::vector<double>> loads;       // per MoE layer, sums to 1
  std::vector<ExpertPlacement> placements;      // per MoE layer
  Fanout fanout;
};

struct SimOptions {
  int64_t fanout_tokens = 2048;  // tokens sampled to estimate all-to-all fan-out
  uint64_t seed = 1;
  const PreparedPlacement* prepared = nullptr;  // reuse (must match the deployment's ep and redundancy)
};

absl::StatusOr<PreparedPlacement> PreparePlacement(const ModelConfig& cfg, const Cluster& cluster,
                                                   const Workload& w, const Deployment& d,
                                                   const SimOptions& options = {});

struct SimResult {
  Deployment deployment;
  Plan plan;                     // the runtime's plan (stages; EPLB placement of the slowest stage)
  double stage_time_ms = 0;      // one step of one stage, overheads included (the slowest stage)
  std::vector<double> stage_times_ms;  // one step of each stage
  double ttft_ms = 0;            // prefill
  double tpot_ms = 0;            // decode
  double tokens_per_s_per_device = 0;  // prefill: prompt tokens incl. cache hits; decode: output tokens
  double tokens_per_s_per_node = 0;   // the deployment's devices on one node (idle ones add nothing)
  int64_t devices_used_per_node = 0;  // devices of a node the deployment runs on
  int64_t idle_devices_per_node = 0;  // the rest of that node (a one-node plan using part of it)
  double computed_tokens_per_s_per_device = 0;  // prefill: excluding cache hits
  MemoryBreakdown memory;
  double memory_gib_per_device = 0;
  double hbm_gib = 0;
  bool fits = true;
  double max_batch_per_device = 0;  // largest batch_per_device that fits in memory
  double expert_imbalance = 1;      // mean over MoE layers of max/mean rank load after EPLB
  Fanout fanout;
  std::string bottleneck;           // resource with the largest share of the critical path
  std::map<std::string, double> critical_path_ms;  // per resource, one step of the slowest stage
  std::map<std::string, double> breakdown_ms;      // per operation group, summed over the stage
  double dispatch_us = 0, combine_us = 0;          // one micro-batch, one MoE layer
  nlohmann::json ToJson() const;
};

absl::StatusOr<SimResult> Simulate(const ModelConfig& cfg, const Cluster& cluster, const Workload& w,
                                   const Deployment& d, const SimOptions& options = {});

// Memory per device of a deployment (no timing).
absl::StatusOr<MemoryBreakdown> DeploymentMemory(const ModelConfig& cfg, const Cluster& cluster, const Workload& w,
                                                 const Deployment& d);

// All-to-all times of one MoE layer for `tokens` per rank: throughput mode
// (prefill; dedup per node, NIC then intra-node forwarding) or low-latency
// mode (decode; one message per (token, expert) copy). The CPU path always
// sends one record per (token, destination rank) (the throughput-mode count on
// one node) with its fp32 payloads. `imbalance` scales the
// receive side of the busiest rank. Bytes per copy: hidden in FP8 + one fp32
// scale per 128 values for dispatch (7,392 B at 7168), BF16 for combine.
struct AllToAllTime {
  double dispatch_s = 0, combine_s = 0;
  Limiter dispatch_limiter = Limiter::kNic, combine_limiter = Limiter::kNic;
};
AllToAllTime AllToAll(const ModelConfig& cfg, const Cluster& cluster, bool low_latency, int64_t ep,
                      double tokens, const Fanout& f, double imbalance);

// Samples group-limited top-k routing (scores = log(load) + Gumbel noise,
// groups ranked by the sum of their top-2 scores) for `tokens` tokens whose
// source ranks cycle over the EP ranks.
Fanout SampleFanout(const ModelConfig& cfg, const ExpertPlacement& p, const std::vector<double>& expert_load,
                    int64_t ranks_per_node, int64_t tokens, uint64_t seed);

// Dispatch bytes per token copy (FP8 + scales) and combine bytes (BF16).
double DispatchBytesPerCopy(const ModelConfig& cfg);
double CombineBytesPerCopy(const ModelConfig& cfg);
// The same for the runtime path of `dev`: the CPU path sends fp32 rows plus
// top_k (slot, weight) entries of 8 B per record (worker/dispatch.cc) and
// combines fp32 partial rows.
double DispatchBytesPerCopy(const ModelConfig& cfg, const DeviceSpec& dev);
double CombineBytesPerCopy(const ModelConfig& cfg, const DeviceSpec& dev);

// The workload as the device's runtime path serves it: the CPU path has no
// compute/communication overlap and keeps an fp32 KV cache, whatever the
// workload file asks for.
Workload WorkloadForPath(const Workload& w, const DeviceSpec& dev);

}  // namespace expertmesh::topology
