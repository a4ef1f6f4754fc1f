// Status helpers shared by every library of expertmesh.
//
// Library code returns absl::Status / absl::StatusOr<T>; foreign error codes
// (errno, MPI, UCX, CUDA, NCCL) are converted at the first line that sees them.
// Debian's abseil (20220623) has no status macros, so they are defined once here.
//
//   absl::StatusOr<int> Parse(const std::string& s);
//   absl::Status Use() {
//     ASSIGN_OR_RETURN(int v, Parse("3"));
//     RETURN_IF_ERROR(Check(v));
//     return absl::OkStatus();
//   }
#pragma once

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define EM_STATUS_CONCAT_INNER(a, b) a##b
#define EM_STATUS_CONCAT(a, b) EM_STATUS_CONCAT_INNER(a, b)

#define RETURN_IF_ERROR(expr)                          \
  do {                                                 \
    ::absl::Status em_status_ = (expr);                \
    if (!em_status_.ok()) return em_status_;           \
  } while (0)

#define ASSIGN_OR_RETURN(lhs, expr) \
  EM_ASSIGN_OR_RETURN_IMPL(EM_STATUS_CONCAT(em_statusor_, __LINE__), lhs, expr)

#define EM_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.ok()) return std::move(tmp).status(); \
  lhs = std::move(tmp).value()

namespace expertmesh {

// Prefixes a status message with context, keeping its code.
inline absl::Status Annotate(const absl::Status& s, absl::string_view context) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(context, ": ", s.message()));
}

}  // namespace expertmesh
