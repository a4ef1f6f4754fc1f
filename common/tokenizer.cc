#include "common/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <queue>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "common/file.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace expertmesh {

namespace {

using json = nlohmann::json;

// ---- UTF-8 ----

// Length of the valid UTF-8 sequence at s[i..n): >0 when complete and valid;
// -k when the bytes s[i..i+k) are a valid but truncated prefix that reaches
// the end of the input; 0 when s[i] starts no valid sequence or the sequence
// breaks (then *bad = length of the maximal invalid subpart, >= 1).
int Utf8Seq(const unsigned char* s, size_t i, size_t n, int* bad) {
  const unsigned char c = s[i];
  if (c < 0x80) return 1;
  int len;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    *bad = 1;
    return 0;
  }
  for (int k = 1; k < len; ++k) {
    if (i + k >= n) return -k;
    const unsigned char b = s[i + k];
    const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (b < l || b > h) {
      *bad = k;
      return 0;
    }
  }
  return len;
}

bool IsAscii(absl::string_view s) {
  for (unsigned char c : s) {
    if (c >= 0x80) return false;
  }
  return true;
}

// ---- GPT-2 byte-level alphabet ----

struct ByteLevelMap {
  uint32_t byte_to_cp[256];
  absl::flat_hash_map<uint32_t, uint8_t> cp_to_byte;
  ByteLevelMap() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool self = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      byte_to_cp[b] = self ? b : 256 + n++;
      cp_to_byte[byte_to_cp[b]] = static_cast<uint8_t>(b);
    }
  }
};

const ByteLevelMap& ByteLevel() {
  static const ByteLevelMap* m = new ByteLevelMap();
  return *m;
}

// Decodes one code point of valid UTF-8 at s[*i], advancing *i.
uint32_t NextCp(absl::string_view s, size_t* i) {
  const unsigned char c = s[*i];
  if (c < 0x80) {
    *i += 1;
    return c;
  }
  int len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
  uint32_t cp = c & (0x7F >> len);
  for (int k = 1; k < len && *i + k < s.size(); ++k) cp = (cp << 6) | (s[*i + k] & 0x3F);
  *i += len;
  return cp;
}

// A token string of tokenizer.json in the byte-level alphabet -> the bytes it
// stands for. As HF's ByteLevel decoder: a token with any character outside
// the alphabet stands for its own UTF-8 bytes.
std::string ByteLevelDecode(absl::string_view token) {
  const ByteLevelMap& m = ByteLevel();
  std::string out;
  out.reserve(token.size());
  size_t i = 0;
  while (i < token.size()) {
    const uint32_t cp = NextCp(token, &i);
    auto it = m.cp_to_byte.find(cp);
    if (it == m.cp_to_byte.end()) return std::string(token);
    out.push_back(static_cast<char>(it->second));
  }
  return out;
}

// ---- added tokens: a byte trie, leftmost-longest ----

class TokenTrie {
 public:
  TokenTrie() : nodes_(1) {}
  void Add(absl::string_view s, int32_t id) {
    if (s.empty()) return;
    int32_t n = 0;
    for (unsigned char c : s) {
      auto it = nodes_[n].next.find(c);
      if (it == nodes_[n].next.end()) {
        nodes_.emplace_back();
        const int32_t m = static_cast<int32_t>(nodes_.size()) - 1;
        nodes_[n].next[c] = m;
        n = m;
      } else {
        n = it->second;
      }
    }
    nodes_[n].id = id;
    first_[static_cast<unsigned char>(s[0])] = true;
    empty_ = false;
  }
  bool empty() const { return empty_; }
  // The longest token starting at text[pos]: sets *len, returns its id (or -1).
  int32_t LongestAt(absl::string_view text, size_t pos, size_t* len) const {
    if (!first_[static_cast<unsigned char>(text[pos])]) return -1;
    int32_t n = 0, best = -1;
    for (size_t i = pos; i < text.size(); ++i) {
      auto it = nodes_[n].next.find(static_cast<unsigned char>(text[i]));
      if (it == nodes_[n].next.end()) break;
      n = it->second;
      if (nodes_[n].id >= 0) {
        best = nodes_[n].id;
        *len = i + 1 - pos;
      }
    }
    return best;
  }

