#!/usr/bin/env bash
# Installs every Debian 12 package expertmesh needs to build, test and run.
# Idempotent and non-interactive; run as root (or with sudo available).
set -euo pipefail
PKGS=(
  build-essential cmake ninja-build pkg-config git
  libopenblas-dev                        # BLAS for the CPU kernels
  libgoogle-glog-dev libgflags-dev libabsl-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libyaml-cpp-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  prometheus-cpp-dev libcpp-httplib-dev  # the coordinator's /metrics endpoint
  libopenmpi-dev openmpi-bin             # MPI data plane and mpirun
  libucx-dev                             # UCX data plane
  libhwloc-dev hwloc                     # topology discovery
  iproute2                               # e2e: network namespaces as hosts
  python3 python3-numpy python3-grpcio   # test oracles and the example client
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PKGS[@]} packages already installed"
  exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
