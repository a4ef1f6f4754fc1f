#include "topology/simulator.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "topology/eplb.h"

namespace expertmesh::topology {

const char* PhaseName(Phase p) { return p == Phase::kPrefill ? "prefill" : "decode"; }

std::string Deployment::ToString() const {
  return absl::StrFormat("%s nodes=%d pp=%d ep=%d redundant=%d batch=%g context=%d", PhaseName(phase), nodes, pp, ep,
                         redundant_experts, batch_per_device, context);
}

nlohmann::json Deployment::ToJson() const {
  return {{"phase", PhaseName(phase)}, {"nodes", nodes},
          {"pp", pp},                  {"ep", ep},
          {"redundant_experts", redundant_experts}, {"batch_per_device", batch_per_device},
          {"context", context}};
}

absl::Status ValidateDeployment(const Deployment& d, const Cluster& c, const ModelConfig& cfg) {
  const int64_t gpn = c.devices_per_node();
  if (d.nodes < 1 || d.pp < 1 || d.ep < 1) {
    return absl::InvalidArgumentError("--nodes, --pp and --ep must be >= 1");
  }
  if (d.nodes > c.nodes) {
    return absl::InvalidArgumentError(absl::StrCat("--nodes ", d.nodes, ": the topology \"", c.name, "\" has ",
                                                   c.nodes, " nodes; use fewer or raise `nodes:` in the topology file"));
  }
  if (d.ep > gpn && d.ep % gpn != 0) {
    // Checked before the device count so that the message names the cause.
    return absl::InvalidArgumentError(absl::StrCat(
        "--ep ", d.ep, ": an EP group larger than one node straddles nodes and must fill whole nodes of ", gpn,
        " devices (a node is one fast-fabric domain); choose --ep a multiple of ", gpn, " with pp * ep = nodes * ",
        gpn, ", or --ep <= ", gpn, " inside one node"));
  }
  if (d.nodes == 1 ? d.devices() > gpn : d.devices() != d.nodes * gpn) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--pp ", d.pp, " x --ep ", d.ep, " = ", d.devices(), " devices, but ", d.nodes, " node(s) of ", gpn,
        " devices hold ", d.nodes * gpn, "; choose pp * ep = nodes * ", gpn, " (or at most ", gpn, " on one node)"));
  }
  // On one node any EP size fits (the devices beyond pp * ep stay idle); on
  // several, a stage smaller than a node must divide it, or some stage would
  // straddle two nodes unevenly.
  if (d.nodes > 1 && d.ep < gpn && gpn % d.ep != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--ep ", d.ep, " on ", d.nodes, " nodes: a stage's EP ranks must divide one node of ", gpn,
        " devices evenly when the plan spans nodes (else a stage straddles two nodes); an EP group that uses part "
        "of a node runs with --nodes 1"));
  }
  if (d.redundant_experts < 0) return absl::InvalidArgumentError("--redundant-experts must be >= 0");
  const int64_t slots = cfg.n_routed_experts + d.redundant_experts;
  const bool moe = cfg.num_moe_layers() > 0;  // dense models: EP ranks are data-parallel lanes
  if (moe && slots % d.ep != 0) {
    return absl::InvalidArgumentError(absl::StrCat("--ep ", d.ep, ": ", cfg.n_routed_experts, " experts + ",
                                                   d.redundant_experts, " redundant = ", slots,
                                                   " slots do not divide over the EP ranks; choose "
                                                   "--redundant-experts so that (experts + redundant) % ep == 0"));
  }
  if (d.pp > cfg.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("--pp ", d.pp, ": more stages than layers (", cfg.num_hidden_layers,
                                                   ")"));
  }
  if (moe && d.ep > cfg.n_routed_experts) {
    return absl::InvalidArgumentError(absl::StrCat("--ep ", d.ep, ": more EP ranks than routed experts (",
                                                   cfg.n_routed_experts, "); use pipeline stages (--pp) or fewer nodes"));
  }
  if (!(d.batch_per_device > 0)) {
    return absl::InvalidArgumentError("--batch-per-device must be > 0 (prefill: tokens, decode: sequences)");
  }
  return absl::OkStatus();
}

double DispatchBytesPerCopy(const ModelConfig& cfg) {
  // FP8 values + one fp32 scale per 128 channels: 7168 + 56 * 4 = 7,392 B.
  return static_cast<double>(cfg.hidden_size) + 4.0 * static_cast<double>((cfg.hidden_size + 127) / 128);
}
double CombineBytesPerCopy(const ModelConfig& cfg) { return 2.0 * static_cast<double>(cfg.hidden_size); }

double DispatchBytesPerCopy(const ModelConfig& cfg, const DeviceSpec& dev) {
  if (!dev.cpu_path()) return DispatchBytesPerCopy(cfg);
  return 4.0 * static_cast<double>(cfg.hidden_size) + 8.0 * static_cast<double>(cfg.num_experts_per_tok);
}