 private:
  struct Node {
    int32_t id = -1;
    absl::flat_hash_map<unsigned char, int32_t> next;
  };
  std::vector<Node> nodes_;
  bool first_[256] = {};
  bool empty_ = true;
};

struct Regex {
  pcre2_code* code = nullptr;
  std::string pattern;
};

}  // namespace

// ---- UTF-8 helpers (public) ----

absl::Status ValidateUtf8(absl::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  size_t i = 0;
  while (i < text.size()) {
    if (s[i] < 0x80) {
      ++i;
      continue;
    }
    int bad = 0;
    const int len = Utf8Seq(s, i, text.size(), &bad);
    if (len <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("input is not valid UTF-8: bad byte 0x",
                                                     absl::Hex(s[i], absl::kZeroPad2), " at offset ", i,
                                                     len < 0 ? " (truncated sequence at the end)" : ""));
    }
    i += len;
  }
  return absl::OkStatus();
}

std::string Utf8Lossy(absl::string_view bytes) {
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0;
  while (i < bytes.size()) {
    int bad = 0;
    const int len = Utf8Seq(s, i, bytes.size(), &bad);
    if (len > 0) {
      out.append(bytes.data() + i, len);
      i += len;
    } else {
      out.append("\xEF\xBF\xBD");
      i += len < 0 ? -len : bad;
    }
  }
  return out;
}

// ---- Tokenizer ----

struct Tokenizer::Impl {
  // Model: vocab keyed by the raw bytes a token stands for.
  absl::flat_hash_map<std::string, int32_t> vocab_bytes;   // raw bytes -> id (model vocab only)
  absl::flat_hash_map<std::string, int32_t> token_to_id;   // tokenizer.json spelling -> id
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left,right) -> (rank, new id)
  int32_t byte_id[256];
  bool ignore_merges = false;
  bool nfc = false;
  std::vector<Regex> splits;
  TokenTrie added_raw, added_normalized;

  mutable absl::Mutex cache_mu;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache ABSL_GUARDED_BY(cache_mu);
  static constexpr size_t kCacheMaxEntries = 1 << 20;
  static constexpr size_t kCacheMaxPieceBytes = 256;

  ~Impl() {
    for (Regex& r : splits) pcre2_code_free(r.code);
  }
};

namespace {

// Per-Encode-call matching state (thread-safe Encode).
struct Scratch {
  std::vector<pcre2_match_data*> md;
  pcre2_match_context* mctx = nullptr;
  pcre2_jit_stack* stack = nullptr;
  ~Scratch() {
    for (auto* m : md) pcre2_match_data_free(m);
    if (mctx != nullptr) pcre2_match_context_free(mctx);
    if (stack != nullptr) pcre2_jit_stack_free(stack);
  }
};

absl::StatusOr<Regex> CompileSplit(const std::string& pattern) {
  int err = 0;
  PCRE2_SIZE off = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof(msg));
    return absl::InvalidArgumentError(absl::StrCat("pre_tokenizer Split regex ", pattern, " at offset ", off,
                                                   ": ", reinterpret_cast<const char*>(msg)));
  }
  if (pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) != 0) {
    pcre2_code_free(code);
    return absl::InternalError(absl::StrCat("PCRE2 JIT is unavailable for ", pattern));
  }
  return Regex{code, pattern};
}

