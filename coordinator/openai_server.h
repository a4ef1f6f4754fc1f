// The OpenAI-compatible HTTP API of a coordinator (--http-listen): GET
// /health, GET /v1/models, POST /v1/completions and POST
// /v1/chat/completions, streamed (SSE) or not. docs/API.md is the user's
// reference; the protocol pieces are in coordinator/openai_api.h.
//
// Each request is one job of the Coordinator (n sequences per prompt), so it
// is journaled, scheduled, cancelled and recovered like a gRPC job: its id
// is the job's (chatcmpl-job-000042), the Idempotency-Key (or X-Request-Id)
// header is the job's client_request_id, so a retry after a coordinator
// restart streams the same completion from the same job. A client that goes
// away (stream or not) cancels its job. Text: the checkpoint's tokenizer.json
// and chat template, loaded once at start; without them only token-id
// completions are served (text requests get a 400 naming the problem).
//
//   ASSIGN_OR_RETURN(auto http, OpenAiServer::Start(coordinator, options));
//   LOG(INFO) << "OpenAI API on port " << http->port();
//
// Threads: every connection has its own thread (coordinator/http_server.h);
// a request waits on the Coordinator's condition variable (WaitJobResults
// with per-token deltas) in short slices, checking its client in between.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "coordinator/coordinator.h"
#include "coordinator/http_server.h"

namespace expertmesh::coordinator {

class OpenAiServer {
 public:
  // The limits it serves with: many long-lived streaming connections, bodies
  // of up to 32 MiB, keep-alive connections kept for 65 s.
  static HttpLimits DefaultLimits();
  // Serves on options.http_listen. `coordinator` must outlive the server.
  // INVALID_ARGUMENT for a bad option (address, --chat-template,
  // --reasoning-field), UNAVAILABLE when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<OpenAiServer>> Start(Coordinator* coordinator,
                                                             const CoordinatorOptions& options,
                                                             const HttpLimits& limits = DefaultLimits());
  virtual ~OpenAiServer() = default;
  virtual int port() const = 0;
  // The model id it answers to.
  virtual const std::string& model_name() const = 0;
};

}  // namespace expertmesh::coordinator
