#include "proto/security.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "grpcpp/support/client_interceptor.h"

namespace expertmesh::rpc {
namespace {

// Adds the configured secrets to the initial metadata of every call.
class SecretsInterceptor : public grpc::experimental::Interceptor {
 public:
  explicit SecretsInterceptor(const std::vector<std::pair<std::string, std::string>>* headers) : headers_(headers) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      std::multimap<std::string, std::string>* md = methods->GetSendInitialMetadata();
      for (const auto& [k, v] : *headers_) md->emplace(k, v);
    }
    methods->Proceed();
  }

 private:
  const std::vector<std::pair<std::string, std::string>>* headers_;
};

class SecretsInterceptorFactory : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit SecretsInterceptorFactory(std::vector<std::pair<std::string, std::string>> headers)
      : headers_(std::move(headers)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(grpc::experimental::ClientRpcInfo*) override {
    return new SecretsInterceptor(&headers_);
  }

 private:
  const std::vector<std::pair<std::string, std::string>> headers_;  // lives as long as the channel
};

absl::StatusOr<std::string> ReadWholeFile(const std::string& path, absl::string_view flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, ": cannot read (", std::strerror(errno), ")"));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address, const ClientSecurity& security,
                                           const grpc::ChannelArguments& args) {
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (security.tls) {
    grpc::SslCredentialsOptions o;
    o.pem_root_certs = security.ca_pem;
    o.pem_cert_chain = security.cert_pem;
    o.pem_private_key = security.key_pem;
    creds = grpc::SslCredentials(o);
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  grpc::ChannelArguments a = args;
  if (security.tls && !security.server_name.empty()) a.SetSslTargetNameOverride(security.server_name);
  auto interceptors = SecretInterceptors(security);
  if (interceptors.empty()) return grpc::CreateCustomChannel(address, creds, a);
  return grpc::experimental::CreateCustomChannelWithInterceptors(address, creds, a, std::move(interceptors));
}

std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> SecretInterceptors(
    const ClientSecurity& security) {
  std::vector<std::pair<std::string, std::string>> headers;
  if (!security.bearer_token.empty()) headers.emplace_back(kAuthorizationKey, "Bearer " + security.bearer_token);
  if (!security.worker_secret.empty()) headers.emplace_back(kWorkerSecretKey, security.worker_secret);
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> interceptors;
  if (!headers.empty()) interceptors.push_back(std::make_unique<SecretsInterceptorFactory>(std::move(headers)));
  return interceptors;
}

std::shared_ptr<grpc::ServerCredentials> MakeServerCredentials(const ServerSecurity& security) {
  if (security.cert_pem.empty()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions o(security.client_ca_pem.empty()
                                          ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                          : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  o.pem_root_certs = security.client_ca_pem;
  o.pem_key_cert_pairs.push_back({security.key_pem, security.cert_pem});
  return grpc::SslServerCredentials(o);
}

absl::StatusOr<std::string> ReadPemFile(const std::string& path, absl::string_view flag) {
  absl::StatusOr<std::string> pem = ReadWholeFile(path, flag);
  if (!pem.ok()) return pem.status();
  if (pem->find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, ": not a PEM file (no -----BEGIN line)"));
  }
  return pem;
}

absl::Status CheckSecret(absl::string_view secret, absl::string_view what) {
  if (secret.size() < 16) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": the secret has ", secret.size(),
                                                   " characters; use at least 16 (e.g. openssl rand -hex 32)"));
  }
  for (char c : secret) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": the secret may hold printable ASCII only (no spaces or control characters)"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadSecretFile(const std::string& path, absl::string_view flag) {
  absl::StatusOr<std::string> text = ReadWholeFile(path, flag);
  if (!text.ok()) return text.status();
  std::string secret(absl::StripAsciiWhitespace(*text));
  absl::Status s = CheckSecret(secret, absl::StrCat(flag, " ", path));
  if (!s.ok()) return s;
  return secret;
}

absl::StatusOr<std::string> RandomSecret() {
  unsigned char bytes[32];
  const int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::InternalError(absl::StrCat("/dev/urandom: ", std::strerror(errno)));
  size_t got = 0;
  while (got < sizeof(bytes)) {
    const ssize_t n = read(fd, bytes + got, sizeof(bytes) - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      close(fd);
      return absl::InternalError("/dev/urandom: short read");
    }
    got += static_cast<size_t>(n);
  }
  close(fd);
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<const char*>(bytes), sizeof(bytes)));
}

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  // Loops over a whatever b is; only the lengths can be learnt from the time.
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i) {
    diff |= static_cast<unsigned char>(a[i] ^ (i < b.size() ? b[i] : 0));
  }
  return diff == 0;
}

}  // namespace expertmesh::rpc
