// Expert-parallel dispatch/combine: the MoE layer's routed experts spread
// over the EP ranks of a stage, tokens moved to them and back by all-to-alls.
//
// One step, on every rank (each rank owns the tokens of its own sequences):
//   1. layout — for each token and each of its top-k experts, the replica
//      (rank, local slot) from the ExpertPlacement; tokens per destination rank;
//   2. pack — each token goes ONCE to each destination rank, as one record:
//      the list of that rank's (slot, weight) pairs and the hidden state
//      (fp32, or fp8 e4m3 with one fp32 scale per 128 values). One message
//      per destination: [the records' (slot, weight) lists][their payloads],
//      gathered by the transport straight from x where it can (no staging
//      copy); this rank's own records never leave it (read in place);
//   3. dispatch all-to-all-v (after a small all-to-all of record counts);
//   4. the expert side: grouped by local slot, every record's token runs
//      through the experts the record names; the weighted outputs are summed
//      into ONE partial row per record (weights applied where the experts are);
//   5. combine all-to-all-v: the partial rows go back to their owners;
//   6. combine: each token's output is the sum of its partial rows (in a
//      fixed order, each block added while later ones are still arriving),
//      in the original token order. The shared expert is added locally.
// Every rank joins both all-to-alls, also with zero tokens or zero slots.
//
// Step 1 is BuildEpLayout (worker/ep_layout.h), shared with the CUDA
// exchange. EpDispatcher does 1–3 and 5–6 and leaves 4 to its caller (the
// layer below runs the SwiGLU experts; the benchmark runs identity experts).
// ExpertParallelMoe is the whole layer and equals MoeForwardLocal;
// CpuEpExchange is the CPU engine's ExpertExchange (worker/expert_exchange.h)
// over one ExpertParallelMoe per MoE layer.
// Both are used by one thread (the communicator's owner); buffers are kept
// and reused from step to step. See docs/EXPERT_PARALLEL.md.
//
//   DispatchOptions o;
//   o.hidden = H;
//   o.top_k = 8;
//   EpDispatcher d(comm, &placement, o);
//   RETURN_IF_ERROR(d.Dispatch(x, T, ids, weights));
//   for (int64_t s = 0; s < d.num_local_slots(); ++s)
//     for (const EpDispatcher::SlotEntry& e : d.slot_entries(s))
//       ... d.GatherToken(e.record, row); write or add e.weight * expert(row)
//           into d.partial(e.record) ...
//   RETURN_IF_ERROR(d.Combine(y));
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "topology/placement.h"
#include "worker/comm/communicator.h"
#include "worker/ep_layout.h"
#include "worker/expert_exchange.h"
#include "worker/model.h"
#include "worker/moe.h"

namespace expertmesh::worker {

struct DispatchOptions {
  int64_t hidden = 0;        // H, values per token
  int64_t top_k = 0;         // experts per token
  bool fp8 = false;          // dispatch payload as e4m3 + one fp32 scale per 128 values
  // Send the dispatch payload straight from x when the communicator can
  // gather (Caps::gather_sends); false: copy it into a staging buffer first.
  bool gather_sends = true;
  absl::Duration timeout = absl::Seconds(60);  // deadline of each all-to-all
};

// Values per fp8 scale block.
constexpr int64_t kFp8Block = 128;

// Wall time of the phases of the last Dispatch and Combine, in seconds.
struct DispatchTimes {
  double layout = 0;         // replica choice, counts, record order
  double pack = 0;           // quantise (fp8), describe or copy the remote blocks
  double dispatch_comm = 0;  // counts all-to-all + payload all-to-all-v
  double unpack = 0;         // index received records by slot
  double combine_comm = 0;   // partial rows all-to-all-v (waiting, not summing)
  double combine = 0;        // summing partial rows into the output (overlaps the transfers)
  double dispatch_total() const { return layout + pack + dispatch_comm + unpack; }
  double combine_total() const { return combine_comm + combine; }
  double arithmetic() const { return layout + pack + unpack + combine; }
};

class EpDispatcher {
 public:
  // One record entry on the expert side: record index and the gate weight.
  struct SlotEntry {
    int64_t record;
    float weight;
  };

  // `comm` and `placement` must outlive the dispatcher; placement.num_ranks()
  // must equal comm->size() (checked by Dispatch).
  EpDispatcher(comm::Communicator* comm, const topology::ExpertPlacement* placement, DispatchOptions options);

  // Steps 1–3 for T local tokens: x [T, H], ids and weights [T, top_k]
  // (router output; ids are logical experts). Blocking: returns when this
  // rank has received every record sent to it, or an error from the
  // communicator (each all-to-all has the options' timeout as deadline).
  // x must stay valid and unchanged until Combine returns: this rank's own
  // records are read in place and remote ones are sent straight from x
  // (gathered sends) when the communicator can. ids and weights may be
  // released once Dispatch returns. T may be 0.
  absl::Status Dispatch(const float* x, int64_t T, const int32_t* ids, const float* weights);

