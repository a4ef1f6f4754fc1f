// Pipeline lanes of a pp x ep cluster with vacant places (elastic EP).
//
// A sequence flows through one *lane*: one worker of every stage, stage 0
// -> stage 1 -> ... -> the last stage, which returns the sampled token to
// stage 0. With every place held, lane r is EP rank r of every stage (worker
// s * ep + r in stage s). When places are vacant (their worker was lost and
// nobody replaced it yet) the lanes are re-paired:
//
//   1. every EP rank r that is live in all stages keeps its lane (intact
//      lanes first, in rank order);
//   2. the remaining live ranks of each stage, in rank order, are paired
//      across the stages: the j-th leftover of every stage forms a lane, for
//      j below the smallest leftover count.
//
// A live worker that gets no lane is *lane-less*: it still holds its experts
// and takes part in its stage's MoE all-to-alls (with zero tokens of its
// own), but no sequence flows through it. A stage without any live worker
// has no lane at all (the caller waits for a replacement then).
//
// The coordinator (which stage-0 workers get sequences) and every worker
// (which lane group to connect) compute the same lanes from the same vacant
// list, so they agree without another message.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace expertmesh::topology {

struct Lanes {
  // lanes[l][s]: the worker id of lane l in stage s.
  std::vector<std::vector<int>> lanes;
  // lane_of[worker id]: its lane, or -1 when it is vacant or lane-less.
  std::vector<int> lane_of;
};

// vacant: worker ids (any order; ids outside [0, pp * ep) are ignored).
inline Lanes ComputeLanes(int64_t pp, int64_t ep, const std::vector<int>& vacant) {
  Lanes out;
  const int n = static_cast<int>(pp * ep);
  std::vector<bool> is_vacant(static_cast<size_t>(std::max(n, 0)), false);
  for (int id : vacant) {
    if (id >= 0 && id < n) is_vacant[static_cast<size_t>(id)] = true;
  }
  out.lane_of.assign(static_cast<size_t>(std::max(n, 0)), -1);
  auto id_of = [&](int64_t s, int64_t r) { return static_cast<int>(s * ep + r); };
  std::vector<std::vector<int>> leftover(static_cast<size_t>(pp));
  for (int64_t r = 0; r < ep; ++r) {
    bool intact = true;
    for (int64_t s = 0; s < pp; ++s) intact &= !is_vacant[static_cast<size_t>(id_of(s, r))];
    if (intact) {
      std::vector<int> lane;
      for (int64_t s = 0; s < pp; ++s) lane.push_back(id_of(s, r));
      out.lanes.push_back(std::move(lane));
    } else {
      for (int64_t s = 0; s < pp; ++s) {
        if (!is_vacant[static_cast<size_t>(id_of(s, r))]) leftover[static_cast<size_t>(s)].push_back(id_of(s, r));
      }
    }
  }
  size_t pairs = pp > 0 ? leftover[0].size() : 0;
  for (const auto& l : leftover) pairs = std::min(pairs, l.size());
  for (size_t j = 0; j < pairs; ++j) {
    std::vector<int> lane;
    for (int64_t s = 0; s < pp; ++s) lane.push_back(leftover[static_cast<size_t>(s)][j]);
    out.lanes.push_back(std::move(lane));
  }
  for (size_t l = 0; l < out.lanes.size(); ++l) {
    for (int id : out.lanes[l]) out.lane_of[static_cast<size_t>(id)] = static_cast<int>(l);
  }
  return out;
}

}  // namespace expertmesh::topology
