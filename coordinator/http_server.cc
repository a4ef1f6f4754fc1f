#include "coordinator/http_server.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <system_error>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "coordinator/auth.h"
#include "glog/logging.h"
#include "nlohmann/json.hpp"

namespace expertmesh::coordinator {
namespace {

thread_local int current_fd = -1;

// Sets current_fd while a connection is served on this thread.
class CurrentFd {
 public:
  explicit CurrentFd(int fd) { current_fd = fd; }
  ~CurrentFd() { current_fd = -1; }
};

// One open connection's deadline-bound reads and writes. Every read of one
// request (request line, headers, body) must finish by the read deadline, so a
// client sending a byte every few seconds is cut off like a silent one.
// Buffered: httplib reads request lines one byte at a time.
class DeadlineStream : public httplib::Stream {
 public:
  DeadlineStream(int fd, absl::Duration write_timeout) : fd_(fd), write_timeout_(write_timeout) {}
  void set_read_deadline(absl::Time deadline) { read_deadline_ = deadline; }
  // Waits until a byte can be read (or the peer closed) or `deadline` passes.
  bool WaitReadable(absl::Time deadline) const { return off_ < len_ || Poll(POLLIN, deadline); }

  bool is_readable() const override { return WaitReadable(read_deadline_); }
  bool is_writable() const override { return Poll(POLLOUT, absl::Now() + write_timeout_); }
  ssize_t read(char* ptr, size_t size) override {
    if (off_ == len_) {
      if (!Poll(POLLIN, read_deadline_)) return -1;
      ssize_t n;
      do {
        n = ::recv(fd_, buf_, sizeof(buf_), 0);
      } while (n < 0 && errno == EINTR);
      if (n <= 0) return n;
      off_ = 0;
      len_ = static_cast<size_t>(n);
    }
    const size_t n = std::min(size, len_ - off_);
    std::memcpy(ptr, buf_ + off_, n);
    off_ += n;
    return static_cast<ssize_t>(n);
  }
  ssize_t write(const char* ptr, size_t size) override {
    if (!is_writable()) return -1;
    ssize_t n;
    do {
      n = ::send(fd_, ptr, size, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n;
  }
  void get_remote_ip_and_port(std::string& ip, int& port) const override { Name(::getpeername, ip, port); }
  void get_local_ip_and_port(std::string& ip, int& port) const override { Name(::getsockname, ip, port); }
  socket_t socket() const override { return fd_; }

 private:
  bool Poll(short events, absl::Time deadline) const {
    for (;;) {
      const absl::Duration left = deadline - absl::Now();
      if (left <= absl::ZeroDuration()) return false;
      pollfd p{fd_, events, 0};
      const int r = ::poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(absl::Ceil(left, absl::Milliseconds(1)))));
      if (r < 0 && errno == EINTR) continue;
      return r > 0;
    }
  }
  void Name(int (*get)(int, sockaddr*, socklen_t*), std::string& ip, int& port) const {
    sockaddr_storage a{};
    socklen_t len = sizeof(a);
    char host[NI_MAXHOST];
    char serv[NI_MAXSERV];
    if (get(fd_, reinterpret_cast<sockaddr*>(&a), &len) == 0 &&
        ::getnameinfo(reinterpret_cast<sockaddr*>(&a), len, host, sizeof(host), serv, sizeof(serv),
                      NI_NUMERICHOST | NI_NUMERICSERV) == 0) {
      ip = host;
      port = std::atoi(serv);
    }
  }

  const int fd_;
  const absl::Duration write_timeout_;
  absl::Time read_deadline_ = absl::InfiniteFuture();
  char buf_[4096];
  size_t off_ = 0;
  size_t len_ = 0;
};

// The open connections, for HttpLimits::max_connections. A connection
// is closed by evicting it: shutdown(2) wakes its thread, which then closes the
// socket itself (only after Leave, so an evicted descriptor is never reused).
class ConnectionTable {
 public:
  enum class State { kWaiting, kAnswering };  // waiting: idle or still sending its request

  explicit ConnectionTable(int max_connections) : max_(max_connections) {}

