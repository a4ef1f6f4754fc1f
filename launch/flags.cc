#include "launch/flags.h"

#include <vector>

#include <cstdlib>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/status.h"
#include "proto/security.h"
#include "worker/comm/registry.h"
#include "worker/cuda_engine.h"

ABSL_FLAG(std::string, checkpoint, "", "checkpoint folder (config.json + safetensors shards + index)");
ABSL_FLAG(std::string, preset, "tiny",
          "model preset: tiny, tiny-text (tiny with the 129280-token vocabulary), small or deepseek-v3 (DeepSeek-V3); "
          "r1-distill-qwen-1.5b, r1-distill-qwen-7b, r1-distill-llama-8b, r1-distill-qwen-14b, r1-distill-qwen-32b, "
          "r1-distill-llama-70b (the dense R1-Distill models, Qwen2 / Llama), tiny-qwen2 or tiny-llama (tiny-qwen2-text / "
          "tiny-llama-text: with the distills' vocabulary sizes, for the qwen2.5 / llama3.1 tokenizers)");
ABSL_FLAG(uint64_t, seed, 0, "random seed (weights for `checkpoint`, sampling for `generate`)");
ABSL_FLAG(bool, json, false, "print one JSON object instead of a table");

ABSL_FLAG(std::string, prompts, "", "JSON-lines file, one {\"tokens\":[ids...]} per prompt");
ABSL_FLAG(int64_t, max_new_tokens, 16, "tokens to generate per prompt");
ABSL_FLAG(double, temperature, 0.0, "sampling temperature; 0 = greedy");
ABSL_FLAG(int64_t, top_k, 0, "keep the k most likely tokens (0 = all)");
ABSL_FLAG(double, top_p, 1.0, "keep the smallest set of tokens whose probability reaches p (1 = all)");
ABSL_FLAG(std::vector<std::string>, stop_token_ids, {}, "comma-separated ids that end a sequence when generated");

ABSL_FLAG(std::string, server, "",
          "the coordinator's address, host:port: its gRPC --listen (submit, status, ...), its HTTP --http-listen "
          "(chat)");

ABSL_FLAG(std::string, model, "deepseek-v3",
          "plan: model preset (deepseek-v3, small, tiny, r1-distill-qwen-1.5b ... r1-distill-llama-70b; see "
          "`expertmesh checkpoint --help`) or path to config.json (DeepSeek-V3, Qwen2 or Llama); chat: the model to ask (default "
          "there: the first of the server's GET /v1/models)");

ABSL_FLAG(int32_t, pp, 1, "pipeline stages");
ABSL_FLAG(int32_t, ep, 1, "expert-parallel (and attention data-parallel) ranks per stage");
ABSL_FLAG(int32_t, redundant_experts, 0, "extra expert slots per MoE layer for replicas of hot experts");
ABSL_FLAG(std::vector<std::string>, layers_per_stage, {},
          "explicit split, e.g. 2,2 (sums to num_hidden_layers); default: balanced by cost");
ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "host:port the coordinator serves gRPC on (port 0 picks a free one; 0.0.0.0 for other machines)");
ABSL_FLAG(std::string, chat_template, "",
          "chat template: deepseek-v3, deepseek-r1 or deepseek-r1-distill (default: recognised from "
          "tokenizer_config.json)");
ABSL_FLAG(std::string, journal, "",
          "coordinator journal file: accepted jobs survive a restart on the same file (empty: none)");

ABSL_FLAG(std::string, device, "cpu", "where the model runs: cpu or cuda (one GPU per process)");
ABSL_FLAG(std::string, cuda_precision, "bf16",
          "--device cuda: bf16 (bf16 activations, bf16/fp8 weights, fp32 residual) or fp32 (matches the CPU)");
