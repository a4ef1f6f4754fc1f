// A client of the coordinator's OpenAI-compatible HTTP API (docs/API.md):
// JSON requests, server-sent-event streams and OpenAI's error shape, over
// cpp-httplib. Used by `expertmesh chat` and `expertmesh bench serve --stream`.
//
//   ASSIGN_OR_RETURN(HttpEndpoint ep, ParseHttpServer("127.0.0.1:8000"));
//   OpenAiClient client(ep, /*api_key=*/"", /*timeout_s=*/600);
//   RETURN_IF_ERROR(client.Stream("/v1/chat/completions", body, {},
//                                 [](const nlohmann::json& chunk) { ...; return true; }));
//
// Errors are canonical codes: UNAVAILABLE (cannot connect, HTTP 503),
// INVALID_ARGUMENT (400), UNAUTHENTICATED (401), NOT_FOUND (404),
// RESOURCE_EXHAUSTED (429), INTERNAL (other 5xx), each with the server's
// `error.message`, and CANCELLED when the caller's callback stopped a stream.
#pragma once

#include <functional>
#include <string>
#include "absl/strings/string_view.h"
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace expertmesh::launch {

// Incremental parser of a text/event-stream body (the WHATWG server-sent
// events format, as OpenAI's API writes it): feed bytes as they arrive, in
// any split; each complete event's data (its `data:` lines joined by '\n')
// goes to on_data. Lines end in \n, \r\n or \r; comments (`:`) and the
// `event:`, `id:` and `retry:` fields are ignored; an event without data
// lines is not delivered.
class SseParser {
 public:
  explicit SseParser(std::function<bool(absl::string_view data)> on_data) : on_data_(std::move(on_data)) {}
  // False once on_data returned false (the rest of the bytes are not parsed).
  bool Feed(absl::string_view bytes);

 private:
  bool Line(absl::string_view line);
  std::function<bool(absl::string_view)> on_data_;
  std::string pending_;     // an unfinished line
  bool after_cr_ = false;   // the last byte fed was '\r' (a following '\n' belongs to it)
  std::string data_;
  bool has_data_ = false;
  bool stopped_ = false;
};

struct HttpEndpoint {
  std::string host;
  int port = 0;
  std::string Url() const;  // http://host:port
};

// "host:port", "http://host:port" or "http://host:port/" (also "[::1]:port");
// https and paths are refused (InvalidArgument).
absl::StatusOr<HttpEndpoint> ParseHttpServer(absl::string_view server);

class OpenAiClient {
 public:
  using Headers = std::vector<std::pair<std::string, std::string>>;
  // api_key: sent as `Authorization: Bearer <key>` when not empty. timeout_s:
  // connect, and the longest wait for the next bytes of a response.
  OpenAiClient(HttpEndpoint endpoint, std::string api_key, double timeout_s);

  const HttpEndpoint& endpoint() const { return endpoint_; }

  absl::StatusOr<nlohmann::json> Get(const std::string& path) const;
  absl::StatusOr<nlohmann::json> Post(const std::string& path, const nlohmann::json& body,
                                      const Headers& headers = {}) const;
  // POSTs body (which should say "stream": true) and hands each event's JSON
  // to on_chunk until `data: [DONE]`. on_chunk returning false closes the
  // connection (the server cancels the request) and the result is CANCELLED.
  // An error event ({"error": {...}}) mid-stream is returned as the error; a
  // stream that ends without [DONE] is UNAVAILABLE.
  absl::Status Stream(const std::string& path, const nlohmann::json& body, const Headers& headers,
                      const std::function<bool(const nlohmann::json& chunk)>& on_chunk) const;

 private:
  HttpEndpoint endpoint_;
  std::string api_key_;
  double timeout_s_;
};

// The canonical code for an HTTP status and the message of an OpenAI error
// body ({"error": {"message": ...}}; any other body is quoted, shortened).
absl::Status HttpError(int http_status, absl::string_view body);

}  // namespace expertmesh::launch
