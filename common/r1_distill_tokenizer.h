// The DeepSeek-R1-Distill tokenizers: each distill ships its base model's
// byte-level BPE (Qwen2.5 or Llama-3.1) with DeepSeek's special tokens
// written over ids the base reserves for its own added tokens, DeepSeek's
// BOS/EOS, and the distills' chat template (R1's layout, see
// common/chat_template.h, kind deepseek-r1-distill). The distills' files are
// not packaged anywhere expertmesh can install them from, so they are
// derived here from the packaged base tokenizer.json (npm @lenml
// tokenizer-qwen2_5 / tokenizer-llama3_1) with the facts of the published
// deepseek-ai/DeepSeek-R1-Distill-* files (docs/TEXT.md names the sources;
// tests/text check the ids and the template).
//
//   ASSIGN_OR_RETURN(TokenizerFiles f, MakeR1DistillTokenizer("r1-distill-qwen", base_tokenizer_json));
//   ASSIGN_OR_RETURN(auto tok, Tokenizer::FromJson(f.tokenizer_json, f.tokenizer_config_json));
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace expertmesh {

// One token DeepSeek wrote into the base vocabulary.
struct DistillToken {
  int32_t id;
  const char* content;
  bool special;  // HF "special": skipped by decode(skip_special_tokens=True)
};

// The contents of a tokenizer folder's two files.
struct TokenizerFiles {
  std::string tokenizer_json;
  std::string tokenizer_config_json;
};

// "r1-distill-qwen", "r1-distill-llama".
std::vector<std::string> R1DistillTokenizerNames();
// The packaged base tokenizer a distill tokenizer is derived from ("qwen2.5"
// for r1-distill-qwen, "llama3.1" for r1-distill-llama); "" for other names.
std::string R1DistillBase(absl::string_view name);
// The DeepSeek tokens of a distill tokenizer (empty for other names).
absl::Span<const DistillToken> R1DistillTokens(absl::string_view name);
// The chat_template text of the distills' tokenizer_config.json (the revision
// whose generation prompt opens <think>).
absl::string_view R1DistillChatTemplate();

// The distill tokenizer `name` from its base's tokenizer.json: each DeepSeek
// token replaces the base's added token at its id (an id the base does not
// have, or a DeepSeek token text the base already holds elsewhere, is an
// error), the Llama base's other added tokens take Llama-3.1's names, the
// post-processor names DeepSeek's BOS, and tokenizer_config.json is the
// distills' (add_bos_token, BOS <｜begin▁of▁sentence｜>, EOS
// <｜end▁of▁sentence｜>, pad EOS for Qwen and none for Llama, the chat
// template).
absl::StatusOr<TokenizerFiles> MakeR1DistillTokenizer(absl::string_view name, absl::string_view base_tokenizer_json);

}  // namespace expertmesh
