#!/usr/bin/env python3
"""`expertmesh generate` on tiny checkpoints against the independent reference.

  python3 test_generate.py --expertmesh build/launch/expertmesh [--workdir DIR]

For fp32, bf16 (sharded) and fp8 tiny checkpoints written by
`expertmesh checkpoint` (fixed seed), one batch of prompts of different
lengths (1..40 tokens, and one of 133):
  * the dumped prefill logits are within 1e-4 relative (||diff|| / ||ref||,
    per prompt) of tests/reference/ds3_ref.py (float64, no KV cache);
  * the greedy tokens (NEW_TOKENS per prompt, decoded with the engine's KV
    cache) equal the reference's, which recomputes everything each step;
  * the engine's cached decode equals recompute also in logits: a second run
    on prompt + the first DECODE_CHECK generated tokens dumps logits that match
    the reference's logits at that later step.
Plus: output format, batch independence, sampling determinism, and the
weights of the three dtypes agree within their rounding.
"""

import argparse
import os
import subprocess
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
import ds3_ref as ref  # noqa: E402
from cli_io import make_tiny_checkpoints, parse_output, write_prompts  # noqa: E402

ARGS = None
SEED = 11
NEW_TOKENS = 10
DECODE_CHECK = 6          # generated tokens fed back for the later-step check
LOGITS_TOL = 1e-4
PROMPT_LENGTHS = [1, 5, 17, 40, 2, 29, 133]   # 133: prompt + generated tokens pass YaRN's original 128 positions
DTYPES = ("fp32", "bf16", "fp8")
MAX_ERR = {}              # dtype -> largest relative logits error seen


def run(args, timeout=120):
    r = subprocess.run([ARGS.expertmesh] + args, capture_output=True, text=True, timeout=timeout)
    return r


ROUTE_MARGIN = 2e-6      # routing decisions this far from a tie (engine fp32 noise in scores: ~1e-7)
ARGMAX_MARGIN = 1e-4     # greedy top-2 logit gap, relative to max |logit|


def make_prompts(models):
    """Random prompts of PROMPT_LENGTHS whose reference computation (all
    NEW_TOKENS greedy steps, every dtype) stays clear of ties: in routing
    (fp32 noise could pick another expert) and in the argmax. A prompt that
    comes too close is redrawn (deterministically)."""
    rng = np.random.default_rng(1234)
    prompts, results = [], {dt: [] for dt in models}
    for i, n in enumerate(PROMPT_LENGTHS):
        for attempt in range(16):
            p = rng.integers(0, 1024, size=n).tolist()
            if i == 1:
                p[0] = 0         # the edges of the vocabulary
            if i == 3:
                p[-1] = 1023
            res, ok = {}, True
            for dt, m in models.items():
                m.reset_margins()
                toks, lg = m.greedy(p, NEW_TOKENS)
                res[dt] = (toks, lg)
                gaps = [np.diff(np.sort(l)[-2:])[0] / np.abs(l).max() for l in lg]
                if m.min_route_margin < ROUTE_MARGIN or min(gaps) < ARGMAX_MARGIN:
                    sys.stderr.write("prompt %d attempt %d (%s): near-tie (routing margin %.2g, argmax gap %.2g); "
                                     "redrawing\n" % (i, attempt, dt, m.min_route_margin, min(gaps)))
                    ok = False
                    break
            if ok:
                break
        else:
            raise RuntimeError("could not draw a tie-free prompt of length %d" % n)
        prompts.append(p)
        for dt in models:
            results[dt].append(res[dt])
    return prompts, results


class Env:
    """Checkpoints, prompts and reference results, built once."""
    ready = False

    @classmethod
    def setup(cls):
        if cls.ready:
            return
        os.makedirs(ARGS.workdir, exist_ok=True)
        cls.ckpt = make_tiny_checkpoints(run, ARGS.workdir, DTYPES, SEED,
                                         extra={"bf16": ["--shard_size", "4000000"]})  # several shards + index
        cls.models = {dt: ref.Model(cls.ckpt[dt]) for dt in DTYPES}
        cls.prompts, cls.ref = make_prompts(cls.models)
        cls.prompt_file = os.path.join(ARGS.workdir, "prompts.jsonl")
        write_prompts(cls.prompt_file, cls.prompts)
        cls.ready = True

    @classmethod
    def reference(cls, dt):
        """[(tokens, [logits per step])] per prompt, by full recompute."""
        return cls.ref[dt]


def setUpModule():
    Env.setup()


def tearDownModule():
    sys.stderr.write("max relative logits error vs reference: %s\n" % ", ".join(
        "%s %.2e" % kv for kv in sorted(MAX_ERR.items())))


