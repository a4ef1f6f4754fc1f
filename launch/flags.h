// Flags shared by several verbs (defined in flags.cc).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"

ABSL_DECLARE_FLAG(std::string, checkpoint);
ABSL_DECLARE_FLAG(std::string, preset);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(bool, json);

// Batches and sampling (generate, submit).
ABSL_DECLARE_FLAG(std::string, prompts);
ABSL_DECLARE_FLAG(int64_t, max_new_tokens);
ABSL_DECLARE_FLAG(double, temperature);
ABSL_DECLARE_FLAG(int64_t, top_k);
ABSL_DECLARE_FLAG(double, top_p);
ABSL_DECLARE_FLAG(std::vector<std::string>, stop_token_ids);

// The cluster (coordinator, launch).
ABSL_DECLARE_FLAG(int32_t, pp);
ABSL_DECLARE_FLAG(int32_t, ep);
ABSL_DECLARE_FLAG(int32_t, redundant_experts);
ABSL_DECLARE_FLAG(std::vector<std::string>, layers_per_stage);
ABSL_DECLARE_FLAG(std::string, listen);
ABSL_DECLARE_FLAG(std::string, journal);

// The device that runs the model (generate, worker, launch).
ABSL_DECLARE_FLAG(std::string, device);
ABSL_DECLARE_FLAG(std::string, cuda_precision);
ABSL_DECLARE_FLAG(bool, cuda_graphs);
ABSL_DECLARE_FLAG(int64_t, cuda_cache_tokens);
ABSL_DECLARE_FLAG(int64_t, cuda_max_step_tokens);
ABSL_DECLARE_FLAG(int32_t, cuda_device);
ABSL_DECLARE_FLAG(std::string, device_data_plane);

// The control plane's security (docs/SECURITY.md).
ABSL_DECLARE_FLAG(std::string, tls_cert);
ABSL_DECLARE_FLAG(std::string, tls_key);
ABSL_DECLARE_FLAG(std::string, tls_client_ca);
ABSL_DECLARE_FLAG(std::string, tls_ca);
ABSL_DECLARE_FLAG(std::string, tls_server_name);
ABSL_DECLARE_FLAG(std::string, auth_token_file);
ABSL_DECLARE_FLAG(std::string, cluster_secret_file);

namespace expertmesh::worker {
struct CudaEngineOptions;
}
namespace expertmesh::rpc {
struct ClientSecurity;
struct ServerSecurity;
}
namespace expertmesh::launch {
// Reads --device: false for "cpu"; true for "cuda", with *options filled from
// the --cuda-* flags; InvalidArgument (naming the flag) for anything else.
absl::StatusOr<bool> DeviceFromFlags(worker::CudaEngineOptions* options);
// --device-data-plane resolved: "nccl" or "host" ("auto": nccl when built).
absl::StatusOr<std::string> DeviceDataPlaneFromFlags();

// The coordinator's side: --tls-cert/--tls-key (TLS), --tls-client-ca (mTLS).
absl::StatusOr<rpc::ServerSecurity> ServerTlsFromFlags();
// --auth-token-file read (the coordinator's client token); "" without it.
absl::StatusOr<std::string> ClientTokenFromFlags();
// --cluster-secret-file read; "" without it.
absl::StatusOr<std::string> ClusterSecretFromFlags();

enum class Caller { kClient, kWorker };
// A client's or worker's side: TLS when --tls-ca is given (the CA that signed
// the coordinator's certificate; mTLS adds --tls-cert/--tls-key), and the
// credential of `caller`: clients the token of --auth-token-file or
// $EXPERTMESH_API_KEY, workers the secret of --cluster-secret-file.
absl::StatusOr<rpc::ClientSecurity> ClientSecurityFromFlags(Caller caller);
}  // namespace expertmesh::launch
