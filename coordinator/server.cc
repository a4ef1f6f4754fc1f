#include "coordinator/server.h"

#include <unistd.h>

#include <climits>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "coordinator/services.h"
#include "glog/logging.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"

namespace expertmesh::coordinator {
namespace {

constexpr int kMaxMessageBytes = 256 << 20;

// "host:port" -> host (brackets kept for IPv6), or "" when malformed.
bool SplitHostPort(const std::string& addr, std::string* host, std::string* port) {
  const size_t colon = addr.rfind(':');
  if (colon == std::string::npos || colon + 1 >= addr.size()) return false;
  *host = addr.substr(0, colon);
  *port = addr.substr(colon + 1);
  int p = 0;
  return absl::SimpleAtoi(*port, &p) && p >= 0 && p <= 65535;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(const CoordinatorOptions& options) {
  std::string host, port;
  if (!SplitHostPort(options.listen, &host, &port)) {
    return absl::InvalidArgumentError(absl::StrCat("--listen \"", options.listen,
                                                   "\": expected host:port, e.g. 0.0.0.0:50051 or 127.0.0.1:0"));
  }
  std::unique_ptr<CoordinatorServer> s(new CoordinatorServer());
  ASSIGN_OR_RETURN(s->coordinator_, Coordinator::Create(options));
  s->auth_ = std::make_unique<Authenticator>(options.client_auth_token, options.cluster_secret);
  s->jobs_ = std::make_unique<JobServiceImpl>(s->coordinator_.get(), s->auth_.get());
  s->cluster_ = std::make_unique<ClusterServiceImpl>(s->coordinator_.get(), s->auth_.get());
  s->workers_ = std::make_unique<WorkerServiceImpl>(s->coordinator_.get(), s->auth_.get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (options.tls.cert_pem.empty() != options.tls.key_pem.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (options.tls.cert_pem.empty() && !options.tls.client_ca_pem.empty()) {
    return absl::InvalidArgumentError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key");
  }
  builder.AddListeningPort(options.listen, rpc::MakeServerCredentials(options.tls), &s->port_);
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  builder.RegisterService(s->jobs_.get());
  builder.RegisterService(s->cluster_.get());
  builder.RegisterService(s->workers_.get());
  s->server_ = builder.BuildAndStart();
  if (s->server_ == nullptr || s->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("--listen ", options.listen,
                                               ": cannot listen there (address in use or not on this machine?)"));
  }
  if (host.empty() || host == "0.0.0.0" || host == "[::]" || host == "::" || host == "*") {
    char name[HOST_NAME_MAX + 1] = {};
    host = gethostname(name, sizeof(name)) == 0 && name[0] != '\0' ? name : "127.0.0.1";
  }
  s->address_ = absl::StrCat(host, ":", s->port_);

  grpc::HealthCheckServiceInterface* health = s->server_->GetHealthCheckService();
  auto set_health = [health](bool serving) {
    if (health == nullptr) return;
    health->SetServingStatus("", serving);
    health->SetServingStatus(kJobServiceName, serving);
  };
  s->coordinator_->SetServingListener(set_health);

  CoordinatorServer* self = s.get();
  s->monitor_ = std::thread([self] {
    const absl::Duration period = absl::Seconds(self->coordinator_->options().monitor_interval_s);
    std::unique_lock<std::mutex> lock(self->mu_);
    while (!self->stopping_) {
      lock.unlock();
      self->coordinator_->Tick();
      lock.lock();
      self->cv_.wait_for(lock, absl::ToChronoNanoseconds(period));
    }
  });
  if (!options.metrics_listen.empty()) {
    ASSIGN_OR_RETURN(s->metrics_, MetricsServer::Start(s->coordinator_.get(), options.metrics_listen));
    LOG(INFO) << "coordinator: Prometheus metrics on http://"
              << options.metrics_listen.substr(0, options.metrics_listen.rfind(':')) << ":" << s->metrics_->port()
              << "/metrics";
  }
  LOG(INFO) << "coordinator: listening on " << s->address_ << " (JobService, ClusterService, WorkerService, health, "
            << "reflection; "
            << (options.tls.cert_pem.empty() ? "plaintext"
                                             : options.tls.client_ca_pem.empty() ? "TLS" : "TLS with client certificates")
            << ", client token " << (s->auth_->client_open() ? "off" : "on") << ", cluster secret "
            << (s->auth_->worker_open() ? "off" : "on") << ")";
  const std::string who = options.tls.client_ca_pem.empty()
                              ? absl::StrCat("anyone who reaches ", s->address_)
                              : std::string("anyone holding a client certificate of --tls-client-ca");
  if (s->auth_->client_open() && s->auth_->worker_open()) {
    LOG(WARNING) << "coordinator: the control plane is unauthenticated: " << who
                 << " can submit and cancel jobs, shut the cluster down, and register or impersonate workers. Set "
                    "--auth-token-file and --cluster-secret-file (and --tls-cert/--tls-key); see docs/SECURITY.md";
  } else if (s->auth_->worker_open()) {
    LOG(WARNING) << "coordinator: WorkerService is unauthenticated (no --cluster-secret-file): " << who
                 << " can register or impersonate workers; see docs/SECURITY.md";
  } else if (s->auth_->client_open()) {
    LOG(WARNING) << "coordinator: JobService and ClusterService are unauthenticated (no --auth-token-file): " << who
                 << " can submit and cancel jobs and shut the cluster down; see docs/SECURITY.md";
  }
  if (options.tls.cert_pem.empty() && !(s->auth_->client_open() && s->auth_->worker_open())) {
    LOG(WARNING) << "coordinator: without --tls-cert the token and the cluster secret cross the network in "
                    "plaintext; see docs/SECURITY.md";
  }
  return s;
}

CoordinatorServer::~CoordinatorServer() { Stop(); }

std::shared_ptr<grpc::Channel> CoordinatorServer::InProcessChannel(const rpc::ClientSecurity& security) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  if (security.bearer_token.empty() && security.worker_secret.empty()) return server_->InProcessChannel(args);
  return server_->experimental().InProcessChannelWithInterceptors(args, rpc::SecretInterceptors(security));
}

void CoordinatorServer::Wait(const std::atomic<int>* stop) {
  while (!coordinator_->WaitForShutdown(absl::Milliseconds(200))) {
    if (stop != nullptr && stop->load() != 0) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
  }
}

void CoordinatorServer::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return;
    stopped_ = true;
    stopping_ = true;
  }
  cv_.notify_all();
  if (monitor_.joinable()) monitor_.join();
  metrics_.reset();  // no scrape reads the coordinator after this
  if (coordinator_ != nullptr) coordinator_->Stop();
  if (server_ != nullptr) {
    if (server_->GetHealthCheckService() != nullptr) {
      server_->GetHealthCheckService()->SetServingStatus("", false);
      server_->GetHealthCheckService()->SetServingStatus(kJobServiceName, false);
    }
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    server_->Wait();
  }
}

absl::Status RunCoordinator(const CoordinatorOptions& options,
                            std::function<void(const std::string& bound_address)> on_listening,
                            const std::atomic<int>* stop) {
  ASSIGN_OR_RETURN(std::unique_ptr<CoordinatorServer> server, CoordinatorServer::Start(options));
  if (on_listening) on_listening(server->address());
  server->Wait(stop);
  if (stop != nullptr && stop->load() != 0) {
    const v1::ClusterStatus st = server->coordinator()->GetClusterStatus();
    LOG(WARNING) << "coordinator: stopping on signal " << stop->load() << " with " << st.queued_sequences()
                 << " sequences queued and " << st.running_sequences() << " running; "
                 << (options.journal_path.empty()
                         ? "no --journal was given, so unfinished jobs are lost"
                         : "their jobs are in the journal " + options.journal_path +
                               ": a coordinator started on it finishes them (the workers wait for it)");
  }
  LOG(INFO) << "coordinator: shutting down";
  server->Stop();
  return absl::OkStatus();
}

}  // namespace expertmesh::coordinator
