// Helpers for the tests of common/: status assertions, scratch folders and
// hand-made safetensors files.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"

namespace expertmesh::testing_util {

#define ASSERT_OK(expr)                                       \
  do {                                                        \
    const ::absl::Status em_s_ = ::expertmesh::testing_util::ToStatus(expr); \
    ASSERT_TRUE(em_s_.ok()) << em_s_;                         \
  } while (0)

// Expects `expr` (Status or StatusOr) to fail with `code` and a message
// containing every one of `fragments`, on one line.
#define EXPECT_ERROR(expr, code, ...)                                                    \
  ::expertmesh::testing_util::ExpectError(::expertmesh::testing_util::ToStatus(expr), code, \
                                          {__VA_ARGS__}, #expr)

inline absl::Status ToStatus(const absl::Status& s) { return s; }
template <typename T>
absl::Status ToStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

void ExpectError(const absl::Status& s, absl::StatusCode code, const std::vector<std::string>& fragments,
                 const char* what);

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
