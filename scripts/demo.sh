#!/usr/bin/env bash
# The main job on one machine: install dependencies, build, generate the tiny
# model with the real DeepSeek-V3 tokenizer (tiny-text: random weights, so the
# text it writes is gibberish), serve it on a local PP2 x EP2 cluster under
# mpirun (rank 0 the coordinator with its OpenAI-compatible HTTP API, ranks 1-4
# the workers, MPI data plane), stream a chat answer with `expertmesh chat`,
# submit a batch of prompts over gRPC, print the generated tokens and the
# cluster status, rebalance the experts live and check that the prompts give
# the same tokens on the new placement, and shut the cluster down.
#   PP=2 EP=2 PROMPTS=8 NEW_TOKENS=16 HTTP_PORT=8000 bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PP=${PP:-2}
EP=${EP:-2}
NUM_PROMPTS=${PROMPTS:-8}
NEW=${NEW_TOKENS:-16}
BUILD=${BUILD:-build}
OUT=${OUT:-out/demo}
HTTP_PORT=${HTTP_PORT:-8000}

bash scripts/install-deps.sh
echo "== build"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD" --target expertmesh -j "$(nproc)"
EM="$BUILD/launch/expertmesh"

mkdir -p "$OUT"
CKPT="$OUT/ckpt-text"
if [ ! -f "$CKPT/tokenizer.json" ]; then
  echo "== generate the tiny checkpoint (random weights) with the real DeepSeek-V3 tokenizer"
  "$EM" checkpoint --preset tiny-text --dtype fp8 --seed 0 --tokenizer deepseek-v3 --out "$CKPT"
fi
/usr/bin/python3 - "$OUT/prompts.jsonl" "$NUM_PROMPTS" <<'PY'
import json, random, sys
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        f.write(json.dumps({"tokens": [rng.randrange(1024) for _ in range(1 + 3 * i)]}) + "\n")
PY

echo "== start the cluster: mpirun -np $((1 + PP * EP)) expertmesh launch --pp $PP --ep $EP --http-listen 127.0.0.1:$HTTP_PORT"
rm -f "$OUT/address"
export OPENBLAS_NUM_THREADS=1   # ranks share the cores
mpirun --allow-run-as-root --oversubscribe --mca btl self,vader -np $((1 + PP * EP)) \
  "$EM" launch --checkpoint "$CKPT" --pp "$PP" --ep "$EP" --listen 127.0.0.1:0 \
  --address-file "$OUT/address" --http-listen "127.0.0.1:$HTTP_PORT" >"$OUT/cluster.log" 2>&1 &
MPIRUN=$!
cleanup() { kill "$MPIRUN" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 600); do
  [ -s "$OUT/address" ] && break
  kill -0 "$MPIRUN" 2>/dev/null || { cat "$OUT/cluster.log"; echo "cluster failed to start" >&2; exit 1; }
  sleep 0.1
done
SERVER=$(cat "$OUT/address")
for _ in $(seq 600); do
  "$EM" status --server "$SERVER" --json 2>/dev/null | grep -q '"serving": *true' && break
  sleep 0.2
done
echo "== cluster at $SERVER is serving (gRPC); OpenAI-compatible HTTP API at http://127.0.0.1:$HTTP_PORT"

# Greedy (--temperature 0): the same answer every run.
echo "== a chat answer, streamed token by token (random weights: the words are gibberish)"
echo "\$ expertmesh chat --server 127.0.0.1:$HTTP_PORT --max-tokens 48 --temperature 0 --message 'Hello! Who are you?'"
"$EM" chat --server "127.0.0.1:$HTTP_PORT" --max-tokens 48 --temperature 0 --message "Hello! Who are you?"

echo "== submit $NUM_PROMPTS prompts, $NEW new tokens each"
"$EM" submit --server "$SERVER" --prompts "$OUT/prompts.jsonl" --max-new-tokens "$NEW" | tee "$OUT/before.jsonl"
sleep 1.5   # one heartbeat: the expert load reaches the coordinator
echo "== cluster status"
"$EM" status --server "$SERVER"
echo "== rebalance the experts live from the observed load (EPLB), then the same prompts again"
"$EM" rebalance --server "$SERVER" --force
"$EM" submit --server "$SERVER" --prompts "$OUT/prompts.jsonl" --max-new-tokens "$NEW" > "$OUT/after.jsonl"
cmp -s "$OUT/before.jsonl" "$OUT/after.jsonl" || { echo "different tokens after the rebalance" >&2; exit 1; }
"$EM" status --server "$SERVER" | grep "expert placement"
echo "== the same tokens on the new placement"
echo "== shut down"
"$EM" shutdown --server "$SERVER"
wait "$MPIRUN"
trap - EXIT
echo "== done (log: $OUT/cluster.log)"
