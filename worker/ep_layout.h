// The host-side layout of one MoE layer's routed tokens over the EP ranks of
// a stage: the one routine behind both expert exchanges (the CPU's
// EpDispatcher in worker/dispatch.h and the GPU's CudaEpExchange in
// worker/cuda_ep.h), so that both move the same records in the same order.
//
// From the router's output (T tokens, top_k logical experts and weights
// each) and the ExpertPlacement:
//   * every (token, k) pair picks its replica (rank, local slot) with
//     ExpertPlacement::Replica(expert, token);
//   * a token becomes ONE record per destination rank that holds any of its
//     experts, listing that rank's (slot, expert, weight) entries in k order
//     (padded to top_k with slot = expert = -1, weight 0);
//   * records are grouped by destination rank, tokens ascending inside each
//     group (the send order); each token's records are listed in
//     destination order (what the combine sums);
//   * counts: records per destination rank, (token, k) pairs per expert.
// After the record-count all-to-all, SetRecvCounts checks what the peers
// announced and numbers the received records by source rank; the byte
// layouts of the dispatch and combine all-to-all-v follow from the counts.
//
//   EpLayout l;
//   RETURN_IF_ERROR(BuildEpLayout(placement, ids, weights, T, K, &l));
//   comm->AllToAll(l.send_count.data(), l.recv_count.data(), 8, kHost, deadline);
//   RETURN_IF_ERROR(l.SetRecvCounts(comm->rank(), "dispatch"));
//   comm->AllToAllV(send, recv, l.DispatchBytes(record_bytes), ...);
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "topology/placement.h"
#include "worker/comm/communicator.h"

namespace expertmesh::worker {

// One entry of a record: the destination's local slot (-1: padding) and the
// gate weight. 8 bytes: the CPU exchange sends these as the record header.
struct EpEntry {
  int32_t slot;
  float weight;
};
static_assert(sizeof(EpEntry) == 8, "EpEntry is a wire format");

struct EpLayout {
  int64_t T = 0;      // tokens of this rank
  int64_t top_k = 0;  // experts per token (entries per record)

  // Send side (BuildEpLayout).
  std::vector<int64_t> send_count;     // [P] records per destination rank
  std::vector<int64_t> send_start;     // [P + 1] first record of each destination
  std::vector<int32_t> send_token;     // [records] the token of each record (send order)
  std::vector<EpEntry> entries;        // [records * top_k] (slot, weight), k order, padded
  std::vector<int32_t> entry_expert;   // [records * top_k] logical expert of each entry, -1 pads
  std::vector<int32_t> token_start;    // [T + 1] token t's records: token_record[token_start[t] .. [t+1])
  std::vector<int32_t> token_record;   // [records] each token's records in destination order
  std::vector<int64_t> expert_count;   // [E] (token, k) pairs routed to each logical expert

  // Receive side (SetRecvCounts): records from each source rank, numbered
  // by source (rank 0's first).
  std::vector<int64_t> recv_count;     // [P], filled by the counts all-to-all
  std::vector<int64_t> recv_start;     // [P + 1]

  int num_ranks() const { return static_cast<int>(send_count.size()); }
  int64_t num_sent() const { return send_start.empty() ? 0 : send_start.back(); }
  int64_t num_received() const { return recv_start.empty() ? 0 : recv_start.back(); }

  // Checks the counts the peers announced (non-negative; this rank's own
  // equal to what it sends itself) and fills recv_start. kInternal naming
  // `who` and the rank otherwise.
  absl::Status SetRecvCounts(int me, const char* who);
  // The byte layout of an all-to-all-v that moves `bytes_per_record` per
  // record to the records' destinations (dispatch), or back from them to the
  // records' owners (combine). Self blocks included.
  comm::AllToAllVLayout DispatchBytes(size_t bytes_per_record) const;
  comm::AllToAllVLayout CombineBytes(size_t bytes_per_record) const;

  // Scratch of BuildEpLayout, kept for reuse.
  std::vector<int32_t> pair_rank, pair_slot;  // [T * top_k]
  std::vector<int64_t> fill;                  // [P]
};

// Builds the send side of `out` (buffers reused from call to call) for T
// tokens routed to ids / weights [T, top_k] (logical experts) over
// `placement`. T may be 0. kInvalidArgument, naming the token, when an id is
// outside [0, num_experts); top_k must be positive.
absl::Status BuildEpLayout(const topology::ExpertPlacement& placement, const int32_t* ids, const float* weights,
                           int64_t T, int64_t top_k, EpLayout* out);

}  // namespace expertmesh::worker
