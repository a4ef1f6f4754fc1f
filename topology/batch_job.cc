#include "topology/batch_job.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace expertmesh::topology {

namespace {
int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

absl::StatusOr<BatchJobResult> SimulateBatchJob(const ModelConfig& cfg, const Cluster& cluster,
                                                const Workload& workload, int64_t nodes, int64_t pp, int64_t ep,
                                                int64_t redundant_experts, const BatchJob& job,
                                                const BatchJobOptions& options) {
  if (job.prompts < 1 || job.prompt_len < 1 || job.max_new_tokens < 1) {
    return absl::InvalidArgumentError("a batch job needs --num-prompts, --prompt-len and --max-new-tokens >= 1");
  }
  if (pp < 1 || ep < 1) return absl::InvalidArgumentError("--pp and --ep must be >= 1");
  BatchJobResult r;
  r.job = job;
  r.pp = pp;
  r.ep = ep;
  r.sequences_per_lane = CeilDiv(job.prompts, ep);
  r.sequences_per_micro_batch = CeilDiv(r.sequences_per_lane, pp);
  const double mb = static_cast<double>(r.sequences_per_micro_batch);

  Workload w = workload;  // the expert-load distribution; the request shape is the job's
  w.cache_hit_rate = 0;
  w.prompt_tokens = job.prompt_len;
  w.output_tokens = job.max_new_tokens;
  w.decode_context_tokens = 0;

  Deployment d;
  d.nodes = nodes;
  d.pp = pp;
  d.ep = ep;
  d.redundant_experts = redundant_experts;

  Deployment pre = d;
  pre.phase = Phase::kPrefill;
  pre.batch_per_device = mb * static_cast<double>(job.prompt_len);
  pre.context = job.prompt_len;
  ASSIGN_OR_RETURN(r.prefill_step, Simulate(cfg, cluster, w, pre, options.sim));

  Deployment dec = d;
  dec.phase = Phase::kDecode;
  dec.batch_per_device = mb;
  // Decode step j (1..M-1) attends to prompt_len + j cached tokens: the mean is
  // prompt_len + M / 2.
  dec.context = job.prompt_len + std::max<int64_t>(job.max_new_tokens / 2, 1);
  ASSIGN_OR_RETURN(r.decode_step, Simulate(cfg, cluster, w, dec, options.sim));

  const double P = static_cast<double>(pp);
  r.prefill_s = P * r.prefill_step.stage_time_ms * 1e-3;
  r.decode_s = static_cast<double>(job.max_new_tokens - 1) * P * r.decode_step.stage_time_ms * 1e-3;
  r.overhead_s = options.job_overhead_ms * 1e-3;
  r.wall_s = r.prefill_s + r.decode_s + r.overhead_s;
  r.generated_tokens = static_cast<double>(job.prompts * job.max_new_tokens);
  r.tokens_per_s = r.generated_tokens / r.wall_s;
  r.prompt_tokens_per_s = static_cast<double>(job.prompts * job.prompt_len) / r.wall_s;
  r.core_share = cluster.node.device.CoreShare(nodes == 1 ? pp * ep : cluster.devices_per_node());
  return r;
}

nlohmann::json BatchJobResult::ToJson() const {
  nlohmann::json j;
  j["job"] = {{"prompts", job.prompts}, {"prompt_len", job.prompt_len}, {"max_new_tokens", job.max_new_tokens}};
  j["pp"] = pp;
  j["ep"] = ep;
  j["sequences_per_lane"] = sequences_per_lane;
  j["sequences_per_micro_batch"] = sequences_per_micro_batch;
  j["core_share"] = core_share;
  j["wall_s"] = wall_s;
  j["tokens_per_s"] = tokens_per_s;
  j["prompt_tokens_per_s"] = prompt_tokens_per_s;
  j["generated_tokens"] = generated_tokens;
  j["prefill_s"] = prefill_s;
  j["decode_s"] = decode_s;
  j["overhead_s"] = overhead_s;
  j["prefill_stage_ms"] = prefill_step.stage_time_ms;
  j["decode_stage_ms"] = decode_step.stage_time_ms;
  j["tpot_ms"] = decode_step.tpot_ms;
  j["prefill_work_ms"] = prefill_step.breakdown_ms;
  j["decode_work_ms"] = decode_step.breakdown_ms;
  j["decode_critical_path_ms"] = decode_step.critical_path_ms;
  j["memory_gib_per_device"] = std::max(prefill_step.memory_gib_per_device, decode_step.memory_gib_per_device);
  j["fits"] = prefill_step.fits && decode_step.fits;
  return j;
}

}  // namespace expertmesh::topology
