// Helpers for the tests of common/: status assertions (status_matchers.h), scratch folders and
// hand-made safetensors files.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "tests/common/status_matchers.h"

namespace expertmesh::testing_util {

// A fresh empty folder under $TMPDIR (or /tmp), removed by the destructor.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void WriteFile(const std::string& path, const std::string& bytes);

// A safetensors file from a raw header string and a data section.
std::string SafetensorsBytes(const std::string& header_json, const std::string& data);

}  // namespace expertmesh::testing_util
