#include "topology/plan.h"

#include <algorithm>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "topology/eplb.h"

namespace expertmesh::topology {

std::vector<double> LayerCosts(const ModelConfig& c) {
  const double H = static_cast<double>(c.hidden_size);
  const double nh = static_cast<double>(c.num_attention_heads);
  if (c.dense_arch()) {  // q, k, v, o projections and the SwiGLU MLP: the same cost every layer
    const double q = nh * static_cast<double>(c.attn_head_dim()), kv = static_cast<double>(c.kv_dim());
    return std::vector<double>(c.num_hidden_layers, 2.0 * (2.0 * H * q + 2.0 * H * kv + 3.0 * H * c.intermediate_size));
  }
  const double attn = (c.q_lora_rank > 0 ? H * c.q_lora_rank + c.q_lora_rank * nh * c.qk_head_dim()
                                         : H * nh * c.qk_head_dim()) +
                      H * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim) +
                      nh * c.v_head_dim * H;
  std::vector<double> cost(c.num_hidden_layers);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const double ffn = c.IsMoeLayer(l)
                           ? 3.0 * H * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts) +
                                 H * c.n_routed_experts
                           : 3.0 * H * c.intermediate_size;
    cost[l] = 2.0 * (attn + ffn);
  }
  return cost;
}

absl::StatusOr<Plan> BuildPlan(const ModelConfig& c, const PlanOptions& o) {
  const int64_t N = c.num_hidden_layers;
  if (o.pp < 1 || o.pp > N) {
    return absl::InvalidArgumentError(absl::StrCat("--pp ", o.pp, ": need 1 <= pp <= num_hidden_layers (", N, ")"));
  }
  if (o.ep < 1) return absl::InvalidArgumentError(absl::StrCat("--ep ", o.ep, ": must be >= 1"));
  // Dense models: the EP ranks of a stage are data-parallel lanes (no experts).
  if (o.ep > c.n_routed_experts && !c.dense_arch()) {
    return absl::InvalidArgumentError(absl::StrCat("--ep ", o.ep, ": more EP ranks than routed experts (",
                                                   c.n_routed_experts, ")"));
  }
  if (o.redundant_experts < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--redundant-experts ", o.redundant_experts, ": must be >= 0"));
  }
  std::vector<int64_t> sizes = o.layers_per_stage;
  if (!sizes.empty()) {
    if (static_cast<int64_t>(sizes.size()) != o.pp ||
        std::accumulate(sizes.begin(), sizes.end(), int64_t{0}) != N ||
        std::any_of(sizes.begin(), sizes.end(), [](int64_t s) { return s < 1; })) {
      return absl::InvalidArgumentError(absl::StrCat("--layers-per-stage ", absl::StrJoin(sizes, ","), ": need ", o.pp,
                                                     " positive counts summing to ", N));
    }
  } else {
    // Minimise the maximum stage cost over contiguous splits (DP over prefixes).
    std::vector<double> cost = LayerCosts(c);
    cost.back() += 2.0 * c.hidden_size * c.vocab_size;  // lm_head on the last stage
    std::vector<double> prefix(N + 1, 0);
    for (int64_t l = 0; l < N; ++l) prefix[l + 1] = prefix[l] + cost[l];
    const double inf = std::numeric_limits<double>::infinity();
    std::vector<std::vector<double>> best(o.pp + 1, std::vector<double>(N + 1, inf));
    std::vector<std::vector<int64_t>> cut(o.pp + 1, std::vector<int64_t>(N + 1, 0));
    best[0][0] = 0;
    for (int64_t s = 1; s <= o.pp; ++s) {
      for (int64_t n = s; n <= N; ++n) {
        for (int64_t k = s - 1; k < n; ++k) {
          const double v = std::max(best[s - 1][k], prefix[n] - prefix[k]);
          if (v < best[s][n]) {
            best[s][n] = v;
            cut[s][n] = k;
          }
        }
      }
    }
    sizes.assign(o.pp, 0);
    for (int64_t s = o.pp, n = N; s >= 1; --s) {
      sizes[s - 1] = n - cut[s][n];
      n = cut[s][n];
    }
  }
  Plan p;
  p.pp = o.pp;
  p.ep = o.ep;
  p.redundant_experts = o.redundant_experts;
  int64_t begin = 0;
  for (int64_t s = 0; s < o.pp; ++s) {
    StagePlan st;
    st.layer_begin = begin;
    st.layer_end = begin + sizes[s];
    st.has_embedding = s == 0;
    st.has_head = s == o.pp - 1;
    for (int64_t l = st.layer_begin; l < st.layer_end; ++l) {
      if (!c.IsMoeLayer(l)) continue;
      st.placement[l] = ExpertPlacement::Uniform(c.n_routed_experts, o.ep, o.redundant_experts);
    }
    begin = st.layer_end;
    p.stages.push_back(std::move(st));
  }
  for (const auto& [layer, load] : o.expert_load) {
    if (layer < 0 || layer >= N || !c.IsMoeLayer(layer)) {
      return absl::InvalidArgumentError(absl::StrCat("expert load given for layer ", layer, ", not a MoE layer"));
    }
  }
  if (c.num_moe_layers() > 0 && (c.n_routed_experts + o.redundant_experts) % o.ep == 0) {
    absl::Status s = PlaceExpertsWithEplb(c, o.expert_load, o.ranks_per_node > 0 ? o.ranks_per_node : o.ep, &p);
    if (!s.ok()) return s;
  } else if (!o.expert_load.empty() && c.num_moe_layers() > 0) {
    return absl::InvalidArgumentError(absl::StrCat("EPLB needs n_routed_experts + redundant experts (",
                                                   c.n_routed_experts + o.redundant_experts,
                                                   ") divisible by --ep ", o.ep));
  }
  return p;
}

nlohmann::json Plan::ToJson() const {
  nlohmann::json stages_j = nlohmann::json::array();
  for (const auto& s : stages) {
    nlohmann::json pl = nlohmann::json::object();
    for (const auto& [layer, placement] : s.placement) pl[std::to_string(layer)] = placement.ToJson();
    stages_j.push_back({{"layer_begin", s.layer_begin}, {"layer_end", s.layer_end},
                        {"has_embedding", s.has_embedding}, {"has_head", s.has_head}, {"placement", pl}});
  }
  return {{"pp", pp}, {"ep", ep}, {"redundant_experts", redundant_experts}, {"stages", stages_j}};
}

absl::StatusOr<Plan> Plan::FromJson(const nlohmann::json& j) {
  try {
    Plan p;
    p.pp = j.at("pp").get<int64_t>();
    p.ep = j.at("ep").get<int64_t>();
    p.redundant_experts = j.value("redundant_experts", int64_t{0});
    for (const auto& sj : j.at("stages")) {
      StagePlan s;
      s.layer_begin = sj.at("layer_begin").get<int64_t>();
      s.layer_end = sj.at("layer_end").get<int64_t>();
      s.has_embedding = sj.at("has_embedding").get<bool>();
      s.has_head = sj.at("has_head").get<bool>();
      for (auto it = sj.at("placement").begin(); it != sj.at("placement").end(); ++it) {
        auto pl = ExpertPlacement::FromJson(it.value());
        if (!pl.ok()) return pl.status();
        s.placement[std::stoll(it.key())] = *std::move(pl);
      }
      p.stages.push_back(std::move(s));
    }
    if (static_cast<int64_t>(p.stages.size()) != p.pp) return absl::InvalidArgumentError("plan: stages != pp");
    return p;
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("plan: malformed JSON: ", e.what()));
  }
}

}  // namespace expertmesh::topology
