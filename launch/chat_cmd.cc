// `expertmesh chat`: a client of the coordinator's OpenAI-compatible HTTP API
// (POST /v1/chat/completions, docs/API.md). One-shot (--message, or stdin
// when it is not a terminal) or interactive (a prompt loop that keeps the
// conversation); the answer is printed as it streams in.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <iterator>
#include <set>
#include "absl/strings/string_view.h"
#include <string>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "launch/flags.h"
#include "launch/openai_client.h"
#include "launch/verbs.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, message, "",
          "chat: send this user message, print the answer and exit (default: stdin when it is not a terminal, "
          "else an interactive prompt)");
ABSL_FLAG(std::string, system, "", "chat: a system prompt, first in the conversation");
ABSL_FLAG(int64_t, max_tokens, 0, "chat: the most tokens an answer may have (0: the server's default)");
ABSL_FLAG(std::string, api_key, "",
          "chat: sent as `Authorization: Bearer KEY` (default: $EXPERTMESH_API_KEY; none when both are empty)");
ABSL_FLAG(bool, show_reasoning, false,
          "chat: also print a reasoning model's (DeepSeek-R1) reasoning_content, dimmed on a terminal, else "
          "between <think> and </think>");
ABSL_FLAG(bool, no_stream, false, "chat: ask for the whole answer at once (stream=false) instead of streaming it");
ABSL_FLAG(double, http_timeout_s, 600, "chat: the longest wait to connect or for the next bytes of an answer");

namespace expertmesh::launch {
namespace {

constexpr char kVerb[] = "chat";

int Fail(const std::string& message, int code = 1) {
  std::fprintf(stderr, "expertmesh %s: %s\n", kVerb, message.c_str());
  return code;
}

// Ctrl-C while an answer streams stops that answer (the connection closes and
// the server cancels the job); at the prompt it ends the session.
std::atomic<bool> g_interrupted{false};
void OnSigint(int) { g_interrupted = true; }

// The flags given on the command line (abseil 20220623 keeps IsSpecifiedOnCommandLine private): sampling
// flags are sent only when given, so the server's defaults apply otherwise. main.cc has already turned
// --top-p into --top_p.
std::set<std::string> g_given;
void NoteGivenFlags(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    absl::string_view a = argv[i];
    if (a == "--") break;
    if (!absl::ConsumePrefix(&a, "--")) continue;
    g_given.emplace(a.substr(0, a.find('=')));
  }
}
bool Specified(const char* flag) { return g_given.count(flag) > 0; }

// Prints an answer's pieces as they come: reasoning (with --show-reasoning) set
// apart from the content.
class AnswerPrinter {
 public:
  AnswerPrinter(bool show_reasoning, bool tty) : show_reasoning_(show_reasoning), tty_(tty) {}

  void Reasoning(const std::string& text) {
    if (text.empty()) return;
    reasoning_seen_ = true;
    if (!show_reasoning_) return;
    if (!in_reasoning_) {
      std::fputs(tty_ ? "\033[2m" : "<think>\n", stdout);
      in_reasoning_ = true;
    }
    Write(text);
  }
  void Content(const std::string& text) {
    if (text.empty()) return;
    EndReasoning();
    Write(text);
    content_ += text;
  }
  // Ends the answer (a newline unless it ended with one).
  void Finish() {
    EndReasoning();
    if (!last_newline_) std::fputc('\n', stdout);
    std::fflush(stdout);
  }
  const std::string& content() const { return content_; }
  bool hidden_reasoning_only() const { return !show_reasoning_ && reasoning_seen_ && content_.empty(); }

 private:
  void EndReasoning() {
    if (!in_reasoning_) return;
    in_reasoning_ = false;
    std::fputs(tty_ ? "\033[0m" : "", stdout);
    if (!last_newline_) std::fputc('\n', stdout);
    std::fputs(tty_ ? "\n" : "</think>\n\n", stdout);
    last_newline_ = true;
  }
  void Write(const std::string& text) {
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
    last_newline_ = text.back() == '\n';
  }

