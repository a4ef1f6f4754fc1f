#include "launch/openai_client.h"

#include <cmath>
#include <cstdint>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "httplib.h"

namespace expertmesh::launch {

bool SseParser::Feed(absl::string_view bytes) {
  for (size_t i = 0; i < bytes.size() && !stopped_; ++i) {
    const char c = bytes[i];
    if (c == '\n' && after_cr_) {  // the \n of a \r\n
      after_cr_ = false;
      continue;
    }
    after_cr_ = c == '\r';
    if (c == '\n' || c == '\r') {
      std::string line;
      line.swap(pending_);
      if (!Line(line)) stopped_ = true;
    } else {
      pending_.push_back(c);
    }
  }
  return !stopped_;
}

bool SseParser::Line(absl::string_view line) {
  if (line.empty()) {  // end of an event
    if (!has_data_) return true;
    std::string data;
    data.swap(data_);
    has_data_ = false;
    return on_data_(data);
  }
  if (line[0] == ':') return true;  // comment
  const size_t colon = line.find(':');
  const absl::string_view field = line.substr(0, colon);
  absl::string_view value = colon == absl::string_view::npos ? absl::string_view() : line.substr(colon + 1);
  if (!value.empty() && value[0] == ' ') value.remove_prefix(1);
  if (field == "data") {
    if (has_data_) data_.push_back('\n');
    data_.append(value.data(), value.size());
    has_data_ = true;
  }
  return true;
}

std::string HttpEndpoint::Url() const {
  const bool v6 = absl::StrContains(host, ':');
  return absl::StrCat("http://", v6 ? "[" : "", host, v6 ? "]" : "", ":", port);
}

absl::StatusOr<HttpEndpoint> ParseHttpServer(absl::string_view server) {
  absl::string_view s = server;
  if (absl::StartsWith(s, "https://")) {
    return absl::InvalidArgumentError(absl::StrCat("--server ", server, ": https is not supported (plain http only)"));
  }
  absl::ConsumePrefix(&s, "http://");
  absl::ConsumeSuffix(&s, "/");
  if (absl::StrContains(s, '/')) {
    return absl::InvalidArgumentError(
        absl::StrCat("--server ", server, ": give host:port (the API's paths, /v1/..., are added)"));
  }
  HttpEndpoint ep;
  absl::string_view port;
  if (absl::StartsWith(s, "[")) {
    const size_t close = s.find("]:");
    if (close == absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat("--server ", server, ": expected [v6-address]:port"));
    }
    ep.host = std::string(s.substr(1, close - 1));
    port = s.substr(close + 2);
  } else {
    const size_t colon = s.rfind(':');
    if (colon == absl::string_view::npos || colon == 0) {
      return absl::InvalidArgumentError(absl::StrCat("--server ", server, ": expected host:port"));
    }
    ep.host = std::string(s.substr(0, colon));
    port = s.substr(colon + 1);
  }
  if (!absl::SimpleAtoi(port, &ep.port) || ep.port <= 0 || ep.port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--server ", server, ": bad port \"", port, "\""));
  }
  return ep;
}

absl::Status HttpError(int http_status, absl::string_view body) {
  std::string message;
  const nlohmann::json j = nlohmann::json::parse(std::string(body), nullptr, /*allow_exceptions=*/false);
  if (j.is_object() && j.contains("error") && j["error"].is_object() && j["error"].contains("message") &&
      j["error"]["message"].is_string()) {
    message = j["error"]["message"].get<std::string>();
    if (j["error"].contains("param") && j["error"]["param"].is_string()) {
      absl::StrAppend(&message, " (param: ", j["error"]["param"].get<std::string>(), ")");
    }
  } else {
    message = std::string(body.substr(0, 300));
    if (message.empty()) message = "(empty body)";
  }
  message = absl::StrCat("HTTP ", http_status, ": ", message);
  switch (http_status) {
    case 400: case 422: return absl::InvalidArgumentError(message);
    case 401: return absl::UnauthenticatedError(message);
    case 403: return absl::PermissionDeniedError(message);
    case 404: return absl::NotFoundError(message);
    case 409: return absl::AlreadyExistsError(message);
    case 429: return absl::ResourceExhaustedError(message);
    case 503: return absl::UnavailableError(message);
    case 504: return absl::DeadlineExceededError(message);
    default: return http_status >= 500 ? absl::InternalError(message) : absl::UnknownError(message);
  }
}

OpenAiClient::OpenAiClient(HttpEndpoint endpoint, std::string api_key, double timeout_s)
    : endpoint_(std::move(endpoint)), api_key_(std::move(api_key)), timeout_s_(timeout_s) {}

