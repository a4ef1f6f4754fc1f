#!/usr/bin/env bash
# The GPU checks and the decode benchmark of the CUDA engine, in one call on a
# lent GPU machine, from binaries built and packed here (tests/gpu_engine/pack.sh):
#   1. em_gpu_engine_tests: the engine against the CPU engine step by step
#      (fp32 and bf16), CUDA graphs vs eager (bitwise), pipeline stages,
#      the EP exchange over one-rank NCCL and UCX communicators;
#   2. test_generate_cuda.py: `generate --device cuda` vs `--device cpu` on
#      the tiny fp32/bf16/fp8 checkpoints (greedy tokens, prefill logits);
#   3. test_worker_cuda.py: standalone clusters of `--device cuda` workers
#      (PP1xEP1, and PP2xEP1 / PP1xEP2 sharing the GPU over UCX);
#   4. decode tokens/s, eager vs CUDA graphs, tiny bf16, batch 1 / 8 / 64.
#
#   tests/gpu_engine/pack.sh                        # here, after building
#   device run, carry [".gpueng"]:  tests/gpu_engine/run_on_gpu.sh
#
# Logs go to $OUT (or ./out-gpueng): device.txt, engine_tests.log, memcheck.log,
# generate_tests.log, worker_tests.log, bench.log, summary.txt (7 files).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
out=${OUT:-$root/out-gpueng}
mkdir -p "$out"
say() { echo "== $(date +%T) $*" | tee -a "$out/summary.txt"; }
[ -x .gpueng/bin/expertmesh ] || { echo "no .gpueng/bin/expertmesh: run tests/gpu_engine/pack.sh first and carry .gpueng"; exit 1; }

libs=/tmp/gpueng-libs
rm -rf "$libs" && mkdir -p "$libs"
tar -C "$libs" --strip-components=1 -xJf .gpueng/libs.tar.xz
ld="$libs"
# libnccl.so.2 and libcublasLt.so.13: the toolkit's, else PyTorch's wheels.
for want in libnccl.so.2 libcublasLt.so.13; do
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import glob, site; [print(p) for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/*/lib") + glob.glob(s + "/nvidia/*/*/lib")]' 2>/dev/null); do
    if [ -e "$d/$want" ]; then ld="$ld:$d"; break; fi
  done
done
export LD_LIBRARY_PATH="$ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OPENBLAS_NUM_THREADS=1
bin="$root/.gpueng/bin"
em="$bin/expertmesh"

say "device"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  echo "built from $(cat .gpueng/commit 2>/dev/null)"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  ldd "$em" | grep -E "not found|nccl|openblas" || true
} >"$out/device.txt" 2>&1
cat "$out/device.txt"

say "engine tests (em_gpu_engine_tests, one process per test so a crash costs one test)"
: >"$out/engine_tests.log"
for t in $("$bin/em_gpu_engine_tests" --gtest_list_tests | awk '/^[^ ]/ {s=$1} /^  / {print s $1}'); do
  timeout 180 "$bin/em_gpu_engine_tests" --gtest_filter="$t" >>"$out/engine_tests.log" 2>&1
  rc=$?
  echo "[ exit ] $t $rc" >>"$out/engine_tests.log"
  [ $rc -ne 0 ] && echo "   $t exited $rc"
done
grep -E "^\[ +(OK|FAILED|SKIPPED) +\] [^ ]+ \(|^\[ info|Failure|Expected|Which is" "$out/engine_tests.log" | head -80

say "compute-sanitizer memcheck on the engine's kernels and one engine test"
if command -v compute-sanitizer >/dev/null; then
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 "$bin/em_gpu_engine_tests" \
    --gtest_filter='EngineOps.*:CudaEngine.PipelineStagesEqualWholeModel' >"$out/memcheck.log" 2>&1
  echo "memcheck exit $? (0: clean, 9: errors found)"
  grep -E "ERROR SUMMARY|Invalid|out of bounds" "$out/memcheck.log" | head -20
fi

say "generate --device cuda vs cpu (test_generate_cuda.py)"
PYTHONUNBUFFERED=1 timeout 420 python3 tests/gpu_engine/test_generate_cuda.py --expertmesh "$em" \
  --workdir /tmp/gpueng-generate 2>&1 | tee "$out/generate_tests.log" | grep -vE "^\s*$" | tail -40
say "generate tests exit ${PIPESTATUS[0]}"

say "workers --device cuda (test_worker_cuda.py)"
EXPERTMESH="$em" PYTHONUNBUFFERED=1 timeout 420 python3 tests/gpu_engine/test_worker_cuda.py 2>&1 |
  tee "$out/worker_tests.log" | grep -E "ok$|FAIL|ERROR|Error|equal the CPU|Ran |OK|no CUDA" | head -40
say "worker tests exit ${PIPESTATUS[0]}"

say "decode benchmark: tokens/s, eager vs CUDA graphs"
bench=/tmp/gpueng-bench
rm -rf "$bench" && mkdir -p "$bench"
"$em" checkpoint --preset tiny --dtype bf16 --seed 1 --out "$bench/tiny_bf16" >/dev/null 2>&1
python3 - "$bench" <<'PY'
import json, random, sys
rng = random.Random(0)
for b in (1, 8, 64):
    with open(f"{sys.argv[1]}/p{b}.jsonl", "w") as f:
        for _ in range(b):
            f.write(json.dumps({"tokens": [rng.randrange(1024) for _ in range(32)]}) + "\n")
PY
{
  printf "%-8s %-6s %-6s %14s %14s\n" precision batch graphs "decode tok/s" "ms per step"
  for prec in bf16 fp32; do
    for b in 1 8 64; do
      for g in false true; do
        line=$(timeout 120 "$em" generate --checkpoint "$bench/tiny_bf16" --prompts "$bench/p$b.jsonl" \
          --max-new-tokens 256 --device cuda --cuda-precision $prec --cuda-graphs=$g 2>&1 >/dev/null |
          grep "decode .* tokens/s")
        tps=$(echo "$line" | sed -E 's/.*decode ([0-9.]+) tokens\/s.*/\1/')
        ms=$(echo "$line" | sed -E 's/.*\(([0-9.]+) ms per step\).*/\1/')
        printf "%-8s %-6s %-6s %14s %14s\n" $prec $b $g "${tps:-?}" "${ms:-?}"
        echo "$line" >>"$bench/lines.txt"
      done
    done
  done
  cat "$bench/lines.txt"
} 2>&1 | tee "$out/bench.log"

say "summary"
{
  grep -E "^\[  FAILED|^\[ info|^\[ exit" "$out/engine_tests.log"
  sed -n '/== GPU engine vs CPU/,$p' "$out/generate_tests.log" | head -20
  grep -E "^Ran |^OK|^FAILED" "$out/generate_tests.log" "$out/worker_tests.log"
  grep "equal the CPU" "$out/worker_tests.log"
  head -14 "$out/bench.log"
} 2>&1 | tee -a "$out/summary.txt"