  bool show_reasoning_, tty_;
  bool in_reasoning_ = false, last_newline_ = true, reasoning_seen_ = false;
  std::string content_;
};

std::string StringField(const nlohmann::json& obj, const char* a, const char* b) {
  for (const char* k : {a, b}) {
    auto it = obj.find(k);
    if (it != obj.end() && it->is_string()) return it->get<std::string>();
  }
  return "";
}

// One chat completion of `messages`; prints it and returns its content.
absl::StatusOr<std::string> Ask(const OpenAiClient& client, const std::string& model, const nlohmann::json& messages,
                                bool tty) {
  nlohmann::json body = {{"model", model}, {"messages", messages}};
  if (absl::GetFlag(FLAGS_max_tokens) > 0) body["max_tokens"] = absl::GetFlag(FLAGS_max_tokens);
  // Sampling: only what the user set, so the server's defaults apply otherwise.
  if (Specified("temperature")) body["temperature"] = absl::GetFlag(FLAGS_temperature);
  if (Specified("top_p")) body["top_p"] = absl::GetFlag(FLAGS_top_p);
  if (Specified("top_k")) body["top_k"] = absl::GetFlag(FLAGS_top_k);
  if (Specified("seed")) body["seed"] = absl::GetFlag(FLAGS_seed);
  AnswerPrinter out(absl::GetFlag(FLAGS_show_reasoning), tty);
  std::string finish_reason;
  if (absl::GetFlag(FLAGS_no_stream)) {
    body["stream"] = false;
    absl::StatusOr<nlohmann::json> r = client.Post("/v1/chat/completions", body);
    if (!r.ok()) return r.status();
    const nlohmann::json& choices = (*r)["choices"];
    if (!choices.is_array() || choices.empty() || !choices[0].contains("message")) {
      return absl::InternalError(absl::StrCat("the answer has no choices[0].message: ", r->dump().substr(0, 300)));
    }
    const nlohmann::json& msg = choices[0]["message"];
    out.Reasoning(StringField(msg, "reasoning_content", "reasoning"));
    out.Content(StringField(msg, "content", "content"));
    finish_reason = StringField(choices[0], "finish_reason", "finish_reason");
  } else {
    body["stream"] = true;
    absl::Status s = client.Stream("/v1/chat/completions", body, {}, [&](const nlohmann::json& chunk) {
      if (g_interrupted) return false;
      auto choices = chunk.find("choices");
      if (choices == chunk.end() || !choices->is_array()) return true;
      for (const nlohmann::json& c : *choices) {
        if (c.value("index", 0) != 0) continue;
        if (c.contains("delta") && c["delta"].is_object()) {
          out.Reasoning(StringField(c["delta"], "reasoning_content", "reasoning"));
          out.Content(StringField(c["delta"], "content", "content"));
        }
        if (c.contains("finish_reason") && c["finish_reason"].is_string()) {
          finish_reason = c["finish_reason"].get<std::string>();
        }
      }
      return true;
    });
    if (absl::IsCancelled(s)) {
      out.Finish();
      std::fprintf(stderr, "[interrupted]\n");
      return out.content();
    }
    if (!s.ok()) {
      if (!out.content().empty()) out.Finish();
      return s;
    }
  }
  out.Finish();
  if (out.hidden_reasoning_only()) std::fprintf(stderr, "[the answer is all reasoning so far: --show-reasoning prints it]\n");
  if (finish_reason == "length") std::fprintf(stderr, "[the answer reached --max-tokens or the model's limit]\n");
  return out.content();
}

}  // namespace

int ChatMain(int argc, char** argv) {
  NoteGivenFlags(argc, argv);
  ParseVerbFlags(argc, argv);
  const std::string server = absl::GetFlag(FLAGS_server);
  if (server.empty()) return Fail("--server HOST:PORT is required (the coordinator's --http-listen address)", 2);
  absl::StatusOr<HttpEndpoint> ep = ParseHttpServer(server);
  if (!ep.ok()) return Fail(std::string(ep.status().message()), 2);
  std::string api_key = absl::GetFlag(FLAGS_api_key);
  if (api_key.empty() && std::getenv("EXPERTMESH_API_KEY") != nullptr) api_key = std::getenv("EXPERTMESH_API_KEY");
  if (absl::GetFlag(FLAGS_http_timeout_s) <= 0) return Fail("--http-timeout-s must be > 0", 2);
  OpenAiClient client(*ep, api_key, absl::GetFlag(FLAGS_http_timeout_s));

  // --model is shared with `plan` (flags.cc), whose default is a preset: only a given one counts here.
  std::string model = Specified("model") ? absl::GetFlag(FLAGS_model) : "";
  if (model.empty()) {
    absl::StatusOr<nlohmann::json> models = client.Get("/v1/models");
    if (!models.ok()) return Fail(std::string(models.status().message()));
    const nlohmann::json& data = (*models)["data"];
    if (!data.is_array() || data.empty() || !data[0].contains("id") || !data[0]["id"].is_string()) {
      return Fail(absl::StrCat(ep->Url(), "/v1/models lists no model: ", models->dump().substr(0, 300)));
    }
    model = data[0]["id"].get<std::string>();
  }

  nlohmann::json messages = nlohmann::json::array();
  if (!absl::GetFlag(FLAGS_system).empty()) {
    messages.push_back({{"role", "system"}, {"content", absl::GetFlag(FLAGS_system)}});
  }
  const bool stdout_tty = isatty(STDOUT_FILENO) != 0;
  const bool interactive = absl::GetFlag(FLAGS_message).empty() && isatty(STDIN_FILENO) != 0;

  if (!interactive) {
    std::string text = absl::GetFlag(FLAGS_message);
    if (text.empty()) {
      text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
      text = std::string(absl::StripTrailingAsciiWhitespace(text));
    }
    if (text.empty()) return Fail("empty message: give --message TEXT or text on stdin", 2);
    messages.push_back({{"role", "user"}, {"content", text}});
    absl::StatusOr<std::string> answer = Ask(client, model, messages, stdout_tty);
    if (!answer.ok()) return Fail(std::string(answer.status().message()));
    return 0;
  }

  struct sigaction sa = {};
  sa.sa_handler = OnSigint;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: Ctrl-C at the prompt ends the read
  sigaction(SIGINT, &sa, nullptr);
  std::fprintf(stderr, "expertmesh chat: %s at %s; /exit or Ctrl-D ends, Ctrl-C stops an answer\n", model.c_str(),
               ep->Url().c_str());
  while (true) {
    g_interrupted = false;
    std::fputs("> ", stdout);
    std::fflush(stdout);
    std::string line;
    if (!std::getline(std::cin, line)) {
      std::fputc('\n', stdout);
      break;
    }
    const std::string text(absl::StripAsciiWhitespace(line));
    if (text.empty()) continue;
    if (text == "/exit" || text == "/quit") break;
    messages.push_back({{"role", "user"}, {"content", text}});
    absl::StatusOr<std::string> answer = Ask(client, model, messages, stdout_tty);
    if (!answer.ok()) {
      std::fprintf(stderr, "expertmesh chat: %s\n", std::string(answer.status().message()).c_str());
      messages.erase(messages.end() - 1);  // not part of the conversation
      continue;
    }
    messages.push_back({{"role", "assistant"}, {"content", *answer}});
  }
  return 0;
}

}  // namespace expertmesh::launch
