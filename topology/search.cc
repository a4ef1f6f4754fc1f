#include "topology/search.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace expertmesh::topology {

double LatencyMs(const SimResult& r) {
  return r.deployment.phase == Phase::kDecode ? r.tpot_ms : r.ttft_ms;
}

std::vector<size_t> ParetoFront(const std::vector<SimResult>& rs) {
  std::vector<size_t> idx(rs.size());
  for (size_t i = 0; i < rs.size(); ++i) idx[i] = i;
  // Sort by latency, then throughput descending; sweep keeping strict improvements.
  std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) {
    const double la = LatencyMs(rs[a]), lb = LatencyMs(rs[b]);
    if (la != lb) return la < lb;
    return rs[a].tokens_per_s_per_device > rs[b].tokens_per_s_per_device;
  });
  std::vector<size_t> front;
  double best = -1;
  for (size_t i : idx) {
    if (rs[i].tokens_per_s_per_device > best) {
      front.push_back(i);
      best = rs[i].tokens_per_s_per_device;
    }
  }
  return front;
}

std::vector<int64_t> PartNodeEpSizes(int64_t devices_per_node, int64_t routed_experts) {
  std::vector<int64_t> eps;
  for (int64_t ep = 8; ep < devices_per_node; ep += 8) {
    if (devices_per_node % ep == 0) continue;  // divides the node: enumerated anyway
    if (routed_experts % ep == 0 || (routed_experts + 32) % ep == 0) eps.push_back(ep);
  }
  return eps;
}

absl::StatusOr<SearchResult> SearchPlans(const ModelConfig& cfg, const Cluster& c, const Workload& w,
                                         const SearchOptions& o) {
  const int64_t gpn = c.devices_per_node();
  const int64_t max_nodes = o.max_nodes > 0 ? std::min(o.max_nodes, c.nodes) : c.nodes;
  std::vector<double> batches = o.batches;
  if (batches.empty()) {
    if (o.phase == Phase::kDecode) {
      batches = {1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512};
    } else {
      batches = {512, 1024, 2048, 4096, 8192, 16384, 32768};
    }
  }
  std::vector<int64_t> pps = o.pps;
  if (pps.empty()) pps = {1, 2, 4, 8};
  const int64_t E = cfg.n_routed_experts;
  SearchResult out;
  for (int64_t nodes = 1; nodes <= max_nodes; ++nodes) {
    for (int64_t pp : pps) {
      // Whole nodes, or for one node every EP size that divides it, and the
      // part-node EP groups (PartNodeEpSizes; the rest of the node idle).
      std::vector<int64_t> eps;
      if (nodes == 1) {
        for (int64_t ep = 1; ep * pp <= gpn; ++ep) {
          if (gpn % ep == 0 && (ep * pp == gpn || ep == 1 || pp == 1)) eps.push_back(ep);
        }
        if (pp == 1 && cfg.num_moe_layers() > 0) {  // as for the divisors: with pp > 1 only plans that fill the node
          for (int64_t ep : PartNodeEpSizes(gpn, E)) eps.push_back(ep);
        }
        std::sort(eps.begin(), eps.end());
        eps.erase(std::unique(eps.begin(), eps.end()), eps.end());
      } else if ((nodes * gpn) % pp == 0) {
        eps.push_back(nodes * gpn / pp);
      }
      for (int64_t ep : eps) {
        // Redundancy: none, the smallest that makes the slots divide, and 32 when it divides.
        std::vector<int64_t> reds;
        if (cfg.num_moe_layers() == 0) reds.push_back(0);  // dense: no experts, no redundancy
        for (int64_t r = 0; cfg.num_moe_layers() > 0 && r <= std::max<int64_t>(ep, 64); ++r) {
          if ((E + r) % ep == 0) {
            reds.push_back(r);
            break;
          }
        }
        if (cfg.num_moe_layers() > 0 && (E + 32) % ep == 0) reds.push_back(32);
        std::sort(reds.begin(), reds.end());
        reds.erase(std::unique(reds.begin(), reds.end()), reds.end());
        for (int64_t red : reds) {
          Deployment d;
          d.phase = o.phase;
          d.nodes = nodes;
          d.pp = pp;
          d.ep = ep;
          d.redundant_experts = red;
          d.context = o.context;
          d.batch_per_device = batches[0];
          if (!ValidateDeployment(d, c, cfg).ok()) continue;
          ASSIGN_OR_RETURN(PreparedPlacement prep, PreparePlacement(cfg, c, w, d));
          SimOptions so;
          so.prepared = &prep;
          for (double b : batches) {
            d.batch_per_device = b;
            ASSIGN_OR_RETURN(SimResult r, Simulate(cfg, c, w, d, so));
            ++out.evaluated;
            if (!r.fits) {
              ++out.over_memory;
              continue;
            }
            r.plan.stages.clear();  // keep search results small; re-simulate a plan to get its placement
            out.all.push_back(r);
            const bool slo_ok = (o.max_ttft_ms <= 0 || o.phase != Phase::kPrefill || r.ttft_ms <= o.max_ttft_ms) &&
                                (o.max_tpot_ms <= 0 || o.phase != Phase::kDecode || r.tpot_ms <= o.max_tpot_ms);
            if (!slo_ok) {
              ++out.over_slo;
              continue;
            }
            out.ranked.push_back(r);
          }
        }
      }
    }
  }
  std::stable_sort(out.ranked.begin(), out.ranked.end(), [](const SimResult& a, const SimResult& b) {
    return a.tokens_per_s_per_device > b.tokens_per_s_per_device;
  });
  for (size_t i : ParetoFront(out.ranked)) out.pareto.push_back(out.ranked[i]);
  return out;
}

Fleet SizeFleet(double daily_in, double daily_out, const SimResult* prefill, const SimResult* decode) {
  Fleet f;
  f.input_tokens_per_s = daily_in / 86400.0;
  f.output_tokens_per_s = daily_out / 86400.0;
  if (prefill != nullptr && prefill->tokens_per_s_per_node > 0) {
    f.prefill_nodes = f.input_tokens_per_s / prefill->tokens_per_s_per_node;
    const double unit = static_cast<double>(prefill->deployment.nodes);
    f.prefill_units = static_cast<int64_t>(std::ceil(f.prefill_nodes / unit - 1e-9));
    f.total_nodes_whole_units += f.prefill_units * prefill->deployment.nodes;
  }
  if (decode != nullptr && decode->tokens_per_s_per_node > 0) {
    f.decode_nodes = f.output_tokens_per_s / decode->tokens_per_s_per_node;
    const double unit = static_cast<double>(decode->deployment.nodes);
    f.decode_units = static_cast<int64_t>(std::ceil(f.decode_nodes / unit - 1e-9));
    f.total_nodes_whole_units += f.decode_units * decode->deployment.nodes;
  }
  f.total_nodes = f.prefill_nodes + f.decode_nodes;
  return f;
}

}  // namespace expertmesh::topology
