#include "topology/placement.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace expertmesh::topology {

absl::StatusOr<ExpertPlacement> ExpertPlacement::Create(int64_t num_experts,
                                                        std::vector<std::vector<int32_t>> rank_slots) {
  if (num_experts <= 0) return absl::InvalidArgumentError("placement: num_experts must be > 0");
  if (rank_slots.empty()) return absl::InvalidArgumentError("placement: needs at least one rank");
  ExpertPlacement p;
  p.num_experts_ = num_experts;
  p.replicas_.assign(num_experts, {});
  for (size_t r = 0; r < rank_slots.size(); ++r) {
    for (size_t s = 0; s < rank_slots[r].size(); ++s) {
      const int32_t e = rank_slots[r][s];
      if (e < 0 || e >= num_experts) {
        return absl::InvalidArgumentError(absl::StrCat("placement: rank ", r, " slot ", s, " holds expert ", e,
                                                       ", outside [0, ", num_experts, ")"));
      }
      p.replicas_[e].push_back({static_cast<int32_t>(r), static_cast<int32_t>(s)});
      ++p.num_slots_;
    }
  }
  for (int64_t e = 0; e < num_experts; ++e) {
    if (p.replicas_[e].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("placement: expert ", e, " has no slot on any rank"));
    }
  }
  p.rank_slots_ = std::move(rank_slots);
  return p;
}

ExpertPlacement ExpertPlacement::Uniform(int64_t E, int64_t R, int64_t redundant) {
  std::vector<std::vector<int32_t>> slots(R);
  for (int64_t e = 0; e < E; ++e) slots[e * R / E].push_back(static_cast<int32_t>(e));
  for (int64_t k = 0; k < redundant; ++k) {
    const int32_t e = static_cast<int32_t>(k % E);
    // The rank with the fewest slots that does not hold e yet (else the fewest).
    int64_t best = -1;
    for (int64_t r = 0; r < R; ++r) {
      const bool has = std::find(slots[r].begin(), slots[r].end(), e) != slots[r].end();
      if (has && R > 1) continue;
      if (best < 0 || slots[r].size() < slots[best].size()) best = r;
    }
    if (best < 0) best = 0;
    slots[best].push_back(e);
  }
  return *Create(E, std::move(slots));
}

nlohmann::json ExpertPlacement::ToJson() const {
  return {{"num_experts", num_experts_}, {"rank_slots", rank_slots_}};
}

absl::StatusOr<ExpertPlacement> ExpertPlacement::FromJson(const nlohmann::json& j) {
  if (!j.is_object() || !j.contains("num_experts") || !j.contains("rank_slots")) {
    return absl::InvalidArgumentError("placement: expected {\"num_experts\": E, \"rank_slots\": [[...]]}");
  }
  try {
    return Create(j["num_experts"].get<int64_t>(), j["rank_slots"].get<std::vector<std::vector<int32_t>>>());
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("placement: ", e.what()));
  }
}

}  // namespace expertmesh::topology