class GreedyMatchesReference(unittest.TestCase):
    def check_dtype(self, dt):
        ck = Env.ckpt[dt]
        want = Env.reference(dt)
        dump = os.path.join(ARGS.workdir, "logits_%s.safetensors" % dt)
        if os.path.exists(dump):
            os.remove(dump)
        r = run(["generate", "--checkpoint", ck, "--prompts", Env.prompt_file,
                 "--max-new-tokens", str(NEW_TOKENS), "--dump-logits", dump])
        self.assertEqual(r.returncode, 0, r.stderr)
        got = parse_output(self, r.stdout, len(Env.prompts))
        f = ref.SafetensorsFile(dump)
        self.assertEqual(f.entry("logits")["dtype"], "F32")
        self.assertEqual(f.entry("logits")["shape"], [len(Env.prompts), 1024])
        logits = f.get("logits")
        for i, (toks, lg) in enumerate(want):
            e = ref.rel_err(logits[i], lg[0])
            MAX_ERR[dt] = max(MAX_ERR.get(dt, 0.0), e)
            self.assertLessEqual(e, LOGITS_TOL, "%s prompt %d (length %d): prefill logits relative error %.3g" % (
                dt, i, len(Env.prompts[i]), e))
        for i, (toks, lg) in enumerate(want):
            self.assertEqual(got[i], toks, "%s prompt %d (length %d): greedy tokens differ from the reference; "
                             "reference top-2 margin at the first difference: %s" % (
                                 dt, i, len(Env.prompts[i]), margin_at_first_diff(got[i], toks, lg)))

        # Later step: prompt + the first DECODE_CHECK generated tokens, prefilled
        # from scratch by the engine, must give the reference's logits there
        # and continue with the same tokens.
        later = [p + t[:DECODE_CHECK] for p, (t, _) in zip(Env.prompts, want)]
        pf = os.path.join(ARGS.workdir, "prompts_later_%s.jsonl" % dt)
        write_prompts(pf, later)
        dump2 = os.path.join(ARGS.workdir, "logits_later_%s.safetensors" % dt)
        rest = NEW_TOKENS - DECODE_CHECK
        r = run(["generate", "--checkpoint", ck, "--prompts", pf, "--max-new-tokens", str(rest),
                 "--dump-logits", dump2])
        self.assertEqual(r.returncode, 0, r.stderr)
        got2 = parse_output(self, r.stdout, len(later))
        logits2 = ref.SafetensorsFile(dump2).get("logits")
        for i, (toks, lg) in enumerate(want):
            e = ref.rel_err(logits2[i], lg[DECODE_CHECK])
            MAX_ERR[dt] = max(MAX_ERR.get(dt, 0.0), e)
            self.assertLessEqual(e, LOGITS_TOL, "%s prompt %d: logits after %d generated tokens: relative "
                                 "error %.3g" % (dt, i, DECODE_CHECK, e))
            self.assertEqual(got2[i], toks[DECODE_CHECK:], "%s prompt %d: continuation" % (dt, i))

    def test_fp32(self):
        self.check_dtype("fp32")

    def test_bf16(self):
        self.check_dtype("bf16")

    def test_fp8(self):
        self.check_dtype("fp8")


def margin_at_first_diff(a, b, logits):
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            top = np.sort(logits[k])[-2:]
            return "step %d: engine %d, reference %d, reference logits top-2 gap %.3g" % (k, x, y, top[1] - top[0])
    return "lengths %d vs %d" % (len(a), len(b))


