#include "coordinator/metrics.h"

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
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "common/status.h"
#include "glog/logging.h"
#include "absl/time/clock.h"
#include "coordinator/auth.h"
#include "httplib.h"
#include "prometheus/metric_family.h"
#include "prometheus/text_serializer.h"

namespace expertmesh::coordinator {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;
using Labels = std::vector<ClientMetric::Label>;

// Builds the families of one scrape.
class Families {
 public:
  // Starts a family; Add appends samples to the last one started.
  void Start(const std::string& name, const std::string& help, MetricType type) {
    MetricFamily f;
    f.name = name;
    f.help = help;
    f.type = type;
    out_.push_back(std::move(f));
  }
  void Add(double value, Labels labels = {}) {
    ClientMetric m;
    m.label = std::move(labels);
    if (out_.back().type == MetricType::Counter) {
      m.counter.value = value;
    } else {
      m.gauge.value = value;
    }
    out_.back().metric.push_back(std::move(m));
  }
  void One(const std::string& name, const std::string& help, MetricType type, double value) {
    Start(name, help, type);
    Add(value);
  }
  std::vector<MetricFamily> Take() { return std::move(out_); }

 private:
  std::vector<MetricFamily> out_;
};

// The API's enum names as label values: "JOB_STATE_SUCCEEDED" -> "succeeded".
std::string LabelOf(const std::string& enum_name, absl::string_view prefix) {
  return absl::AsciiStrToLower(absl::StripPrefix(enum_name, prefix));
}

// A place's health; UNSPECIFIED is a place no worker has registered for.
std::string HealthLabel(v1::WorkerHealth h) {
  return h == v1::WORKER_HEALTH_UNSPECIFIED ? "unregistered" : LabelOf(v1::WorkerHealth_Name(h), "WORKER_HEALTH_");
}

std::vector<MetricFamily> Collect(const Coordinator& c) {
  const v1::ClusterStatus st = c.GetClusterStatus();
  Families f;
  f.One("expertmesh_serving", "1 while every worker is READY (gRPC health SERVING)", MetricType::Gauge,
        st.serving() ? 1 : 0);
  f.One("expertmesh_data_plane_generation", "data-plane generation: grows each time the set of workers changes",
        MetricType::Gauge, static_cast<double>(st.generation()));
  f.One("expertmesh_workers_lost_total", "workers found MISSING or exited unasked since the coordinator started",
        MetricType::Counter, static_cast<double>(st.workers_lost()));
  const v1::RebalanceStatus& rb = st.rebalance();
  f.One("expertmesh_expert_placement_version", "expert placement in use: 1 at start, larger after each committed rebalance",
        MetricType::Gauge, static_cast<double>(rb.placement_version()));
  f.One("expertmesh_expert_rebalances_total", "expert rebalances committed since the coordinator started",
        MetricType::Counter, static_cast<double>(rb.rebalances()));
  f.One("expertmesh_expert_rank_imbalance",
        "mean over MoE layers of max / mean EP-rank load for the load observed since the last rebalance, on the "
        "placement in use (1 = balanced)",
        MetricType::Gauge, rb.window_imbalance());

  f.Start("expertmesh_sequences", "sequences of unfinished jobs by state", MetricType::Gauge);
  f.Add(st.queued_sequences(), {{"state", "queued"}});
  f.Add(st.running_sequences(), {{"state", "running"}});

  const std::map<v1::JobState, int64_t> by_state = c.JobCountsByState();
  f.Start("expertmesh_jobs", "jobs the coordinator holds (finished ones until --job-retention-s), by state",
          MetricType::Gauge);
  for (v1::JobState s : {v1::JOB_STATE_CANCELLED, v1::JOB_STATE_FAILED, v1::JOB_STATE_QUEUED, v1::JOB_STATE_RUNNING,
                         v1::JOB_STATE_SUCCEEDED}) {
    auto it = by_state.find(s);
    f.Add(static_cast<double>(it == by_state.end() ? 0 : it->second),
          {{"state", LabelOf(v1::JobState_Name(s), "JOB_STATE_")}});
  }

  std::map<std::string, int> health;  // every health, zero or not, in label order
  for (v1::WorkerHealth h : {v1::WORKER_HEALTH_UNSPECIFIED, v1::WORKER_HEALTH_STARTING, v1::WORKER_HEALTH_READY,
                             v1::WORKER_HEALTH_MISSING, v1::WORKER_HEALTH_EXITED}) {
    health[HealthLabel(h)] = 0;
  }
  for (const v1::WorkerStatus& w : st.workers()) ++health[HealthLabel(w.health())];
  f.Start("expertmesh_workers", "worker places by health (pp x ep places)", MetricType::Gauge);
  for (const auto& [h, n] : health) f.Add(n, {{"health", h}});

  auto worker_labels = [](const v1::WorkerStatus& w) {
    return Labels{{"worker", absl::StrCat(w.worker_id())},
                  {"stage", absl::StrCat(w.stage())},
                  {"ep_rank", absl::StrCat(w.ep_rank())}};
  };
  f.Start("expertmesh_worker_tokens_total", "tokens a worker's stage processed (prompt and generated)",
          MetricType::Counter);
  for (const auto& w : st.workers()) f.Add(static_cast<double>(w.tokens_processed()), worker_labels(w));
  f.Start("expertmesh_worker_steps_total", "forward steps a worker ran", MetricType::Counter);
  for (const auto& w : st.workers()) f.Add(static_cast<double>(w.steps()), worker_labels(w));
  f.Start("expertmesh_worker_active_sequences", "sequences a worker holds (stage 0) or caches", MetricType::Gauge);
  for (const auto& w : st.workers()) f.Add(w.active_sequences(), worker_labels(w));
  f.Start("expertmesh_worker_heartbeat_age_seconds", "seconds since a worker's last heartbeat", MetricType::Gauge);
  const int64_t now_ms = absl::ToUnixMillis(absl::Now());
  for (const auto& w : st.workers()) {
    if (w.last_heartbeat_unix_ms() > 0) {
      f.Add(static_cast<double>(now_ms - w.last_heartbeat_unix_ms()) / 1000.0, worker_labels(w));
    }
  }
  f.Start("expertmesh_worker_time_seconds_total",
          "where a worker's time went since it started serving (its own accounting)", MetricType::Counter);
  for (const auto& w : st.workers()) {
    const v1::StageTimes& t = w.times();
    const std::pair<const char*, double> kinds[] = {
        {"attention", t.attention_s()}, {"dense", t.dense_s()},       {"expert", t.expert_s()},
        {"dispatch", t.dispatch_s()},   {"combine", t.combine_s()},   {"transfer", t.transfer_s()},
        {"idle", t.idle_s()},           {"embed_head", t.embed_head_s()}, {"control", t.control_s()}};
    for (const auto& [kind, v] : kinds) {
      Labels l = worker_labels(w);
      l.push_back({"kind", kind});
      f.Add(v, std::move(l));
    }
  }

  f.Start("expertmesh_expert_routed_tokens_total", "token-expert pairs routed in a MoE layer", MetricType::Counter);
  std::vector<std::pair<int, double>> imbalance;
  for (const v1::LayerExpertLoad& l : st.expert_load()) {
    double sum = 0, mx = 0;
    for (int64_t v : l.tokens_per_expert()) {
      sum += static_cast<double>(v);
      mx = std::max(mx, static_cast<double>(v));
    }
    f.Add(sum, {{"layer", absl::StrCat(l.layer())}});
    const double mean = l.tokens_per_expert_size() > 0 ? sum / l.tokens_per_expert_size() : 0;
    imbalance.emplace_back(l.layer(), mean > 0 ? mx / mean : 0);
  }
  f.Start("expertmesh_expert_load_imbalance",
          "hottest expert's routed tokens over the mean, per MoE layer (1 = balanced; EPLB input)", MetricType::Gauge);
  for (const auto& [layer, v] : imbalance) f.Add(v, {{"layer", absl::StrCat(layer)}});

  const Coordinator::JournalStats js = c.journal_stats();
  f.One("expertmesh_journal_bytes", "size of the journal file (0 without --journal)", MetricType::Gauge,
        static_cast<double>(js.size_bytes));
  f.One("expertmesh_journal_compactions_total", "journal compactions by this coordinator", MetricType::Counter,
        static_cast<double>(js.compactions));
  return f.Take();
}

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

// The open connections, for MetricsHttpLimits::max_connections. A connection
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
// connection table bounds how many stay open), so a scrape never queues behind
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
      LOG(WARNING) << "metrics HTTP: cannot start a thread (" << e.what() << "); serving on the accepting one";
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

// cpp-httplib's server with its connection loop replaced (httplib 0.11.4 has
// a per-recv read timeout only, and holds a pool thread through a connection's
// whole keep-alive wait): MetricsHttpLimits's bounds on connections, request
// read time and idle time. Requests are still parsed, routed and answered by
// httplib (process_request).
class GuardedServer : public httplib::Server {
 public:
  explicit GuardedServer(const MetricsHttpLimits& limits) : limits_(limits), table_(limits.max_connections) {
    set_payload_max_length(64 << 10);  // GET /metrics takes no body
    new_task_queue = [max = limits.max_connections + 16] { return new ThreadPerConnection(max); };
  }
  // httplib listens with a backlog of 5: a burst of connections (an attack, or
  // just many clients) would have a scrape's SYN dropped and retried for
  // seconds. Call after binding.
  void DeepenBacklog() { ::listen(svr_sock_, SOMAXCONN); }
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

