#include "coordinator/openai_api.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace expertmesh::coordinator::openai {
namespace {

using nlohmann::json;

const char* TypeName(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::string: return "a string";
    case json::value_t::array: return "an array";
    case json::value_t::object: return "an object";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "an integer";
    case json::value_t::number_float: return "a number";
    default: return "not JSON";
  }
}

ApiError WrongType(const std::string& param, const json& v, const std::string& want) {
  return BadField(param, absl::StrCat(param, ": expected ", want, ", got ", TypeName(v)));
}

// An integer in [lo, hi]; a float with an integral value counts.
std::optional<ApiError> Int(const json& v, const std::string& param, int64_t lo, int64_t hi, int64_t* out) {
  double d = 0;
  if (v.is_number_integer()) {
    d = static_cast<double>(v.get<int64_t>());
  } else if (v.is_number_unsigned()) {
    d = static_cast<double>(v.get<uint64_t>());
  } else if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>()) {
    d = v.get<double>();
  } else {
    return WrongType(param, v, "an integer");
  }
  if (d < static_cast<double>(lo) || d > static_cast<double>(hi)) {
    return BadField(param, absl::StrCat(param, ": ", v.dump(), " is out of range [", lo, ", ", hi, "]"));
  }
  *out = v.is_number_unsigned() ? static_cast<int64_t>(v.get<uint64_t>())
                                : (v.is_number_integer() ? v.get<int64_t>() : static_cast<int64_t>(d));
  return std::nullopt;
}

std::optional<ApiError> Number(const json& v, const std::string& param, double lo, double hi, bool lo_open,
                               double* out) {
  if (!v.is_number()) return WrongType(param, v, "a number");
  const double d = v.get<double>();
  if (!(lo_open ? d > lo : d >= lo) || !(d <= hi)) {
    return BadField(param, absl::StrCat(param, ": ", v.dump(), " is out of range ", lo_open ? "(" : "[", lo, ", ",
                                        hi, "]"));
  }
  *out = d;
  return std::nullopt;
}

std::optional<ApiError> Bool(const json& v, const std::string& param, bool* out) {
  if (!v.is_boolean()) return WrongType(param, v, "a boolean");
  *out = v.get<bool>();
  return std::nullopt;
}

std::optional<ApiError> Unsupported(const std::string& param, const std::string& what) {
  return BadField(param, absl::StrCat(param, ": ", what, " is not supported by this server (see docs/API.md)"));
}

// Chat content: a string, null, or an array of {"type": "text", "text": ...}
// parts (joined).
std::optional<ApiError> Content(json* content, const std::string& param) {
  if (content->is_string() || content->is_null()) return std::nullopt;
  if (!content->is_array()) return WrongType(param, *content, "a string, null or an array of text parts");
  std::string joined;
  for (size_t i = 0; i < content->size(); ++i) {
    const json& part = (*content)[i];
    const std::string p = absl::StrCat(param, "[", i, "]");
    if (!part.is_object()) return WrongType(p, part, "an object {\"type\": \"text\", \"text\": ...}");
    auto type = part.find("type");
    if (type == part.end() || !type->is_string()) return BadField(p + ".type", p + ".type: required string");
    if (*type != "text") {
      return Unsupported(p + ".type", absl::StrCat("content part type \"", type->get<std::string>(), "\""));
    }
    auto text = part.find("text");
    if (text == part.end() || !text->is_string()) return BadField(p + ".text", p + ".text: required string");
    joined += text->get<std::string>();
  }
  *content = joined;
  return std::nullopt;
}