std::string RegexEscape(absl::string_view s) {
  std::string out;
  for (char c : s) {
    if (std::strchr("\\^$.|?*+()[]{}", c) != nullptr) out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

// GPT-2's pattern, used by a ByteLevel pre-tokenizer with use_regex = true.
constexpr char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::string JsonTokenContent(const json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string()) return j["content"].get<std::string>();
  return "";
}

}  // namespace

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromDir(const std::string& dir) {
  auto tj = ReadFileToString(dir + "/tokenizer.json");
  if (!tj.ok()) {
    return absl::NotFoundError(absl::StrCat(dir, "/tokenizer.json: cannot open (a checkpoint serving text needs "
                                            "the HF tokenizer.json next to config.json)"));
  }
  std::string cfg;
  auto cj = ReadFileToString(dir + "/tokenizer_config.json");
  if (cj.ok()) cfg = std::move(*cj);
  auto t = FromJson(*tj, cfg);
  if (!t.ok()) return Annotate(t.status(), dir);
  return t;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(absl::string_view tokenizer_json,
                                                                absl::string_view tokenizer_config_json) {
  json j = json::parse(tokenizer_json.begin(), tokenizer_json.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError("tokenizer.json: not a JSON object");
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  Impl& im = *t->impl_;
  auto unimpl = [](const std::string& what, const json& v) {
    return absl::UnimplementedError(absl::StrCat("tokenizer.json: ", what, " is not supported: ",
                                                 v.dump().substr(0, 200)));
  };

  // Model.
  const json& model = j.value("model", json());
  if (!model.is_object() || model.value("type", "") != "BPE") return unimpl("model type (only BPE)", model.value("type", json()));
  if (model.value("byte_fallback", false)) return unimpl("model.byte_fallback", true);
  if (model.contains("dropout") && !model["dropout"].is_null()) return unimpl("model.dropout", model["dropout"]);
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(k) && !model[k].is_null() && model[k] != "") return unimpl(absl::StrCat("model.", k), model[k]);
  }
  im.ignore_merges = model.value("ignore_merges", false);
  const json& vocab = model.value("vocab", json());
  if (!vocab.is_object()) return absl::InvalidArgumentError("tokenizer.json: model.vocab is not an object");
  int32_t max_id = -1;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer()) return absl::InvalidArgumentError("tokenizer.json: a vocab id is not an integer");
    const int32_t id = it.value().get<int32_t>();
    if (id < 0) return absl::InvalidArgumentError("tokenizer.json: negative vocab id");
    max_id = std::max(max_id, id);
  }
  const json& added = j.value("added_tokens", json::array());
  for (const json& a : added) max_id = std::max(max_id, a.value("id", -1));
  t->bytes_.assign(max_id + 1, std::string());
  t->valid_.assign(max_id + 1, false);
  t->special_.assign(max_id + 1, false);
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const int32_t id = it.value().get<int32_t>();
    std::string raw = ByteLevelDecode(it.key());
    t->bytes_[id] = raw;
    t->valid_[id] = true;
    im.vocab_bytes.emplace(std::move(raw), id);
    im.token_to_id.emplace(it.key(), id);
  }
  for (int b = 0; b < 256; ++b) {
    auto it = im.vocab_bytes.find(std::string(1, static_cast<char>(b)));
    im.byte_id[b] = it == im.vocab_bytes.end() ? -1 : it->second;
  }
  const json& merges = model.value("merges", json::array());
  int32_t rank = 0;
  for (const json& m : merges) {
    std::string l, r;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos) return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: bad merge \"", s, "\""));
      l = s.substr(0, sp);
      r = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      l = m[0].get<std::string>();
      r = m[1].get<std::string>();
    } else {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: bad merge ", m.dump()));
    }
    auto li = im.token_to_id.find(l), ri = im.token_to_id.find(r), ni = im.token_to_id.find(l + r);
    if (li == im.token_to_id.end() || ri == im.token_to_id.end() || ni == im.token_to_id.end()) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: merge \"", l, " ", r, "\" uses a token not in the vocab"));
    }
    const uint64_t key = (static_cast<uint64_t>(li->second) << 32) | static_cast<uint32_t>(ri->second);
    im.merges[key] = std::make_pair(rank++, ni->second);  // a repeated pair: the last wins, as in HF
  }

  // Normalizer.
  std::function<absl::Status(const json&)> normalizer = [&](const json& n) -> absl::Status {
    if (n.is_null()) return absl::OkStatus();
    const std::string type = n.value("type", "");
    if (type == "Sequence") {
      for (const json& s : n.value("normalizers", json::array())) RETURN_IF_ERROR(normalizer(s));
      return absl::OkStatus();
    }
    if (type == "NFC") {
      im.nfc = true;
      return absl::OkStatus();
    }
    return unimpl("normalizer", n);
  };
  RETURN_IF_ERROR(normalizer(j.value("normalizer", json())));

  // Pre-tokenizer: Split regexes, then ByteLevel (the byte mapping is applied by the model step).
  std::vector<json> pres;
  const json& pre = j.value("pre_tokenizer", json());
  if (pre.is_object() && pre.value("type", "") == "Sequence") {
    for (const json& p : pre.value("pretokenizers", json::array())) pres.push_back(p);
  } else if (!pre.is_null()) {
    pres.push_back(pre);
  }
  bool seen_byte_level = false;
  for (const json& p : pres) {
    const std::string type = p.value("type", "");
    if (seen_byte_level) return unimpl("a pre-tokenizer after ByteLevel", p);
    if (type == "Split") {
      if (p.value("behavior", "") != "Isolated") return unimpl("Split behavior other than Isolated", p);
      if (p.value("invert", false)) return unimpl("Split with invert", p);
      const json& pat = p.value("pattern", json());
      std::string re;
      if (pat.contains("Regex")) {
        re = pat["Regex"].get<std::string>();
      } else if (pat.contains("String")) {
        re = RegexEscape(pat["String"].get<std::string>());
      } else {
        return unimpl("Split pattern", pat);
      }
      ASSIGN_OR_RETURN(Regex r, CompileSplit(re));
      im.splits.push_back(r);
    } else if (type == "ByteLevel") {
      if (p.value("add_prefix_space", false)) return unimpl("ByteLevel add_prefix_space", p);
      if (p.value("use_regex", true)) {
        ASSIGN_OR_RETURN(Regex r, CompileSplit(kGpt2Pattern));
        im.splits.push_back(r);
      }
      seen_byte_level = true;
    } else {
      return unimpl("pre_tokenizer", p);
    }
  }
  if (!seen_byte_level) return unimpl("a pre_tokenizer without ByteLevel (only byte-level BPE)", pre);

  // Decoder: ByteLevel only.
  const json& dec = j.value("decoder", json());
  if (!(dec.is_object() && dec.value("type", "") == "ByteLevel")) return unimpl("decoder (only ByteLevel)", dec);

  // Added tokens.
  for (const json& a : added) {
    const std::string content = a.value("content", "");
    const int32_t id = a.value("id", -1);
    if (content.empty() || id < 0) return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: bad added token ", a.dump()));
    if (a.value("lstrip", false) || a.value("rstrip", false) || a.value("single_word", false)) {
      return unimpl("added token with lstrip/rstrip/single_word", a);
    }
    t->bytes_[id] = ByteLevelDecode(content);
    t->valid_[id] = true;
    t->special_[id] = a.value("special", false);
    im.token_to_id[content] = id;
    if (a.value("normalized", false) && !a.value("special", false)) {
      im.added_normalized.Add(content, id);
    } else {
      im.added_raw.Add(content, id);
    }
  }

  // tokenizer_config.json.
  if (!tokenizer_config_json.empty()) {
    json c = json::parse(tokenizer_config_json.begin(), tokenizer_config_json.end(), nullptr, false);
    if (c.is_discarded() || !c.is_object()) return absl::InvalidArgumentError("tokenizer_config.json: not a JSON object");
    t->add_bos_token_ = c.value("add_bos_token", false);
    t->bos_token_ = JsonTokenContent(c.value("bos_token", json()));
    t->eos_token_ = JsonTokenContent(c.value("eos_token", json()));
    const json& ct = c.value("chat_template", json());
    if (ct.is_string()) {
      t->chat_template_ = ct.get<std::string>();
    } else if (ct.is_array()) {
      for (const json& e : ct) {
        if (e.value("name", "") == "default") t->chat_template_ = e.value("template", "");
      }
    }
  }
  if (!t->bos_token_.empty()) {
    if (auto id = t->TokenToId(t->bos_token_)) t->bos_id_ = *id;
    else return absl::InvalidArgumentError(absl::StrCat("tokenizer_config.json: bos_token ", t->bos_token_, " is not a token"));
  }
  if (!t->eos_token_.empty()) {
    if (auto id = t->TokenToId(t->eos_token_)) t->eos_id_ = *id;
    else return absl::InvalidArgumentError(absl::StrCat("tokenizer_config.json: eos_token ", t->eos_token_, " is not a token"));
  }
  if (t->add_bos_token_ && !t->bos_id_) {
    return absl::InvalidArgumentError("tokenizer_config.json: add_bos_token is true but there is no bos_token");
  }
  return t;
}