  // Admits `fd`, evicting the longest-waiting connection when full; false
  // when the table is full of connections being answered, or stopping.
  bool Admit(int fd, uint64_t* id) {
    absl::MutexLock l(&mu_);
    if (stopping_) return false;
    if (static_cast<int>(open_.size()) >= max_) {
      auto oldest = open_.end();
      for (auto it = open_.begin(); it != open_.end(); ++it) {
        if (it->second.state == State::kWaiting && (oldest == open_.end() || it->second.since < oldest->second.since)) {
          oldest = it;
        }
      }
      if (oldest == open_.end()) return false;
      ::shutdown(oldest->second.fd, SHUT_RDWR);
      open_.erase(oldest);
    }
    *id = next_id_++;
    open_[*id] = Conn{fd, State::kWaiting, absl::Now()};
    return true;
  }
  void Set(uint64_t id, State state) {
    absl::MutexLock l(&mu_);
    auto it = open_.find(id);
    if (it != open_.end()) it->second = Conn{it->second.fd, state, absl::Now()};
  }
  void Leave(uint64_t id) {
    absl::MutexLock l(&mu_);
    open_.erase(id);
  }
  bool stopping() const {
    absl::MutexLock l(&mu_);
    return stopping_;
  }
  // Refuses new connections and wakes every open one to close.
  void Stop() {
    absl::MutexLock l(&mu_);
    stopping_ = true;
    for (const auto& [id, c] : open_) ::shutdown(c.fd, SHUT_RDWR);
  }

 private:
  struct Conn {
    int fd;
    State state;
    absl::Time since;  // when it entered `state`
  };
  const int max_;
  mutable absl::Mutex mu_;
  std::map<uint64_t, Conn> open_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
};

// httplib's TaskQueue: a thread of its own for each accepted connection (the
// connection table bounds how many stay open), so a request never queues behind
// idle or slow clients as it would in a fixed pool. Past `max_threads` the
// accepting thread waits (briefly: threads past the table's bound close at
// once).
class ThreadPerConnection : public httplib::TaskQueue {
 public:
  explicit ThreadPerConnection(int max_threads) : max_threads_(max_threads) {}
  void enqueue(std::function<void()> fn) override {
    {
      absl::MutexLock l(&count_->mu);
      count_->mu.Await(absl::Condition(
          +[](std::pair<Count*, int>* c) { return c->first->running < c->second; }, &limit_));
      ++count_->running;
    }
    // The thread holds the count, not the queue: shutdown may return and the
    // queue go away while the last thread is still leaving.
    auto run = [count = count_, fn = std::move(fn)] {
      fn();
      absl::MutexLock l(&count->mu);
      --count->running;
    };
    try {
      std::thread(run).detach();
    } catch (const std::system_error& e) {  // out of threads: serve it here rather than end the server
      LOG(WARNING) << "HTTP: cannot start a thread (" << e.what() << "); serving on the accepting one";
      run();
    }
  }
  // Waits for every connection's thread to finish.
  void shutdown() override {
    absl::MutexLock l(&count_->mu);
    count_->mu.Await(absl::Condition(+[](Count* c) { return c->running == 0; }, count_.get()));
  }

 private:
  struct Count {
    absl::Mutex mu;
    int running = 0;
  };
  const int max_threads_;
  std::shared_ptr<Count> count_ = std::make_shared<Count>();
  std::pair<Count*, int> limit_{count_.get(), max_threads_};
};

}  // namespace

// cpp-httplib's server with its connection loop replaced (httplib 0.11.4 has
// a per-recv read timeout only, and holds a pool thread through a connection's
// whole keep-alive wait): HttpLimits's bounds on connections, request
// read time and idle time. Requests are still parsed, routed and answered by
// httplib (process_request).
class GuardedHttpServer : public httplib::Server {
 public:
  explicit GuardedHttpServer(const HttpLimits& limits) : limits_(limits), table_(limits.max_connections) {
    set_payload_max_length(limits.max_body_bytes);
    new_task_queue = [max = limits.max_connections + 16] { return new ThreadPerConnection(max); };
  }
  // httplib listens with a backlog of 5: a burst of connections (an attack, or
  // just many clients) would have a request's SYN dropped and retried for
  // seconds. Call after binding.
  void DeepenBacklog() { ::listen(svr_sock_, SOMAXCONN); }
  const HttpLimits& limits() const { return limits_; }
  // Closes every open connection and stops accepting; listen_after_bind returns.
  void Shutdown() {
    table_.Stop();
    stop();
  }