std::optional<ApiError> Messages(const json& v, json* out) {
  if (!v.is_array()) return WrongType("messages", v, "an array of messages");
  if (v.empty()) return BadField("messages", "messages: must not be empty");
  static const std::set<std::string> kRoles = {"system", "developer", "user", "assistant", "tool"};
  static const std::set<std::string> kKeys = {"role", "content", "name", "tool_calls", "tool_call_id",
                                              "reasoning_content", "refusal"};
  *out = json::array();
  for (size_t i = 0; i < v.size(); ++i) {
    const std::string p = absl::StrCat("messages[", i, "]");
    json m = v[i];
    if (!m.is_object()) return WrongType(p, m, "an object");
    for (auto it = m.begin(); it != m.end(); ++it) {
      if (kKeys.count(it.key()) == 0) return BadField(p + "." + it.key(), absl::StrCat(p, ".", it.key(), ": unknown field"));
    }
    auto role = m.find("role");
    if (role == m.end()) return BadField(p + ".role", p + ".role: required");
    if (!role->is_string()) return WrongType(p + ".role", *role, "a string");
    if (kRoles.count(role->get<std::string>()) == 0) {
      return BadField(p + ".role", absl::StrCat(p, ".role: \"", role->get<std::string>(),
                                                "\" is not one of system, developer, user, assistant, tool"));
    }
    if (*role == "developer") m["role"] = "system";  // OpenAI's newer name for the system prompt
    if (!m.contains("content")) m["content"] = nullptr;
    if (auto e = Content(&m["content"], p + ".content")) return e;
    if (m["content"].is_null() && *role != "assistant") {
      return BadField(p + ".content", p + ".content: required for role " + role->get<std::string>());
    }
    if (m.contains("tool_calls") && !m["tool_calls"].is_null() && !m["tool_calls"].is_array()) {
      return WrongType(p + ".tool_calls", m["tool_calls"], "an array");
    }
    out->push_back(std::move(m));
  }
  return std::nullopt;
}

std::optional<ApiError> TokenIds(const json& v, const std::string& param, std::vector<int32_t>* out) {
  out->clear();
  for (size_t i = 0; i < v.size(); ++i) {
    int64_t id = 0;
    if (auto e = Int(v[i], absl::StrCat(param, "[", i, "]"), 0, INT32_MAX, &id)) return e;
    out->push_back(static_cast<int32_t>(id));
  }
  if (out->empty()) return BadField(param, param + ": an empty prompt");
  return std::nullopt;
}

// A string, an array of strings, an array of token ids, or an array of arrays of token ids.
std::optional<ApiError> Prompt(const json& v, ParsedRequest* out) {
  if (v.is_string()) {
    out->prompt_texts.push_back(v.get<std::string>());
    return std::nullopt;
  }
  if (!v.is_array() || v.empty()) {
    return v.is_array() ? BadField("prompt", "prompt: an empty array")
                        : WrongType("prompt", v, "a string, an array of strings or an array of token ids");
  }
  if (v[0].is_string()) {
    for (size_t i = 0; i < v.size(); ++i) {
      if (!v[i].is_string()) return WrongType(absl::StrCat("prompt[", i, "]"), v[i], "a string");
      out->prompt_texts.push_back(v[i].get<std::string>());
    }
    return std::nullopt;
  }
  if (v[0].is_array()) {
    for (size_t i = 0; i < v.size(); ++i) {
      const std::string p = absl::StrCat("prompt[", i, "]");
      if (!v[i].is_array()) return WrongType(p, v[i], "an array of token ids");
      out->prompt_ids.emplace_back();
      if (auto e = TokenIds(v[i], p, &out->prompt_ids.back())) return e;
    }
    return std::nullopt;
  }
  out->prompt_ids.emplace_back();
  return TokenIds(v, "prompt", &out->prompt_ids.back());
}

bool IsZero(const json& v) { return v.is_null() || (v.is_number() && v.get<double>() == 0); }

}  // namespace

json ErrorJson(const ApiError& e) {
  return {{"error",
           {{"message", e.message},
            {"type", e.type},
            {"param", e.param.empty() ? json(nullptr) : json(e.param)},
            {"code", e.code.empty() ? json(nullptr) : json(e.code)}}}};
}

