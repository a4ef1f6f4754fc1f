// The worker process: registers with the coordinator, loads its shard (the
// layers of its pipeline stage and the experts of its EP rank), joins the
// data planes (EP all-to-all inside the stage, pipeline transfers along its
// lane) and runs steps until the coordinator shuts the cluster down. Its
// parts (docs/CLUSTER.md, "Worker internals"): control_session.h,
// data_plane.h, stage_executor.h, placement_stager.h, scheduler.h,
// stage_loop.h, wired together by worker.cc.
//
// Lanes: EP rank r of every stage forms lane r. Stage 0 of a lane owns the
// lane's sequences (given by the coordinator through Sync), builds
// micro-batches (prefill and decode segments), and keeps up to P of them in
// flight so that stages overlap; the last stage samples and returns the new
// tokens to stage 0. Within a stage the EP ranks agree (all-gather) on each
// step, so every rank joins every MoE all-to-all, also with zero tokens.
#pragma once

#include <atomic>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "proto/security.h"
#include "worker/cuda_engine.h"

namespace expertmesh::worker::runtime {

class CoordinatorClient;

struct WorkerOptions {
  std::string coordinator;               // host:port of the coordinator's gRPC server
  // TLS to the coordinator and the cluster secret (docs/SECURITY.md).
  rpc::ClientSecurity security;
  std::string backend = "ucx";           // data plane: "mpi" (under mpirun) or "ucx"
  int requested_worker_id = -1;          // -1: the coordinator assigns one
  int mpi_world_offset = 1;              // mpi: world rank of worker w is w + offset
  int max_sequences = 64;                // sequences a stage-0 worker holds at once
  int64_t max_step_tokens = 2048;        // tokens in one micro-batch (decode + prefill chunks); >= 1
  absl::Duration step_timeout = absl::Seconds(120);        // any data-plane wait
  absl::Duration register_timeout = absl::Seconds(300);
  absl::Duration coordinator_timeout = absl::Seconds(300);  // lost coordinator: give up after
  // After a data-plane failure (a peer lost): how long to wait for the
  // cluster to be complete again (a replacement worker) before exiting.
  absl::Duration rejoin_timeout = absl::Seconds(600);
  absl::Duration heartbeat_interval = absl::Seconds(1);
  // The shard on a GPU (CudaEngine) instead of the CPU engine.
  bool cuda = false;
  CudaEngineOptions cuda_options;
  // With cuda: "nccl" moves the EP tokens and the pipeline's hidden states GPU
  // to GPU over NCCL communicators (control messages stay on `backend`);
  // "host" stages them through host memory over `backend`.
  std::string device_data_plane = "host";
  // Leaving on request (SIGTERM): once *stop_signal turns non-zero the worker
  // aborts its data plane, tells the coordinator it is exiting (its sequences
  // go back to the queue; the others rebuild without it until a replacement
  // registers) and RunWorker returns OK. *serving (if given) is set while the
  // worker can leave that way (from its first heartbeat on).
  const std::atomic<int>* stop_signal = nullptr;
  std::atomic<bool>* serving = nullptr;
};

// Runs the worker until the cluster shuts down, it leaves on request (OK), or
// it fails. Talks to the coordinator over gRPC at options.coordinator.
absl::Status RunWorker(const WorkerOptions& options);
// The same over `client` (tests inject a fake coordinator); options.coordinator
// is not used. client must outlive the call.
absl::Status RunWorker(const WorkerOptions& options, CoordinatorClient* client);

}  // namespace expertmesh::worker::runtime