std::optional<int32_t> Tokenizer::TokenToId(absl::string_view token) const {
  auto it = impl_->token_to_id.find(token);
  if (it == impl_->token_to_id.end()) return std::nullopt;
  return it->second;
}

const std::string& Tokenizer::TokenBytes(int32_t id) const {
  static const std::string* empty = new std::string();
  return IsValidId(id) ? bytes_[id] : *empty;
}

// Byte-level BPE of one pre-tokenized piece (HF's Word::merge_all: lowest
// rank first, leftmost among equals).
absl::Status Tokenizer::EncodePiece(absl::string_view piece, void* /*scratch*/, std::vector<int32_t>* out) const {
  const Impl& im = *impl_;
  const bool cacheable = piece.size() <= Impl::kCacheMaxPieceBytes;
  if (cacheable) {
    absl::ReaderMutexLock l(&im.cache_mu);
    auto it = im.cache.find(piece);
    if (it != im.cache.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return absl::OkStatus();
    }
  }
  std::vector<int32_t> ids;
  auto whole = im.ignore_merges ? im.vocab_bytes.find(piece) : im.vocab_bytes.end();
  if (whole != im.vocab_bytes.end()) {
    ids.push_back(whole->second);
  } else {
    const size_t n = piece.size();
    struct Sym {
      int32_t id, prev, next;
    };
    std::vector<Sym> sym(n);
    for (size_t i = 0; i < n; ++i) {
      const int32_t id = im.byte_id[static_cast<unsigned char>(piece[i])];
      if (id < 0) {
        return absl::InvalidArgumentError(absl::StrCat("tokenizer: byte 0x", absl::Hex(static_cast<unsigned char>(piece[i])),
                                                       " has no token in the vocabulary"));
      }
      sym[i] = {id, static_cast<int32_t>(i) - 1, i + 1 < n ? static_cast<int32_t>(i + 1) : -1};
    }
    struct Cand {
      int32_t rank, pos, new_id;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> q;
    auto lookup = [&](int32_t a, int32_t b) -> const std::pair<int32_t, int32_t>* {
      auto it = im.merges.find((static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b));
      return it == im.merges.end() ? nullptr : &it->second;
    };
    for (size_t i = 0; i + 1 < n; ++i) {
      if (auto* m = lookup(sym[i].id, sym[i + 1].id)) q.push({m->first, static_cast<int32_t>(i), m->second});
    }
    std::vector<bool> dead(n, false);
    while (!q.empty()) {
      const Cand c = q.top();
      q.pop();
      if (dead[c.pos] || sym[c.pos].next < 0) continue;
      const int32_t r = sym[c.pos].next;
      auto* m = lookup(sym[c.pos].id, sym[r].id);
      if (m == nullptr || m->second != c.new_id) continue;  // stale
      sym[c.pos].id = c.new_id;
      dead[r] = true;
      sym[c.pos].next = sym[r].next;
      if (sym[r].next >= 0) sym[sym[r].next].prev = c.pos;
      if (sym[c.pos].prev >= 0) {
        const int32_t p = sym[c.pos].prev;
        if (auto* pm = lookup(sym[p].id, sym[c.pos].id)) q.push({pm->first, p, pm->second});
      }
      if (sym[c.pos].next >= 0) {
        if (auto* nm = lookup(sym[c.pos].id, sym[sym[c.pos].next].id)) q.push({nm->first, c.pos, nm->second});
      }
    }
    for (int32_t i = 0; i >= 0; i = sym[i].next) ids.push_back(sym[i].id);
  }
  out->insert(out->end(), ids.begin(), ids.end());
  if (cacheable) {
    absl::MutexLock l(&im.cache_mu);
    if (im.cache.size() >= Impl::kCacheMaxEntries) im.cache.clear();
    im.cache.emplace(std::string(piece), std::move(ids));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(absl::string_view text, bool add_bos) const {
  RETURN_IF_ERROR(ValidateUtf8(text));
  const Impl& im = *impl_;
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos && add_bos_token_ && bos_id_) out.push_back(*bos_id_);

  Scratch sc;
  sc.md.reserve(im.splits.size());
  for (const Regex& r : im.splits) sc.md.push_back(pcre2_match_data_create_from_pattern(r.code, nullptr));
  sc.mctx = pcre2_match_context_create(nullptr);  // JIT stack: the default 32 KiB until a match needs more

  // Splits s (one level of the Sequence) into matches and the gaps between them.
  std::function<absl::Status(absl::string_view, size_t)> split = [&](absl::string_view s, size_t level) -> absl::Status {
    if (s.empty()) return absl::OkStatus();
    if (level == im.splits.size()) return EncodePiece(s, &sc, &out);
    pcre2_code* code = im.splits[level].code;
    pcre2_match_data* md = sc.md[level];
    size_t pos = 0, last = 0;
    while (pos <= s.size()) {
      int rc = pcre2_jit_match(code, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos, 0, md, sc.mctx);
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT && sc.stack == nullptr) {
        sc.stack = pcre2_jit_stack_create(64 << 10, 64 << 20, nullptr);
        pcre2_jit_stack_assign(sc.mctx, nullptr, sc.stack);
        rc = pcre2_jit_match(code, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos, 0, md, sc.mctx);
      }
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof(msg));
        return absl::InternalError(absl::StrCat("tokenizer regex: ", reinterpret_cast<const char*>(msg)));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      const size_t b = ov[0], e = ov[1];
      if (e == b) {  // empty match: skip one character
        if (b >= s.size()) break;
        size_t i = b;
        NextCp(s, &i);
        pos = i;
        continue;
      }
      if (b > last) RETURN_IF_ERROR(split(s.substr(last, b - last), level + 1));
      RETURN_IF_ERROR(split(s.substr(b, e - b), level + 1));
      last = pos = e;
    }
    if (last < s.size()) RETURN_IF_ERROR(split(s.substr(last), level + 1));
    return absl::OkStatus();
  };

  std::string normalized;
  // A run of text between added tokens that match the raw input.
  auto text_run = [&](absl::string_view run) -> absl::Status {
    if (run.empty()) return absl::OkStatus();
    if (im.nfc && !IsAscii(run)) {
      utf8proc_uint8_t* dst = nullptr;
      const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(run.data()), run.size(), &dst,
                                              static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
      if (n < 0) return absl::InvalidArgumentError(absl::StrCat("NFC normalization: ", utf8proc_errmsg(n)));
      normalized.assign(reinterpret_cast<char*>(dst), n);
      std::free(dst);
      run = normalized;
    }
    if (im.added_normalized.empty()) return split(run, 0);
    size_t last = 0;
    for (size_t i = 0; i < run.size();) {
      size_t len = 0;
      const int32_t id = im.added_normalized.LongestAt(run, i, &len);
      if (id < 0) {
        ++i;
        continue;
      }
      RETURN_IF_ERROR(split(run.substr(last, i - last), 0));
      out.push_back(id);
      i += len;
      last = i;
    }
    return split(run.substr(last), 0);
  };

  size_t last = 0;
  if (!im.added_raw.empty()) {
    for (size_t i = 0; i < text.size();) {
      size_t len = 0;
      const int32_t id = im.added_raw.LongestAt(text, i, &len);
      if (id < 0) {
        ++i;
        continue;
      }
      RETURN_IF_ERROR(text_run(text.substr(last, i - last)));
      out.push_back(id);
      i += len;
      last = i;
    }
  }
  RETURN_IF_ERROR(text_run(text.substr(last)));
  return out;
}

