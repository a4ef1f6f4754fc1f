#include "worker/comm/registry.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "expertmesh/build_config.h"
#include "worker/comm/mpi_communicator.h"
#if EXPERTMESH_HAVE_UCX
#include "worker/comm/ucx_communicator.h"
#endif
#if EXPERTMESH_HAVE_NCCL
#include "worker/comm/nccl_communicator.h"
#endif

namespace expertmesh::comm {

std::vector<std::string> AvailableBackends() {
  std::vector<std::string> b = {"mpi"};
#if EXPERTMESH_HAVE_UCX
  b.push_back("ucx");
#endif
#if EXPERTMESH_HAVE_NCCL
  b.push_back("nccl");
#endif
  return b;
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateCommunicator(absl::string_view backend, Bootstrap* bootstrap,
                                                                 const CommOptions& options) {
  const absl::Time deadline = absl::Now() + options.connect_timeout;
  if (backend == "mpi") return CreateMpiCommunicator(deadline);
  if (backend == "ucx") {
#if EXPERTMESH_HAVE_UCX
    UcxOptions ucx;
    ucx.detect_peer_failure = options.ucx_detect_peer_failure;
    return CreateUcxCommunicator(bootstrap, deadline, ucx);
#else
    return absl::UnimplementedError(
        "this build has no UCX backend: install libucx-dev and reconfigure with -DEXPERTMESH_UCX=ON");
#endif
  }
  if (backend == "nccl") {
#if EXPERTMESH_HAVE_NCCL
    return CreateNcclCommunicator(bootstrap, options.cuda_device, deadline);
#else
    return absl::UnimplementedError(
        "this build has no NCCL backend: install CUDA and NCCL and reconfigure with -DEXPERTMESH_CUDA=ON");
#endif
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown communicator backend '", backend, "'; this build has: ",
                                                 absl::StrJoin(AvailableBackends(), ", ")));
}

}  // namespace expertmesh::comm
