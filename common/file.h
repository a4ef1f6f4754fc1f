// Whole-file reads for the small text files a process loads once
// (config.json, tokenizer.json, tokenizer_config.json).
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace expertmesh {

// The bytes of `path`; NOT_FOUND naming the path when it cannot be opened.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace expertmesh
