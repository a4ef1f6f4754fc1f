// expertmesh worker: one worker process of a standalone cluster (UCX data plane).
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "launch/flags.h"
#include "proto/security.h"
#include "launch/signals.h"
#include "launch/verbs.h"
#include "worker/runtime/worker.h"

ABSL_FLAG(std::string, coordinator, "", "address of the coordinator's gRPC server (host:port)");
ABSL_FLAG(int32_t, worker_id, -1, "keep this worker id (after a restart); -1: the coordinator assigns one");
ABSL_FLAG(std::string, data_plane, "ucx", "data plane between workers: ucx (standalone) or mpi (under mpirun)");
ABSL_FLAG(int32_t, max_sequences, 64, "sequences a stage-0 worker holds at once (continuous batching)");
ABSL_FLAG(int32_t, max_step_tokens, 2048,
          "tokens in one step of a stage-0 worker: decode tokens first, then chunks of waiting prompts (chunked "
          "prefill; a longer prompt takes several steps)");
ABSL_FLAG(int32_t, step_timeout_s, 120, "seconds any data-plane wait may take before the peer counts as lost");
ABSL_FLAG(int32_t, rejoin_timeout_s, 600,
          "after a lost peer: seconds to wait for the cluster to be complete again (start a replacement "
          "`expertmesh worker`) before this worker exits");

namespace expertmesh::launch {

int WorkerMain(int argc, char** argv) {
  // SIGTERM/SIGINT: at once while starting; once serving, leave the cluster cleanly.
  static std::atomic<bool> serving{false};
  WatchTerminationSignals(&serving);
  ParseVerbFlags(argc, argv);
  worker::runtime::WorkerOptions o;
  o.stop_signal = &TerminationSignal();
  o.serving = &serving;
  o.coordinator = absl::GetFlag(FLAGS_coordinator);
  if (o.coordinator.empty()) {
    std::fprintf(stderr, "expertmesh worker: --coordinator HOST:PORT is required\n");
    return 2;
  }
  o.backend = absl::GetFlag(FLAGS_data_plane);
  o.requested_worker_id = absl::GetFlag(FLAGS_worker_id);
  o.max_sequences = absl::GetFlag(FLAGS_max_sequences);
  o.max_step_tokens = absl::GetFlag(FLAGS_max_step_tokens);
  if (o.max_sequences < 1 || o.max_step_tokens < 1) {
    std::fprintf(stderr, "expertmesh worker: --max-sequences and --max-step-tokens must be >= 1\n");
    return 2;
  }
  o.step_timeout = absl::Seconds(absl::GetFlag(FLAGS_step_timeout_s));
  o.rejoin_timeout = absl::Seconds(absl::GetFlag(FLAGS_rejoin_timeout_s));
  if (o.backend == "mpi") {
    std::fprintf(stderr, "expertmesh worker: the mpi data plane needs mpirun: use `expertmesh launch`\n");
    return 2;
  }
  auto cuda = DeviceFromFlags(&o.cuda_options);
  auto plane = DeviceDataPlaneFromFlags();
  auto security = ClientSecurityFromFlags(Caller::kWorker);
  for (const absl::Status& st : {cuda.status(), plane.status(), security.status()}) {
    if (!st.ok()) {
      std::fprintf(stderr, "expertmesh worker: %s\n", std::string(st.message()).c_str());
      return 2;
    }
  }
  o.cuda = *cuda;
  o.device_data_plane = *plane;
  o.security = *security;
  absl::Status s = worker::runtime::RunWorker(o);
  if (!s.ok()) {
    std::fprintf(stderr, "expertmesh worker: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace expertmesh::launch