absl::StatusOr<std::string> Tokenizer::Decode(absl::Span<const int32_t> ids, bool skip_special) const {
  std::string bytes;
  for (int32_t id : ids) {
    if (!IsValidId(id)) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is outside the vocabulary (size ", vocab_size(), ")"));
    }
    if (skip_special && special_[id]) continue;
    bytes += bytes_[id];
  }
  return Utf8Lossy(bytes);
}

absl::StatusOr<std::string> StreamDecoder::Push(int32_t id) {
  if (!tok_.IsValidId(id)) {
    return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is outside the vocabulary (size ",
                                                   tok_.vocab_size(), ")"));
  }
  if (skip_special_ && tok_.IsSpecial(id)) return std::string();
  pending_ += tok_.TokenBytes(id);
  // Emit everything except a valid but incomplete sequence at the end.
  const auto* s = reinterpret_cast<const unsigned char*>(pending_.data());
  size_t i = 0, keep = pending_.size();
  while (i < pending_.size()) {
    int bad = 0;
    const int len = Utf8Seq(s, i, pending_.size(), &bad);
    if (len < 0) {
      keep = i;
      break;
    }
    i += len > 0 ? len : bad;
  }
  std::string out = Utf8Lossy(absl::string_view(pending_).substr(0, keep));
  pending_.erase(0, keep);
  return out;
}

std::string StreamDecoder::Finish() {
  std::string out = Utf8Lossy(pending_);
  pending_.clear();
  return out;
}

}  // namespace expertmesh
