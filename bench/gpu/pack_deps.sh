#!/usr/bin/env bash
# Packs what the standalone GPU build (bench/gpu/CMakeLists.txt) needs beyond
# CUDA and a C++ compiler into .gpudeps/ at the repository root: headers of
# abseil, nlohmann/json, glog, gflags, googletest, OpenBLAS's cblas.h and
# cuBLASLt, and static x86-64 libraries of abseil, glog, gflags, libunwind and
# googletest (~12 MB). The GPU machine has no package registry: the device
# tool carries this folder (`carry: [".gpudeps"]`). Run it here, once, from
# the repository root; .gpudeps is kept out of git by .git/info/exclude.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
out="$root/.gpudeps"
exclude=$(git -C "$root" rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpudeps/' "$exclude" 2>/dev/null || echo '/.gpudeps/' >>"$exclude"
rm -rf "$out"
mkdir -p "$out/include" "$out/lib" "$out/cublas"
lib=/usr/lib/x86_64-linux-gnu
for d in absl nlohmann glog gflags gtest; do cp -r "/usr/include/$d" "$out/include/"; done
cp /usr/include/x86_64-linux-gnu/openblas-pthread/{cblas.h,openblas_config.h} "$out/include/"
cp /usr/local/cuda/include/{cublasLt.h,cublas_api.h,cublas_v2.h,cublas.h} "$out/cublas/" 2>/dev/null || true
cp "$lib"/libabsl_*.a "$lib"/libglog.a "$lib"/libgflags.a "$lib"/libgtest.a "$lib"/libgtest_main.a "$out/lib/"
# glog takes its stack traces from libunwind (a non-PIC archive: the standalone build links -no-pie).
for f in libunwind.a liblzma.a; do [ -e "$lib/$f" ] && cp "$lib/$f" "$out/lib/"; done

# Fallback binaries for run.sh (used only if the build on the GPU machine fails):
# built here by `cmake -S bench/gpu -B build-gpu -G Ninja -DEM_DEPS=$PWD/.gpudeps && ninja -C build-gpu`.
if [ -x "$root/build-gpu/em_gpu_tests" ] && [ -x "$root/build-gpu/em_gpu_bench" ]; then
  mkdir -p "$out/prebuilt"
  cp "$root/build-gpu/em_gpu_tests" "$root/build-gpu/em_gpu_bench" "$out/prebuilt/"
fi
du -sh "$out"