double CombineBytesPerCopy(const ModelConfig& cfg, const DeviceSpec& dev) {
  if (!dev.cpu_path()) return CombineBytesPerCopy(cfg);
  return 4.0 * static_cast<double>(cfg.hidden_size);
}

Workload WorkloadForPath(const Workload& w, const DeviceSpec& dev) {
  Workload out = w;
  if (dev.cpu_path()) {
    out.overlap = Workload::Overlap::kNone;
    out.kv_cache_dtype = "fp32";
  }
  return out;
}

namespace {

// splitmix64 stream: deterministic across platforms and standard libraries.
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t Next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double Uniform() { return (static_cast<double>(Next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
  double Gumbel() { return -std::log(-std::log(Uniform())); }

 private:
  uint64_t s_;
};

}  // namespace

Fanout SampleFanout(const ModelConfig& cfg, const ExpertPlacement& p, const std::vector<double>& load,
                    int64_t rpn, int64_t tokens, uint64_t seed) {
  const int64_t E = cfg.n_routed_experts, G = std::max<int64_t>(cfg.n_group, 1);
  const int64_t gsize = E / G, k = cfg.num_experts_per_tok;
  const int64_t topg = std::min<int64_t>(std::max<int64_t>(cfg.topk_group, 1), G);
  const int64_t ep = p.num_ranks();
  Rng rng(seed);
  std::vector<double> score(E), gscore(G);
  std::vector<int64_t> order(E), gorder(G);
  Fanout f;
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t src = t % ep, src_node = src / rpn;
    for (int64_t e = 0; e < E; ++e) score[e] = std::log(load[e] + 1e-12) + rng.Gumbel();
    for (int64_t g = 0; g < G; ++g) {
      double a = -1e300, b = -1e300;  // top-2 scores of the group
      for (int64_t e = g * gsize; e < (g + 1) * gsize; ++e) {
        if (score[e] > a) {
          b = a;
          a = score[e];
        } else if (score[e] > b) {
          b = score[e];
        }
      }
      gscore[g] = gsize >= 2 ? a + b : a;
      gorder[g] = g;
    }
    std::partial_sort(gorder.begin(), gorder.begin() + topg, gorder.end(),
                      [&](int64_t x, int64_t y) { return gscore[x] > gscore[y]; });
    int64_t n = 0;
    for (int64_t i = 0; i < topg; ++i) {
      for (int64_t e = gorder[i] * gsize; e < (gorder[i] + 1) * gsize; ++e) order[n++] = e;
    }
    const int64_t kk = std::min(k, n);
    std::partial_sort(order.begin(), order.begin() + kk, order.begin() + n,
                      [&](int64_t x, int64_t y) { return score[x] > score[y]; });
    std::set<int64_t> nodes, ranks;
    for (int64_t i = 0; i < kk; ++i) {
      const int64_t r = p.ReplicaRank(order[i], t);
      ranks.insert(r);
      nodes.insert(r / rpn);
      if (r / rpn != src_node) {
        f.copies_remote += 1;
      } else if (r != src) {
        f.copies_local_other += 1;
      }
    }
    for (int64_t node : nodes) {
      // The copy arrives at the source itself (own node) or at the rank with the
      // source's local index (rail-aligned NIC transfer), which forwards it to
      // the other ranks of that node that hold its experts.
      const int64_t receiver = node == src_node ? src : node * rpn + src % rpn;
      for (int64_t r : ranks) {
        if (r / rpn == node && r != receiver) f.nvlink_forwards += 1;
      }
      if (node != src_node) f.remote_nodes += 1;
    }
    f.all_nodes += static_cast<double>(nodes.size());
    f.distinct_ranks += static_cast<double>(ranks.size());
  }
  const double inv = 1.0 / static_cast<double>(std::max<int64_t>(tokens, 1));
  f.remote_nodes *= inv;
  f.all_nodes *= inv;
  f.nvlink_forwards *= inv;
  f.distinct_ranks *= inv;
  f.copies_remote *= inv;
  f.copies_local_other *= inv;
  return f;
}

AllToAllTime AllToAll(const ModelConfig& cfg, const Cluster& c, bool low_latency, int64_t ep, double tokens,
                      const Fanout& f, double imbalance) {
  AllToAllTime out;
  if (c.node.device.cpu_path()) low_latency = false;  // one record per (token, destination rank)
  if (ep <= 1 || tokens <= 0) {
    out.dispatch_limiter = out.combine_limiter = Limiter::kNvlink;
    return out;
  }
  const int64_t rpn = std::min(c.devices_per_node(), ep);
  const bool multi_node = ep > rpn;
  const double nvl = c.FabricBytesPerS() * c.node.intra_node.alltoall_efficiency;
  const double nic_eff = low_latency ? c.node.nics.alltoall_efficiency_low_latency
                                     : c.node.nics.alltoall_efficiency_normal;
  const double nic = c.NicBytesPerSPerDevice() * nic_eff;
  // Copies per token over each link. Low-latency kernels send one message per
  // (token, expert); throughput kernels send one NIC copy per destination node
  // and forward inside the node.
  const double nic_copies = multi_node ? (low_latency ? f.copies_remote : f.remote_nodes) : 0.0;
  const double nvl_copies = low_latency ? f.copies_local_other : f.nvlink_forwards;
  const double latency = (c.node.intra_node.latency_us + (multi_node ? c.node.nics.latency_us : 0.0)) * 1e-6;
  auto time = [&](double bytes_per_copy, Limiter* lim) {
    const double t_nic = nic > 0 ? tokens * nic_copies * bytes_per_copy * imbalance / nic : 0.0;
    const double t_nvl = tokens * nvl_copies * bytes_per_copy * imbalance / nvl;
    *lim = t_nic >= t_nvl ? Limiter::kNic : Limiter::kNvlink;
    return std::max(t_nic, t_nvl) + latency;
  };
  out.dispatch_s = time(DispatchBytesPerCopy(cfg, c.node.device), &out.dispatch_limiter);
  out.combine_s = time(CombineBytesPerCopy(cfg, c.node.device), &out.combine_limiter);
  return out;
}

namespace {

struct Shape {
  BatchShape mb;        // one micro-batch on one device
  int64_t micro = 2;    // micro-batches per step
  double prompt = 0;    // prefill: prompt length
  double new_per_seq = 0;
  double logit_tokens = 0;  // per micro-batch
};

Shape MakeShape(const Workload& w, const Deployment& d) {
  Shape s;
  s.micro = w.two_micro_batch_overlap() ? 2 : 1;
  const double T = d.batch_per_device / static_cast<double>(s.micro);
  if (d.phase == Phase::kDecode) {
    const double ctx = static_cast<double>(d.context > 0 ? d.context : w.DecodeContext());
    s.mb = BatchShape{true, T, T, ctx};
    s.logit_tokens = T;
  } else {
    s.prompt = static_cast<double>(d.context > 0 ? d.context : w.prompt_tokens);
    s.new_per_seq = std::max(1.0, s.prompt * (1.0 - w.cache_hit_rate));
    s.mb = BatchShape{false, T, T / s.new_per_seq, s.prompt - s.new_per_seq};
    s.logit_tokens = s.mb.sequences;  // only each prompt's last position needs logits
  }
  return s;
}

double LayersKv(const ModelConfig& cfg, const Workload& w) {
  return static_cast<double>(KvBytesPerTokenLayer(cfg, w.kv_cache_dtype));
}

MemoryBreakdown ComputeMemory(const ModelConfig& cfg, const Cluster& c, const Workload& w, const Deployment& d,
                              const Plan& plan, const ModelWeights& mw, double max_rank_copies) {
  const DeviceSpec& dev = c.node.device;
  const std::string& dt = dev.gemm_dtype;
  const Shape s = MakeShape(w, d);
  const double slots_per_rank = static_cast<double>(cfg.n_routed_experts + d.redundant_experts) / d.ep;
  MemoryBreakdown m;
  double worst = 0;
  int64_t worst_layers = 0;
  for (const auto& st : plan.stages) {
    double b = 0;
    for (int64_t l = st.layer_begin; l < st.layer_end; ++l) {
      b += mw.attention.Bytes(dt);
      if (cfg.IsMoeLayer(l)) {
        b += mw.router.Bytes(dt) + mw.shared_experts.Bytes(dt) + slots_per_rank * mw.routed_expert.Bytes(dt);
      } else {
        b += mw.dense_mlp.Bytes(dt);
      }
    }
    if (st.has_embedding) b += mw.embed.Bytes(dt);
    if (st.has_head) b += mw.head.Bytes(dt);
    if (b > worst) {
      worst = b;
      worst_layers = st.layer_end - st.layer_begin;
    }
  }
  m.weights = worst;
  const double kvb = LayersKv(cfg, w);
  const double groups = static_cast<double>(d.pp);  // pipeline groups in flight per device
  if (d.phase == Phase::kDecode) {
    m.kv_cache = d.batch_per_device * groups * s.mb.context * kvb * static_cast<double>(worst_layers);
  } else {
    const double seqs = d.batch_per_device / s.new_per_seq;
    m.kv_cache = seqs * groups * s.prompt * kvb * static_cast<double>(worst_layers);
  }
  // Live activations of the micro-batches in flight: residual stream + the
  // largest of attention working set, MoE receive/intermediate buffers, logits.
  const double H = static_cast<double>(cfg.hidden_size), nh = static_cast<double>(cfg.num_attention_heads);
  const double T = s.mb.tokens, a2 = dev.gemm_dtype == "fp32" ? 4.0 : 2.0;
  const double resid = 3.0 * T * H * a2;
  double attn;
  if (cfg.dense_arch()) {
    // q, k, v, attention output (decode); prefill also the context's K and V.
    const double hd = static_cast<double>(cfg.attn_head_dim()), kv = static_cast<double>(cfg.kv_dim());
    attn = T * (2.0 * nh * hd + 2.0 * kv) * a2;
    if (!s.mb.decode) attn += s.mb.sequences * s.mb.context * 2.0 * kv * a2;
  } else if (s.mb.decode) {
    attn = 3.0 * T * nh * static_cast<double>(cfg.kv_lora_rank + cfg.qk_rope_head_dim) * a2;
  } else {
    const double ctx_tokens = T + s.mb.sequences * s.mb.context;
    attn = (ctx_tokens * nh * static_cast<double>(cfg.qk_head_dim() + cfg.v_head_dim) +
            T * nh * static_cast<double>(cfg.qk_head_dim() + cfg.v_head_dim)) *
           a2;
  }
  const double I = static_cast<double>(cfg.moe_intermediate_size);
  const double moe = max_rank_copies * (H * 1.0 + 2.0 * I * a2 + H * a2);
  const double logits = s.logit_tokens * static_cast<double>(cfg.vocab_size) * 4.0;
  m.activations = static_cast<double>(s.micro) * (resid + std::max({attn, moe, logits}));
  if (cfg.num_moe_layers() == 0) {
    // No MoE layers: no all-to-all, no communication buffers.
  } else if (d.ep > 1 && dev.cpu_path()) {
    // MPI dispatcher: send and receive buffers of the busiest rank's records.
    m.comm_buffers = 2.0 * max_rank_copies * (DispatchBytesPerCopy(cfg, dev) + CombineBytesPerCopy(cfg, dev));
  } else if (d.ep > 1) {
    if (d.phase == Phase::kDecode) {
      // Low-latency buffers, double-buffered, sized for every logical expert:
      // dispatch message 2H + 16 B (BF16 worst case + header), combine message
      // 2H + H/32 B (BF16 + per-128 min/max). 1.89 GB at 128 tokens, H = 7168,
      // 256 experts (DeepEP's "Allocating buffer size: 1880 MB").
      const double msg = 4.0 * H + 16.0 + H / 32.0;
      m.comm_buffers = 2.0 * static_cast<double>(cfg.n_routed_experts) * std::ceil(T) * msg;
    } else {
      // Throughput-mode buffers: 1 GB intra-node + 1 GB RDMA when the stage
      // spans nodes (DeepEP's test defaults, num_nvl_bytes = num_rdma_bytes = 1e9).
      m.comm_buffers = 1e9 + (d.ep > c.devices_per_node() ? 1e9 : 0.0);
    }
  }
  m.reserved = dev.runtime_reserved_gib * 1073741824.0;
  return m;
}

// Per-resource attribution of a group of operations that ran `scale` times.
void Attribute(const std::vector<OpCost>& ops, double scale, double ko_s, std::map<std::string, double>* crit) {
  for (const auto& op : ops) {
    const double overhead = std::min(op.seconds, static_cast<double>(op.kernels) * ko_s);
    (*crit)[LimiterName(Limiter::kOverhead)] += overhead * scale * 1e3;
    if (op.limiter != Limiter::kOverhead) (*crit)[LimiterName(op.limiter)] += (op.seconds - overhead) * scale * 1e3;
    else (*crit)[LimiterName(Limiter::kMemory)] += (op.seconds - overhead) * scale * 1e3;
  }
}

void Append(std::vector<OpCost>* a, const std::vector<OpCost>& b) { a->insert(a->end(), b.begin(), b.end()); }

}  // namespace

absl::StatusOr<MemoryBreakdown> DeploymentMemory(const ModelConfig& cfg, const Cluster& cluster, const Workload& w_in,
                                                 const Deployment& d) {
  RETURN_IF_ERROR(ValidateDeployment(d, cluster, cfg));
  const Workload w = WorkloadForPath(w_in, cluster.node.device);
  PlanOptions po;
  po.pp = d.pp;
  po.ep = d.ep;
  po.redundant_experts = d.redundant_experts;
  ASSIGN_OR_RETURN(Plan plan, BuildPlan(cfg, po));
  const Shape s = MakeShape(w, d);
  const double copies = s.mb.tokens * static_cast<double>(cfg.num_experts_per_tok);
  return ComputeMemory(cfg, cluster, w, d, plan, CountWeights(cfg), copies);
}

absl::StatusOr<PreparedPlacement> PreparePlacement(const ModelConfig& cfg, const Cluster& c, const Workload& w,
                                                   const Deployment& d, const SimOptions& opt) {
  const int64_t E = cfg.n_routed_experts;
  const int64_t rpn = std::min(c.devices_per_node(), d.ep);
  const int64_t moe_layers = std::max<int64_t>(cfg.num_moe_layers(), 1);
  PreparedPlacement p;
  if (cfg.num_moe_layers() == 0) return p;  // dense models: no experts to place
  ASSIGN_OR_RETURN(p.loads, w.expert_load.Loads(moe_layers, E));
  EplbOptions eo;
  eo.num_ranks = d.ep;
  eo.ranks_per_node = rpn;
  eo.num_groups = cfg.n_group > 0 && E % cfg.n_group == 0 ? cfg.n_group : 1;
  eo.redundant = d.redundant_experts;
  const bool uniform = w.expert_load.kind == LoadDistribution::Kind::kUniform;
  if (uniform) {
    // Every layer has the same loads and therefore the same placement.
    ASSIGN_OR_RETURN(std::vector<ExpertPlacement> one, RebalanceExperts({p.loads[0]}, eo));
    p.placements.assign(moe_layers, one[0]);
  } else {
    ASSIGN_OR_RETURN(p.placements, RebalanceExperts(p.loads, eo));
  }
  // Fan-out of the dispatch, sampled on up to 4 MoE layers spread over the model.
  const int64_t samples = uniform ? 1 : std::min<int64_t>(4, moe_layers);
  for (int64_t i = 0; i < samples; ++i) {
    const int64_t li = samples == 1 ? 0 : i * (moe_layers - 1) / (samples - 1);
    const Fanout f = SampleFanout(cfg, p.placements[li], p.loads[li], rpn, opt.fanout_tokens,
                                  opt.seed + static_cast<uint64_t>(li));
    const double inv = 1.0 / static_cast<double>(samples);
    p.fanout.remote_nodes += f.remote_nodes * inv;
    p.fanout.all_nodes += f.all_nodes * inv;
    p.fanout.nvlink_forwards += f.nvlink_forwards * inv;
    p.fanout.distinct_ranks += f.distinct_ranks * inv;
    p.fanout.copies_remote += f.copies_remote * inv;
    p.fanout.copies_local_other += f.copies_local_other * inv;
  }
  return p;
}

absl::StatusOr<SimResult> Simulate(const ModelConfig& cfg, const Cluster& cluster, const Workload& w_in,
                                   const Deployment& d, const SimOptions& opt) {
  RETURN_IF_ERROR(ValidateDeployment(d, cluster, cfg));
  // The CPU path has its own overlap and KV cache (WorkloadForPath); devices
  // sharing a CPU host's cores are handled after the stages are timed.
  const Cluster& c = cluster;
  const Workload w = WorkloadForPath(w_in, c.node.device);
  PlanOptions po;
  po.pp = d.pp;
  po.ep = d.ep;
  po.redundant_experts = d.redundant_experts;
  ASSIGN_OR_RETURN(Plan plan, BuildPlan(cfg, po));
  const int64_t E = cfg.n_routed_experts, k = cfg.num_experts_per_tok;
  PreparedPlacement own;
  if (opt.prepared == nullptr) {
    ASSIGN_OR_RETURN(own, PreparePlacement(cfg, c, w, d, opt));
  }
  const PreparedPlacement& prep = opt.prepared != nullptr ? *opt.prepared : own;
  const std::vector<std::vector<double>>& loads = prep.loads;
  const std::vector<ExpertPlacement>& placements = prep.placements;
  // MoE index of each layer; the plan carries the EPLB placements.
  std::vector<int64_t> moe_index(cfg.num_hidden_layers, -1);
  for (int64_t l = 0, i = 0; l < cfg.num_hidden_layers; ++l) {
    if (cfg.IsMoeLayer(l)) moe_index[l] = i++;
  }
  for (auto& st : plan.stages) {
    for (auto& [layer, placement] : st.placement) placement = placements[moe_index[layer]];
  }

  const Shape s = MakeShape(w, d);
  const DeviceCostModel dev(c.node.device);
  const Efficiency& eff = c.node.device.efficiency;
  const double ko = eff.kernel_overhead_us * 1e-6;
  const bool low_latency = d.phase == Phase::kDecode;
  const double T = s.mb.tokens, m = static_cast<double>(s.micro);
  const int64_t kvb = KvBytesPerTokenLayer(cfg, w.kv_cache_dtype);

  SimResult r;
  r.fanout = prep.fanout;

  // Compute-side slow-down while a throughput-mode all-to-all holds SMs.
  double sm_slowdown = 1.0;
  const int64_t sms = c.node.device.sm_count;
  if (!low_latency && d.ep > 1 && eff.comm_sms > 0 && sms > eff.comm_sms) {
    sm_slowdown = static_cast<double>(sms) / static_cast<double>(sms - eff.comm_sms);
  }

  const std::vector<OpCost> attn = AttentionOps(cfg, dev, s.mb, kvb);
  const std::vector<OpCost> router = RouterOps(cfg, dev, T);
  const std::vector<OpCost> shared = SharedExpertOps(cfg, dev, T);
  const std::vector<OpCost> dense = DenseMlpOps(cfg, dev, T);
  std::vector<OpCost> attn_piece = attn;  // runs while the other micro-batch communicates
  Append(&attn_piece, router);
  Append(&attn_piece, shared);

  double worst_stage = -1;
  double imbalance_sum = 0;
  int64_t imbalance_n = 0;
  double max_rank_copies = T * k;
  // Rank skew: with EP > 1 every all-to-all waits for the slowest rank of the
  // stage, so each stretch of compute between two all-to-alls (attention ->
  // dispatch, experts -> combine, and the head, embedding and dense layers up
  // to the next step's first dispatch) lasts the expected maximum over the EP
  // ranks. A rank's speed varies by rank_speed_cv (its standard deviation over
  // the mean, measured on identical work: calibration.cc); the routed experts
  // also vary with the routing (GroupedGemm: the slowest rank's touched
  // experts), and the two independent deviations add in quadrature.
  const double skew_c = d.ep > 1 ? ExpectedMaxOfNormals(d.ep) : 0.0;
  const double cv = eff.rank_speed_cv;
  for (const StagePlan& st : plan.stages) {
    double t = 0, skew = 0;
    std::map<std::string, double> crit, brk;
    auto group = [&](const std::string& name, double sec) { brk[name] += sec * 1e3; };
    if (st.has_embedding) {
      const auto ops = EmbedOps(cfg, dev, T);
      skew += m * skew_c * cv * SumSeconds(ops);
      t += m * SumSeconds(ops);
      Attribute(ops, m, ko, &crit);
      group("embedding", m * SumSeconds(ops));
    }
    for (int64_t l = st.layer_begin; l < st.layer_end; ++l) {
      if (!cfg.IsMoeLayer(l)) {
        const double a = SumSeconds(attn), x = SumSeconds(dense);
        skew += m * skew_c * cv * (a + x);
        t += m * (a + x);
        Attribute(attn, m, ko, &crit);
        Attribute(dense, m, ko, &crit);
        group("attention", m * a);
        group("dense_mlp", m * x);
        continue;
      }
      const int64_t li = moe_index[l];
      const ExpertPlacement& pl = placements[li];
      // Token-copies per expert in one micro-batch over the stage; each replica
      // takes an equal share (the runtime spreads tokens over replicas).
      const double copies = T * static_cast<double>(d.ep * k);
      std::vector<double> expert_copies(E);
      for (int64_t e = 0; e < E; ++e) expert_copies[e] = copies * loads[li][e];
      const std::vector<double> rank_load = RankLoads(pl, expert_copies);
      int64_t busiest = 0;
      for (int64_t rk = 1; rk < pl.num_ranks(); ++rk) {
        if (rank_load[rk] > rank_load[busiest]) busiest = rk;
      }
      const double mean = copies / static_cast<double>(d.ep);
      const double imb = mean > 0 ? rank_load[busiest] / mean : 1.0;
      imbalance_sum += imb;
      ++imbalance_n;
      max_rank_copies = std::max(max_rank_copies, rank_load[busiest]);
      std::vector<double> per_slot;
      for (int32_t e : pl.slots_of_rank(busiest)) {
        per_slot.push_back(expert_copies[e] / static_cast<double>(pl.replicas(e).size()));
      }
      // Every rank waits for the slowest at the all-to-all: with few tokens per
      // expert, the touched-expert count is random and the slowest rank's is
      // its expected maximum over the EP ranks.
      const std::vector<OpCost> experts = RoutedExpertOps(cfg, dev, per_slot, T, d.ep);
      const double a = SumSeconds(attn_piece), x = SumSeconds(experts);
      if (skew_c > 0 && cv > 0) {
        // x is the routing's expected slowest rank: mean + c x sigma_routing.
        const double x_mean = SumSeconds(RoutedExpertOps(cfg, dev, per_slot, T, 1));
        const double sigma_routing = std::max(0.0, x - x_mean) / skew_c, sigma_speed = cv * x_mean;
        const double slowest = x_mean + skew_c * std::sqrt(sigma_routing * sigma_routing + sigma_speed * sigma_speed);
        skew += m * (skew_c * cv * a + (slowest - x));
      }
      const AllToAllTime comm = AllToAll(cfg, c, low_latency, d.ep, T, r.fanout, imb);
      if (li == 0 || r.dispatch_us == 0) {
        r.dispatch_us = comm.dispatch_s * 1e6;
        r.combine_us = comm.combine_s * 1e6;
      }
      group("attention", m * SumSeconds(attn));
      group("router+shared_expert", m * (SumSeconds(router) + SumSeconds(shared)));
      group("routed_experts", m * x);
      group("dispatch", m * comm.dispatch_s);
      group("combine", m * comm.combine_s);
      if (s.micro == 2 && low_latency && w.overlap == Workload::Overlap::kFiveStage) {
        // Fine-grained decode pipeline: the layer is bound by the busier
        // resource (compute of both micro-batches, or their all-to-alls) or by
        // one micro-batch's chain attention -> dispatch -> experts -> combine.
        const double compute = 2 * (a + x), comm_total = 2 * (comm.dispatch_s + comm.combine_s);
        const double chain = a + x + comm.dispatch_s + comm.combine_s;
        const double lt = std::max({compute, comm_total, chain});
        t += lt;
        if (lt == compute) {
          Attribute(attn_piece, 2, ko, &crit);
          Attribute(experts, 2, ko, &crit);
        } else if (lt == comm_total) {
          crit[LimiterName(comm.dispatch_limiter)] += 2 * comm.dispatch_s * 1e3;
          crit[LimiterName(comm.combine_limiter)] += 2 * comm.combine_s * 1e3;
        } else {
          Attribute(attn_piece, 1, ko, &crit);
          Attribute(experts, 1, ko, &crit);
          crit[LimiterName(comm.dispatch_limiter)] += comm.dispatch_s * 1e3;
          crit[LimiterName(comm.combine_limiter)] += comm.combine_s * 1e3;
        }
      } else if (s.micro == 2) {
        // Two micro-batches A, B: [attn B | dispatch A] [experts A | dispatch B]
        // [experts B | combine A] [attn A (next layer) | combine B].
        const double slow = d.ep > 1 ? sm_slowdown : 1.0;
        const struct {
          double compute;
          const std::vector<OpCost>* ops;
          double comm;
          Limiter lim;
        } slots[4] = {{a * slow, &attn_piece, comm.dispatch_s, comm.dispatch_limiter},
                      {x * slow, &experts, comm.dispatch_s, comm.dispatch_limiter},
                      {x * slow, &experts, comm.combine_s, comm.combine_limiter},
                      {a * slow, &attn_piece, comm.combine_s, comm.combine_limiter}};
        for (const auto& sl : slots) {
          if (sl.comm > sl.compute) {
            t += sl.comm;
            crit[LimiterName(sl.lim)] += sl.comm * 1e3;
          } else {
            t += sl.compute;
            Attribute(*sl.ops, slow, ko, &crit);
          }
        }
      } else {
        t += a + x + comm.dispatch_s + comm.combine_s;
        Attribute(attn_piece, 1, ko, &crit);
        Attribute(experts, 1, ko, &crit);
        crit[LimiterName(comm.dispatch_limiter)] += comm.dispatch_s * 1e3;
        crit[LimiterName(comm.combine_limiter)] += comm.combine_s * 1e3;
      }
    }
    if (st.has_head) {
      const auto ops = HeadOps(cfg, dev, s.logit_tokens);
      skew += m * skew_c * cv * SumSeconds(ops);
      t += m * SumSeconds(ops);
      Attribute(ops, m, ko, &crit);
      group("head", m * SumSeconds(ops));
    }
    if (d.pp > 1 && !st.has_head) {
      // Hidden states to the next stage: NIC when stages sit on different nodes.
      const double bytes = T * static_cast<double>(cfg.hidden_size) * dev.ActOutBytes();
      const bool cross_node = d.nodes > 1 && d.ep >= c.devices_per_node();
      const double bw = cross_node ? c.NicBytesPerSPerDevice() : c.FabricBytesPerS();
      const double lat = (cross_node ? c.node.nics.latency_us : c.node.intra_node.latency_us) * 1e-6;
      const double tp = m * (bytes / bw + lat);
      t += tp;
      crit[LimiterName(Limiter::kPipeline)] += tp * 1e3;
      group("pipeline_send", tp);
    }
    if (skew > 0) {
      t += skew;
      crit["rank skew"] += skew * 1e3;
      group("rank_skew", skew);
    }
    t += eff.step_overhead_ms * 1e-3;
    crit["host overhead"] += eff.step_overhead_ms;
    group("host_overhead", eff.step_overhead_ms * 1e-3);
    r.stage_times_ms.push_back(t * 1e3);
    if (t > worst_stage) {
      worst_stage = t;
      r.critical_path_ms = crit;
      r.breakdown_ms = brk;
    }
  }

  // Shared cores (node.device.host_cores < devices on a node): the node's
  // processes time-share its cores and the scheduler gives a waiting or idle
  // process's core to another, so a stage step lasts at least the CPU time
  // of all the node's processes in one step divided by the cores (stage time
  // x EP ranks, summed over the node's stages), and at least the slowest
  // stage. The stage times include the rank skew: a rank waiting at an
  // all-to-all polls with sched_yield (worker/comm/mpi_communicator.cc) and
  // stays runnable. Waits for a peer descheduled by the scheduler itself are
  // not modelled (docs/PLANNER.md, "Local calibration").
  const int64_t on_node = d.nodes == 1 ? d.devices() : c.devices_per_node();
  if (c.node.device.host_cores > 0 && on_node > c.node.device.host_cores) {
    double cpu = 0;
    for (double st : r.stage_times_ms) cpu += st * 1e-3 * static_cast<double>(d.ep);
    cpu *= static_cast<double>(on_node) / static_cast<double>(d.devices());  // this node's share of the processes
    const double shared = cpu / static_cast<double>(c.node.device.host_cores);
    if (shared > worst_stage) {
      r.critical_path_ms["shared cores"] += (shared - worst_stage) * 1e3;
      r.breakdown_ms["shared_cores"] += (shared - worst_stage) * 1e3;
      worst_stage = shared;
    }
  }

  r.deployment = d;
  if (r.deployment.context <= 0) {  // report the context the workload supplied
    r.deployment.context = d.phase == Phase::kDecode ? w.DecodeContext() : w.prompt_tokens;
  }
  r.plan = std::move(plan);
  r.expert_imbalance = imbalance_n > 0 ? imbalance_sum / imbalance_n : 1.0;
  r.stage_time_ms = worst_stage * 1e3;
  // A column of pp devices (one per stage) moves one batch of batch_per_device
  // tokens through all stages every stage step (decode: pp groups in flight,
  // each advancing one stage per step), so per device it is 1 / pp of that.
  const double per_device = d.batch_per_device / (worst_stage * static_cast<double>(d.pp));
  const double devices_per_node = static_cast<double>(d.devices()) / static_cast<double>(d.nodes);
  if (d.phase == Phase::kDecode) {
    r.tpot_ms = r.stage_time_ms * static_cast<double>(d.pp);
    r.tokens_per_s_per_device = per_device;
    r.computed_tokens_per_s_per_device = per_device;
  } else {
    r.ttft_ms = r.stage_time_ms * static_cast<double>(d.pp);
    r.computed_tokens_per_s_per_device = per_device;
    r.tokens_per_s_per_device = per_device / (1.0 - w.cache_hit_rate);
  }
  r.tokens_per_s_per_node = r.tokens_per_s_per_device * devices_per_node;
  r.devices_used_per_node = d.devices() / d.nodes;
  r.idle_devices_per_node = c.devices_per_node() - r.devices_used_per_node;
  std::string best;
  double best_v = -1;
  for (const auto& [name, v] : r.critical_path_ms) {
    if (v > best_v) {
      best_v = v;
      best = name;
    }
  }
  r.bottleneck = best;

  const ModelWeights mw = CountWeights(cfg);
  r.memory = ComputeMemory(cfg, c, w, d, r.plan, mw, max_rank_copies);
  r.memory_gib_per_device = r.memory.Total() / 1073741824.0;
  r.hbm_gib = c.node.device.hbm_gib;
  const double cap = c.node.device.hbm_gib * 1073741824.0;
  r.fits = r.memory.Total() <= cap;
  // The largest batch that fits: memory grows monotonically with the batch
  // (KV cache, activations, low-latency buffers), so double, then bisect.
  auto fits_at = [&](double b) {
    Deployment db = d;
    db.batch_per_device = b;
    const double copies = max_rank_copies * b / d.batch_per_device;
    return ComputeMemory(cfg, c, w, db, r.plan, mw, copies).Total() <= cap;
  };
  double lo = 0, hi = 1;
  while (fits_at(hi) && hi < 1e9) {
    lo = hi;
    hi *= 2;
  }
  for (int i = 0; i < 40 && hi - lo > 1e-3 * std::max(1.0, lo); ++i) {
    const double mid = 0.5 * (lo + hi);
    (fits_at(mid) ? lo : hi) = mid;
  }
  r.max_batch_per_device = d.phase == Phase::kDecode ? std::floor(lo) : lo;
  if (!r.fits) r.bottleneck = "memory capacity";
  return r;
}

nlohmann::json SimResult::ToJson() const {
  nlohmann::json j;
  j["plan"] = deployment.ToJson();
  j["phase"] = PhaseName(deployment.phase);
  j["tokens_per_s_per_node"] = tokens_per_s_per_node;
  j["tokens_per_s_per_device"] = tokens_per_s_per_device;
  j["devices_used_per_node"] = devices_used_per_node;
  j["idle_devices_per_node"] = idle_devices_per_node;
  if (deployment.phase == Phase::kDecode) {
    j["tpot_ms"] = tpot_ms;
  } else {
    j["ttft_ms"] = ttft_ms;
    j["computed_tokens_per_s_per_device"] = computed_tokens_per_s_per_device;
  }
  j["stage_time_ms"] = stage_time_ms;
  j["stage_times_ms"] = stage_times_ms;
  j["memory_gib_per_device"] = memory_gib_per_device;
  j["hbm_gib"] = hbm_gib;
  j["fits"] = fits;
  j["max_batch_per_device"] = max_batch_per_device;
  j["memory_gib"] = {{"weights", memory.weights / 1073741824.0},
                     {"kv_cache", memory.kv_cache / 1073741824.0},
                     {"activations", memory.activations / 1073741824.0},
                     {"comm_buffers", memory.comm_buffers / 1073741824.0},
                     {"reserved", memory.reserved / 1073741824.0}};
  j["bottleneck"] = bottleneck;
  j["critical_path_ms"] = critical_path_ms;
  j["work_ms"] = breakdown_ms;
  j["expert_imbalance"] = expert_imbalance;
  j["dispatch_us_per_layer_micro_batch"] = dispatch_us;
  j["combine_us_per_layer_micro_batch"] = combine_us;
  j["fanout"] = {{"remote_nodes", fanout.remote_nodes},
                 {"nodes", fanout.all_nodes},
                 {"nvlink_forwards", fanout.nvlink_forwards},
                 {"ranks", fanout.distinct_ranks},
                 {"copies_remote", fanout.copies_remote},
                 {"copies_local_other", fanout.copies_local_other}};
  return j;
}

}  // namespace expertmesh::topology
