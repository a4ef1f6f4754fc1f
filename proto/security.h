// Credentials of the control plane (gRPC between clients, the coordinator and
// the workers): TLS settings read from PEM files, and the two shared secrets.
//
//   * the client token: clients send "authorization: Bearer <token>"; it
//     grants JobService and ClusterService (and the HTTP endpoints);
//   * the cluster secret: workers send "x-expertmesh-worker-secret: <secret>";
//     it grants WorkerService only. A client token never grants WorkerService.
//
// One helper builds every client channel, so that the CLI verbs, the bench
// clients and the worker's coordinator client all speak the same way:
//
//   rpc::ClientSecurity sec;
//   RETURN_IF_ERROR(rpc::LoadClientTls("ca.pem", "", "", &sec));
//   sec.bearer_token = "s3cret";
//   auto channel = rpc::MakeChannel("coord:50051", sec, grpc::ChannelArguments());
//
// See docs/SECURITY.md for the threat model.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/support/client_interceptor.h"

namespace expertmesh::rpc {

// Metadata keys (lower case, as gRPC requires).
inline constexpr char kAuthorizationKey[] = "authorization";
inline constexpr char kWorkerSecretKey[] = "x-expertmesh-worker-secret";

struct ClientSecurity {
  bool tls = false;             // TLS to the server (ca_pem verifies it)
  std::string ca_pem;           // trusted roots; empty with tls: the system roots
  std::string cert_pem;         // mTLS: this client's certificate chain
  std::string key_pem;          //       and its private key
  std::string server_name;      // non-empty: expect this name in the server certificate, not the address's host
  std::string bearer_token;     // non-empty: "authorization: Bearer <token>" on every call
  std::string worker_secret;    // non-empty: "x-expertmesh-worker-secret" on every call
};

struct ServerSecurity {
  std::string cert_pem;         // non-empty: serve TLS with this certificate chain
  std::string key_pem;          //            and private key
  std::string client_ca_pem;    // non-empty: mTLS, require client certificates signed by it
};

// A channel to `address` with TLS when security.tls and the secrets attached
// to every call (a client interceptor; works over TLS and plaintext alike).
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address, const ClientSecurity& security,
                                           const grpc::ChannelArguments& args);

// The client interceptors MakeChannel attaches (empty without secrets); for
// channels made otherwise, e.g. grpc::Server's in-process channel.
std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> SecretInterceptors(
    const ClientSecurity& security);

// Server credentials: TLS (and mTLS) when configured, else insecure.
std::shared_ptr<grpc::ServerCredentials> MakeServerCredentials(const ServerSecurity& security);

// Reads a PEM file named by `flag` ("--tls-ca"); INVALID_ARGUMENT naming the
// flag and the file when it cannot be read or holds no PEM block.
absl::StatusOr<std::string> ReadPemFile(const std::string& path, absl::string_view flag);

// Reads a secret (token) file named by `flag`: surrounding white space is
// dropped; INVALID_ARGUMENT when unreadable, empty, shorter than 16
// characters, or holding characters not allowed in gRPC metadata.
absl::StatusOr<std::string> ReadSecretFile(const std::string& path, absl::string_view flag);
// The same checks for a secret given otherwise (an environment variable).
absl::Status CheckSecret(absl::string_view secret, absl::string_view what);

// 32 bytes from /dev/urandom, hex encoded (64 characters).
absl::StatusOr<std::string> RandomSecret();

// Compares in time that depends only on the lengths, not on where they differ.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

}  // namespace expertmesh::rpc
