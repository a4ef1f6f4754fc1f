// SVG charts of planner results, written without any plotting dependency:
// throughput per device against latency with the Pareto front (plan search),
// and the per-resource critical path of one plan's step.
#pragma once

#include <string>
#include <vector>

#include "topology/search.h"
#include "topology/simulator.h"

namespace expertmesh::topology {

// One panel per searched phase: every plan that fits in memory (grey), the
// SLO-feasible ones (blue), the Pareto front (red line), with axes and labels.
std::string ParetoSvg(const std::vector<SearchResult>& phases, const std::string& topology_name,
                      const std::string& workload_name);

// Horizontal bars: milliseconds of the step's critical path per resource.
std::string BreakdownSvg(const SimResult& r, const std::string& topology_name);

}  // namespace expertmesh::topology