  // Expert side, valid after Dispatch until the next Dispatch. Records are
  // numbered by source rank (rank 0's first), in each source's token order.
  int64_t num_records() const { return num_recv_; }
  // Records that came from source rank r: [record_start(r), record_start(r + 1)).
  int64_t record_start(int r) const { return layout_.recv_start[static_cast<size_t>(r)]; }
  // Slots the placement puts on this rank (0 if the placement has fewer ranks).
  int64_t num_local_slots() const {
    if (comm_->rank() >= placement_->num_ranks()) return 0;
    return static_cast<int64_t>(placement_->slots_of_rank(comm_->rank()).size());
  }
  // The entries of local slot s (records whose token goes through slot s).
  absl::Span<const SlotEntry> slot_entries(int64_t s) const {
    return absl::MakeConstSpan(slot_entries_).subspan(static_cast<size_t>(slot_start_[s]),
                                                      static_cast<size_t>(slot_start_[s + 1] - slot_start_[s]));
  }
  // The logical expert of local slot s.
  int32_t slot_expert(int64_t s) const { return placement_->slots_of_rank(comm_->rank())[s]; }
  // Writes the hidden state of record i to out[0..H) (dequantising an fp8
  // payload): what the expert side calls while gathering its input rows.
  void GatherToken(int64_t i, float* out) const;
  // The fp32 hidden state of record i in place (H floats), or null with fp8.
  const float* token(int64_t i) const {
    return options_.fp8 ? nullptr : reinterpret_cast<const float*>(rec_row_[static_cast<size_t>(i)]);
  }
  // The partial-sum row of record i (H floats). Uninitialised after
  // Dispatch: the expert side must write every row (each record names at
  // least one slot), e.g. assign at a record's first entry and add after.
  float* partial(int64_t i) { return combine_send_.data() + i * options_.hidden; }

  // Steps 5–6: sends the partial rows back and writes y [T, H] (the T of the
  // last Dispatch) = sum of the token's partial rows, overwriting y; with
  // `accumulate`, y[t] += each partial row instead (the same order), and
  // rows of tokens routed nowhere stay as they are. Blocking, same errors as
  // Dispatch. Every rank calls it after every Dispatch.
  absl::Status Combine(float* y, bool accumulate = false);

  const DispatchTimes& times() const { return times_; }
  int64_t hidden() const { return options_.hidden; }
  // Bytes of the last dispatch / combine matrix row of this rank (self
  // block included) and the bytes of one record on the wire (its (slot,
  // weight) list plus the payload).
  int64_t dispatch_bytes_sent() const { return num_send_ * record_bytes_; }
  int64_t combine_bytes_sent() const { return num_recv_ * options_.hidden * 4; }
  int64_t record_bytes() const { return record_bytes_; }
  // Records this rank sent in the last dispatch: one per (token, destination rank).
  int64_t num_sent_records() const { return num_send_; }
  // The byte layouts of the last dispatch and combine all-to-all-v, self
  // block included (the benchmark runs the transport's plain all-to-all-v of
  // exactly these matrices).
  const comm::AllToAllVLayout& dispatch_layout() const { return dispatch_layout_; }
  const comm::AllToAllVLayout& combine_layout() const { return combine_layout_; }
  // The routing layout of the last Dispatch (counts per rank and expert, send order).
  const EpLayout& layout() const { return layout_; }

 private:
  void Pack();
  absl::Status Unpack();
  // Row of the combine result for sent record j (received, or this rank's own).
  const float* CombineRow(int64_t j) const;
  // y[t] (=, first time, else +=) the rows of the records sent to rank p.
  void AccumulateFrom(int p, float* y);

  comm::Communicator* comm_;
  const topology::ExpertPlacement* placement_;
  DispatchOptions options_;
  bool gather_ = false;        // the communicator sends gathered pieces
  int64_t meta_bytes_ = 0;     // per record: top_k (int32 slot, float weight)
  int64_t row_bytes_ = 0;      // per record: the payload (fp32 row, or fp8 scales + codes)
  int64_t record_bytes_ = 0;   // meta_bytes_ + row_bytes_