namespace {

std::unique_ptr<httplib::Client> Connect(const HttpEndpoint& ep, double timeout_s) {
  auto cli = std::make_unique<httplib::Client>(ep.host, ep.port);
  const auto sec = static_cast<time_t>(timeout_s);
  const auto usec = static_cast<time_t>((timeout_s - std::floor(timeout_s)) * 1e6);
  cli->set_connection_timeout(std::min<time_t>(sec, 10), sec >= 10 ? 0 : usec);
  cli->set_read_timeout(sec, usec);
  cli->set_write_timeout(std::min<time_t>(sec, 30), sec >= 30 ? 0 : usec);
  cli->set_keep_alive(false);
  return cli;
}

absl::Status TransportError(const HttpEndpoint& ep, httplib::Error e) {
  const std::string what = httplib::to_string(e);
  if (e == httplib::Error::Connection || e == httplib::Error::ConnectionTimeout) {
    return absl::UnavailableError(absl::StrCat("cannot reach ", ep.Url(), " (", what,
                                               "): is a coordinator serving HTTP there (--http-listen)?"));
  }
  if (e == httplib::Error::Read) {
    return absl::UnavailableError(absl::StrCat(ep.Url(), ": the connection closed or timed out (", what, ")"));
  }
  return absl::UnavailableError(absl::StrCat(ep.Url(), ": ", what));
}

absl::StatusOr<nlohmann::json> ParseJson(const std::string& body, const std::string& path) {
  nlohmann::json j = nlohmann::json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InternalError(absl::StrCat(path, ": the answer is not JSON: ", body.substr(0, 200)));
  }
  return j;
}

}  // namespace

absl::StatusOr<nlohmann::json> OpenAiClient::Get(const std::string& path) const {
  auto cli = Connect(endpoint_, timeout_s_);
  httplib::Headers h;
  if (!api_key_.empty()) h.emplace("Authorization", "Bearer " + api_key_);
  httplib::Result r = cli->Get(path.c_str(), h);
  if (!r) return TransportError(endpoint_, r.error());
  if (r->status != 200) return HttpError(r->status, r->body);
  return ParseJson(r->body, path);
}

absl::StatusOr<nlohmann::json> OpenAiClient::Post(const std::string& path, const nlohmann::json& body,
                                                  const Headers& headers) const {
  auto cli = Connect(endpoint_, timeout_s_);
  httplib::Headers h;
  if (!api_key_.empty()) h.emplace("Authorization", "Bearer " + api_key_);
  for (const auto& [k, v] : headers) h.emplace(k, v);
  httplib::Result r = cli->Post(path.c_str(), h, body.dump(), "application/json");
  if (!r) return TransportError(endpoint_, r.error());
  if (r->status != 200) return HttpError(r->status, r->body);
  return ParseJson(r->body, path);
}

absl::Status OpenAiClient::Stream(const std::string& path, const nlohmann::json& body, const Headers& headers,
                                  const std::function<bool(const nlohmann::json&)>& on_chunk) const {
  auto cli = Connect(endpoint_, timeout_s_);
  httplib::Request req;
  req.method = "POST";
  req.path = path;
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  req.set_header("Accept", "text/event-stream");
  if (!api_key_.empty()) req.set_header("Authorization", "Bearer " + api_key_);
  for (const auto& [k, v] : headers) req.set_header(k, v);

  int status = 0;
  std::string error_body;  // the body of a non-200 answer
  bool done = false, stopped = false;
  absl::Status stream_error;
  SseParser parser([&](absl::string_view data) {
    if (done) return true;  // nothing is expected after [DONE]
    if (data == "[DONE]") {
      done = true;
      return true;
    }
    nlohmann::json chunk = nlohmann::json::parse(std::string(data), nullptr, /*allow_exceptions=*/false);
    if (chunk.is_discarded()) {
      stream_error = absl::InternalError(absl::StrCat(path, ": an event is not JSON: ", data.substr(0, 200)));
      return false;
    }
    if (chunk.contains("error")) {  // OpenAI's error event mid-stream
      const std::string msg = chunk["error"].is_object() && chunk["error"].value("message", "").size()
                                  ? chunk["error"]["message"].get<std::string>()
                                  : chunk["error"].dump();
      stream_error = absl::AbortedError(absl::StrCat("the server ended the stream with an error: ", msg));
      return false;
    }
    if (!on_chunk(chunk)) {
      stopped = true;
      return false;
    }
    return true;
  });
  req.response_handler = [&](const httplib::Response& res) {
    status = res.status;
    return true;
  };
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    if (status != 200) {
      if (error_body.size() < 65536) error_body.append(data, n);
      return true;
    }
    return parser.Feed(absl::string_view(data, n));
  };
  httplib::Response res;
  httplib::Error err = httplib::Error::Success;
  const bool ok = cli->send(req, res, err);
  if (stopped) return absl::CancelledError("the stream was closed by the client");
  if (!stream_error.ok()) return stream_error;
  if (status != 0 && status != 200) return HttpError(status, error_body);
  if (!ok) return TransportError(endpoint_, err);
  if (!done) return absl::UnavailableError(absl::StrCat(endpoint_.Url(), path, ": the stream ended without [DONE]"));
  return absl::OkStatus();
}

}  // namespace expertmesh::launch
