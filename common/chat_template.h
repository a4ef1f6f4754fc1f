// Chat templates: a conversation (OpenAI-style messages) -> the prompt text a
// model was trained on. The DeepSeek-V3, DeepSeek-R1 and DeepSeek-R1-Distill
// Jinja templates of their tokenizer_config.json are implemented in C++ (no Jinja engine), with
// the templates' exact output, quirks included (tests/text compare with
// python3-jinja2 rendering the real templates).
//
//   ASSIGN_OR_RETURN(ChatTemplate t, ChatTemplate::ForTokenizer(*tok, /*override_name=*/""));
//   ASSIGN_OR_RETURN(std::string prompt, t.Render(messages_json, /*add_generation_prompt=*/true));
//   ASSIGN_OR_RETURN(std::vector<int32_t> ids, tok->Encode(prompt));   // prompt starts with BOS text
//
// Messages are a JSON array of objects {"role": "system"|"user"|"assistant"|
// "tool", "content": string or null, "tool_calls": [{"type": "function",
// "function": {"name": ..., "arguments": "<json text>"}}]}. Where Jinja would
// fail (a null content concatenated, a non-string argument) Render returns
// InvalidArgument; roles the template ignores are ignored.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace expertmesh {

class Tokenizer;

class ChatTemplate {
 public:
  enum class Kind { kDeepSeekV3, kDeepSeekR1, kDeepSeekR1Distill };

  // Names accepted by --chat-template: "deepseek-v3", "deepseek-r1",
  // "deepseek-r1-distill" (the R1-Distill Qwen and Llama models).
  static std::vector<std::string> Names();
  static absl::StatusOr<ChatTemplate> FromName(absl::string_view name, std::string bos_token);
  // Recognises a tokenizer_config.json chat_template text (exact match with a
  // published template); unknown text is NotFound naming --chat-template.
  static absl::StatusOr<ChatTemplate> Recognize(absl::string_view template_text, std::string bos_token);
  // --chat-template NAME when `override_name` is not empty, else the
  // tokenizer's chat_template recognised.
  static absl::StatusOr<ChatTemplate> ForTokenizer(const Tokenizer& tok, absl::string_view override_name);

  Kind kind() const { return kind_; }
  std::string name() const;
  // R1 and its distills: the generation prompt opens a <think> block; the
  // answer's reasoning is what precedes </think>.
  bool reasons() const { return kind_ == Kind::kDeepSeekR1 || kind_ == Kind::kDeepSeekR1Distill; }

  absl::StatusOr<std::string> Render(const nlohmann::json& messages, bool add_generation_prompt) const;

 private:
  ChatTemplate(Kind k, std::string bos) : kind_(k), bos_token_(std::move(bos)) {}
  Kind kind_;
  std::string bos_token_;
};

// FNV-1a, 64 bits: the fingerprint of a template text (and a stable name for
// files derived from a text, e.g. the R1-Distill tokenizer folders).
uint64_t Fnv1a64(absl::string_view s);

}  // namespace expertmesh
