"""The GGUF conversion (`expertmesh checkpoint --gguf`) is right: llama.cpp (the
prebuilt library of node-llama-cpp, tools/llama_peer.mjs) on the GGUF of an fp32
`tiny` checkpoint makes the same greedy tokens as `expertmesh generate` on the
checkpoint itself (MLA with YaRN, sigmoid group-limited routing with the
correction bias, shared expert, routed scaling; fp32 KV cache on both sides).

Exits 77 (ctest SKIP_RETURN_CODE) with a "SKIP:" line when node-llama-cpp or
its prebuilt binary for this machine is absent.

  EXPERTMESH=build/launch/expertmesh python3 tests/e2e/test_peer.py
"""
import array
import json
import math
import os
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EM = os.environ.get("EXPERTMESH", os.path.join(ROOT, "build", "launch", "expertmesh"))
NEW = 24
# Prompts of different lengths, one sequence each (llama.cpp runs them in one context).
PROMPTS = [[5, 17, 300, 42, 7], list(range(100, 130)), [900, 3, 3, 3, 512, 64, 1000, 77, 250, 11, 12, 13]]


def read_logits(path):
    """Tensor "logits" (float32 [prompts, vocab]) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
        data = f.read()
    t = h["logits"]
    a = array.array("f")
    a.frombytes(data[t["data_offsets"][0]:t["data_offsets"][1]])
    rows, cols = t["shape"]
    return [list(a[r * cols:(r + 1) * cols]) for r in range(rows)]


def log_softmax(v):
    m = max(v)
    z = m + math.log(sum(math.exp(x - m) for x in v))
    return [x - z for x in v]


def main():
    with tempfile.TemporaryDirectory(prefix="em-peer-") as d:
        ck, gguf, prompts = os.path.join(d, "ck"), os.path.join(d, "tiny.gguf"), os.path.join(d, "p.jsonl")
        subprocess.run([EM, "checkpoint", "--preset", "tiny", "--dtype", "fp32", "--seed", "3", "--out", ck,
                        "--gguf", gguf], check=True, timeout=60, stderr=subprocess.DEVNULL)
        with open(prompts, "w") as f:
            for p in PROMPTS:
                f.write(json.dumps({"tokens": p}) + "\n")
        # One thread each: correctness does not depend on it, and ggml's spinning thread barrier is slow on an
        # oversubscribed machine.
        env = dict(os.environ, EXPERTMESH_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        g = subprocess.run([EM, "generate", "--checkpoint", ck, "--prompts", prompts, "--max-new-tokens", str(NEW),
                            "--dump-logits", os.path.join(d, "logits.safetensors")],
                           check=True, timeout=60, env=env, capture_output=True, text=True)
        ours = [json.loads(l)["tokens"] for l in g.stdout.splitlines() if l.strip()]
        p = subprocess.run(["node", os.path.join(ROOT, "tools", "llama_peer.mjs"), "--model", gguf, "--prompts",
                            prompts, "--threads", "1", "--new-tokens", str(NEW), "--kv", "f32", "--dump-probs",
                            os.path.join(d, "probs.json")],
                           timeout=80, capture_output=True, text=True)
        if p.returncode == 3:
            print(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "SKIP: node-llama-cpp unavailable")
            return 77
        if p.returncode != 0:
            print(f"llama_peer.mjs failed ({p.returncode}):\n{p.stderr[-3000:]}")
            return 1
        theirs = json.loads(p.stdout)["tokens"]
        ok = True
        for i, (a, b) in enumerate(zip(ours, theirs)):
            k = 0
            while k < min(len(a), len(b)) and a[k] == b[k]:
                k += 1
            print(f"prompt {i} ({len(PROMPTS[i])} tokens): {k}/{NEW} greedy tokens agree")
            if a != b:
                ok = False
                print(f"  expertmesh: {a}\n  llama.cpp:  {b}")
        if len(ours) != len(PROMPTS) or len(theirs) != len(PROMPTS):
            print(f"expected {len(PROMPTS)} results, got {len(ours)} and {len(theirs)}")
            ok = False
        # The distributions before the first new token: our logits (log-softmaxed) against llama.cpp's
        # probabilities. Random weights give close logits, so equal argmaxes need small differences.
        logits = read_logits(os.path.join(d, "logits.safetensors"))
        with open(os.path.join(d, "probs.json")) as f:
            probs = json.load(f)["probs"]
        worst = 0.0
        for i, (lo, pr) in enumerate(zip(logits, probs)):
            ours_lp = log_softmax(lo)
            dp = max(abs(math.exp(a) - b) for a, b in zip(ours_lp, pr))
            # log-probability difference, over tokens llama.cpp gives p > 1e-30 (float underflow)
            dl = max(abs(a - math.log(b)) for a, b in zip(ours_lp, pr) if b > 1e-30)
            worst = max(worst, dl)
            print(f"prompt {i}: first-token distribution: max |p - p'| {dp:.2e}, max |log p - log p'| {dl:.2e}")
        if worst > 1e-3:
            print(f"log-probabilities differ by {worst:.2e} > 1e-3")
            ok = False
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