ApiError BadField(std::string param, std::string message) {
  ApiError e;
  e.http_status = 400;
  e.message = std::move(message);
  e.param = std::move(param);
  return e;
}

ApiError FromStatus(const absl::Status& s, std::string param) {
  ApiError e;
  e.message = std::string(s.message());
  e.param = std::move(param);
  switch (s.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      e.http_status = 400;
      break;
    case absl::StatusCode::kNotFound:
      e.http_status = 404;
      e.type = "not_found_error";
      break;
    case absl::StatusCode::kAlreadyExists:
      e.http_status = 409;
      e.type = "conflict_error";
      break;
    case absl::StatusCode::kResourceExhausted:
      e.http_status = 429;
      e.type = "rate_limit_error";
      e.code = "queue_full";
      break;
    case absl::StatusCode::kUnavailable:
      e.http_status = 503;
      e.type = "service_unavailable_error";
      break;
    case absl::StatusCode::kUnauthenticated:
      e.http_status = 401;
      e.type = "authentication_error";
      break;
    default:
      e.http_status = 500;
      e.type = "server_error";
  }
  return e;
}

std::optional<ApiError> ParseRequest(Endpoint endpoint, absl::string_view body, ParsedRequest* out) {
  *out = ParsedRequest();
  out->endpoint = endpoint;
  const bool chat = endpoint == Endpoint::kChat;
  json j = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return BadField("", "the request body is not valid JSON");
  if (!j.is_object()) return BadField("", absl::StrCat("the request body must be a JSON object, got ", TypeName(j)));
  bool have_input = false;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const json& v = it.value();
    // Explicit nulls mean "the default" (as OpenAI's SDKs send them).
    if (v.is_null() && k != "messages" && k != "prompt") continue;
    if (k == "model") {
      if (!v.is_string()) return WrongType(k, v, "a string");
      out->model = v.get<std::string>();
    } else if (chat && k == "messages") {
      if (auto e = Messages(v, &out->messages)) return e;
      have_input = true;
    } else if (!chat && k == "prompt") {
      if (auto e = Prompt(v, out)) return e;
      have_input = true;
    } else if (k == "max_tokens" || (chat && k == "max_completion_tokens")) {
      int64_t n = 0;
      if (auto e = Int(v, k, 1, INT32_MAX, &n)) return e;
      out->max_tokens = n;
    } else if (k == "temperature") {
      if (auto e = Number(v, k, 0, 2, false, &out->temperature)) return e;
    } else if (k == "top_p") {
      if (auto e = Number(v, k, 0, 1, true, &out->top_p)) return e;
    } else if (k == "top_k") {
      int64_t n = 0;
      if (auto e = Int(v, k, -1, INT32_MAX, &n)) return e;
      out->top_k = n < 0 ? 0 : static_cast<int32_t>(n);
    } else if (k == "seed") {
      int64_t n = 0;
      if (auto e = Int(v, k, INT64_MIN, INT64_MAX, &n)) return e;
      out->seed = n;
    } else if (k == "n") {
      int64_t n = 0;
      if (auto e = Int(v, k, 1, kMaxN, &n)) return e;
      out->n = static_cast<int32_t>(n);
    } else if (k == "stop") {
      std::vector<std::string> stops;
      if (v.is_string()) {
        stops.push_back(v.get<std::string>());
      } else if (v.is_array()) {
        for (size_t i = 0; i < v.size(); ++i) {
          if (!v[i].is_string()) return WrongType(absl::StrCat("stop[", i, "]"), v[i], "a string");
          stops.push_back(v[i].get<std::string>());
        }
      } else {
        return WrongType(k, v, "a string or an array of strings");
      }
      if (stops.size() > static_cast<size_t>(kMaxStops)) {
        return BadField(k, absl::StrCat("stop: ", stops.size(), " stop strings; at most ", kMaxStops));
      }
      for (const std::string& s : stops) {
        if (s.empty()) return BadField(k, "stop: an empty stop string");
        if (s.size() > kMaxStopBytes) {
          return BadField(k, absl::StrCat("stop: a stop string of ", s.size(), " bytes; at most ", kMaxStopBytes));
        }
        if (!ValidateUtf8(s).ok()) return BadField(k, "stop: a stop string is not valid UTF-8");
      }
      out->stop = std::move(stops);
    } else if (k == "stream") {
      if (auto e = Bool(v, k, &out->stream)) return e;
    } else if (k == "stream_options") {
      if (!v.is_object()) return WrongType(k, v, "an object");
      for (auto o = v.begin(); o != v.end(); ++o) {
        if (o.key() == "include_usage") {
          if (o.value().is_null()) continue;
          if (auto e = Bool(o.value(), "stream_options.include_usage", &out->include_usage)) return e;
        } else if (o.key() != "continuous_usage_stats" || !(o.value().is_null() || o.value() == false)) {
          return BadField("stream_options." + o.key(), absl::StrCat("stream_options.", o.key(), ": unknown field"));
        }
      }
    } else if (k == "user" || k == "metadata" || k == "service_tier" || k == "parallel_tool_calls") {
      // Accepted and ignored: they do not change the output.
    } else if (k == "frequency_penalty" || k == "presence_penalty") {
      if (!v.is_number()) return WrongType(k, v, "a number");
      if (!IsZero(v)) return Unsupported(k, absl::StrCat(k, " other than 0"));
    } else if (k == "repetition_penalty") {
      if (!v.is_number()) return WrongType(k, v, "a number");
      if (v.get<double>() != 1) return Unsupported(k, "repetition_penalty other than 1");
    } else if (k == "logit_bias") {
      if (!v.is_object()) return WrongType(k, v, "an object");
      if (!v.empty()) return Unsupported(k, "logit_bias");
    } else if (k == "logprobs") {
      if (chat ? !(v.is_boolean() && !v.get<bool>()) : !IsZero(v)) return Unsupported(k, "logprobs");
    } else if (k == "top_logprobs") {
      if (!IsZero(v)) return Unsupported(k, "top_logprobs");
    } else if (chat && (k == "tools" || k == "functions")) {
      if (!v.is_array()) return WrongType(k, v, "an array");
      if (!v.empty()) return Unsupported(k, "tool (function) calling");
    } else if (chat && (k == "tool_choice" || k == "function_call")) {
      if (!(v == "none" || v == "auto")) return Unsupported(k, "forcing a tool call");
    } else if (chat && k == "response_format") {
      if (!v.is_object() || v.value("type", "") != "text") return Unsupported(k, "response_format other than text");
    } else if (chat && k == "store") {
      if (!(v.is_boolean() && !v.get<bool>())) return Unsupported(k, "store");
    } else if (!chat && k == "echo") {
      if (!(v.is_boolean() && !v.get<bool>())) return Unsupported(k, "echo");
    } else if (!chat && k == "best_of") {
      if (!(v.is_number_integer() && v.get<int64_t>() == 1)) return Unsupported(k, "best_of other than 1");
    } else if (!chat && k == "suffix") {
      if (!(v.is_string() && v.get<std::string>().empty())) return Unsupported(k, "suffix");
    } else {
      return BadField(k, absl::StrCat(k, ": unknown field for ", chat ? "/v1/chat/completions" : "/v1/completions"));
    }
  }
  if (!have_input) {
    const char* field = chat ? "messages" : "prompt";
    return BadField(field, absl::StrCat(field, ": required"));
  }
  if (!chat && out->prompt_texts.size() + out->prompt_ids.size() > static_cast<size_t>(kMaxN)) {
    return BadField("prompt", absl::StrCat("prompt: at most ", kMaxN, " prompts"));
  }
  if (out->include_usage && !out->stream) {
    return BadField("stream_options", "stream_options: only allowed with \"stream\": true");
  }
  return std::nullopt;
}

