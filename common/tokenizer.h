// Text <-> token ids for the HF `tokenizer.json` files that DeepSeek-V3/R1,
// Qwen2/3 and Llama-3 checkpoints ship: byte-level BPE behind a pre-tokenizer
// that is a `Sequence` of `Split` regexes (PCRE2 with JIT, Unicode classes
// such as \p{L}) and `ByteLevel`, an optional NFC normalizer (utf8proc), and
// the added/special tokens, which are matched in the raw text before BPE
// (leftmost-longest, as HF tokenizers does). Output equals HF `tokenizers`
// token for token (tests/text compare them on a corpus).
//
//   ASSIGN_OR_RETURN(auto tok, Tokenizer::FromDir(checkpoint_dir));
//   ASSIGN_OR_RETURN(std::vector<int32_t> ids, tok->Encode("Hello", /*add_bos=*/true));
//   ASSIGN_OR_RETURN(std::string text, tok->Decode(ids));
//   StreamDecoder stream(*tok);            // for token-by-token output
//   for (int32_t id : generated) { ASSIGN_OR_RETURN(std::string piece, stream.Push(id)); ... }
//   std::string tail = stream.Finish();
//
// A Tokenizer is immutable after loading; Encode/Decode are thread-safe.
// Anything in tokenizer.json this file does not implement (another model
// type, normalizer or pre-tokenizer) is an Unimplemented error at load time,
// never a silent approximation.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace expertmesh {

class Tokenizer {
 public:
  // Loads DIR/tokenizer.json and, when present, DIR/tokenizer_config.json
  // (add_bos_token, bos/eos token, chat_template).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromDir(const std::string& dir);
  // The same from the two files' contents; `tokenizer_config_json` may be empty.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(absl::string_view tokenizer_json,
                                                             absl::string_view tokenizer_config_json);
  ~Tokenizer();

  // Token ids of `text` (which must be valid UTF-8: InvalidArgument otherwise,
  // naming the byte offset). add_bos: prepend the BOS token when the config's
  // add_bos_token is true (as transformers does with add_special_tokens=True).
  absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text, bool add_bos = false) const;

  // Text of `ids`; invalid UTF-8 across token boundaries becomes U+FFFD (as
  // HF's decode does). skip_special: drop special tokens. An id outside the
  // vocabulary is InvalidArgument.
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids, bool skip_special = false) const;

  // The raw bytes token `id` decodes to (possibly part of a UTF-8 sequence);
  // empty for an id outside the vocabulary.
  const std::string& TokenBytes(int32_t id) const;
  bool IsValidId(int32_t id) const { return id >= 0 && id < static_cast<int32_t>(bytes_.size()) && valid_[id]; }
  bool IsSpecial(int32_t id) const { return IsValidId(id) && special_[id]; }
  // Id of an exact token string as it appears in tokenizer.json (vocab or added token).
  std::optional<int32_t> TokenToId(absl::string_view token) const;

  // One past the largest id (model vocab and added tokens).
  int32_t vocab_size() const { return static_cast<int32_t>(bytes_.size()); }
  std::optional<int32_t> bos_id() const { return bos_id_; }
  std::optional<int32_t> eos_id() const { return eos_id_; }
  const std::string& bos_token() const { return bos_token_; }
  const std::string& eos_token() const { return eos_token_; }
  bool add_bos_token() const { return add_bos_token_; }
  // tokenizer_config.json's chat_template ("" when absent).
  const std::string& chat_template() const { return chat_template_; }

 private:
  struct Impl;
  Tokenizer();
  absl::Status EncodePiece(absl::string_view piece, void* scratch, std::vector<int32_t>* out) const;

  std::unique_ptr<Impl> impl_;
  std::vector<std::string> bytes_;  // per id
  std::vector<bool> valid_, special_;
  std::optional<int32_t> bos_id_, eos_id_;
  std::string bos_token_, eos_token_, chat_template_;
  bool add_bos_token_ = false;
};

// Incremental detokenisation for streaming: Push returns the text completed
// by one more token and never emits part of a UTF-8 code point (an incomplete
// sequence waits for the next token; bytes that can never become valid UTF-8
// are emitted as U+FFFD, like Decode). The concatenation of every Push and
// Finish equals Decode of all the ids.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special = false)
      : tok_(tokenizer), skip_special_(skip_special) {}
  absl::StatusOr<std::string> Push(int32_t id);
  // Flushes bytes still pending (an incomplete sequence becomes U+FFFD).
  std::string Finish();

 private:
  const Tokenizer& tok_;
  bool skip_special_;
  std::string pending_;
};

// Replaces each maximal invalid UTF-8 subsequence with U+FFFD (as Rust's
// String::from_utf8_lossy, which HF decode uses).
std::string Utf8Lossy(absl::string_view bytes);

// OK when `text` is valid UTF-8; InvalidArgument naming the first bad byte offset.
absl::Status ValidateUtf8(absl::string_view text);

}  // namespace expertmesh