ABSL_FLAG(bool, cuda_graphs, true, "--device cuda: capture decode steps in CUDA graphs and replay them");
ABSL_FLAG(int64_t, cuda_cache_tokens, 1 << 17, "--device cuda: latent-cache capacity in tokens (all sequences)");
ABSL_FLAG(int64_t, cuda_max_step_tokens, 16384, "--device cuda: most tokens in one step (sizes GPU scratch)");
ABSL_FLAG(int32_t, cuda_device, -1,
          "--device cuda: the GPU of this process; -1: the MPI/Slurm local rank modulo the GPUs seen, else 0");
ABSL_FLAG(std::string, device_data_plane, "auto",
          "workers with --device cuda: nccl (EP tokens and pipeline hidden states GPU to GPU), host (through the "
          "host data plane) or auto (nccl when this build has it)");

ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain: the coordinator's server certificate (enables TLS); a client's or worker's "
          "certificate for mTLS");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls-cert");
ABSL_FLAG(std::string, tls_client_ca, "",
          "coordinator: PEM CA; require client certificates signed by it on every gRPC call (mTLS)");
ABSL_FLAG(std::string, tls_ca, "",
          "clients and workers: PEM CA that signed the coordinator's certificate; connect with TLS (scripts/"
          "make-certs.sh makes a test CA)");
ABSL_FLAG(std::string, tls_server_name, "",
          "clients and workers with --tls-ca: the name to expect in the coordinator's certificate (default: the "
          "host of the address)");
// Shared by two verbs (one absl flag per name in the binary).
ABSL_FLAG(bool, stream, false,
          "submit: also print each sequence's tokens as they are generated, one line "
          "{\"index\": i, \"offset\": o, \"new_tokens\": [...]} per event (never a token twice, also across a "
          "coordinator restart), before the results. bench serve: stream --num-prompts completions over the "
          "coordinator's OpenAI-compatible HTTP API (POST /v1/completions, stream=true, token ids in and out: the "
          "preset with DeepSeek-V3's vocabulary, no tokenizer) with --concurrency at a time; prints time to first "
          "token and inter-token latency p50/p99 beside the decode step time the workers report");
ABSL_FLAG(std::string, auth_token_file, "",
          "file holding the client bearer token. Coordinator: JobService, ClusterService (shutdown, rebalance) and "
          "GET /metrics require \"authorization: Bearer <token>\". Clients: send it (default: "
          "$EXPERTMESH_API_KEY)");
ABSL_FLAG(std::string, cluster_secret_file, "",
          "file holding the cluster secret workers present to the coordinator's WorkerService (coordinator and "
          "worker; `launch` generates one per job when not given); a client token does not grant WorkerService");

