// Reading prompt files: JSON lines {"tokens": [ids...]} (blank lines skipped).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace expertmesh::launch {

// Errors name the file and line: "p.jsonl:3: ...".
absl::StatusOr<std::vector<std::vector<int32_t>>> ReadPrompts(const std::string& path);

}  // namespace expertmesh::launch
