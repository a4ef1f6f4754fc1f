#!/usr/bin/env bash
# Calibrates the capacity planner on this CPU host and checks it against the
# runtime (docs/PLANNER.md, "Local calibration"):
#
#   calibrate  kernel and transport benchmarks (`expertmesh bench layer`, `bench
#              moe-alltoall`, alone and with the cores shared with busy
#              processes) -> local-calibration/bench.json, then
#              `expertmesh plan --calibrate-from` -> examples/topologies/cpu-local-calibrated.yaml
#   fit        only the second half of calibrate (the topology from bench.json)
#   routing    the expert load the runtime reports for bench serve's kind of
#              prompts on its checkpoint (a local cluster, one job, `expertmesh
#              status --json`) -> local-calibration/expert-load.json, the
#              workload's expert_load (no timing is taken from it)
#   measure    the checked runs of the runtime (`expertmesh bench serve --json`)
#              -> local-calibration/serve-measured.json
#   compare    `expertmesh plan --phase job --measured` for each measured run
#   all        the four in order (default)
#
#   examples/planning/calibrate_local.sh [calibrate|fit|routing|measure|compare|all]
#
# Needs mpirun and jq. Environment: EXPERTMESH (the binary; default build/launch/expertmesh),
# BENCH_DIR (bench serve's checkpoints and logs; default out/bench), CORES
# (concurrent copies of each layer benchmark; default nproc), MIN_SECONDS (per
# timed measurement; default 3), NICE (scheduling priority of the benchmarks,
# default 0; as root, NICE=-10 shields them from other users' compiles),
# MAX_BUSY (before each benchmark, wait until the cores were at most this busy,
# in percent, over 3 s; default 20), MAX_WAIT (give up waiting after this many
# seconds and run anyway; default 1800). The load average of the minute before
# each benchmark and the busy share of the cores just before it are recorded
# next to its result.
set -euo pipefail
cd "$(dirname "$0")/../.."
EM=${EXPERTMESH:-build/launch/expertmesh}
BENCH_DIR=${BENCH_DIR:-out/bench}
CORES=${CORES:-$(nproc)}
MIN_SECONDS=${MIN_SECONDS:-3}
NICE=${NICE:-0}
OUT=examples/planning/local-calibration
TOPO=examples/topologies/cpu-local-calibrated.yaml
mode=${1:-all}
mkdir -p "$OUT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

MAX_BUSY=${MAX_BUSY:-20}
MAX_WAIT=${MAX_WAIT:-1800}

# Percent of the cores' time spent busy (user + nice + system + irq + steal) over 3 s.
busy() {
  local a b
  a=($(head -1 /proc/stat)); sleep 3; b=($(head -1 /proc/stat))
  local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) total=0 i
  for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
  echo $(( total > 0 ? 100 * (total - idle) / total : 0 ))
}

# Waits for a quiet machine (other users' builds and benchmarks distort every
# number here); sets BUSY to the busy share measured just before the benchmark.
wait_quiet() {
  local start=$SECONDS
  BUSY=$(busy)
  while (( BUSY > MAX_BUSY && SECONDS - start < MAX_WAIT )); do
    echo "calibrate_local: cores ${BUSY}% busy (> ${MAX_BUSY}%), waiting..." >&2
    sleep 20
    BUSY=$(busy)
  done
}

load1() { cut -d' ' -f1 /proc/loadavg; }

# One entry of a results file: the command, the machine's state before it, its JSON.
entry() {
  printf '    {"command": "%s", "load_average_1m": %s, "cores_busy_percent_before": %s, "nice": %s, "result": %s}' \
    "$1" "$2" "$BUSY" "$NICE" "$3"
}

# `bench layer` in $CORES concurrent single-threaded copies (the serving
# processes run one BLAS thread each, all cores busy); result: their JSON array.
layer() {
  local preset=$1 tokens=$2 load cmd
  cmd="OPENBLAS_NUM_THREADS=1 expertmesh bench layer --preset $preset --tokens $tokens --min-seconds $MIN_SECONDS --json (x$CORES concurrent)"
  wait_quiet
  load=$(load1)
  echo "calibrate_local: $cmd (load $load)" >&2
  for i in $(seq "$CORES"); do
    OPENBLAS_NUM_THREADS=1 nice -n "$NICE" "$EM" bench layer --preset "$preset" --tokens "$tokens" --min-seconds "$MIN_SECONDS" \
      --json >"$tmp/layer.$i" 2>"$tmp/log.layer.$i" &
  done
  wait
  entry "$cmd" "$load" "[$(cat "$tmp"/layer.* | grep '^{' | paste -sd, -)]"
  rm -f "$tmp"/layer.* "$tmp"/log.layer.*
}

