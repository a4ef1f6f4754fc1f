// Validation of the planner against published DeepSeek-V3 deployment figures
// (docs/PLANNER.md has the table this prints, with sources). Every row
// predicts one published number from the shipped H800 topology and workload
// files and states a bound on the relative error; tests/planner fails if a
// row leaves its bound.
//
//   ASSIGN_OR_RETURN(auto rows, RunValidation({}));
//   std::cout << ValidationMarkdown(rows);
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace expertmesh::topology {

struct ValidationRow {
  std::string id;           // stable name used by the test
  std::string figure;       // what is compared
  std::string setting;      // deployment evaluated
  double published = 0;
  double predicted = 0;
  std::string unit;
  double bound = 0.10;      // allowed |relative error|
  bool calibration = false; // this figure was used to fit a parameter (not an independent check)
  std::string source;
  double RelativeError() const { return published != 0 ? (predicted - published) / published : 0; }
  bool WithinBound() const;
};

struct ValidationOptions {
  // Folder holding topologies/h800.yaml and workloads/deepseek-*.yaml; empty:
  // the examples/ folder of the source tree this binary was built from.
  std::string examples_dir;
};

absl::StatusOr<std::vector<ValidationRow>> RunValidation(const ValidationOptions& options);
std::string ValidationMarkdown(const std::vector<ValidationRow>& rows);
nlohmann::json ValidationJson(const std::vector<ValidationRow>& rows);
bool ValidationWithinBounds(const std::vector<ValidationRow>& rows);

}  // namespace expertmesh::topology