  const MetricsHttpLimits limits_;
  ConnectionTable table_;
};

// Serves GET /metrics; the text is built at each scrape.
class HttpMetricsServer : public MetricsServer {
 public:
  HttpMetricsServer(const Coordinator* c, const MetricsHttpLimits& limits) : c_(c), http_(limits) {
    http_.Get("/metrics", [this](const httplib::Request& req, httplib::Response& res) {
      // The client token (--auth-token-file) guards the metrics like the gRPC services.
      const Authenticator auth(c_->options().client_auth_token, "");
      const bool has = req.has_header("Authorization");
      const std::string value = has ? req.get_header_value("Authorization") : "";
      const absl::Status ok = auth.CheckClient(has ? &value : nullptr, nullptr, "GET /metrics");
      if (!ok.ok()) {
        res.status = ok.code() == absl::StatusCode::kUnauthenticated ? 401 : 403;
        if (res.status == 401) res.set_header("WWW-Authenticate", "Bearer");
        res.set_content(std::string(ok.message()) + "\n", "text/plain; charset=utf-8");
        return;
      }
      res.set_content(MetricsText(*c_), "text/plain; version=0.0.4; charset=utf-8");
    });
  }
  ~HttpMetricsServer() override {
    http_.Shutdown();
    if (thread_.joinable()) thread_.join();
  }
  absl::Status Listen(const std::string& host, int port) {
    port_ = port == 0 ? http_.bind_to_any_port(host) : (http_.bind_to_port(host, port) ? port : -1);
    if (port_ <= 0) {
      return absl::UnavailableError(absl::StrCat("--metrics-listen ", host, ":", port,
                                                 ": cannot serve metrics there (address in use or not on this "
                                                 "machine?)"));
    }
    http_.DeepenBacklog();
    thread_ = std::thread([this] { http_.listen_after_bind(); });
    return absl::OkStatus();
  }
  int port() const override { return port_; }