class EngineBehaviour(unittest.TestCase):
    def generate(self, extra, prompts_file=None, n=NEW_TOKENS, dt="fp32"):
        r = run(["generate", "--checkpoint", Env.ckpt[dt], "--prompts", prompts_file or Env.prompt_file,
                 "--max-new-tokens", str(n)] + extra)
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(prompts_file or Env.prompt_file) as f:
            n_prompts = sum(1 for l in f if l.strip())
        return parse_output(self, r.stdout, n_prompts)

    def test_batch_independence(self):
        """A prompt alone gives the same tokens and logits as inside the batch."""
        batch_dump = os.path.join(ARGS.workdir, "batch.safetensors")
        batch = self.generate(["--dump-logits", batch_dump])
        for i in (0, 3):
            pf = os.path.join(ARGS.workdir, "single_%d.jsonl" % i)
            write_prompts(pf, [Env.prompts[i]])
            dump = os.path.join(ARGS.workdir, "single_%d.safetensors" % i)
            alone = self.generate(["--dump-logits", dump], pf)
            self.assertEqual(alone[0], batch[i], "prompt %d alone vs in the batch" % i)
            e = ref.rel_err(ref.SafetensorsFile(dump).get("logits")[0],
                            ref.SafetensorsFile(batch_dump).get("logits")[i])
            self.assertLessEqual(e, 1e-5, "prompt %d: logits alone vs in the batch differ by %.3g" % (i, e))

    def test_zero_new_tokens(self):
        """--max-new-tokens 0: empty token lists, prefill logits still dumped."""
        dump = os.path.join(ARGS.workdir, "zero.safetensors")
        out = self.generate(["--dump-logits", dump], n=0)
        self.assertEqual(out, [[] for _ in Env.prompts])
        lg = ref.SafetensorsFile(dump).get("logits")
        for i, (_, want) in enumerate(Env.reference("fp32")):
            self.assertLessEqual(ref.rel_err(lg[i], want[0]), LOGITS_TOL, "prompt %d" % i)

    def test_sampling(self):
        greedy = [t for t, _ in Env.reference("fp32")]
        samp = ["--temperature", "0.9", "--top-k", "50", "--top-p", "0.95"]
        a = self.generate(samp + ["--seed", "5"])
        b = self.generate(samp + ["--seed", "5"])
        c = self.generate(samp + ["--seed", "6"])
        self.assertEqual(a, b, "same seed must give the same tokens")
        self.assertNotEqual(a, c, "different seeds gave identical samples for all prompts")
        self.assertNotEqual(a, greedy, "sampling at temperature 0.9 reproduced greedy for every prompt")
        self.assertEqual(self.generate(["--temperature", "0", "--seed", "9"]), greedy,
                         "--temperature 0 must be greedy")
        self.assertEqual(self.generate(["--temperature", "1.5", "--top-k", "1", "--seed", "9"]), greedy,
                         "--top-k 1 must be greedy")
        for toks in a + c:
            self.assertEqual(len(toks), NEW_TOKENS)
            self.assertTrue(all(0 <= t < 1024 for t in toks), toks)

    def test_sampling_respects_top_k(self):
        """With top-k 2, every sampled token is one of the reference's top-2 at its step
        (checked on the first token, whose logits do not depend on earlier draws)."""
        lg = [l[0] for _, l in Env.reference("fp32")]
        seen = set()
        for seed in range(6):
            out = self.generate(["--temperature", "5", "--top-k", "2", "--seed", str(seed)], n=1)
            for i, toks in enumerate(out):
                top2 = set(np.argsort(-lg[i])[:2].tolist())
                self.assertIn(toks[0], top2, "prompt %d seed %d" % (i, seed))
                seen.add((i, toks[0]))
        self.assertGreater(len(seen), len(lg), "top-k 2 at temperature 5 never drew the second token")


class CheckpointDtypes(unittest.TestCase):
    def test_dtypes_agree(self):
        """bf16 and fp8 weights are the fp32 ones (same seed) within their rounding:
        bf16 relative 2^-8; fp8 e4m3 per 128x128 block: relative 2^-4 of the value,
        or half a subnormal step (2^-10) of the block scale."""
        ck = {dt: ref.Checkpoint(Env.ckpt[dt]) for dt in DTYPES}
        names = [n for n in ck["fp32"].names() if "experts.3." in n or ".experts." not in n]
        n_fp8 = 0
        for n in names:
            w32 = ck["fp32"].get(n)
            wb = ck["bf16"].get(n)
            self.assertTrue(np.all(np.abs(wb - w32) <= 2.0 ** -8 * np.abs(w32) + 1e-38), n)
            w8 = ck["fp8"].get(n)
            if ck["fp8"].dtype(n) == "F8_E4M3":
                n_fp8 += 1
                s = ck["fp8"].get(n + "_scale_inv")
                br, bc = ck["fp8"].block
                sfull = np.repeat(np.repeat(s, br, 0), bc, 1)[:w32.shape[0], :w32.shape[1]]
                bound = np.maximum(2.0 ** -4 * np.abs(w32), 2.0 ** -10 * sfull) * (1 + 1e-6)
                self.assertTrue(np.all(np.abs(w8 - w32) <= bound), n)
            else:
                self.assertTrue(np.all(np.abs(w8 - w32) <= 2.0 ** -8 * np.abs(w32) + 1e-38), n)
        self.assertGreater(n_fp8, 20)
        # the correction bias is F32 in every dtype
        b = "model.layers.1.mlp.gate.e_score_correction_bias"
        for dt in DTYPES:
            self.assertEqual(ck[dt].dtype(b), "F32", dt)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--expertmesh", required=True)
    ap.add_argument("--workdir", default="generate_tmp")
    ARGS, rest = ap.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
