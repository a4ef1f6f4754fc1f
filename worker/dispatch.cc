#include "worker/dispatch.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status.h"

namespace expertmesh::worker {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

int64_t RoundUp(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

}  // namespace

uint8_t FastFloatToF8E4M3(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return 0x7f;                                // NaN
  if (abs >= 0x43e00000u) return static_cast<uint8_t>(sign | 0x7eu);  // >= 448: saturate
  if (abs < 0x3c800000u) {                                            // < 2^-6: subnormal, step 2^-9
    float a;
    std::memcpy(&a, &abs, 4);
    const float t = a * 512.0f + 8388608.0f;  // adding 2^23 rounds to an integer, ties to even
    uint32_t tb;
    std::memcpy(&tb, &t, 4);
    return static_cast<uint8_t>(sign | (tb - 0x4b000000u));
  }
  // Normal: keep 3 of 23 mantissa bits, round to nearest even, rebias 127 -> 7.
  uint32_t r = (abs + 0x7ffffu + ((abs >> 20) & 1u)) >> 20;
  r -= (127u - 7u) << 3;
  return static_cast<uint8_t>(sign | std::min(r, 0x7eu));
}

namespace {

typedef float F8x __attribute__((vector_size(32)));
typedef uint32_t U8x __attribute__((vector_size(32)));

// FastFloatToF8E4M3 on 8 lanes at once (the same bit recipe, selects instead
// of branches). Inlined into each target clone of QuantizeFp8Blocks.
inline __attribute__((always_inline)) void ToF8E4M3x8(const float* in, uint8_t* out) {
  U8x bits;
  std::memcpy(&bits, in, sizeof(bits));
  const U8x sign = (bits >> 24) & 0x80u;
  const U8x abs = bits & 0x7fffffffu;
  U8x normal = ((abs + 0x7ffffu + ((abs >> 20) & 1u)) >> 20) - ((127u - 7u) << 3);
  normal = normal > 0x7eu ? U8x{} + 0x7eu : normal;
  F8x a;
  std::memcpy(&a, &abs, sizeof(a));
  const F8x t = a * 512.0f + 8388608.0f;
  U8x tb;
  std::memcpy(&tb, &t, sizeof(tb));
  U8x code = abs < 0x3c800000u ? tb - 0x4b000000u : normal;
  code = abs >= 0x43e00000u ? U8x{} + 0x7eu : code;
  code |= sign;
  code = abs > 0x7f800000u ? U8x{} + 0x7fu : code;
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(code[i]);
}

}  // namespace

// Built twice, for AVX2 (8 lanes in one register: ~0.6 ns per value) and for
// the x86-64 baseline; the loader picks one for the CPU it runs on.
__attribute__((target_clones("avx2", "default"))) void QuantizeFp8Blocks(const float* x, int64_t n, uint8_t* q,
                                                                          float* scales) {
  float tmp[8];
  for (int64_t b = 0; b * kFp8Block < n; ++b) {
    const int64_t lo = b * kFp8Block, hi = std::min(n, lo + kFp8Block);
    U8x m = {};
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8) {
      U8x v;
      std::memcpy(&v, x + i, sizeof(v));
      v &= 0x7fffffffu;  // |x| as bits: ordered like the floats (NaN aside)
      m = v > m ? v : m;
    }
    uint32_t mb = 0;
    for (int l = 0; l < 8; ++l) mb = std::max(mb, m[l]);
    float amax;
    std::memcpy(&amax, &mb, 4);
    for (; i < hi; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float scale = amax / kF8E4M3Max;
    const float inv = amax > 0 ? kF8E4M3Max / amax : 0.0f;
    scales[b] = scale;
    for (i = lo; i + 8 <= hi; i += 8) {
      F8x v;
      std::memcpy(&v, x + i, sizeof(v));
      v *= inv;
      std::memcpy(tmp, &v, sizeof(v));
      ToF8E4M3x8(tmp, q + i);
    }
    for (; i < hi; ++i) q[i] = FastFloatToF8E4M3(x[i] * inv);
  }
}

void DequantizeFp8Blocks(const uint8_t* q, const float* scales, int64_t n, float* x) {
  for (int64_t b = 0; b * kFp8Block < n; ++b) {
    const int64_t lo = b * kFp8Block, hi = std::min(n, lo + kFp8Block);
    const float scale = scales[b];
    for (int64_t i = lo; i < hi; ++i) x[i] = F8E4M3ToFloat(q[i]) * scale;
  }
}

EpDispatcher::EpDispatcher(comm::Communicator* comm, const topology::ExpertPlacement* placement,
                           DispatchOptions options)
    : comm_(comm), placement_(placement), options_(options) {
  const int64_t H = options_.hidden;
  gather_ = options_.gather_sends && comm_->caps().gather_sends;
  meta_bytes_ = options_.top_k * static_cast<int64_t>(sizeof(EpEntry));
  // fp8 payload: the scales first (4-byte aligned), then one byte per value.
  row_bytes_ = options_.fp8 ? RoundUp((H + kFp8Block - 1) / kFp8Block * 4 + H, 4) : H * 4;
  record_bytes_ = meta_bytes_ + row_bytes_;
  const size_t P = static_cast<size_t>(comm_->size());
  layout_.send_count.assign(P, 0);
  layout_.send_start.assign(P + 1, 0);
  layout_.recv_count.assign(P, 0);
  layout_.recv_start.assign(P + 1, 0);
  recv_off_.assign(P, 0);
  seg_start_.assign(P + 1, 0);
  slot_start_.assign(static_cast<size_t>(num_local_slots()) + 1, 0);
}

void EpDispatcher::Pack() {
  const int P = comm_->size(), me = comm_->rank();
  const int64_t H = options_.hidden;
  const char* meta = reinterpret_cast<const char*>(layout_.entries.data());
  const char* rows = reinterpret_cast<const char*>(x_);
  if (options_.fp8) {
    // Quantise each token once; every destination gets the same bytes.
    const int64_t nscale = (H + kFp8Block - 1) / kFp8Block;
    quant_.resize(static_cast<size_t>(T_ * row_bytes_));
    for (int64_t t = 0; t < T_; ++t) {
      char* dst = quant_.data() + t * row_bytes_;
      QuantizeFp8Blocks(x_ + t * H, H, reinterpret_cast<uint8_t*>(dst + nscale * 4), reinterpret_cast<float*>(dst));
    }
    rows = quant_.data();
  }
  if (gather_) {
    // Describe each remote block as pieces: its metas, then runs of
    // consecutive token rows (merged into one piece each).
    segs_.clear();
    for (int p = 0; p < P; ++p) {
      seg_start_[p] = static_cast<int64_t>(segs_.size());
      if (p == me || layout_.send_count[p] == 0) continue;
      segs_.push_back({meta + layout_.send_start[p] * meta_bytes_,
                       static_cast<size_t>(layout_.send_count[p] * meta_bytes_)});
      for (int64_t j = layout_.send_start[p]; j < layout_.send_start[p + 1];) {
        int64_t e = j + 1;
        while (e < layout_.send_start[p + 1] && layout_.send_token[e] == layout_.send_token[e - 1] + 1) ++e;
        segs_.push_back({rows + layout_.send_token[j] * row_bytes_, static_cast<size_t>((e - j) * row_bytes_)});
        j = e;
      }
    }
    seg_start_[P] = static_cast<int64_t>(segs_.size());
    return;
  }
  // No gathered sends: copy the remote blocks into one staging buffer.
  pack_.resize(static_cast<size_t>(num_send_ * record_bytes_));
  for (int p = 0; p < P; ++p) {
    if (p == me) continue;
    char* dst = pack_.data() + layout_.send_start[p] * record_bytes_;
    std::memcpy(dst, meta + layout_.send_start[p] * meta_bytes_, static_cast<size_t>(layout_.send_count[p] * meta_bytes_));
    dst += layout_.send_count[p] * meta_bytes_;
    for (int64_t j = layout_.send_start[p]; j < layout_.send_start[p + 1]; ++j, dst += row_bytes_) {
      std::memcpy(dst, rows + layout_.send_token[j] * row_bytes_, static_cast<size_t>(row_bytes_));
    }
  }
}

absl::Status EpDispatcher::Unpack() {
  const int P = comm_->size(), me = comm_->rank();
  const int64_t H = options_.hidden, K = options_.top_k;
  const int64_t S = num_local_slots();
  // Where the metas and payloads of each source's records are.
  std::vector<const char*> meta(static_cast<size_t>(P)), payload(static_cast<size_t>(P));
  for (int q = 0; q < P; ++q) {
    if (q == me) {
      meta[q] = reinterpret_cast<const char*>(layout_.entries.data()) + layout_.send_start[me] * meta_bytes_;
      payload[q] = nullptr;  // this rank's own tokens: rows of x (or quant_), by layout_.send_token
    } else {
      meta[q] = recv_buf_.data() + recv_off_[q];
      payload[q] = meta[q] + layout_.recv_count[q] * meta_bytes_;
    }
  }
  slot_start_.assign(static_cast<size_t>(S + 1), 0);
  for (int q = 0; q < P; ++q) {
    const EpEntry* hdr = reinterpret_cast<const EpEntry*>(meta[q]);
    for (int64_t i = 0; i < layout_.recv_count[q]; ++i, hdr += K) {
      int64_t m = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int32_t s = hdr[k].slot;
        if (s < 0) continue;
        if (s >= S) {
          return absl::InternalError(absl::StrCat("dispatch: rank ", me, " received from rank ", q,
                                                  " a record for slot ", s, " but holds ", S,
                                                  " slots; the ranks' placements disagree"));
        }
        ++slot_start_[s + 1];
        ++m;
      }
      if (m == 0) {
        return absl::InternalError(absl::StrCat("dispatch: rank ", me, " received from rank ", q,
                                                " a record that names no slot"));
      }
    }
  }
  for (int64_t s = 0; s < S; ++s) slot_start_[s + 1] += slot_start_[s];
  slot_entries_.resize(static_cast<size_t>(slot_start_[S]));
  std::vector<int64_t>& fill = scratch_;
  fill.assign(slot_start_.begin(), slot_start_.end() - 1);
  rec_row_.resize(static_cast<size_t>(num_recv_));
  for (int q = 0; q < P; ++q) {
    const EpEntry* hdr = reinterpret_cast<const EpEntry*>(meta[q]);
    for (int64_t i = 0; i < layout_.recv_count[q]; ++i, hdr += K) {
      const int64_t rec = layout_.recv_start[q] + i;
      for (int64_t k = 0; k < K; ++k) {
        if (hdr[k].slot >= 0) slot_entries_[fill[hdr[k].slot]++] = SlotEntry{rec, hdr[k].weight};
      }
      const char* row = q == me ? (options_.fp8 ? quant_.data() + layout_.send_token[layout_.send_start[me] + i] * row_bytes_
                                                : reinterpret_cast<const char*>(x_ + layout_.send_token[layout_.send_start[me] + i] * H))
                                : payload[q] + i * row_bytes_;
      rec_row_[rec] = row;
    }
  }
  return absl::OkStatus();
}