  // The layout of the last Dispatch (worker/ep_layout.h): sent records are
  // grouped by destination, tokens ascending inside each group; their
  // (slot, weight) lists (layout_.entries) are the records' headers.
  EpLayout layout_;
  const float* x_ = nullptr;
  int64_t T_ = 0;
  int64_t num_send_ = 0;
  std::vector<char> quant_;               // fp8: [T_] payloads, each token quantised once
  std::vector<char> pack_;                // without gathered sends: packed remote blocks
  std::vector<comm::Segment> segs_;       // gathered sends: pieces of every remote block
  std::vector<int64_t> seg_start_;        // (P + 1)
  // Receiver side (records for this rank's slots).
  int64_t num_recv_ = 0;
  std::vector<size_t> recv_off_;          // byte offset of each remote source's block in recv_buf_
  std::vector<char> recv_buf_;            // per remote source: [n metas][n payloads]
  std::vector<const char*> rec_row_;      // payload of record i (in recv_buf_, x_ or quant_)
  std::vector<int64_t> slot_start_;       // CSR by local slot
  std::vector<SlotEntry> slot_entries_;
  std::vector<float> combine_send_;       // [num_recv_, H]
  std::vector<float> combine_recv_;       // [num_send_, H] (this rank's own rows stay in combine_send_)
  std::vector<char> combined_;            // per token: y row written yet
  comm::AllToAllVLayout dispatch_layout_, combine_layout_;
  comm::Batch batch_;
  DispatchTimes times_;
  std::vector<int64_t> scratch_;          // Unpack's fill pointers
};

// The MoE layer with routed experts spread over the ranks of `comm`:
// router (replicated), dispatch, this rank's slots' experts, combine, shared
// expert. `weights` must hold the router, the shared expert and the expert of
// every slot placed on this rank (other experts may be absent). comm,
// placement and weights must outlive the layer.
class ExpertParallelMoe {
 public:
  ExpertParallelMoe(comm::Communicator* comm, const topology::ExpertPlacement* placement, const MoeWeights* weights,
                    DispatchOptions options);

  // y [T, H] = routed(x) + shared(x) for this rank's T tokens (T may be 0;
  // x and y do not overlap). Blocking and collective: every rank of comm
  // calls it once per step. kFailedPrecondition, before any exchange, when a
  // slot's expert is not loaded here; otherwise the dispatcher's and the
  // communicator's errors (a deadline per all-to-all).
  absl::Status Forward(const float* x, int64_t T, float* y);
  // The routed part only, with routes the caller computed (ids and weights
  // [T, top_k], the router's output): y[t] += the sum of the token's partial
  // rows (no shared expert). Same contract otherwise; what CpuEpExchange runs.
  absl::Status ForwardRouted(const float* x, int64_t T, const int32_t* ids, const float* weights, float* y);

  const EpDispatcher& dispatcher() const { return dispatcher_; }
  // Seconds spent in the last Forward's expert compute (step 4).
  double expert_seconds() const { return expert_seconds_; }

 private:
  absl::Status CheckLocalExperts();
  void RunLocalExperts();
  // Dispatch, local experts, combine (y overwritten, or added to with accumulate).
  absl::Status Exchange(const float* x, int64_t T, const int32_t* ids, const float* weights, float* y,
                        bool accumulate);

  const MoeWeights* w_;
  bool checked_ = false;  // CheckLocalExperts passed
  EpDispatcher dispatcher_;
  double expert_seconds_ = 0;
  std::vector<float> xin_, out_, scratch_;
};

// The CPU engine's ExpertExchange (worker/expert_exchange.h): per MoE layer
// an ExpertParallelMoe over `comm` with the layer's placement and the
// shard's experts, run on the routes the engine computed (host memory; the
// exchange never routes). Layer::x is fp32. One owner thread.
class CpuEpExchange : public ExpertExchange {
 public:
  // `shard` holds the experts, `placements` maps each MoE layer of the shard
  // to its placement over comm->size() ranks; they must outlive the
  // exchange. `options` gives the timeout, fp8 and gather_sends (hidden and
  // top_k come from each layer's weights). comm may be null: Run fails with
  // kFailedPrecondition until Reset gives one.
  CpuEpExchange(const ModelShard* shard, comm::Communicator* comm,
                const std::map<int64_t, topology::ExpertPlacement>* placements, DispatchOptions options);

  absl::Status Run(const Layer& layer) override;
  ExchangeTimes times() const override { return times_; }

  // A new communicator (after a lost peer; null: none for now), or new
  // placements or experts (after a rebalance): the per-layer state, which
  // points at the old ones, is dropped.
  void Reset(comm::Communicator* comm);
  comm::Communicator* comm() const { return comm_; }

 private:
  const ModelShard* shard_;
  comm::Communicator* comm_;
  const std::map<int64_t, topology::ExpertPlacement>* placements_;
  DispatchOptions options_;
  std::map<int64_t, std::unique_ptr<ExpertParallelMoe>> layers_;
  ExchangeTimes times_;
};

// FP8 payload helpers (exposed for tests): quantises n values into e4m3 codes
// with one fp32 scale (amax / 448) per kFp8Block values, and back.
void QuantizeFp8Blocks(const float* x, int64_t n, uint8_t* q, float* scales);
void DequantizeFp8Blocks(const uint8_t* q, const float* scales, int64_t n, float* x);
// Fast float -> e4m3 (round to nearest even, saturating), bit-identical to
// FloatToF8E4M3 for finite inputs.
uint8_t FastFloatToF8E4M3(float f);

}  // namespace expertmesh::worker