StopMatcher::StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
  for (const std::string& s : stops_) max_len_ = std::max(max_len_, s.size());
}

std::string StopMatcher::Push(absl::string_view text) {
  if (stopped_) return "";
  held_.append(text.data(), text.size());
  if (stops_.empty()) return std::exchange(held_, std::string());
  size_t first = std::string::npos;
  for (const std::string& s : stops_) first = std::min(first, held_.find(s));
  if (first != std::string::npos) {
    stopped_ = true;
    std::string out = held_.substr(0, first);
    held_.clear();
    return out;
  }
  // Keep the longest tail that is a proper prefix of some stop string.
  size_t keep = 0;
  for (size_t k = std::min(held_.size(), max_len_ - 1); k > 0 && keep == 0; --k) {
    const absl::string_view tail = absl::string_view(held_).substr(held_.size() - k);
    for (const std::string& s : stops_) {
      if (s.size() > k && absl::string_view(s).substr(0, k) == tail) {
        keep = k;
        break;
      }
    }
  }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopMatcher::Finish() {
  if (stopped_) return "";
  return std::exchange(held_, std::string());
}

TextPiece ReasoningSplitter::Push(absl::string_view text) {
  static constexpr absl::string_view kEnd = "</think>";
  TextPiece out;
  std::string rest;
  if (state_ == kReasoning) {
    held_.append(text.data(), text.size());
    const size_t end = held_.find(kEnd.data(), 0, kEnd.size());
    if (end == std::string::npos) {
      size_t keep = 0;
      for (size_t k = std::min(held_.size(), kEnd.size() - 1); k > 0; --k) {
        if (absl::EndsWith(held_, kEnd.substr(0, k))) {
          keep = k;
          break;
        }
      }
      out.reasoning = held_.substr(0, held_.size() - keep);
      held_.erase(0, held_.size() - keep);
      return out;
    }
    out.reasoning = held_.substr(0, end);
    rest = held_.substr(end + kEnd.size());
    held_.clear();
    state_ = kContentStart;
    text = rest;
  }
  if (state_ == kContentStart) {
    text = absl::StripLeadingAsciiWhitespace(text);
    if (text.empty()) return out;
    state_ = kContent;
  }
  out.content.append(text.data(), text.size());
  return out;
}

TextPiece ReasoningSplitter::Finish() {
  TextPiece out;
  out.reasoning = std::exchange(held_, std::string());
  return out;
}

absl::StatusOr<TextPiece> ChoiceText::Push(int32_t id) {
  if (stop_.stopped() || finished_ || !decoder_.has_value()) return TextPiece();
  // A model's vocabulary may be padded past the tokenizer's (DeepSeek-V3:
  // 129280 rows, 128815 ids): such ids have no text, as in HF's decode.
  if (!tokenizer_->IsValidId(id)) return TextPiece();
  absl::StatusOr<std::string> piece = decoder_->Push(id);
  if (!piece.ok()) return piece.status();
  return Split(stop_.Push(*piece));
}

TextPiece ChoiceText::Finish() {
  if (finished_) return TextPiece();
  finished_ = true;
  std::string text;
  if (!decoder_.has_value()) return TextPiece();
  if (!stop_.stopped()) {
    text = stop_.Push(decoder_->Finish());
    if (!stop_.stopped()) text += stop_.Finish();
  }
  TextPiece out = Split(text);
  TextPiece tail = split_.Finish();
  out.reasoning += tail.reasoning;
  out.content += tail.content;
  return out;
}

TextPiece ChoiceText::Split(const std::string& text) {
  if (text.empty()) return TextPiece();
  return split_.Push(text);
}

std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string SseEvent(const json& j) { return absl::StrCat("data: ", Dump(j), "\n\n"); }

}  // namespace expertmesh::coordinator::openai