absl::Status EpDispatcher::Dispatch(const float* x, int64_t T, const int32_t* ids, const float* weights) {
  times_ = DispatchTimes{};
  const int P = comm_->size(), me = comm_->rank();
  if (placement_->num_ranks() != P) {
    return absl::InvalidArgumentError(absl::StrCat("dispatch: the placement has ", placement_->num_ranks(),
                                                   " ranks but the communicator has ", P));
  }
  if (options_.hidden <= 0 || options_.top_k <= 0) {
    return absl::InvalidArgumentError("dispatch: hidden and top_k must be positive");
  }
  if (T < 0 || (T > 0 && (x == nullptr || ids == nullptr || weights == nullptr))) {
    return absl::InvalidArgumentError("dispatch: T < 0 or null inputs");
  }
  x_ = x;
  T_ = T;
  auto t0 = Clock::now();
  RETURN_IF_ERROR(BuildEpLayout(*placement_, ids, weights, T, options_.top_k, &layout_));
  num_send_ = layout_.num_sent();
  times_.layout = Since(t0);

  t0 = Clock::now();
  Pack();
  times_.pack = Since(t0);

  t0 = Clock::now();
  const absl::Time deadline = absl::Now() + options_.timeout;
  layout_.recv_count.assign(static_cast<size_t>(P), 0);
  RETURN_IF_ERROR(comm_->AllToAll(layout_.send_count.data(), layout_.recv_count.data(), sizeof(int64_t),
                                  comm::MemoryKind::kHost, deadline));
  RETURN_IF_ERROR(layout_.SetRecvCounts(me, "dispatch"));
  size_t off = 0;
  for (int q = 0; q < P; ++q) {
    recv_off_[q] = off;
    if (q != me) off += static_cast<size_t>(layout_.recv_count[q] * record_bytes_);
  }
  num_recv_ = layout_.num_received();
  recv_buf_.resize(off);
  // The byte matrices of this step (self blocks included), for the benchmark.
  dispatch_layout_ = layout_.DispatchBytes(static_cast<size_t>(record_bytes_));
  combine_layout_ = layout_.CombineBytes(static_cast<size_t>(options_.hidden * 4));
  const auto& d = dispatch_layout_;
  // One message per remote peer each way (zero-byte ones too: every pair
  // exchanges, so a peer with nothing to say still completes the step).
  batch_.Clear();
  batch_.memory = comm::MemoryKind::kHost;
  for (int i = 1; i < P; ++i) {
    const int p = (me + i) % P;
    if (gather_) {
      batch_.SendGather(p, segs_.data() + seg_start_[p], static_cast<size_t>(seg_start_[p + 1] - seg_start_[p]));
    } else {
      batch_.Send(p, pack_.data() + layout_.send_start[p] * record_bytes_, d.send_bytes[p]);
    }
  }
  for (int i = 1; i < P; ++i) {
    const int q = (me + P - i) % P;
    batch_.Recv(q, recv_buf_.data() + recv_off_[q], d.recv_bytes[q]);
  }
  RETURN_IF_ERROR(comm_->Run(batch_, deadline));
  times_.dispatch_comm = Since(t0);

  t0 = Clock::now();
  RETURN_IF_ERROR(Unpack());
  combine_send_.resize(static_cast<size_t>(num_recv_ * options_.hidden));
  times_.unpack = Since(t0);
  return absl::OkStatus();
}

