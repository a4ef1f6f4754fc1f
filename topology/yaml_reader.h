// Strict reader of one YAML mapping for the planner's input files: every
// value is type-checked, unknown keys (typos) are errors, and each error names
// the file and the full key path and says what is expected. Internal to
// topology/ (used by cluster.cc and workload.cc).
#pragma once

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "yaml-cpp/yaml.h"

namespace expertmesh::topology::internal {

// Parses a whole YAML document; a syntax error names `source`, line and column.
inline absl::StatusOr<YAML::Node> ParseYamlDocument(const std::string& text, const std::string& source) {
  try {
    return YAML::Load(text);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not valid YAML (line ", e.mark.line + 1, ", column ",
                                                   e.mark.column + 1, "): ", e.msg));
  }
}

// Walks one YAML mapping, remembering which keys were read so that unknown
// keys (typos such as `hbm_gb`) are reported with the list of known ones.
class MapReader {
 public:
  MapReader(const YAML::Node& node, std::string path, const std::string& source)
      : node_(node), path_(std::move(path)), source_(source) {}

  absl::Status CheckIsMap() const {
    if (!node_.IsMap()) {
      return Error(absl::StrCat(path_.empty() ? std::string("the document") : absl::StrCat("`", path_, "`"),
                                " must be a mapping of keys to values"));
    }
    return absl::OkStatus();
  }

  bool Has(const std::string& key) {
    known_.insert(key);
    const YAML::Node v = Get(key);
    return v.IsDefined() && !v.IsNull();
  }

  // Const lookup: never inserts the key into the document.
  YAML::Node Get(const std::string& key) const {
    const YAML::Node& n = node_;
    return n[key];
  }

  absl::Status Double(const std::string& key, bool required, double* out, double min_value = 0.0) {
    if (!Has(key)) return required ? Missing(key, "a number") : absl::OkStatus();
    const YAML::Node v = Get(key);
    double d = 0;
    try {
      if (!v.IsScalar()) throw YAML::Exception(YAML::Mark(), "not a scalar");
      d = v.as<double>();
    } catch (const YAML::Exception&) {
      return Error(absl::StrCat("`", Key(key), "` must be a number, got ", Dump(v)));
    }
    if (!(d >= min_value)) {
      return Error(absl::StrCat("`", Key(key), "` must be >= ", min_value, ", got ", d));
    }
    *out = d;
    return absl::OkStatus();
  }

  absl::Status Int(const std::string& key, bool required, int64_t* out, int64_t min_value = 0) {
    if (!Has(key)) return required ? Missing(key, "an integer") : absl::OkStatus();
    const YAML::Node v = Get(key);
    int64_t i = 0;
    try {
      if (!v.IsScalar()) throw YAML::Exception(YAML::Mark(), "not a scalar");
      i = v.as<int64_t>();
    } catch (const YAML::Exception&) {
      return Error(absl::StrCat("`", Key(key), "` must be an integer, got ", Dump(v)));
    }
    if (i < min_value) return Error(absl::StrCat("`", Key(key), "` must be >= ", min_value, ", got ", i));
    *out = i;
    return absl::OkStatus();
  }

  absl::Status String(const std::string& key, bool required, std::string* out,
                      const std::vector<std::string>& allowed = {}) {
    if (!Has(key)) return required ? Missing(key, "a string") : absl::OkStatus();
    const YAML::Node v = Get(key);
    if (!v.IsScalar()) return Error(absl::StrCat("`", Key(key), "` must be a string, got ", Dump(v)));
    std::string s = v.as<std::string>();
    if (!allowed.empty() && std::find(allowed.begin(), allowed.end(), s) == allowed.end()) {
      return Error(absl::StrCat("`", Key(key), "` is \"", s, "\"; expected one of: ", absl::StrJoin(allowed, ", ")));
    }
    *out = s;
    return absl::OkStatus();
  }

  // A nested mapping; `*present` tells whether it was there.
  absl::StatusOr<MapReader> Child(const std::string& key, bool required) {
    if (!Has(key)) {
      if (required) return Missing(key, "a mapping");
      return MapReader(YAML::Node(YAML::NodeType::Map), Key(key), source_);
    }
    MapReader r(Get(key), Key(key), source_);
    RETURN_IF_ERROR(r.CheckIsMap());
    return r;
  }

  absl::Status CheckNoUnknownKeys() const {
    for (const auto& kv : node_) {
      const std::string k = kv.first.as<std::string>();
      if (known_.count(k) == 0) {
        return Error(absl::StrCat("unknown key `", Key(k), "`; known keys here: ",
                                  absl::StrJoin(std::vector<std::string>(known_.begin(), known_.end()), ", ")));
      }
    }
    return absl::OkStatus();
  }

  absl::Status Error(const std::string& msg) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": ", msg));
  }

 private:
  std::string Key(const std::string& k) const { return path_.empty() ? k : absl::StrCat(path_, ".", k); }
  absl::Status Missing(const std::string& key, const char* what) const {
    return Error(absl::StrCat("missing required key `", Key(key), "` (", what,
                              "); see docs/PLANNER.md for the file formats"));
  }
  static std::string Dump(const YAML::Node& v) {
    YAML::Emitter e;
    e << YAML::Flow << v;
    return absl::StrCat("`", e.c_str(), "`");
  }

  YAML::Node node_;
  std::string path_;
  std::string source_;
  std::set<std::string> known_;
};

}  // namespace expertmesh::topology::internal
