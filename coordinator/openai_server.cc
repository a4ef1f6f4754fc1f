#include "coordinator/openai_server.h"

#include <atomic>
#include <functional>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/chat_template.h"
#include "common/status.h"
#include "common/tokenizer.h"
#include "coordinator/openai_api.h"
#include "glog/logging.h"
#include "nlohmann/json.hpp"

namespace expertmesh::coordinator {
namespace {

using nlohmann::json;
using openai::ApiError;
using openai::Endpoint;
using openai::ParsedRequest;
using openai::TextPiece;

// How long one wait for a job's progress lasts before the client is checked.
constexpr absl::Duration kPollSlice = absl::Milliseconds(100);

void Answer(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(openai::Dump(body), "application/json");
}

void AnswerError(httplib::Response& res, const ApiError& e) {
  if (e.http_status >= 500) {
    LOG(WARNING) << "OpenAI API: " << e.http_status << " " << e.message;
  } else {
    VLOG(1) << "OpenAI API: " << e.http_status << " " << e.message;
  }
  Answer(res, e.http_status, openai::ErrorJson(e));
}

std::string Basename(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// FNV-1a: the same in every process (a retry reaches another coordinator).
uint64_t StableHash(const std::string& s) {
  uint64_t h = 14695981039346656037ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

const char* FinishName(v1::FinishReason r) {
  switch (r) {
    case v1::FINISH_REASON_LENGTH: return "length";
    case v1::FINISH_REASON_STOP: return "stop";
    case v1::FINISH_REASON_CANCELLED: return "abort";
    default: return "error";
  }
}

// One request's job, followed until it is final: the choices' text as it is
// generated. Used by one thread at a time (the handler, then the stream's
// content provider, which may run after the handler returned).
class Run {
 public:
  struct Choice {
    openai::ChoiceText text;
    std::string content, reasoning;
    std::vector<int32_t> token_ids;  // without a tokenizer: the generated ids
    const char* finish = nullptr;    // set once its result came
    int64_t completion_tokens = 0;
    bool stop_sent = false;          // StopSequence was called
  };

  Run(Coordinator* c, const Tokenizer* tok, ParsedRequest req, std::string job_id, std::string reasoning_field,
      bool reasoning, std::string model, int64_t created, int64_t prompt_tokens, int num_choices)
      : c_(c),
        tok_(tok),
        req_(std::move(req)),
        job_id_(std::move(job_id)),
        reasoning_field_(std::move(reasoning_field)),
        reasoning_(reasoning),
        model_(std::move(model)),
        created_(created),
        prompt_tokens_(prompt_tokens) {
    const bool chat = req_.endpoint == Endpoint::kChat;
    id_ = absl::StrCat(chat ? "chatcmpl-" : "cmpl-", job_id_);
    for (int i = 0; i < num_choices; ++i) choices_.push_back(Choice{openai::ChoiceText(tok, req_.stop, reasoning_)});
  }

  const std::string& job_id() const { return job_id_; }
  bool done() const { return done_; }
  const std::optional<ApiError>& error() const { return error_; }

  // Waits up to `wait` for progress and applies it; appends stream chunks
  // (when streaming) to *chunks. done() once the job is final and every
  // result was applied.
  absl::Status Step(absl::Duration wait, std::vector<json>* chunks) {
    std::vector<v1::WatchJobResponse> batch;
    absl::StatusOr<bool> r = c_->WaitJobResults(job_id_, &cursor_, absl::Now() + wait, &batch, &offsets_);
    if (!r.ok()) return r.status();
    for (const v1::WatchJobResponse& m : batch) {
      for (const v1::SequenceDelta& d : m.deltas()) {
        if (d.index() < 0 || d.index() >= static_cast<int>(choices_.size())) continue;
        Choice& ch = choices_[static_cast<size_t>(d.index())];
        if (ch.finish != nullptr) continue;
        TextPiece piece;
        for (int32_t id : d.new_tokens()) {
          if (tok_ == nullptr) ch.token_ids.push_back(id);
          absl::StatusOr<TextPiece> p = ch.text.Push(id);
          if (!p.ok()) return p.status();
          piece.reasoning += p->reasoning;
          piece.content += p->content;
          if (ch.text.stopped()) break;
        }
        Emit(d.index(), ch, piece, chunks, tok_ == nullptr ? &d : nullptr);
        if (ch.text.stopped() && !ch.stop_sent) {
          ch.stop_sent = true;
          // The job's record of this sequence ends here; its result follows.
          absl::Status s = c_->StopSequence(job_id_, d.index());
          if (!s.ok()) LOG(WARNING) << "OpenAI API: cannot stop " << job_id_ << "/" << d.index() << ": " << s;
        }
      }
      if (!m.has_result()) continue;
      const v1::SequenceResult& res = m.result();
      if (res.index() < 0 || res.index() >= static_cast<int>(choices_.size())) continue;
      Choice& ch = choices_[static_cast<size_t>(res.index())];
      Emit(res.index(), ch, ch.text.Finish(), chunks, nullptr);
      ch.completion_tokens = res.tokens_size();
      ch.finish = ch.text.stopped() ? "stop" : FinishName(res.finish_reason());
      if (res.finish_reason() == v1::FINISH_REASON_ERROR && !error_.has_value()) {
        ApiError e;
        e.http_status = 500;
        e.type = "server_error";
        e.message = absl::StrCat("generation failed: ", res.error());
        error_ = e;
      }
      if (req_.stream) chunks->push_back(Chunk(res.index(), json::object(), ch.finish));
    }
    done_ = *r;
    return absl::OkStatus();
  }

  // The first chunk of each choice (role, empty content), as OpenAI sends.
  std::vector<json> OpeningChunks() const {
    std::vector<json> out;
    if (req_.endpoint != Endpoint::kChat) return out;
    for (size_t i = 0; i < choices_.size(); ++i) {
      out.push_back(Chunk(static_cast<int>(i), json{{"role", "assistant"}, {"content", ""}}, nullptr));
    }
    return out;
  }

  json Usage() const {
    int64_t completion = 0;
    for (const Choice& ch : choices_) completion += ch.completion_tokens;
    return json{{"prompt_tokens", prompt_tokens_},
                {"completion_tokens", completion},
                {"total_tokens", prompt_tokens_ + completion}};
  }

  // The final chunk of a stream with include_usage: no choices, the usage.
  json UsageChunk() const {
    json c = Envelope(true);
    c["choices"] = json::array();
    c["usage"] = Usage();
    return c;
  }

  // The whole answer of a request that did not stream.
  json Response() const {
    const bool chat = req_.endpoint == Endpoint::kChat;
    json out = Envelope(false);
    json choices = json::array();
    for (size_t i = 0; i < choices_.size(); ++i) {
      const Choice& ch = choices_[i];
      json c = {{"index", i}, {"logprobs", nullptr}, {"finish_reason", ch.finish == nullptr ? "abort" : ch.finish}};
      if (chat) {
        json msg = {{"role", "assistant"}, {"content", ch.content}};
        if (reasoning_) msg[reasoning_field_] = ch.reasoning;
        c["message"] = std::move(msg);
      } else {
        c["text"] = ch.content;
      }
      if (tok_ == nullptr) c["token_ids"] = ch.token_ids;
      choices.push_back(std::move(c));
    }
    out["choices"] = std::move(choices);
    out["usage"] = Usage();
    return out;
  }

  bool stream() const { return req_.stream; }
  bool include_usage() const { return req_.include_usage; }

 private:
  json Envelope(bool chunk) const {
    const bool chat = req_.endpoint == Endpoint::kChat;
    return json{{"id", id_},
                {"object", chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion"},
                {"created", created_},
                {"model", model_}};
  }

  json Chunk(int index, json delta, const char* finish) const {
    json c = Envelope(true);
    json choice = {{"index", index}, {"logprobs", nullptr},
                   {"finish_reason", finish == nullptr ? json(nullptr) : json(finish)}};
    if (req_.endpoint == Endpoint::kChat) {
      choice["delta"] = std::move(delta);
    } else {
      choice["text"] = delta.value("content", "");
      if (delta.contains("token_ids")) choice["token_ids"] = delta["token_ids"];
    }
    c["choices"] = json::array({std::move(choice)});
    if (req_.include_usage) c["usage"] = nullptr;
    return c;
  }

  void Emit(int index, Choice& ch, const TextPiece& piece, std::vector<json>* chunks, const v1::SequenceDelta* ids) {
    ch.reasoning += piece.reasoning;
    ch.content += piece.content;
    if (!req_.stream) return;
    if (piece.empty() && ids == nullptr) return;
    json delta = json::object();
    if (!piece.reasoning.empty()) delta[reasoning_field_] = piece.reasoning;
    if (!piece.content.empty() || req_.endpoint != Endpoint::kChat) delta["content"] = piece.content;
    if (ids != nullptr) delta["token_ids"] = std::vector<int32_t>(ids->new_tokens().begin(), ids->new_tokens().end());
    chunks->push_back(Chunk(index, std::move(delta), nullptr));
  }

  Coordinator* const c_;
  const Tokenizer* const tok_;
  const ParsedRequest req_;
  const std::string job_id_;
  const std::string reasoning_field_;
  const bool reasoning_;
  const std::string model_;
  const int64_t created_;
  const int64_t prompt_tokens_;
  std::string id_;
  std::vector<Choice> choices_;
  size_t cursor_ = 0;
  std::vector<int64_t> offsets_;
  bool done_ = false;
  std::optional<ApiError> error_;
};

class OpenAiServerImpl : public OpenAiServer {
 public:
  OpenAiServerImpl(Coordinator* c, const CoordinatorOptions& o, const HttpLimits& limits)
      : c_(c), options_(o), http_(limits, o.client_auth_token) {}
  ~OpenAiServerImpl() override { stopping_ = true; }

  absl::Status Init() {
    const CoordinatorOptions& o = options_;
    if (o.reasoning_field != "reasoning_content" && o.reasoning_field != "reasoning") {
      return absl::InvalidArgumentError(absl::StrCat("--reasoning-field \"", o.reasoning_field,
                                                     "\": expected reasoning_content (SGLang) or reasoning (vLLM)"));
    }
    model_ = o.served_model_name.empty() ? Basename(o.checkpoint) : o.served_model_name;
    created_ = absl::ToUnixSeconds(absl::Now());
    absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::FromDir(o.checkpoint);
    if (tok.ok()) {
      tok_ = std::move(*tok);
      absl::StatusOr<ChatTemplate> t = ChatTemplate::ForTokenizer(*tok_, o.chat_template);
      if (t.ok()) {
        template_ = std::move(*t);
      } else if (!o.chat_template.empty()) {
        return t.status();  // the flag itself is wrong
      } else {
        chat_error_ = absl::StrCat("this server has no chat template: ", t.status().message());
        LOG(WARNING) << "OpenAI API: " << chat_error_ << "; /v1/chat/completions answers 400";
      }
      if (tok_->vocab_size() > c_->config().vocab_size) {
        LOG(WARNING) << "OpenAI API: the tokenizer has " << tok_->vocab_size() << " ids, the model's vocab_size is "
                     << c_->config().vocab_size << "; prompts with larger ids are refused";
      }
    } else {
      text_error_ = absl::StrCat("this server cannot read text: the checkpoint's tokenizer could not be loaded (",
                                 tok.status().message(), "); only /v1/completions with token-id prompts works");
      chat_error_ = text_error_;
      LOG(WARNING) << "OpenAI API: " << text_error_;
    }
    auto& r = http_.routes();
    r.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      const bool serving = c_->serving();
      Answer(res, serving ? 200 : 503, json{{"status", serving ? "serving" : "not serving"}});
    });
    r.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      Answer(res, 200, json{{"object", "list"}, {"data", json::array({ModelJson()})}});
    });
    r.Get(R"(/v1/models/(.+))", [this](const httplib::Request& req, httplib::Response& res) {
      if (req.matches[1] != model_) {
        ApiError e;
        e.http_status = 404;
        e.type = "not_found_error";
        e.code = "model_not_found";
        e.message = absl::StrCat("The model `", std::string(req.matches[1]), "` does not exist; this server serves `",
                                 model_, "`");
        return AnswerError(res, e);
      }
      Answer(res, 200, ModelJson());
    });
    r.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
      Handle(Endpoint::kChat, req, res);
    });
    r.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
      Handle(Endpoint::kCompletions, req, res);
    });
    r.set_error_handler([](const httplib::Request&, httplib::Response& res) {
      if (!res.body.empty()) return;  // an answer of ours
      ApiError e;
      e.http_status = res.status;
      e.type = res.status == 404 ? "not_found_error" : "invalid_request_error";
      e.message = res.status == 404 ? "no such route; see docs/API.md (OpenAI-compatible HTTP API)"
                                    : absl::StrCat("HTTP ", res.status);
      Answer(res, res.status, openai::ErrorJson(e));
    });
    return http_.Listen("--http-listen", o.http_listen);
  }

  int port() const override { return http_.port(); }
  const std::string& model_name() const override { return model_; }

 private:
  json ModelJson() const {
    return json{{"id", model_},
                {"object", "model"},
                {"created", created_},
                {"owned_by", "expertmesh"},
                {"max_model_len", c_->config().max_position_embeddings}};
  }

  void Handle(Endpoint endpoint, const httplib::Request& req, httplib::Response& res) {
    ParsedRequest p;
    if (std::optional<ApiError> e = openai::ParseRequest(endpoint, req.body, &p)) return AnswerError(res, *e);
    if (!p.model.empty() && p.model != model_) {
      ApiError e;
      e.http_status = 404;
      e.type = "not_found_error";
      e.param = "model";
      e.code = "model_not_found";
      e.message = absl::StrCat("The model `", p.model, "` does not exist; this server serves `", model_, "`");
      return AnswerError(res, e);
    }
    // The prompts as token ids.
    std::vector<std::vector<int32_t>> prompts;
    const bool chat = endpoint == Endpoint::kChat;
    if (chat) {
      if (!template_.has_value()) return AnswerError(res, openai::BadField("messages", chat_error_));
      absl::StatusOr<std::string> text = template_->Render(p.messages, /*add_generation_prompt=*/true);
      if (!text.ok()) return AnswerError(res, openai::BadField("messages", std::string(text.status().message())));
      absl::StatusOr<std::vector<int32_t>> ids = tok_->Encode(*text, /*add_bos=*/false);
      if (!ids.ok()) return AnswerError(res, openai::BadField("messages", std::string(ids.status().message())));
      prompts.push_back(std::move(*ids));
    } else if (!p.prompt_texts.empty()) {
      if (tok_ == nullptr) return AnswerError(res, openai::BadField("prompt", text_error_));
      for (size_t i = 0; i < p.prompt_texts.size(); ++i) {
        absl::StatusOr<std::vector<int32_t>> ids = tok_->Encode(p.prompt_texts[i], /*add_bos=*/true);
        if (!ids.ok()) {
          return AnswerError(res, openai::BadField("prompt", absl::StrCat("prompt[", i, "]: ", ids.status().message())));
        }
        if (ids->empty()) return AnswerError(res, openai::BadField("prompt", "prompt: empty"));
        prompts.push_back(std::move(*ids));
      }
    } else {
      prompts = p.prompt_ids;
    }
    if (!p.stop.empty() && tok_ == nullptr) return AnswerError(res, openai::BadField("stop", text_error_));
    const char* input = chat ? "messages" : "prompt";
    const int64_t context = c_->config().max_position_embeddings;
    int64_t longest = 0, prompt_tokens = 0;
    for (const auto& ids : prompts) {
      longest = std::max<int64_t>(longest, static_cast<int64_t>(ids.size()));
      prompt_tokens += static_cast<int64_t>(ids.size());
    }
    if (longest >= context) {
      return AnswerError(res, openai::BadField(input, absl::StrCat("the prompt is ", longest,
                                                                   " tokens; the model's context is ", context,
                                                                   " tokens (max_position_embeddings), prompt and "
                                                                   "completion together")));
    }
    int64_t max_tokens = p.max_tokens.value_or(chat ? context - longest : std::min<int64_t>(16, context - longest));
    if (longest + max_tokens > context) {
      return AnswerError(res, openai::BadField("max_tokens",
                                               absl::StrCat("max_tokens ", max_tokens, " + the prompt's ", longest,
                                                            " tokens exceed the model's context of ", context,
                                                            " tokens; at most ", context - longest)));
    }
    if (static_cast<int64_t>(prompts.size()) * p.n > options_.max_sequences_per_job) {
      return AnswerError(res, openai::BadField("n", absl::StrCat(prompts.size(), " prompts x n=", p.n, " = ",
                                                                 prompts.size() * static_cast<size_t>(p.n),
                                                                 " sequences; at most ",
                                                                 options_.max_sequences_per_job, " per request")));
    }
    std::string request_id = req.get_header_value("Idempotency-Key");
    if (request_id.empty()) request_id = req.get_header_value("X-Request-Id");
    // A retry of a known request is answered from its job even while the
    // cluster does not serve (its results may be there; its sequences wait).
    if (!c_->serving() && !c_->FindJobByRequestId(request_id).has_value()) {
      ApiError e;
      e.http_status = 503;
      e.type = "service_unavailable_error";
      e.message = "the cluster is not serving now (workers starting, lost or shutting down); retry later";
      res.set_header("Retry-After", "1");
      return AnswerError(res, e);
    }
    // The job: n sequences per prompt, in choice order.
    v1::SubmitJobRequest job;
    job.set_client_request_id(request_id);
    uint64_t base_seed = 0;
    if (p.seed.has_value()) {
      base_seed = static_cast<uint64_t>(*p.seed);
    } else if (!request_id.empty()) {
      base_seed = StableHash(request_id);  // a retry must be the same request
    } else {
      base_seed = (static_cast<uint64_t>(std::random_device()()) << 32) ^ std::random_device()();
    }
    uint64_t seq = 0;
    for (const auto& ids : prompts) {
      for (int i = 0; i < p.n; ++i, ++seq) {
        v1::SequenceRequest* s = job.add_sequences();
        s->mutable_tokens()->Add(ids.begin(), ids.end());
        s->set_max_new_tokens(static_cast<int32_t>(max_tokens));
        if (p.temperature > 0) {
          v1::SamplingParams* sp = s->mutable_sampling();
          sp->set_temperature(static_cast<float>(p.temperature));
          sp->set_top_p(static_cast<float>(p.top_p));
          sp->set_top_k(p.top_k);
          sp->set_seed(base_seed + seq);
        }
        if (tok_ != nullptr && tok_->eos_id().has_value()) s->add_stop_token_ids(*tok_->eos_id());
      }
    }
    absl::StatusOr<v1::SubmitJobResponse> sub = c_->SubmitJob(job);
    if (!sub.ok()) {
      std::string param;
      if (sub.status().code() == absl::StatusCode::kInvalidArgument) {
        param = absl::StrContains(sub.status().message(), "client_request_id") ? "Idempotency-Key" : input;
      }
      return AnswerError(res, openai::FromStatus(sub.status(), param));
    }
    absl::StatusOr<v1::Job> info = c_->GetJob(sub->job_id());
    const int64_t created = info.ok() ? info->submitted_unix_ms() / 1000 : absl::ToUnixSeconds(absl::Now());
    res.set_header("X-Expertmesh-Job-Id", sub->job_id());
    auto run = std::make_shared<Run>(c_, tok_.get(), std::move(p), sub->job_id(), options_.reasoning_field,
                                     chat && template_.has_value() && template_->reasons(), model_, created,
                                     prompt_tokens, job.sequences_size());
    if (!run->stream()) return AnswerWhole(run, res);
    Stream(run, res);
  }

  // Not streaming: waits for the whole job, cancelling it if the client goes away.
  void AnswerWhole(const std::shared_ptr<Run>& run, httplib::Response& res) {
    std::vector<json> unused;
    const int fd = CurrentConnectionFd();
    while (!run->done()) {
      absl::Status s = run->Step(kPollSlice, &unused);
      if (!s.ok()) return AnswerError(res, openai::FromStatus(s));
      if (stopping_) {
        return AnswerError(res, openai::FromStatus(absl::UnavailableError(
                                    "the coordinator is stopping; retry with the same Idempotency-Key to get this "
                                    "completion from its successor")));
      }
      if (!run->done() && PeerClosed(fd)) {
        LOG(INFO) << "OpenAI API: the client of " << run->job_id() << " went away; cancelling the job";
        c_->CancelJob(run->job_id()).IgnoreError();
        res.status = 499;  // never read by anyone
        return;
      }
    }
    if (run->error().has_value()) return AnswerError(res, *run->error());
    Answer(res, 200, run->Response());
  }

  // Streaming: SSE chunks as tokens come; the job is cancelled if the stream
  // ends before the job does (the client went away or stopped reading).
  void Stream(const std::shared_ptr<Run>& run, httplib::Response& res) {
    res.set_header("Cache-Control", "no-cache");
    res.set_header("X-Accel-Buffering", "no");
    auto opened = std::make_shared<bool>(false);
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, run, opened](size_t, httplib::DataSink& sink) -> bool {
          if (stopping_) return false;
          std::vector<json> chunks;
          if (!*opened) {
            *opened = true;
            chunks = run->OpeningChunks();
          }
          absl::Status s = run->Step(kPollSlice, &chunks);
          std::string out;
          for (const json& c : chunks) out += openai::SseEvent(c);
          if (!s.ok() || run->error().has_value()) {
            out += openai::SseEvent(openai::ErrorJson(s.ok() ? *run->error() : openai::FromStatus(s)));
            out += openai::kSseDone;
            if (!sink.write(out.data(), out.size())) return false;
            sink.done();
            return true;
          }
          if (run->done()) {
            if (run->include_usage()) out += openai::SseEvent(run->UsageChunk());
            out += openai::kSseDone;
          }
          if (!out.empty() && !sink.write(out.data(), out.size())) return false;
          if (run->done()) {
            sink.done();
            return true;
          }
          return !PeerClosed(CurrentConnectionFd());
        },
        [this, run](bool) {
          if (run->done() || stopping_) return;
          LOG(INFO) << "OpenAI API: the stream of " << run->job_id() << " ended early (client went away); "
                    << "cancelling the job";
          c_->CancelJob(run->job_id()).IgnoreError();
        });
  }

  Coordinator* const c_;
  const CoordinatorOptions options_;
  std::string model_;
  int64_t created_ = 0;
  std::unique_ptr<Tokenizer> tok_;
  std::optional<ChatTemplate> template_;
  std::string text_error_, chat_error_;
  // Set while the server shuts down: the streams it cuts are not the
  // clients' doing, so their jobs go on (a retry finds them).
  std::atomic<bool> stopping_{false};
  HttpServer http_;  // last: destroyed (its threads joined) before what they use
};

}  // namespace

HttpLimits OpenAiServer::DefaultLimits() {
  HttpLimits l;
  l.max_connections = 1024;
  l.request_read_timeout = absl::Seconds(30);
  l.idle_timeout = absl::Seconds(65);
  l.max_requests_per_connection = 10000;
  l.max_body_bytes = size_t{32} << 20;
  return l;
}

absl::StatusOr<std::unique_ptr<OpenAiServer>> OpenAiServer::Start(Coordinator* coordinator,
                                                                  const CoordinatorOptions& options,
                                                                  const HttpLimits& limits) {
  auto s = std::make_unique<OpenAiServerImpl>(coordinator, options, limits);
  RETURN_IF_ERROR(s->Init());
  return std::unique_ptr<OpenAiServer>(std::move(s));
}

}  // namespace expertmesh::coordinator