alltoall() {
  local tokens=$1 load cmd
  cmd="mpirun -np 2 expertmesh bench moe-alltoall --backend mpi --tokens $tokens --hidden 1024 --topk 8 --experts 256 --min-seconds $MIN_SECONDS --json"
  wait_quiet
  load=$(load1)
  echo "calibrate_local: $cmd (load $load)" >&2
  nice -n "$NICE" mpirun --allow-run-as-root --oversubscribe --mca btl self,vader -np 2 "$EM" bench moe-alltoall --backend mpi \
    --tokens "$tokens" --hidden 1024 --topk 8 --experts 256 --min-seconds "$MIN_SECONDS" --json \
    >"$tmp/a2a" 2>"$tmp/a2a.log"
  entry "$cmd" "$load" "$(grep '^{' "$tmp/a2a")"
}

# The same all-to-all while $CORES busy processes (single-threaded tiny-layer
# benchmarks) share the cores, as the other stage's processes do in an
# oversubscribed PP x EP run: what waiting for a descheduled peer costs.
alltoall_shared() {
  local tokens=$1 load cmd hogs=()
  cmd="mpirun -np 2 expertmesh bench moe-alltoall --backend mpi --tokens $tokens --hidden 1024 --topk 8 --experts 256 --min-seconds $MIN_SECONDS --json, while $CORES x (OPENBLAS_NUM_THREADS=1 expertmesh bench layer --preset tiny --tokens 512) run"
  wait_quiet
  load=$(load1)
  echo "calibrate_local: $cmd (load $load)" >&2
  for i in $(seq "$CORES"); do
    OPENBLAS_NUM_THREADS=1 nice -n "$NICE" "$EM" bench layer --preset tiny --tokens 512 \
      --min-seconds $((MIN_SECONDS * 2)) --json >/dev/null 2>&1 &
    hogs+=($!)
  done
  sleep 3  # the busy processes are past their set-up
  nice -n "$NICE" mpirun --allow-run-as-root --oversubscribe --mca btl self,vader -np 2 "$EM" bench moe-alltoall \
    --backend mpi --tokens "$tokens" --hidden 1024 --topk 8 --experts 256 --min-seconds "$MIN_SECONDS" --json \
    >"$tmp/a2a" 2>"$tmp/a2a.log"
  wait "${hogs[@]}"
  printf '    {"command": "%s", "busy_processes": %s, "load_average_1m": %s, "cores_busy_percent_before": %s, "nice": %s, "result": %s}' \
    "$cmd" "$CORES" "$load" "$BUSY" "$NICE" "$(grep '^{' "$tmp/a2a")"
}

calibrate() {
  {
    echo '{"host": "'"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"'",'
    echo ' "benches": ['
    layer tiny 1; echo ,
    layer small 8; echo ,
    layer small 16; echo ,
    layer small 512; echo ,
    alltoall 16; echo ,
    alltoall 64; echo ,
    alltoall 512; echo ,
    alltoall_shared 16; echo
    echo ' ]}'
  } >"$tmp/bench.json"
  mv "$tmp/bench.json" "$OUT/bench.json"
  fit
}

# The calibrated topology from local-calibration/bench.json (no benchmarks run).
fit() {
  "$EM" plan --topology examples/topologies/cpu-2core.yaml --calibrate-from "$OUT/bench.json" >"$tmp/topo.yaml"
  { echo "name: cpu-local-calibrated"; grep -v '^name:' "$tmp/topo.yaml"; } | sed 's/^description: .*/description: "cpu-2core fitted to expertmesh bench on this host (examples\/planning\/calibrate_local.sh)"/' >"$TOPO"
  echo "calibrate_local: wrote $TOPO" >&2
}

# The expert load of bench serve's random prompts on the small fp8 checkpoint.
routing() {
  local ckpt=$BENCH_DIR/small-fp8-seed0 addr
  if [[ ! -f $ckpt/config.json ]]; then
    "$EM" checkpoint --preset small --dtype fp8 --seed 0 --out "$ckpt" >&2
  fi
  echo "calibrate_local: expert load of 16 random prompts x 64 tokens, 32 new tokens (PP1 x EP2 cluster)" >&2
  OPENBLAS_NUM_THREADS=1 mpirun --allow-run-as-root --oversubscribe --mca btl self,vader -np 3 "$EM" launch \
    --checkpoint "$ckpt" --pp 1 --ep 2 --listen 127.0.0.1:0 --address-file "$tmp/addr" >"$tmp/cluster.log" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do [[ -s $tmp/addr ]] && break; sleep 1; done
  addr=$(cat "$tmp/addr")
  for _ in $(seq 16); do
    local toks=() j
    for j in $(seq 64); do toks+=($((RANDOM % 32000))); done
    echo "{\"tokens\": [$(IFS=,; echo "${toks[*]}")]}"
  done >"$tmp/prompts.jsonl"
  "$EM" submit --server "$addr" --prompts "$tmp/prompts.jsonl" --max-new-tokens 32 >/dev/null
  sleep 2  # the last heartbeats carry the load
  "$EM" status --server "$addr" --json | jq '{source: "expertmesh status --json after one job of 16 random prompts x 64 tokens, 32 new tokens, on a PP1 x EP2 cluster of the small fp8 checkpoint (calibrate_local.sh routing)", expert_load}' >"$OUT/expert-load.json"
  "$EM" shutdown --server "$addr" >/dev/null
  wait "$pid" || true
  echo "calibrate_local: wrote $OUT/expert-load.json" >&2
}

