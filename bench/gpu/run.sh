#!/usr/bin/env bash
# The GPU check of expertmesh, in one call on a lent GPU machine: builds the
# CUDA kernels, their tests and their benchmark with CUDA alone (standalone
# CMake project bench/gpu, carried dependencies in .gpudeps/), runs the tests
# (every CUDA kernel against its CPU twin), the benchmark (each kernel beside
# its floor from the HBM bandwidth and bf16 matrix peak measured in the same
# run) and PyTorch doing the same operations, then prints one summary table.
#
#   bench/gpu/pack_deps.sh                       # once, on the build machine
#   device run, carry [".gpudeps"]:  bench/gpu/run.sh
#
# Logs go to $OUT (the device tool's folder) or ./out-gpu: device.txt,
# build.log, tests.log, bench.log, torch.log, summary.md, ncu.txt, run.log.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
out=${OUT:-$root/out-gpu}
mkdir -p "$out"
build=${BUILD_DIR:-/tmp/em-build-gpu}
say() { echo "== $(date +%T) $*" | tee -a "$out/run.log"; }

say "device"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
    --format=csv 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -2 || /usr/local/cuda/bin/nvcc --version | tail -2
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  g++ --version | head -1
  cmake --version | head -1
  nproc
} >"$out/device.txt" 2>&1
cat "$out/device.txt"

# cuBLASLt is opened with dlopen: find a libcublasLt.so.13 (toolkit or PyTorch's wheel).
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  $(python3 -c 'import glob, site; [print(p) for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/*/lib") + glob.glob(s + "/nvidia/*/*/lib")]' 2>/dev/null); do
  if [ -e "$d/libcublasLt.so.13" ]; then
    export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "cuBLASLt from $d"
    break
  fi
done

say "build (standalone CMake project bench/gpu)"
deps=()
[ -d "$root/.gpudeps" ] && deps=(-DEM_DEPS="$root/.gpudeps")
export PATH="$PATH:/usr/local/cuda/bin"
gen=(-G Ninja)
command -v ninja >/dev/null || gen=(-G "Unix Makefiles")
if timeout 400 cmake -S bench/gpu -B "$build" "${gen[@]}" "${deps[@]}" >"$out/build.log" 2>&1 &&
  timeout 400 cmake --build "$build" -j "$(nproc)" >>"$out/build.log" 2>&1; then
  bin="$build"
  cuobjdump -res-usage "$build/libem_gpu_kernels.a" 2>/dev/null | grep -E "Function|REG" >>"$out/build.log"
  echo "HGMMA instructions in the kernels: $(cuobjdump --dump-sass "$build/libem_gpu_kernels.a" 2>/dev/null | grep -c HGMMA)" | tee -a "$out/build.log"
else
  tail -30 "$out/build.log"
  if [ -x "$root/.gpudeps/prebuilt/em_gpu_tests" ]; then
    say "build FAILED: using the binaries prebuilt on the build machine (.gpudeps/prebuilt)"
    bin="$root/.gpudeps/prebuilt"
  else
    say "build FAILED"
    exit 1
  fi
fi

say "tests (CUDA kernels vs CPU kernels)"
timeout 240 "$bin/em_gpu_tests" 2>&1 | tee "$out/tests.log" | grep -E "^\[ (error|info) |^\[  (FAILED|PASSED|SKIPPED) |Failure|Expected|Which is|random seed"
say "tests exit ${PIPESTATUS[0]}"

say "benchmark"
timeout 180 "$bin/em_gpu_bench" 2>&1 | tee "$out/bench.log" | grep -v '^RESULT'
say "benchmark exit ${PIPESTATUS[0]}"

say "PyTorch, same operations"
PYTHONUNBUFFERED=1 timeout 180 python3 bench/gpu/torch_bench.py --offsets-from "$out/bench.log" 2>&1 |
  tee "$out/torch.log" | grep -v '^RESULT'

say "summary"
python3 bench/gpu/summary.py "$out" | tee "$out/summary.md"

if [ "${EM_NCU:-1}" = 1 ] && command -v ncu >/dev/null; then
  say "ncu: speed of light of the MLA decode, permute and router kernels"
  : >"$out/ncu.txt"
  for k in MlaDecodeWgmma:mla MlaDecodeFast:mla PermuteKernel:router; do
    timeout 60 ncu --clock-control none -k regex:"${k%%:*}" -c 1 --section SpeedOfLight \
      --section WarpStateStats --section Occupancy "$bin/em_gpu_bench" --only "${k##*:}" --reps 1 >>"$out/ncu.txt" 2>&1
  done
  grep -E "MlaDecode|PermuteKernel|Duration|Throughput|Stall|Warp Cycles" "$out/ncu.txt" | head -60
fi
