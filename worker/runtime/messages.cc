#include "worker/runtime/messages.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace expertmesh::worker::runtime {

namespace {

constexpr uint32_t kMicroBatchMagic = 0x454d4d43;  // "EMMC" (with the placement version)
constexpr uint32_t kReturnMagic = 0x454d5254;      // "EMRT"

class Writer {
 public:
  template <typename T>
  void Put(const T& v) {
    const char* p = reinterpret_cast<const char*>(&v);
    out_.append(p, sizeof(T));
  }
  template <typename T>
  void PutVec(const std::vector<T>& v) {
    Put<uint64_t>(v.size());
    out_.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
  }
  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
};

class Reader {
 public:
  explicit Reader(const std::string& s) : s_(s) {}
  template <typename T>
  bool Get(T* v) {
    if (pos_ + sizeof(T) > s_.size()) return false;
    std::memcpy(v, s_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  template <typename T>
  bool GetVec(std::vector<T>* v) {
    uint64_t n;
    if (!Get(&n) || n > (s_.size() - pos_) / sizeof(T)) return false;
    v->resize(n);
    std::memcpy(v->data(), s_.data() + pos_, n * sizeof(T));
    pos_ += n * sizeof(T);
    return true;
  }
  bool done() const { return pos_ == s_.size(); }

 private:
  const std::string& s_;
  size_t pos_ = 0;
};

}  // namespace

std::string Encode(const MicroBatch& mb) {
  Writer w;
  w.Put(kMicroBatchMagic);
  w.Put(static_cast<uint32_t>(mb.kind));
  w.Put(mb.tick);
  w.Put(mb.placement_version);
  w.PutVec(mb.release);
  w.PutVec(mb.segments);
  w.PutVec(mb.hidden);
  return w.Take();
}

absl::StatusOr<MicroBatch> DecodeMicroBatch(const std::string& bytes, int64_t hidden_size) {
  Reader r(bytes);
  uint32_t magic = 0, kind = 0;
  MicroBatch mb;
  if (!r.Get(&magic) || magic != kMicroBatchMagic || !r.Get(&kind) || kind > 2 || !r.Get(&mb.tick) ||
      !r.Get(&mb.placement_version) || !r.GetVec(&mb.release) || !r.GetVec(&mb.segments) || !r.GetVec(&mb.hidden) || !r.done()) {
    return absl::DataLossError(absl::StrCat("malformed micro-batch message (", bytes.size(), " bytes)"));
  }
  mb.kind = static_cast<BatchKind>(kind);
  int64_t T = 0;
  for (const auto& s : mb.segments) T += s.n;
  if (mb.kind == BatchKind::kWork && static_cast<int64_t>(mb.hidden.size()) != T * hidden_size) {
    return absl::DataLossError(absl::StrCat("micro-batch carries ", mb.hidden.size(), " hidden values for ", T,
                                            " tokens of width ", hidden_size));
  }
  return mb;
}

std::string Encode(const Return& ret) {
  Writer w;
  w.Put(kReturnMagic);
  w.Put(static_cast<uint32_t>(ret.kind));
  w.Put(ret.tick);
  w.PutVec(ret.keys);
  w.PutVec(ret.tokens);
  return w.Take();
}

absl::StatusOr<Return> DecodeReturn(const std::string& bytes) {
  Reader r(bytes);
  uint32_t magic = 0, kind = 0;
  Return ret;
  if (!r.Get(&magic) || magic != kReturnMagic || !r.Get(&kind) || kind > 2 || !r.Get(&ret.tick) ||
      !r.GetVec(&ret.keys) || !r.GetVec(&ret.tokens) || !r.done() || ret.keys.size() != ret.tokens.size()) {
    return absl::DataLossError(absl::StrCat("malformed return message (", bytes.size(), " bytes)"));
  }
  ret.kind = static_cast<BatchKind>(kind);
  return ret;
}

}  // namespace expertmesh::worker::runtime
