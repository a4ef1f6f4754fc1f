#!/usr/bin/env bash
# Packs what tests/gpu_engine/run_on_gpu.sh needs on a bare GPU machine (no
# package registry, no gRPC/MPI/abseil/OpenBLAS) into .gpueng/ at the
# repository root (kept out of git by .git/info/exclude): the expertmesh
# binary and em_gpu_engine_tests built here, and the shared libraries they
# load, xz-compressed (~13 MB), minus glibc/libstdc++ (the GPU image has
# newer ones) and libnccl (200+ MB; run_on_gpu.sh takes PyTorch's).
#
#   cmake -S . -B build-gpueng -G Ninja && ninja -C build-gpueng expertmesh em_gpu_engine_tests
#   tests/gpu_engine/pack.sh [build-gpueng]
#   device run, carry [".gpueng"]:  tests/gpu_engine/run_on_gpu.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel)
build=$(cd "${1:-$root/build-gpueng}" && pwd)
out="$root/.gpueng"
exclude=$(git -C "$root" rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpueng/' "$exclude" 2>/dev/null || echo '/.gpueng/' >>"$exclude"
rm -rf "$out"
mkdir -p "$out/bin"
bins=("$build/launch/expertmesh" "$build/tests/gpu_engine/em_gpu_engine_tests")
for b in "${bins[@]}"; do
  [ -x "$b" ] || { echo "missing $b: build it first" >&2; exit 1; }
  strip --strip-debug -o "$out/bin/$(basename "$b")" "$b"
done
stage=$(mktemp -d)
mkdir -p "$stage/libs"
for b in "${bins[@]}"; do ldd "$b"; done | awk '$3 ~ /^\// {print $3}' | sort -u |
  grep -vE '/(libc|libm|libstdc\+\+|libgcc_s|libpthread|libdl|librt|ld-linux[^/]*|libnccl)\.so' |
  while read -r lib; do cp -L "$lib" "$stage/libs/"; done
# UCX loads its transports from <libdir>/ucx next to libucs.
[ -d /usr/lib/x86_64-linux-gnu/ucx ] && cp -rL /usr/lib/x86_64-linux-gnu/ucx "$stage/libs/"
tar -C "$stage" -cJf "$out/libs.tar.xz" libs
rm -rf "$stage"
git -C "$root" rev-parse HEAD >"$out/commit"
du -sh "$out"
