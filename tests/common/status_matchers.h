// Status assertions for every test of the project (header-only; include it,
// nothing to link). Each takes an absl::Status or an absl::StatusOr<T>; a
// file that also defines `ToStatus(const X&)` in expertmesh::testing_util
// for another status type (tests/coordinator/test_util.h does for
// grpc::Status) makes the macros take that type too.
//
//   ASSERT_OK(comm->Barrier(deadline));
//   EXPECT_OK(LoadConfig(path));
//   ASSERT_OK_AND_ASSIGN(Plan plan, BuildPlan(cfg, options));
//   EXPECT_ERROR(Parse("x"), absl::StatusCode::kInvalidArgument, "line 1", "expected");
//   ASSERT_ERROR(s, absl::StatusCode::kNotFound);
//
// EXPECT_ERROR / ASSERT_ERROR check the code, that the message is one line,
// and that it contains every given fragment (none: the code alone).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"

namespace expertmesh::testing_util {

inline absl::Status ToStatus(const absl::Status& s) { return s; }
template <typename T>
absl::Status ToStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

inline ::testing::AssertionResult IsOk(const char* what, const absl::Status& s) {
  if (s.ok()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << s;
}

inline ::testing::AssertionResult IsError(const char* what, const absl::Status& s, absl::StatusCode code,
                                          const std::vector<std::string>& fragments) {
  if (s.ok()) {
    return ::testing::AssertionFailure() << what << ": expected " << absl::StatusCodeToString(code) << ", got OK";
  }
  if (s.code() != code) {
    return ::testing::AssertionFailure() << what << ": expected " << absl::StatusCodeToString(code) << ", got " << s;
  }
  const std::string msg(s.message());
  if (msg.find('\n') != std::string::npos) {
    return ::testing::AssertionFailure() << what << ": message is not one line: " << msg;
  }
  for (const std::string& f : fragments) {
    if (msg.find(f) == std::string::npos) {
      return ::testing::AssertionFailure() << what << ": message lacks \"" << f << "\": " << s;
    }
  }
  return ::testing::AssertionSuccess();
}

}  // namespace expertmesh::testing_util

#define EXPECT_OK(expr) EXPECT_TRUE(::expertmesh::testing_util::IsOk(#expr, ::expertmesh::testing_util::ToStatus(expr)))
#define ASSERT_OK(expr) ASSERT_TRUE(::expertmesh::testing_util::IsOk(#expr, ::expertmesh::testing_util::ToStatus(expr)))

// Expects `expr` to fail with `code` (an absl::StatusCode) and a one-line
// message containing each of the optional fragments.
#define EXPECT_ERROR(expr, code, ...) \
  EXPECT_TRUE(                        \
      ::expertmesh::testing_util::IsError(#expr, ::expertmesh::testing_util::ToStatus(expr), code, {__VA_ARGS__}))
#define ASSERT_ERROR(expr, code, ...) \
  ASSERT_TRUE(                        \
      ::expertmesh::testing_util::IsError(#expr, ::expertmesh::testing_util::ToStatus(expr), code, {__VA_ARGS__}))

// ASSERT_OK_AND_ASSIGN(lhs, rexpr): evaluates the StatusOr `rexpr`, fails
// the test (returning from the function) unless it is OK, else moves its
// value into `lhs` (a declaration such as `auto x` or an existing variable).
#define ASSERT_OK_AND_ASSIGN(lhs, rexpr) \
  EM_ASSERT_OK_AND_ASSIGN_IMPL(EM_STATUS_MATCHERS_CONCAT(em_statusor_, __LINE__), lhs, rexpr)
#define EM_ASSERT_OK_AND_ASSIGN_IMPL(var, lhs, rexpr)                                               \
  auto var = (rexpr);                                                                               \
  ASSERT_TRUE(::expertmesh::testing_util::IsOk(#rexpr, ::expertmesh::testing_util::ToStatus(var))); \
  lhs = *std::move(var)
#define EM_STATUS_MATCHERS_CONCAT_INNER(a, b) a##b
#define EM_STATUS_MATCHERS_CONCAT(a, b) EM_STATUS_MATCHERS_CONCAT_INNER(a, b)
