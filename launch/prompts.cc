#include "launch/prompts.h"

#include <fstream>
#include <limits>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace expertmesh::launch {

absl::StatusOr<std::vector<std::vector<int32_t>>> ReadPrompts(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open prompts file"));
  std::vector<std::vector<int32_t>> prompts;
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = absl::StrCat(path, ":", lineno);
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": not a JSON object; expected {\"tokens\": [ids...]}"));
    }
    auto it = j.find("tokens");
    if (it == j.end() || !it->is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": missing \"tokens\" array; expected {\"tokens\": [ids...]}"));
    }
    std::vector<int32_t> toks;
    for (const auto& t : *it) {
      if (!t.is_number_integer() || t.get<int64_t>() < std::numeric_limits<int32_t>::min() ||
          t.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": token ", toks.size(), " is not a 32-bit integer"));
      }
      toks.push_back(static_cast<int32_t>(t.get<int64_t>()));
    }
    prompts.push_back(std::move(toks));
  }
  if (prompts.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no prompts (empty file)"));
  return prompts;
}

}  // namespace expertmesh::launch