 private:
  const Coordinator* c_;
  GuardedServer http_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace

std::string MetricsText(const Coordinator& coordinator) {
  return prometheus::TextSerializer().Serialize(Collect(coordinator));
}

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(const Coordinator* coordinator,
                                                                    const std::string& listen,
                                                                    const MetricsHttpLimits& limits) {
  const size_t colon = listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos || colon == 0 || !absl::SimpleAtoi(listen.substr(colon + 1), &port) || port < 0 ||
      port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics-listen \"", listen, "\": expected host:port, e.g. 0.0.0.0:9400"));
  }
  if (limits.max_connections < 1 || limits.max_requests_per_connection < 1 ||
      limits.request_read_timeout <= absl::ZeroDuration() || limits.idle_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "metrics HTTP limits: max_connections ", limits.max_connections, " and max_requests_per_connection ",
        limits.max_requests_per_connection, " must be >= 1, request_read_timeout ",
        absl::FormatDuration(limits.request_read_timeout), " and idle_timeout ",
        absl::FormatDuration(limits.idle_timeout), " > 0"));
  }
  auto server = std::make_unique<HttpMetricsServer>(coordinator, limits);
  RETURN_IF_ERROR(server->Listen(listen.substr(0, colon), port));
  return std::unique_ptr<MetricsServer>(std::move(server));
}

}  // namespace expertmesh::coordinator
