// expertmesh launch: the cluster under mpirun. Rank 0 runs the coordinator
// (gRPC), ranks 1..P*E are the workers (worker w = rank - 1, stage-major),
// with MPI as the data plane; the coordinator's address reaches the workers
// by MPI_Bcast, so nothing but mpirun's own launch is needed. So does the
// cluster secret: rank 0 draws a random one per job (or reads
// --cluster-secret-file) and the workers present it to WorkerService, so
// that nobody else who reaches the coordinator's port can act as a worker.
#include <mpi.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <future>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "coordinator/server.h"
#include "launch/flags.h"
#include "proto/security.h"
#include "worker/cuda_engine.h"
#include "launch/verbs.h"
#include "worker/comm/mpi_communicator.h"
#include "worker/runtime/worker.h"

ABSL_DECLARE_FLAG(std::string, address_file);
ABSL_FLAG(int32_t, launch_max_sequences, 64, "sequences each stage-0 worker holds at once (continuous batching)");
ABSL_FLAG(int32_t, launch_max_step_tokens, 2048,
          "tokens in one step of a stage-0 worker: decode tokens first, then chunks of waiting prompts (chunked "
          "prefill)");
ABSL_FLAG(int32_t, launch_step_timeout_s, 120,
          "seconds any data-plane wait may take before a peer counts as lost");

namespace expertmesh::launch {

namespace {

constexpr int kAddressBytes = 512;
constexpr int kSecretBytes = 512;

int Fail(int rank, const std::string& msg, int code) {
  std::fprintf(stderr, "expertmesh launch (rank %d): %s\n", rank, msg.c_str());
  return code;
}

}  // namespace

int LaunchMain(int argc, char** argv) {
  ParseVerbFlags(argc, argv);
  absl::Status s = comm::InitMpi(&argc, &argv);
  if (!s.ok()) return Fail(-1, std::string(s.message()) + " (run me under mpirun)", 2);
  const int rank = comm::MpiWorldRank(), size = comm::MpiWorldSize();
  const int pp = absl::GetFlag(FLAGS_pp), ep = absl::GetFlag(FLAGS_ep);
  if (pp < 1 || ep < 1 || size != 1 + pp * ep) {
    const int code = Fail(rank,
                          absl::StrCat("mpirun started ", size, " processes; --pp ", pp, " --ep ", ep, " needs 1 + ",
                                       pp, "*", ep, " = ", 1 + pp * ep, " (rank 0 is the coordinator)"),
                          2);
    comm::FinalizeMpi().IgnoreError();
    return code;
  }
  if (!absl::GetFlag(FLAGS_tls_cert).empty() && absl::GetFlag(FLAGS_tls_ca).empty()) {
    const int code = Fail(rank, "--tls-cert (rank 0 serves TLS) needs --tls-ca: the workers verify rank 0's "
                                "certificate with it (docs/SECURITY.md)", 2);
    comm::FinalizeMpi().IgnoreError();
    return code;
  }
  char address[kAddressBytes] = {0};
  char secret[kSecretBytes] = {0};
  int code = 0;
  if (rank == 0) {
    coordinator::CoordinatorOptions o;
    s = CoordinatorOptionsFromFlags(&o);
    if (s.ok() && o.cluster_secret.empty()) {
      absl::StatusOr<std::string> r = rpc::RandomSecret();  // per job, from /dev/urandom
      if (r.ok()) {
        o.cluster_secret = *r;
      } else {
        s = r.status();
      }
    }
    if (s.ok() && o.cluster_secret.size() >= kSecretBytes) {
      s = absl::InvalidArgumentError(absl::StrCat("--cluster-secret-file: the secret has ", o.cluster_secret.size(),
                                                  " characters; launch shares at most ", kSecretBytes - 1));
    }
    if (s.ok()) std::strncpy(secret, o.cluster_secret.c_str(), kSecretBytes - 1);
    std::promise<std::string> bound;
    std::thread coord;
    if (s.ok()) {
      coord = std::thread([&] {
        bool told = false;
        absl::Status r = coordinator::RunCoordinator(o, [&](const std::string& a) {
          told = true;
          bound.set_value(a);
        });
        if (!told) bound.set_value("");
        if (!r.ok()) {
          code = Fail(0, std::string(r.message()), 1);
        }
      });
    } else {
      code = Fail(0, std::string(s.message()), 2);
      bound.set_value("");
    }
    const std::string a = bound.get_future().get();
    if (!a.empty()) {
      std::printf("coordinator listening on %s\n", a.c_str());
      std::fflush(stdout);
      const std::string file = absl::GetFlag(FLAGS_address_file);
      if (!file.empty()) {
        std::ofstream(file + ".tmp") << a << "\n";
        std::rename((file + ".tmp").c_str(), file.c_str());
      }
    }
    std::strncpy(address, a.c_str(), kAddressBytes - 1);
    MPI_Bcast(address, kAddressBytes, MPI_CHAR, 0, MPI_COMM_WORLD);
    MPI_Bcast(secret, kSecretBytes, MPI_CHAR, 0, MPI_COMM_WORLD);
    std::memset(secret, 0, sizeof(secret));
    if (coord.joinable()) coord.join();
  } else {
    MPI_Bcast(address, kAddressBytes, MPI_CHAR, 0, MPI_COMM_WORLD);
    MPI_Bcast(secret, kSecretBytes, MPI_CHAR, 0, MPI_COMM_WORLD);
    // TLS to rank 0 as for `expertmesh worker` (--tls-ca; with --tls-client-ca
    // the workers present --tls-cert/--tls-key); the secret is rank 0's.
    absl::StatusOr<rpc::ClientSecurity> security = ClientSecurityFromFlags(Caller::kWorker);
    if (security.ok()) security->worker_secret = secret;
    std::memset(secret, 0, sizeof(secret));
    if (!security.ok()) {
      code = Fail(rank, std::string(security.status().message()), 2);
    } else if (address[0] == '\0') {
      code = Fail(rank, "the coordinator (rank 0) failed to start; see its message", 1);
    } else {
      worker::runtime::WorkerOptions o;
      o.coordinator = address;
      o.security = *security;
      o.backend = "mpi";
      o.requested_worker_id = rank - 1;
      o.mpi_world_offset = 1;
      o.max_sequences = absl::GetFlag(FLAGS_launch_max_sequences);
      o.max_step_tokens = absl::GetFlag(FLAGS_launch_max_step_tokens);
      o.step_timeout = absl::Seconds(absl::GetFlag(FLAGS_launch_step_timeout_s));
      auto cuda = DeviceFromFlags(&o.cuda_options);
      auto plane = DeviceDataPlaneFromFlags();
      s = cuda.ok() ? plane.status() : cuda.status();
      if (s.ok()) {
        o.cuda = *cuda;
        o.device_data_plane = *plane;
        s = worker::runtime::RunWorker(o);
      }
      if (!s.ok()) code = Fail(rank, std::string(s.message()), 1);
    }
  }
  if (code != 0) MPI_Abort(MPI_COMM_WORLD, code);  // one failed process ends the job, like mpirun users expect
  comm::FinalizeMpi().IgnoreError();
  return code;
}

}  // namespace expertmesh::launch
