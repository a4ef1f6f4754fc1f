// Discovery of the local machine into the topology format of cluster.h:
// CPU cores and memory from hwloc (libhwloc, when built with it) or /proc;
// GPUs from `nvidia-smi --query-gpu` and their links from `nvidia-smi topo -m`
// (NV# = NVLink, otherwise PCIe); NICs from /sys/class/infiniband (rate) or
// /sys/class/net (speed). Peaks of known GPU kinds come from the datasheet
// table of cluster.cc; a CPU's from its core count, clock and vector width.
// The result is a one-node cluster; edit `nodes:` for a cluster of such machines.
//
//   ASSIGN_OR_RETURN(Cluster c, DiscoverLocalMachine());
//   std::cout << ClusterToYaml(c);
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "topology/cluster.h"

namespace expertmesh::topology {

absl::StatusOr<Cluster> DiscoverLocalMachine();

// Parsers, exposed for tests. `nvidia-smi --query-gpu=name,memory.total
// --format=csv,noheader,nounits` output -> (name, MiB) per GPU.
std::vector<std::pair<std::string, double>> ParseNvidiaSmiGpus(const std::string& text);
// `nvidia-smi topo -m`: number of NVLink links between GPU0 and GPU1 ("NV18"
// -> 18); 0 when they talk over PCIe (PIX/PXB/PHB/NODE/SYS) or with one GPU.
int ParseNvlinkCount(const std::string& topo_text);

}  // namespace expertmesh::topology
