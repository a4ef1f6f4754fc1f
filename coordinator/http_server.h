// The coordinator's HTTP servers' common base (GET /metrics, the OpenAI API):
// cpp-httplib's routing and parsing behind a connection loop that keeps the
// server answering when clients misbehave (idle connections, slowloris
// headers, bursts of connections), and an optional bearer token.
//
//   HttpServer http(HttpLimits{}, /*bearer_token=*/"");
//   http.routes().Get("/health", [](const httplib::Request&, httplib::Response& res) { ... });
//   RETURN_IF_ERROR(http.Listen("--http-listen", "0.0.0.0:8000"));
//   ... http.port() ...
//
// Threads: each connection has a thread of its own while it is open (bounded
// by HttpLimits::max_connections), so a long answer (a token stream) or a
// slow client never holds the thread another request needs. Handlers run on
// their connection's thread; CurrentConnectionFd() tells them its socket (to
// notice a client that went away while they wait).
#pragma once

#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "httplib.h"

namespace expertmesh::coordinator {

struct HttpLimits {
  // Connections open at once. A new one past this closes the connection that
  // has waited longest without a request in hand (idle, or still sending its
  // request); when every one is being answered, the new one is closed.
  int max_connections = 64;
  // A request (request line, headers and any body) must arrive in full within
  // this time of its first byte, however slowly it trickles in.
  absl::Duration request_read_timeout = absl::Seconds(5);
  // A connection that sends no (further) request for this long is closed.
  absl::Duration idle_timeout = absl::Seconds(2);
  // Requests one keep-alive connection may make before it is closed.
  int max_requests_per_connection = 100;
  // Largest request body accepted (413 past it).
  size_t max_body_bytes = 64 << 10;
};

class GuardedHttpServer;

class HttpServer {
 public:
  // `bearer_token` not empty: every route but GET /health needs the header
  // `Authorization: Bearer <token>`; others get 401 with an OpenAI-shaped
  // JSON error.
  HttpServer(const HttpLimits& limits, std::string bearer_token);
  ~HttpServer();  // closes every connection and waits for their threads

  // Register the routes here before Listen.
  httplib::Server& routes();
  // Binds `listen` ("host:port"; port 0 picks a free one) and serves on a
  // thread of its own. `flag` names the option in errors. INVALID_ARGUMENT
  // for a malformed address or limits, UNAVAILABLE when it cannot be bound.
  absl::Status Listen(const std::string& flag, const std::string& listen);
  int port() const { return port_; }

 private:
  std::unique_ptr<GuardedHttpServer> http_;
  std::thread thread_;
  int port_ = 0;
};

// The socket of the connection whose request the calling thread answers; -1
// outside a handler.
int CurrentConnectionFd();
// True when the peer of `fd` closed the connection or it failed (a request
// pipelined meanwhile counts as open). Does not wait.
bool PeerClosed(int fd);

}  // namespace expertmesh::coordinator
