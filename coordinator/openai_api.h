// The OpenAI-compatible API's protocol, without sockets or a cluster (the
// server is coordinator/openai_server.h): request parsing and validation,
// OpenAI's error shape, stop strings matched on streamed text, the R1
// reasoning splitter, and SSE framing. Each piece is a plain function or a
// small single-threaded object, unit-tested on its own (tests/coordinator).
//
//   ParsedRequest r;
//   if (std::optional<ApiError> e = ParseRequest(Endpoint::kChat, body, &r)) answer(e->http_status, ErrorJson(*e));
//   ChoiceText choice(tokenizer, r.stop, /*reasoning=*/true);
//   for (int32_t id : new_tokens) { TextPiece p = choice.Push(id); ... if (choice.stopped()) break; }
//   TextPiece tail = choice.Finish();
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "common/tokenizer.h"
#include "nlohmann/json.hpp"

namespace expertmesh::coordinator::openai {

// An error answer: the HTTP status and OpenAI's JSON error object
// {"error": {"message", "type", "param", "code"}}.
struct ApiError {
  int http_status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // the offending field; empty: null
  std::string code;   // empty: null
};
nlohmann::json ErrorJson(const ApiError& e);
// A coordinator status as an answer: INVALID_ARGUMENT 400, NOT_FOUND 404,
// ALREADY_EXISTS 409, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, others 500.
ApiError FromStatus(const absl::Status& s, std::string param = "");
ApiError BadField(std::string param, std::string message);

enum class Endpoint { kChat, kCompletions };

// The fields of a /v1/chat/completions or /v1/completions body.
struct ParsedRequest {
  Endpoint endpoint = Endpoint::kChat;
  std::string model;                             // may be empty (any model)
  nlohmann::json messages;                       // chat: the messages, content parts joined to strings
  std::vector<std::string> prompt_texts;         // completions: text prompts
  std::vector<std::vector<int32_t>> prompt_ids;  // completions: token-id prompts
  std::optional<int64_t> max_tokens;             // max_tokens or max_completion_tokens
  double temperature = 1.0;                      // OpenAI's default
  double top_p = 1.0;
  int32_t top_k = 0;                             // 0 (or -1 in the request): off
  std::optional<int64_t> seed;
  int32_t n = 1;
  std::vector<std::string> stop;
  bool stream = false;
  bool include_usage = false;                    // stream_options.include_usage
};

// Parses and checks a request body. Every field is checked for its type and
// range; an unknown field, or a known OpenAI field this server does not
// implement used with a non-default value (logprobs, tools, response_format,
// ...), is an error naming it. Returns the error to answer, if any.
std::optional<ApiError> ParseRequest(Endpoint endpoint, absl::string_view body, ParsedRequest* out);

// Limits of the API (documented in docs/API.md).
inline constexpr int kMaxN = 128;
inline constexpr int kMaxStops = 16;
inline constexpr size_t kMaxStopBytes = 256;

// Holds back generated text that may be the start of a stop string, so no
// part of a stop string is ever emitted. Text must arrive in whole UTF-8 code
// points (StreamDecoder's pieces). After a match, stopped() is true and
// nothing more is emitted.
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);
  // Appends text; returns what can be emitted now (before any stop string).
  std::string Push(absl::string_view text);
  // The text held back, at the end of a sequence that did not stop.
  std::string Finish();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  size_t max_len_ = 0;
  std::string held_;
  bool stopped_ = false;
};

// Generated text split into reasoning and answer.
struct TextPiece {
  std::string reasoning;
  std::string content;
  bool empty() const { return reasoning.empty() && content.empty(); }
};

// DeepSeek-R1 reasoning (SGLang's `deepseek-r1` parser): the generation
// prompt opens a <think> block, so generated text up to `</think>` is
// reasoning, and the answer after it (leading whitespace dropped) is
// content. A sequence that never closes the block is all reasoning. Disabled
// (not a reasoning template): everything is content.
class ReasoningSplitter {
 public:
  explicit ReasoningSplitter(bool enabled) : state_(enabled ? kReasoning : kContent) {}
  TextPiece Push(absl::string_view text);
  TextPiece Finish();

 private:
  enum State { kReasoning, kContentStart, kContent };
  State state_;
  std::string held_;  // reasoning text that may be the start of "</think>"
};

// One choice's text from its tokens: incremental detokenisation (never half a
// code point; special tokens such as EOS are not shown), then the stop
// strings, then the reasoning split.
class ChoiceText {
 public:
  // Without a tokenizer (null) there is no text: Push and Finish return nothing.
  ChoiceText(const Tokenizer* tokenizer, std::vector<std::string> stops, bool reasoning)
      : tokenizer_(tokenizer), stop_(std::move(stops)), split_(reasoning) {
    if (tokenizer != nullptr) decoder_.emplace(*tokenizer, /*skip_special=*/true);
  }
  // The text completed by one more token; nothing once stopped(). An id the
  // tokenizer does not know (a model vocabulary padded past the tokenizer's)
  // has no text.
  absl::StatusOr<TextPiece> Push(int32_t id);
  // Flushes what is held back at the end of the sequence.
  TextPiece Finish();
  // A stop string matched: the sequence's remaining tokens are not shown.
  bool stopped() const { return stop_.stopped(); }

 private:
  TextPiece Split(const std::string& text);
  const Tokenizer* tokenizer_;
  std::optional<StreamDecoder> decoder_;
  StopMatcher stop_;
  ReasoningSplitter split_;
  bool finished_ = false;
};

// One Server-Sent Event: "data: <json>\n\n" (invalid UTF-8 replaced).
std::string SseEvent(const nlohmann::json& j);
inline constexpr char kSseDone[] = "data: [DONE]\n\n";
// JSON text of a response body (invalid UTF-8 replaced, never throws).
std::string Dump(const nlohmann::json& j);

}  // namespace expertmesh::coordinator::openai