namespace expertmesh::launch {

absl::StatusOr<bool> DeviceFromFlags(worker::CudaEngineOptions* o) {
  const std::string d = absl::GetFlag(FLAGS_device);
  if (d == "cpu") return false;
  if (d != "cuda") return absl::InvalidArgumentError(absl::StrCat("--device ", d, ": expected cpu or cuda"));
  auto p = worker::ParseCudaPrecision(absl::GetFlag(FLAGS_cuda_precision));
  if (!p.ok()) return absl::InvalidArgumentError(absl::StrCat("--cuda-precision: ", p.status().message()));
  o->precision = *p;
  o->cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  o->cache_tokens = absl::GetFlag(FLAGS_cuda_cache_tokens);
  o->max_step_tokens = absl::GetFlag(FLAGS_cuda_max_step_tokens);
  o->device = absl::GetFlag(FLAGS_cuda_device);
  if (o->device < 0) {  // one GPU per process on a node: by local rank
    int local = 0;
    for (const char* v : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"}) {
      const char* e = std::getenv(v);
      if (e != nullptr) {
        local = std::atoi(e);
        break;
      }
    }
    const int n = worker::CudaDeviceCount();
    o->device = n > 0 ? local % n : 0;
  }
  if (o->cache_tokens <= 0 || o->max_step_tokens <= 0) {
    return absl::InvalidArgumentError("--cuda-cache-tokens and --cuda-max-step-tokens must be positive");
  }
  std::string why;
  if (!worker::CudaEngineAvailable(&why)) return absl::FailedPreconditionError(absl::StrCat("--device cuda: ", why));
  return true;
}

absl::StatusOr<std::string> DeviceDataPlaneFromFlags() {
  const std::string d = absl::GetFlag(FLAGS_device_data_plane);
  if (d == "nccl" || d == "host") return d;
  if (d != "auto") {
    return absl::InvalidArgumentError(absl::StrCat("--device-data-plane ", d, ": expected nccl, host or auto"));
  }
  for (const auto& b : comm::AvailableBackends()) {
    if (b == "nccl") return std::string("nccl");
  }
  return std::string("host");
}

absl::StatusOr<rpc::ServerSecurity> ServerTlsFromFlags() {
  rpc::ServerSecurity t;
  const std::string cert = absl::GetFlag(FLAGS_tls_cert), key = absl::GetFlag(FLAGS_tls_key);
  const std::string client_ca = absl::GetFlag(FLAGS_tls_client_ca);
  if (cert.empty() != key.empty()) return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  if (cert.empty() && !client_ca.empty()) {
    return absl::InvalidArgumentError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key (TLS)");
  }
  if (cert.empty()) return t;
  ASSIGN_OR_RETURN(t.cert_pem, rpc::ReadPemFile(cert, "--tls-cert"));
  ASSIGN_OR_RETURN(t.key_pem, rpc::ReadPemFile(key, "--tls-key"));
  if (!client_ca.empty()) {
    ASSIGN_OR_RETURN(t.client_ca_pem, rpc::ReadPemFile(client_ca, "--tls-client-ca"));
  }
  return t;
}

absl::StatusOr<std::string> ClientTokenFromFlags() {
  const std::string f = absl::GetFlag(FLAGS_auth_token_file);
  if (f.empty()) return std::string();
  return rpc::ReadSecretFile(f, "--auth-token-file");
}

absl::StatusOr<std::string> ClusterSecretFromFlags() {
  const std::string f = absl::GetFlag(FLAGS_cluster_secret_file);
  if (f.empty()) return std::string();
  return rpc::ReadSecretFile(f, "--cluster-secret-file");
}

absl::StatusOr<rpc::ClientSecurity> ClientSecurityFromFlags(Caller caller) {
  rpc::ClientSecurity c;
  const std::string ca = absl::GetFlag(FLAGS_tls_ca);
  const std::string cert = absl::GetFlag(FLAGS_tls_cert), key = absl::GetFlag(FLAGS_tls_key);
  if (cert.empty() != key.empty()) return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  if (!cert.empty() && ca.empty()) {
    return absl::InvalidArgumentError("--tls-cert/--tls-key (a client certificate) need --tls-ca (TLS)");
  }
  if (!ca.empty()) {
    c.tls = true;
    ASSIGN_OR_RETURN(c.ca_pem, rpc::ReadPemFile(ca, "--tls-ca"));
    if (!cert.empty()) {
      ASSIGN_OR_RETURN(c.cert_pem, rpc::ReadPemFile(cert, "--tls-cert"));
      ASSIGN_OR_RETURN(c.key_pem, rpc::ReadPemFile(key, "--tls-key"));
    }
    c.server_name = absl::GetFlag(FLAGS_tls_server_name);
  }
  if (caller == Caller::kWorker) {
    ASSIGN_OR_RETURN(c.worker_secret, ClusterSecretFromFlags());
  } else {
    ASSIGN_OR_RETURN(c.bearer_token, ClientTokenFromFlags());
    const char* env = std::getenv("EXPERTMESH_API_KEY");
    if (c.bearer_token.empty() && env != nullptr && env[0] != '\0') {
      c.bearer_token = std::string(absl::StripAsciiWhitespace(env));
      RETURN_IF_ERROR(rpc::CheckSecret(c.bearer_token, "$EXPERTMESH_API_KEY"));
    }
  }
  return c;
}

}  // namespace expertmesh::launch
