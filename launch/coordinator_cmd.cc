// expertmesh coordinator: the standalone coordinator (jobs, plan, workers' control plane).
#include <cstdio>
#include <fstream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "coordinator/server.h"
#include "proto/security.h"
#include "launch/flags.h"
#include "launch/signals.h"
#include "launch/verbs.h"

ABSL_FLAG(int32_t, max_queued_sequences, 65536, "sequences waiting for a worker, over all jobs (more: RESOURCE_EXHAUSTED)");
ABSL_FLAG(int32_t, max_sequences_per_job, 4096, "sequences one SubmitJob may carry");
ABSL_FLAG(double, heartbeat_timeout_s, 10, "a READY worker without a heartbeat this long becomes MISSING");
ABSL_FLAG(double, startup_timeout_s, 1800, "a registered worker without a first heartbeat (loading) this long becomes MISSING");
ABSL_FLAG(double, register_timeout_s, 600, "how long Register waits for all pp*ep workers");
ABSL_FLAG(double, shutdown_timeout_s, 30, "how long Shutdown waits for the workers' last heartbeats");
ABSL_FLAG(double, job_retention_s, 86400,
          "a job final (succeeded, cancelled, failed) this long is forgotten, results included: GetJob answers "
          "NOT_FOUND (expired), its client_request_id no longer deduplicates, the journal is compacted; 0 = keep forever");
ABSL_FLAG(std::string, expert_load, "",
          "observed expert load for placement: JSON {\"<layer>\": [tokens per expert]} or `expertmesh status --json`");
ABSL_FLAG(std::string, metrics_listen, "",
          "serve Prometheus metrics (GET /metrics: workers, sequences, jobs, tokens, time breakdown, expert load, "
          "data-plane generation) on this host:port, e.g. 0.0.0.0:9400; empty: off");
ABSL_FLAG(double, eplb_interval_s, 0,
          "rebalance experts while serving every this many seconds: EPLB on the load observed since the last "
          "rebalance, the workers load their new experts next to the old ones and switch at one step; 0: only on "
          "`expertmesh rebalance`");
ABSL_FLAG(double, eplb_min_gain, 0.05,
          "rebalance only when the mean imbalance (max / mean EP rank load over MoE layers) drops by this fraction");
ABSL_FLAG(int64_t, eplb_min_tokens, 2048,
          "rebalance only after this many routed tokens per MoE layer since the last rebalance");
ABSL_FLAG(std::string, http_listen, "",
          "serve the OpenAI-compatible HTTP API (POST /v1/chat/completions, /v1/completions, GET /v1/models, "
          "/health; docs/API.md) on this host:port, e.g. 0.0.0.0:8000 (port 0 picks a free one); empty: off");
ABSL_FLAG(std::string, served_model_name, "",
          "the model id the HTTP API answers to (GET /v1/models, the requests' \"model\"); default: the checkpoint "
          "folder's name");
ABSL_FLAG(std::string, reasoning_field, "reasoning_content",
          "with a reasoning chat template (deepseek-r1, deepseek-r1-distill): the JSON field of the text before </think>: "
          "reasoning_content (SGLang, DeepSeek's API) or reasoning (vLLM)");
ABSL_FLAG(bool, elastic_ep, false,
          "a lost worker's place turns vacant while its stage keeps a live worker, and the survivors serve without "
          "it (its experts re-placed over them, onto a survivor holding a replica first; with --pp > 1 the "
          "pipeline lanes are re-paired) until a worker takes the place again; without it (or when a stage loses "
          "its last worker) the cluster waits for a replacement");
ABSL_FLAG(std::string, address_file, "", "write the bound host:port to this file once serving (for --listen host:0)");

namespace expertmesh::launch {

absl::Status CoordinatorOptionsFromFlags(coordinator::CoordinatorOptions* o) {
  o->checkpoint = absl::GetFlag(FLAGS_checkpoint);
  if (o->checkpoint.empty()) return absl::InvalidArgumentError("--checkpoint DIR is required (the folder with config.json)");
  o->pp = absl::GetFlag(FLAGS_pp);
  o->ep = absl::GetFlag(FLAGS_ep);
  o->redundant_experts = absl::GetFlag(FLAGS_redundant_experts);
  o->layers_per_stage.clear();
  for (const std::string& s : absl::GetFlag(FLAGS_layers_per_stage)) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(s, &v)) {
      return absl::InvalidArgumentError(absl::StrCat("--layers-per-stage: \"", s, "\" is not an integer"));
    }
    o->layers_per_stage.push_back(v);
  }
  o->listen = absl::GetFlag(FLAGS_listen);
  o->journal_path = absl::GetFlag(FLAGS_journal);
  o->metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  o->expert_load_file = absl::GetFlag(FLAGS_expert_load);
  o->max_queued_sequences = absl::GetFlag(FLAGS_max_queued_sequences);
  o->max_sequences_per_job = absl::GetFlag(FLAGS_max_sequences_per_job);
  o->heartbeat_timeout_s = absl::GetFlag(FLAGS_heartbeat_timeout_s);
  o->startup_timeout_s = absl::GetFlag(FLAGS_startup_timeout_s);
  o->register_timeout_s = absl::GetFlag(FLAGS_register_timeout_s);
  o->shutdown_timeout_s = absl::GetFlag(FLAGS_shutdown_timeout_s);
  o->job_retention_s = absl::GetFlag(FLAGS_job_retention_s);
  o->eplb_interval_s = absl::GetFlag(FLAGS_eplb_interval_s);
  o->eplb_min_gain = absl::GetFlag(FLAGS_eplb_min_gain);
  o->eplb_min_tokens = absl::GetFlag(FLAGS_eplb_min_tokens);
  o->elastic_ep = absl::GetFlag(FLAGS_elastic_ep);
  ASSIGN_OR_RETURN(o->tls, ServerTlsFromFlags());
  ASSIGN_OR_RETURN(o->client_auth_token, ClientTokenFromFlags());
  ASSIGN_OR_RETURN(o->cluster_secret, ClusterSecretFromFlags());
  o->http_listen = absl::GetFlag(FLAGS_http_listen);
  o->served_model_name = absl::GetFlag(FLAGS_served_model_name);
  o->reasoning_field = absl::GetFlag(FLAGS_reasoning_field);
  o->chat_template = absl::GetFlag(FLAGS_chat_template);
  return absl::OkStatus();
}

int CoordinatorMain(int argc, char** argv) {
  static std::atomic<bool> graceful{true};
  WatchTerminationSignals(&graceful);  // SIGTERM/SIGINT: stop serving, keep the journal, leave workers running
  ParseVerbFlags(argc, argv);
  coordinator::CoordinatorOptions o;
  absl::Status s = CoordinatorOptionsFromFlags(&o);
  if (!s.ok()) {
    std::fprintf(stderr, "expertmesh coordinator: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  const std::string address_file = absl::GetFlag(FLAGS_address_file);
  s = coordinator::RunCoordinator(o, [&](const std::string& address) {
    std::printf("coordinator listening on %s\n", address.c_str());
    std::fflush(stdout);
    if (!address_file.empty()) {
      const std::string tmp = address_file + ".tmp";
      std::ofstream(tmp) << address << "\n";
      std::rename(tmp.c_str(), address_file.c_str());
    }
  }, &TerminationSignal());
  if (!s.ok()) {
    std::fprintf(stderr, "expertmesh coordinator: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace expertmesh::launch
