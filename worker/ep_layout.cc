#include "worker/ep_layout.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace expertmesh::worker {

absl::Status BuildEpLayout(const topology::ExpertPlacement& placement, const int32_t* ids, const float* weights,
                           int64_t T, int64_t top_k, EpLayout* out) {
  EpLayout& l = *out;
  const int P = static_cast<int>(placement.num_ranks());
  const int64_t K = top_k, E = placement.num_experts();
  if (K <= 0) return absl::InvalidArgumentError("EP layout: top_k must be positive");
  if (T < 0 || (T > 0 && (ids == nullptr || weights == nullptr))) {
    return absl::InvalidArgumentError("EP layout: T < 0 or null routes");
  }
  l.T = T;
  l.top_k = K;
  l.pair_rank.resize(static_cast<size_t>(T * K));
  l.pair_slot.resize(static_cast<size_t>(T * K));
  l.send_count.assign(static_cast<size_t>(P), 0);
  l.expert_count.assign(static_cast<size_t>(E), 0);
  // Replica of every (token, k); records per destination rank, each token
  // counted once per rank.
  std::vector<int64_t>& last = l.fill;
  last.assign(static_cast<size_t>(P), -1);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int32_t e = ids[t * K + k];
      if (e < 0 || e >= E) {
        return absl::InvalidArgumentError(
            absl::StrCat("EP layout: token ", t, " is routed to expert ", e, ", outside [0, ", E, ")"));
      }
      const auto [r, s] = placement.Replica(e, t);
      l.pair_rank[t * K + k] = r;
      l.pair_slot[t * K + k] = s;
      ++l.expert_count[e];
      if (last[r] != t) {
        last[r] = t;
        ++l.send_count[r];
      }
    }
  }
  l.send_start.assign(static_cast<size_t>(P) + 1, 0);
  for (int p = 0; p < P; ++p) l.send_start[p + 1] = l.send_start[p] + l.send_count[p];
  const int64_t ns = l.send_start[P];
  // Records by destination, tokens ascending inside each, with the
  // destination's entries of each; each token's records in destination order.
  l.send_token.resize(static_cast<size_t>(ns));
  l.entries.resize(static_cast<size_t>(ns * K));
  l.entry_expert.resize(static_cast<size_t>(ns * K));
  l.token_start.resize(static_cast<size_t>(T) + 1);
  l.token_record.resize(static_cast<size_t>(ns));
  std::vector<int64_t>& fill = l.fill;
  fill.assign(l.send_start.begin(), l.send_start.end() - 1);
  int64_t n_tok_rec = 0;
  l.token_start[0] = 0;
  for (int64_t t = 0; t < T; ++t) {
    for (int r = 0; r < P; ++r) {
      int64_t j = -1, m = 0;
      for (int64_t k = 0; k < K; ++k) {
        if (l.pair_rank[t * K + k] != r) continue;
        if (j < 0) {
          j = fill[r]++;
          l.send_token[j] = static_cast<int32_t>(t);
          l.token_record[n_tok_rec++] = static_cast<int32_t>(j);
        }
        l.entries[j * K + m] = EpEntry{l.pair_slot[t * K + k], weights[t * K + k]};
        l.entry_expert[j * K + m] = ids[t * K + k];
        ++m;
      }
      if (j >= 0) {
        for (; m < K; ++m) {
          l.entries[j * K + m] = EpEntry{-1, 0.0f};
          l.entry_expert[j * K + m] = -1;
        }
      }
    }
    l.token_start[t + 1] = static_cast<int32_t>(n_tok_rec);
  }
  return absl::OkStatus();
}

absl::Status EpLayout::SetRecvCounts(int me, const char* who) {
  const int P = num_ranks();
  if (static_cast<int>(recv_count.size()) != P) {
    return absl::InternalError(absl::StrCat(who, ": ", recv_count.size(), " record counts for ", P, " ranks"));
  }
  recv_start.assign(static_cast<size_t>(P) + 1, 0);
  for (int q = 0; q < P; ++q) {
    if (recv_count[q] < 0 || (q == me && recv_count[q] != send_count[q])) {
      return absl::InternalError(absl::StrCat(who, ": rank ", q, " announced ", recv_count[q], " records"));
    }
    recv_start[q + 1] = recv_start[q] + recv_count[q];
  }
  return absl::OkStatus();
}

namespace {

comm::AllToAllVLayout BytesLayout(const std::vector<int64_t>& send_count, const std::vector<int64_t>& send_start,
                                  const std::vector<int64_t>& recv_count, const std::vector<int64_t>& recv_start,
                                  size_t per_record) {
  comm::AllToAllVLayout lay;
  const size_t P = send_count.size();
  lay.send_bytes.resize(P);
  lay.send_offsets.resize(P);
  lay.recv_bytes.resize(P);
  lay.recv_offsets.resize(P);
  for (size_t p = 0; p < P; ++p) {
    lay.send_bytes[p] = static_cast<size_t>(send_count[p]) * per_record;
    lay.send_offsets[p] = static_cast<size_t>(send_start[p]) * per_record;
    lay.recv_bytes[p] = static_cast<size_t>(recv_count[p]) * per_record;
    lay.recv_offsets[p] = static_cast<size_t>(recv_start[p]) * per_record;
  }
  return lay;
}

}  // namespace

comm::AllToAllVLayout EpLayout::DispatchBytes(size_t bytes_per_record) const {
  return BytesLayout(send_count, send_start, recv_count, recv_start, bytes_per_record);
}

comm::AllToAllVLayout EpLayout::CombineBytes(size_t bytes_per_record) const {
  return BytesLayout(recv_count, recv_start, send_count, send_start, bytes_per_record);
}

}  // namespace expertmesh::worker