 private:
  bool process_and_close_socket(socket_t sock) override {
    uint64_t id = 0;
    bool ok = false;
    if (table_.Admit(sock, &id)) {
      ok = Serve(sock, id);
      table_.Leave(id);
    }
    ::shutdown(sock, SHUT_RDWR);
    ::close(sock);
    return ok;
  }
  bool Serve(int sock, uint64_t id) {
    DeadlineStream strm(sock, absl::Seconds(CPPHTTPLIB_WRITE_TIMEOUT_SECOND));
    const CurrentFd current(sock);
    for (int n = 0; n < limits_.max_requests_per_connection && !table_.stopping(); ++n) {
      table_.Set(id, ConnectionTable::State::kWaiting);
      if (!strm.WaitReadable(absl::Now() + limits_.idle_timeout)) return true;  // idle: close
      strm.set_read_deadline(absl::Now() + limits_.request_read_timeout);
      bool closed = false;
      const bool last = n + 1 == limits_.max_requests_per_connection;
      if (!process_request(strm, last, closed,
                           [&](httplib::Request&) { table_.Set(id, ConnectionTable::State::kAnswering); })) {
        return false;
      }
      if (closed) return true;
    }
    return true;
  }

  const HttpLimits limits_;
  ConnectionTable table_;
};


HttpServer::HttpServer(const HttpLimits& limits, std::string bearer_token)
    : http_(std::make_unique<GuardedHttpServer>(limits)) {
  if (!bearer_token.empty()) {
    http_->set_pre_routing_handler([token = std::move(bearer_token)](const httplib::Request& req,
                                                                       httplib::Response& res) {
      if (req.path == "/health") return httplib::Server::HandlerResponse::Unhandled;
      // One check for gRPC and HTTP (coordinator/auth.h): constant-time, the
      // same messages. OpenAI's convention: a missing or wrong key is 401.
      const bool has = req.has_header("Authorization");
      const std::string got = has ? req.get_header_value("Authorization") : "";
      const absl::Status ok =
          Authenticator(token, "").CheckClient(has ? &got : nullptr, nullptr, absl::StrCat(req.method, " ", req.path));
      if (ok.ok()) return httplib::Server::HandlerResponse::Unhandled;
      nlohmann::json e = {{"error",
                           {{"message", std::string(ok.message())},
                            {"type", "authentication_error"},
                            {"param", nullptr},
                            {"code", "invalid_api_key"}}}};
      res.status = 401;
      res.set_header("WWW-Authenticate", "Bearer");
      res.set_content(e.dump(), "application/json");
      return httplib::Server::HandlerResponse::Handled;
    });
  }
}

HttpServer::~HttpServer() {
  http_->Shutdown();
  if (thread_.joinable()) thread_.join();
}

httplib::Server& HttpServer::routes() { return *http_; }

absl::Status HttpServer::Listen(const std::string& flag, const std::string& listen) {
  const size_t colon = listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos || colon == 0 || !absl::SimpleAtoi(listen.substr(colon + 1), &port) || port < 0 ||
      port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " \"", listen, "\": expected host:port, e.g. 0.0.0.0:8000 or 127.0.0.1:0"));
  }
  const HttpLimits& limits = http_->limits();
  if (limits.max_connections < 1 || limits.max_requests_per_connection < 1 ||
      limits.request_read_timeout <= absl::ZeroDuration() || limits.idle_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "HTTP limits: max_connections ", limits.max_connections, " and max_requests_per_connection ",
        limits.max_requests_per_connection, " must be >= 1, request_read_timeout ",
        absl::FormatDuration(limits.request_read_timeout), " and idle_timeout ",
        absl::FormatDuration(limits.idle_timeout), " > 0"));
  }
  std::string host = listen.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  port_ = port == 0 ? http_->bind_to_any_port(host) : (http_->bind_to_port(host, port) ? port : -1);
  if (port_ <= 0) {
    port_ = 0;
    return absl::UnavailableError(
        absl::StrCat(flag, " ", listen, ": cannot listen there (address in use or not on this machine?)"));
  }
  http_->DeepenBacklog();
  thread_ = std::thread([this] { http_->listen_after_bind(); });
  return absl::OkStatus();
}

int CurrentConnectionFd() { return current_fd; }

bool PeerClosed(int fd) {
  if (fd < 0) return false;
  pollfd p{fd, POLLIN | POLLRDHUP, 0};
  int r;
  do {
    r = ::poll(&p, 1, 0);
  } while (r < 0 && errno == EINTR);
  if (r <= 0) return false;
  if ((p.revents & (POLLERR | POLLHUP | POLLNVAL | POLLRDHUP)) != 0) return true;
  if ((p.revents & POLLIN) != 0) {
    char c;
    ssize_t n;
    do {
      n = ::recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK);
  }
  return false;
}

}  // namespace expertmesh::coordinator