# This host's speed is not constant (a VM: the same single-threaded SGEMM runs
# at 50 or 105 GFLOP/s per process from one minute to the next). A probe: the
# SGEMM peak of $CORES concurrent single-threaded processes, as `bench layer`
# measures it, in GFLOP/s per process (the calibration's layer runs report the
# same number).
probe() {
  for i in $(seq "$CORES"); do
    OPENBLAS_NUM_THREADS=1 nice -n "$NICE" "$EM" bench layer --preset tiny --tokens 1 --min-seconds 1 --json \
      >"$tmp/probe.$i" 2>/dev/null &
  done
  wait
  cat "$tmp"/probe.* | grep '^{' | jq -s 'map(.sgemm_peak_gflops) | add / length | floor'
  rm -f "$tmp"/probe.*
}

# The checked runs: small preset, 16 prompts x 64 tokens, 32 new tokens. Each
# is measured between two probes; a run whose probes differ from the
# calibration's SGEMM peak by more than PROBE_TOLERANCE percent (default 15) is
# repeated (up to 5 times): the machine was not in the state it was calibrated in.
RUNS=("1 2" "2 1" "2 2")
PROBE_TOLERANCE=${PROBE_TOLERANCE:-15}
serve() {
  local pp=$1 ep=$2 load cmd ref before after try ok
  ref=$(jq '[.benches[].result | arrays | .[].sgemm_peak_gflops] | add / length | floor' "$OUT/bench.json")
  cmd="expertmesh bench serve --preset small --pp $pp --ep $ep --num-prompts 16 --prompt-len 64 --max-new-tokens 32 --json"
  for try in 1 2 3 4 5; do
    wait_quiet
    load=$(load1)
    before=$(probe)
    echo "calibrate_local: $cmd (load $load, SGEMM probe $before GFLOP/s, calibrated at $ref)" >&2
    nice -n "$NICE" "$EM" bench serve --preset small --bench-dir "$BENCH_DIR" --pp "$pp" --ep "$ep" --num-prompts 16 \
      --prompt-len 64 --max-new-tokens 32 --json >"$tmp/serve" 2>"$tmp/serve.log"
    after=$(probe)
    ok=$(( (100 * (before - ref) / ref) <= PROBE_TOLERANCE && (100 * (ref - before) / ref) <= PROBE_TOLERANCE &&
           (100 * (after - ref) / ref) <= PROBE_TOLERANCE && (100 * (ref - after) / ref) <= PROBE_TOLERANCE ))
    [[ $ok == 1 ]] && break
    echo "calibrate_local: probes $before / $after GFLOP/s vs $ref calibrated: repeating the run" >&2
  done
  printf '    {"command": "%s", "load_average_1m": %s, "cores_busy_percent_before": %s, "nice": %s, "sgemm_probe_gflops_before": %s, "sgemm_probe_gflops_after": %s, "sgemm_calibrated_gflops": %s, "result": %s}' \
    "$cmd" "$load" "$BUSY" "$NICE" "$before" "$after" "$ref" "$(grep '^{' "$tmp/serve")"
}

measure() {
  {
    echo '{"host": "'"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"'",'
    echo ' "runs": ['
    local first=1
    for r in "${RUNS[@]}"; do
      [[ $first == 1 ]] || echo ,
      first=0
      # shellcheck disable=SC2086
      serve $r
    done
    echo
    echo ' ]}'
  } >"$tmp/serve.json"
  mv "$tmp/serve.json" "$OUT/serve-measured.json"
  echo "calibrate_local: wrote $OUT/serve-measured.json" >&2
}

compare() {
  for r in "${RUNS[@]}"; do
    set -- $r
    # One run per file for --measured: cut it out of the results file.
    "$EM" plan --topology "$TOPO" --workload "$OUT/workload.yaml" --phase job --measured "$OUT/serve-measured.json" \
      --pp "$1" --ep "$2"
  done
}

case $mode in
  calibrate) calibrate ;;
  fit) fit ;;
  routing) routing ;;
  measure) measure ;;
  compare) compare ;;
  all) calibrate; routing; measure; compare ;;
  *) echo "usage: $0 [calibrate|fit|routing|measure|compare|all]" >&2; exit 2 ;;
esac