void EpDispatcher::GatherToken(int64_t i, float* out) const {
  const int64_t H = options_.hidden;
  const char* row = rec_row_[static_cast<size_t>(i)];
  if (options_.fp8) {
    const int64_t nscale = (H + kFp8Block - 1) / kFp8Block;
    DequantizeFp8Blocks(reinterpret_cast<const uint8_t*>(row + nscale * 4), reinterpret_cast<const float*>(row), H, out);
  } else {
    std::memcpy(out, row, static_cast<size_t>(H * 4));
  }
}

const float* EpDispatcher::CombineRow(int64_t j) const {
  const int me = comm_->rank();
  const int64_t H = options_.hidden;
  if (j >= layout_.send_start[me] && j < layout_.send_start[me + 1]) {
    return combine_send_.data() + (layout_.recv_start[me] + (j - layout_.send_start[me])) * H;  // never left this rank
  }
  return combine_recv_.data() + j * H;
}

namespace {

typedef float V8 __attribute__((vector_size(32)));

// y[0..H) += row[0..H), 8 lanes at a time.
void AddRow(float* y, const float* row, int64_t H) {
  int64_t h = 0;
  for (; h + 8 <= H; h += 8) {
    V8 a, b;
    std::memcpy(&a, y + h, sizeof(V8));
    std::memcpy(&b, row + h, sizeof(V8));
    a += b;
    std::memcpy(y + h, &a, sizeof(V8));
  }
  for (; h < H; ++h) y[h] += row[h];
}

}  // namespace

