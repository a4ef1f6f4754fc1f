// Expert placement of one MoE layer over the EP ranks of a stage.
//
// Physical slots live on ranks; each slot holds one logical (routed) expert.
// With redundancy there are more slots than experts (e.g. 256 experts in 288
// slots) and hot experts have several replicas. A token's copy for expert e
// goes to one replica, chosen deterministically from the token index so that
// load spreads evenly over replicas and every process agrees on the choice.
//
//   ExpertPlacement p = ExpertPlacement::Uniform(256, 4, /*redundant=*/32);
//   int rank = p.ReplicaRank(/*expert=*/17, /*token=*/5);
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace expertmesh::topology {

class ExpertPlacement {
 public:
  ExpertPlacement() = default;
  // rank_slots[r] lists the logical expert of each slot on rank r. Every
  // expert in [0, num_experts) needs at least one slot; ranks may hold none.
  static absl::StatusOr<ExpertPlacement> Create(int64_t num_experts,
                                                std::vector<std::vector<int32_t>> rank_slots);
  // Contiguous placement: expert e on rank e * R / E; the `redundant` extra
  // slots replicate experts 0, 1, ... round-robin on the ranks with the fewest slots.
  static ExpertPlacement Uniform(int64_t num_experts, int64_t num_ranks, int64_t redundant = 0);

  int64_t num_experts() const { return num_experts_; }
  int64_t num_ranks() const { return static_cast<int64_t>(rank_slots_.size()); }
  int64_t num_slots() const { return num_slots_; }
  const std::vector<int32_t>& slots_of_rank(int64_t r) const { return rank_slots_[r]; }
  // (rank, local slot index) of each replica of expert e.
  const std::vector<std::pair<int32_t, int32_t>>& replicas(int64_t e) const { return replicas_[e]; }
  // The replica a token's copy for expert e uses: replicas[(token + e) % n].
  std::pair<int32_t, int32_t> Replica(int64_t expert, int64_t token) const {
    const auto& r = replicas_[expert];
    return r[static_cast<size_t>((token + expert) % static_cast<int64_t>(r.size()))];
  }
  int32_t ReplicaRank(int64_t expert, int64_t token) const { return Replica(expert, token).first; }

  // Same experts in the same slots of the same ranks (replicas follow).
  bool operator==(const ExpertPlacement& o) const {
    return num_experts_ == o.num_experts_ && rank_slots_ == o.rank_slots_;
  }
  bool operator!=(const ExpertPlacement& o) const { return !(*this == o); }

  nlohmann::json ToJson() const;  // {"num_experts": E, "rank_slots": [[...], ...]}
  static absl::StatusOr<ExpertPlacement> FromJson(const nlohmann::json& j);

 private:
  int64_t num_experts_ = 0;
  int64_t num_slots_ = 0;
  std::vector<std::vector<int32_t>> rank_slots_;
  std::vector<std::vector<std::pair<int32_t, int32_t>>> replicas_;
};

}  // namespace expertmesh::topology