void EpDispatcher::AccumulateFrom(int p, float* y) {
  const int64_t H = options_.hidden;
  for (int64_t j = layout_.send_start[p]; j < layout_.send_start[p + 1]; ++j) {
    const int64_t t = layout_.send_token[j];
    float* yt = y + t * H;
    if (!combined_[t]) {
      std::memcpy(yt, CombineRow(j), static_cast<size_t>(H * 4));
      combined_[t] = 1;
    } else {
      AddRow(yt, CombineRow(j), H);
    }
  }
}

absl::Status EpDispatcher::Combine(float* y, bool accumulate) {
  const int P = comm_->size(), me = comm_->rank();
  const int64_t H = options_.hidden;
  auto t0 = Clock::now();
  double sum_s = 0;
  combine_recv_.resize(static_cast<size_t>(num_send_ * H));
  combined_.assign(static_cast<size_t>(T_), accumulate ? 1 : 0);  // 1: add every row
  batch_.Clear();
  batch_.memory = comm::MemoryKind::kHost;
  const auto& c = combine_layout_;
  for (int i = 1; i < P; ++i) {
    const int q = (me + i) % P;
    batch_.Send(q, reinterpret_cast<const char*>(combine_send_.data()) + c.send_offsets[q], c.send_bytes[q]);
  }
  // Receive i comes from rank me - 1 - i. Each token's partial rows are summed
  // in a fixed order — this rank's own first, then receive 0, 1, ... — each
  // block as soon as it and all before it have arrived, while the later ones
  // are still in flight (the same result bits on every run).
  std::vector<int> source(static_cast<size_t>(std::max(P - 1, 0)));
  for (int i = 1; i < P; ++i) {
    const int p = (me + P - i) % P;
    source[i - 1] = p;
    batch_.Recv(p, reinterpret_cast<char*>(combine_recv_.data()) + c.recv_offsets[p], c.recv_bytes[p]);
  }
  auto s0 = Clock::now();
  AccumulateFrom(me, y);
  sum_s += Since(s0);
  std::vector<char> arrived(source.size(), 0);
  size_t next = 0;
  auto on_recv = [&](size_t i) -> absl::Status {
    arrived[i] = 1;
    const auto a0 = Clock::now();
    while (next < source.size() && arrived[next]) AccumulateFrom(source[next++], y);
    sum_s += Since(a0);
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(comm_->Run(batch_, absl::Now() + options_.timeout, on_recv));
  s0 = Clock::now();
  while (next < source.size()) AccumulateFrom(source[next++], y);  // a backend that reports late
  for (int64_t t = 0; t < T_; ++t) {
    if (!combined_[t]) std::fill(y + t * H, y + (t + 1) * H, 0.0f);  // routed nowhere (top_k = 0 never happens)
  }
  sum_s += Since(s0);
  times_.combine = sum_s;
  times_.combine_comm = Since(t0) - sum_s;
  return absl::OkStatus();
}

ExpertParallelMoe::ExpertParallelMoe(comm::Communicator* comm, const topology::ExpertPlacement* placement,
                                     const MoeWeights* weights, DispatchOptions options)
    : w_(weights), dispatcher_(comm, placement, options) {}

void ExpertParallelMoe::RunLocalExperts() {
  const int64_t H = w_->hidden, I = w_->expert_inter;
  EpDispatcher& d = dispatcher_;
  std::vector<char> written(static_cast<size_t>(d.num_records()), 0);
  for (int64_t s = 0; s < d.num_local_slots(); ++s) {
    const auto entries = d.slot_entries(s);
    const int64_t n = static_cast<int64_t>(entries.size());
    if (n == 0) continue;
    const int32_t e = d.slot_expert(s);
    xin_.resize(static_cast<size_t>(n * H));
    out_.resize(static_cast<size_t>(n * H));
    scratch_.resize(static_cast<size_t>(n * 3 * I));
    for (int64_t j = 0; j < n; ++j) d.GatherToken(entries[j].record, xin_.data() + j * H);
    RunExpert(w_->experts[e], H, I, xin_.data(), n, out_.data(), scratch_.data());
    for (int64_t j = 0; j < n; ++j) {
      const int64_t rec = entries[j].record;
      const float g = entries[j].weight;
      float* row = d.partial(rec);
      const float* o = out_.data() + j * H;
      if (!written[rec]) {
        for (int64_t h = 0; h < H; ++h) row[h] = g * o[h];
        written[rec] = 1;
      } else {
        for (int64_t h = 0; h < H; ++h) row[h] += g * o[h];
      }
    }
  }
}

absl::Status ExpertParallelMoe::CheckLocalExperts() {
  if (checked_) return absl::OkStatus();
  const EpDispatcher& d = dispatcher_;
  if (w_->hidden != d.hidden()) {
    return absl::InvalidArgumentError(absl::StrCat("expert-parallel MoE: weights have hidden ", w_->hidden,
                                                   " but the dispatcher was built for ", d.hidden()));
  }
  for (int64_t s = 0; s < d.num_local_slots(); ++s) {
    const int32_t e = d.slot_expert(s);
    if (e < 0 || e >= static_cast<int32_t>(w_->experts.size()) || !w_->experts[e].loaded()) {
      return absl::FailedPreconditionError(absl::StrCat("expert-parallel MoE: expert ", e, " of local slot ", s,
                                                        " is not loaded on this rank; load every expert that the "
                                                        "placement puts on it"));
    }
  }
  checked_ = true;
  return absl::OkStatus();
}

absl::Status ExpertParallelMoe::Exchange(const float* x, int64_t T, const int32_t* ids, const float* weights,
                                         float* y, bool accumulate) {
  // Checked before the first all-to-all, so that a bad rank fails alone and
  // early instead of leaving its peers to their deadline mid-step.
  RETURN_IF_ERROR(CheckLocalExperts());
  RETURN_IF_ERROR(dispatcher_.Dispatch(x, T, ids, weights));
  auto t0 = Clock::now();
  RunLocalExperts();
  expert_seconds_ = Since(t0);
  return dispatcher_.Combine(y, accumulate);
}

absl::Status ExpertParallelMoe::Forward(const float* x, int64_t T, float* y) {
  RETURN_IF_ERROR(CheckLocalExperts());
  std::vector<int32_t> ids;
  std::vector<float> weights;
  if (T > 0) RouteTokens(*w_, x, T, &ids, &weights);
  RETURN_IF_ERROR(Exchange(x, T, ids.data(), weights.data(), y, /*accumulate=*/false));
  if (T > 0) SharedExpertAccumulate(*w_, x, T, y);
  return absl::OkStatus();
}

absl::Status ExpertParallelMoe::ForwardRouted(const float* x, int64_t T, const int32_t* ids, const float* weights,
                                              float* y) {
  return Exchange(x, T, ids, weights, y, /*accumulate=*/true);
}

CpuEpExchange::CpuEpExchange(const ModelShard* shard, comm::Communicator* comm,
                             const std::map<int64_t, topology::ExpertPlacement>* placements, DispatchOptions options)
    : shard_(shard), comm_(comm), placements_(placements), options_(options) {}

void CpuEpExchange::Reset(comm::Communicator* comm) {
  comm_ = comm;
  layers_.clear();
}

absl::Status CpuEpExchange::Run(const Layer& l) {
  if (comm_ == nullptr) return absl::FailedPreconditionError("no data plane (being rebuilt)");
  auto it = layers_.find(l.layer);
  if (it == layers_.end()) {
    auto pl = placements_->find(l.layer);
    if (pl == placements_->end()) return absl::InternalError(absl::StrCat("no placement for layer ", l.layer));
    const int64_t slot = l.layer - shard_->layer_begin();
    if (slot < 0 || slot >= static_cast<int64_t>(shard_->layers().size()) ||
        !shard_->layers()[static_cast<size_t>(slot)].is_moe) {
      return absl::InternalError(absl::StrCat("layer ", l.layer, " is not a MoE layer of this shard"));
    }
    const MoeWeights& w = shard_->layers()[static_cast<size_t>(slot)].moe;
    DispatchOptions o = options_;
    o.hidden = w.hidden;
    o.top_k = w.router_params.top_k;
    it = layers_.emplace(l.layer, std::make_unique<ExpertParallelMoe>(comm_, &pl->second, &w, o)).first;
  }
  if (l.on_route != nullptr && l.T > 0 && *l.on_route) {
    (*l.on_route)(l.layer, l.ids, l.T * shard_->config().num_experts_per_tok);
  }
  auto t0 = Clock::now();
  absl::Status s = it->second->ForwardRouted(static_cast<const float*>(l.x), l.T, l.ids, l.weights, l.y);
  const double total = Since(t0);
  const DispatchTimes& dt = it->second->dispatcher().times();
  times_.dispatch += dt.dispatch_total();
  times_.combine += dt.combine_total();
  times_.expert += std::max(0.0, total - dt.dispatch_total() - dt.combine_total());
  return s;
}

}  // namespace expertmesh::worker
