#!/usr/bin/env python3
"""The MTP module and `expertmesh generate --speculative mtp`.

  python3 test_speculative.py --expertmesh build/launch/expertmesh [--workdir DIR]

  * MTP logits: `--dump-mtp-logits` (the MTP module's logits at every prompt
    position) against tests/reference/ds3_ref.py Model.mtp_forward (float64,
    no cache) on tiny fp32 and fp8 checkpoints: relative error <= 1e-4 per
    position, the bound of the main-model reference tests.
  * Speculative == plain: the generated tokens with --speculative mtp equal
    those without it (and the reference's greedy tokens), for 8 prompts of
    different lengths (two of length 1) x 13 tokens in one batch, with stop
    tokens, with max_new_tokens 1..4, and when sampling.
    With random weights the MTP's drafts are almost never accepted, which
    exercises only the reject + rollback path. So the same checks also run on
    a "doctored" copy of the fp32 checkpoint (see doctor()) in which the MTP
    layer predicts the main model well but not perfectly: drafts are accepted
    about half of the time, so both the accept path (two tokens per step, MTP
    segments of two positions) and the rollback of rejected drafts run with
    attention that matters.
  * Bad flag combinations exit 2 (or 1 for the checkpoint) with one named error.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
import ds3_ref as ref  # noqa: E402
from cli_io import make_tiny_checkpoints, parse_output, write_prompts  # noqa: E402

ARGS = None
SEED = 11
NEW_TOKENS = 13
LOGITS_TOL = 1e-4
PROMPT_LENGTHS = [1, 5, 17, 40, 2, 29, 1, 9]
ROUTE_MARGIN = 2e-6       # as in test_generate.py: routing this close to a tie may flip under fp32 noise
ARGMAX_MARGIN = 1e-4      # greedy top-2 logit gap relative to max |logit|
DOCTOR_SCALE = 0.6        # residual-branch scale of the doctored main model (acceptance ~0.5)
STATS_RE = re.compile(r"speculative mtp: (\d+) drafts, (\d+) accepted \(acceptance rate ([0-9.]+)\); "
                      r"([0-9.]+) tokens per sequence per main-model decode step")
ACCEPTANCE = {}           # checkpoint -> acceptance rate seen (for the summary)
MAX_ERR = {}


def run(args, timeout=180):
    return subprocess.run([ARGS.expertmesh] + args, capture_output=True, text=True, timeout=timeout)


def doctor(src, dst, scale):
    """A copy of an fp32 checkpoint whose MTP layer approximates the main
    model: main layers' residual branches (o_proj, down_proj) scaled by
    `scale`, so the main model is a bigram model (h_i ~ embed(t_i)) plus
    attention/MoE corrections; the MTP block is made the identity (o_proj and
    down_proj zero), eh_proj = [I | 0] (embedding part only), enorm = 1 and
    the MTP embedding / shared head = the main embedding / model.norm /
    lm_head, so the MTP predicts bigram(t_{i+1}) for t_{i+2}."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    L, H = cfg["num_hidden_layers"], cfg["hidden_size"]
    full = ref.Checkpoint(src)
    p = "model.layers.%d." % L
    replace = {p + "eh_proj.weight": np.concatenate([np.eye(H), np.zeros((H, H))], axis=1),
               p + "enorm.weight": np.ones(H),
               p + "embed_tokens.weight": full.get("model.embed_tokens.weight"),
               p + "shared_head.norm.weight": full.get("model.norm.weight"),
               p + "shared_head.head.weight": full.get("lm_head.weight")}
    for fn in os.listdir(src):
        if not fn.endswith(".safetensors"):
            shutil.copy(os.path.join(src, fn), os.path.join(dst, fn))
            continue
        t = ref.read_safetensors(os.path.join(src, fn))
        out = {}
        for n, v in t.items():
            if n.startswith("model.layers.") and (n.endswith("o_proj.weight") or n.endswith("down_proj.weight")):
                v = v * (scale if int(n.split(".")[2]) < L else 0.0)
            out[n] = np.asarray(replace.get(n, v), dtype=np.float32)
        ref.write_safetensors(os.path.join(dst, fn), out)


class Env:
    ready = False

    @classmethod
    def setup(cls):
        if cls.ready:
            return
        os.makedirs(ARGS.workdir, exist_ok=True)
        cls.ckpt = make_tiny_checkpoints(run, ARGS.workdir, ("fp32", "fp8"), SEED)
        d = os.path.join(ARGS.workdir, "tiny_doctored")
        shutil.rmtree(d, ignore_errors=True)
        doctor(cls.ckpt["fp32"], d, DOCTOR_SCALE)
        cls.ckpt["doctored"] = d
        cls.models = {k: ref.Model(v) for k, v in cls.ckpt.items()}
        cls.make_prompts()
        cls.prompt_file = os.path.join(ARGS.workdir, "prompts.jsonl")
        write_prompts(cls.prompt_file, cls.prompts)
        cls.ready = True

    @classmethod
    def make_prompts(cls):
        """Random prompts whose reference computation (greedy NEW_TOKENS steps
        and the MTP over prompt + first token, every checkpoint) stays clear of
        routing and argmax ties; redrawn deterministically otherwise."""
        rng = np.random.default_rng(4321)
        cls.prompts, cls.greedy, cls.mtp = [], {k: [] for k in cls.models}, {k: [] for k in cls.models}
        for i, n in enumerate(PROMPT_LENGTHS):
            for attempt in range(16):
                p = rng.integers(0, 1024, size=n).tolist()
                res, ok = {}, True
                for k, m in cls.models.items():
                    m.reset_margins()
                    toks, lg = m.greedy(p, NEW_TOKENS)
                    mtp = m.mtp_forward(p + toks[:1])
                    gaps = [np.diff(np.sort(l)[-2:])[0] / np.abs(l).max() for l in lg]
                    if m.min_route_margin < ROUTE_MARGIN or min(gaps) < ARGMAX_MARGIN:
                        sys.stderr.write("prompt %d attempt %d (%s): near-tie (routing margin %.2g, argmax gap "
                                         "%.2g); redrawing\n" % (i, attempt, k, m.min_route_margin, min(gaps)))
                        ok = False
                        break
                    res[k] = (toks, mtp)
                if ok:
                    break
            else:
                raise RuntimeError("could not draw a tie-free prompt of length %d" % n)
            cls.prompts.append(p)
            for k in cls.models:
                cls.greedy[k].append(res[k][0])
                cls.mtp[k].append(res[k][1])


def setUpModule():
    Env.setup()


def tearDownModule():
    sys.stderr.write("MTP logits max relative error vs reference: %s; acceptance rates: %s\n" % (
        ", ".join("%s %.2e" % kv for kv in sorted(MAX_ERR.items())),
        ", ".join("%s %.3f" % kv for kv in sorted(ACCEPTANCE.items()))))


class MtpMatchesReference(unittest.TestCase):
    def check(self, key):
        dump = os.path.join(ARGS.workdir, "mtp_%s.safetensors" % key)
        if os.path.exists(dump):
            os.remove(dump)
        r = run(["generate", "--checkpoint", Env.ckpt[key], "--prompts", Env.prompt_file, "--max-new-tokens", "1",
                 "--speculative", "mtp", "--dump-mtp-logits", dump])
        self.assertEqual(r.returncode, 0, r.stderr)
        got = parse_output(self, r.stdout, len(Env.prompts))
        f = ref.SafetensorsFile(dump)
        for i, p in enumerate(Env.prompts):
            self.assertEqual(got[i], Env.greedy[key][i][:1], "%s prompt %d: first token" % (key, i))
            name = "mtp_logits.%d" % i
            self.assertEqual(f.entry(name)["dtype"], "F32")
            self.assertEqual(f.entry(name)["shape"], [len(p), 1024])
            lg = f.get(name)
            want = Env.mtp[key][i]
            for j in range(len(p)):
                e = ref.rel_err(lg[j], want[j])
                MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), e)
                self.assertLessEqual(e, LOGITS_TOL, "%s prompt %d (length %d) position %d: MTP logits relative "
                                     "error %.3g" % (key, i, len(p), j, e))

    def test_fp32(self):
        self.check("fp32")

    def test_fp8(self):
        self.check("fp8")

    def test_doctored(self):
        self.check("doctored")


class SpeculativeEqualsPlain(unittest.TestCase):
    def generate(self, key, n, extra=(), speculative=True, prompts_file=None):
        args = ["generate", "--checkpoint", Env.ckpt[key], "--prompts", prompts_file or Env.prompt_file,
                "--max-new-tokens", str(n)] + list(extra)
        if speculative:
            args += ["--speculative", "mtp"]
        r = run(args)
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(prompts_file or Env.prompt_file) as f:
            n_prompts = sum(1 for l in f if l.strip())
        toks = parse_output(self, r.stdout, n_prompts)
        stats = None
        if speculative:
            m = STATS_RE.search(r.stderr)
            self.assertIsNotNone(m, "no speculative statistics on stderr:\n" + r.stderr)
            drafts, accepted, rate, per_step = int(m.group(1)), int(m.group(2)), float(m.group(3)), float(m.group(4))
            self.assertLessEqual(accepted, drafts)
            self.assertAlmostEqual(rate, accepted / drafts if drafts else 0.0, places=3)
            self.assertTrue(1.0 <= per_step <= 2.0 or (per_step == 0 and n <= 1), r.stderr)
            stats = (drafts, accepted, rate, per_step)
        else:
            self.assertNotIn("speculative", r.stderr)
        return toks, stats

    def check_greedy(self, key):
        plain, _ = self.generate(key, NEW_TOKENS, speculative=False)
        spec, st = self.generate(key, NEW_TOKENS)
        self.assertEqual(plain, Env.greedy[key], "%s: plain greedy vs reference" % key)
        for i in range(len(plain)):
            self.assertEqual(spec[i], plain[i], "%s prompt %d (length %d): speculative vs plain" % (
                key, i, len(Env.prompts[i])))
        ACCEPTANCE[key] = st[2]
        return st

    def test_random_fp32(self):
        drafts, _, _, _ = self.check_greedy("fp32")
        self.assertGreater(drafts, 0)

    def test_random_fp8(self):
        self.check_greedy("fp8")

    def test_doctored_accepts_and_rejects(self):
        drafts, accepted, rate, per_step = self.check_greedy("doctored")
        # both paths ran: accepted drafts (two tokens in a step) and rejected ones (rollback)
        self.assertGreater(accepted, 0.2 * drafts, "doctored MTP: too few drafts accepted to test the accept path")
        self.assertLess(accepted, drafts, "doctored MTP: no draft rejected, the rollback path did not run")
        self.assertGreater(per_step, 1.1)

    def test_stop_tokens(self):
        """Stop ids taken from the plain output at different steps; the sequence
        ends right after the first one, with or without speculation."""
        for key in ("doctored", "fp32"):
            greedy = Env.greedy[key]
            stop = sorted({greedy[0][4], greedy[2][1], greedy[3][7], greedy[5][10]})
            extra = ["--stop-token-ids", ",".join(map(str, stop))]
            plain, _ = self.generate(key, NEW_TOKENS, extra, speculative=False)
            spec, _ = self.generate(key, NEW_TOKENS, extra)
            self.assertEqual(spec, plain, "%s with stop tokens %s" % (key, stop))
            ended = 0
            for i, toks in enumerate(plain):
                cut = next((k for k, t in enumerate(greedy[i]) if t in stop), None)
                want = greedy[i] if cut is None else greedy[i][:cut + 1]
                self.assertEqual(toks, want, "%s prompt %d" % (key, i))
                ended += cut is not None and cut + 1 < NEW_TOKENS
            self.assertGreaterEqual(ended, 3)

    def test_max_new_tokens(self):
        for key in ("doctored", "fp32"):
            for n in (0, 1, 2, 3, 4):
                spec, _ = self.generate(key, n)
                self.assertEqual(spec, [g[:n] for g in Env.greedy[key]], "%s max_new_tokens %d" % (key, n))

    def test_sampling(self):
        """Drafts are accepted when they equal the token the main model samples
        (seeded per sequence and step), so sampled output is that of plain
        generation too."""
        samp = ["--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "5"]
        for key in ("doctored", "fp32"):
            plain, _ = self.generate(key, NEW_TOKENS, samp, speculative=False)
            spec, _ = self.generate(key, NEW_TOKENS, samp)
            self.assertEqual(spec, plain, key)
            self.assertNotEqual(plain, Env.greedy[key], key)

    def test_single_prompt(self):
        """A prompt alone gives the tokens it gets in the batch (length 1 and 40)."""
        for i in (0, 3):
            pf = os.path.join(ARGS.workdir, "single_%d.jsonl" % i)
            write_prompts(pf, [Env.prompts[i]])
            spec, _ = self.generate("doctored", NEW_TOKENS, prompts_file=pf)
            self.assertEqual(spec[0], Env.greedy["doctored"][i], "prompt %d alone" % i)


class BadFlags(unittest.TestCase):
    def expect_error(self, args, fragments, code=2):
        r = run(["generate", "--checkpoint", Env.ckpt["fp32"], "--prompts", Env.prompt_file,
                 "--max-new-tokens", "3"] + args)
        self.assertEqual(r.returncode, code, "args %s: rc %d, stderr %s" % (args, r.returncode, r.stderr))
        self.assertEqual(r.stdout, "")
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        self.assertTrue(any(all(f.lower() in l.lower() for f in fragments) for l in lines),
                        "args %s: no stderr line with %s:\n%s" % (args, fragments, r.stderr))

    def test_unknown_method(self):
        self.expect_error(["--speculative", "eagle"], ["--speculative eagle", "unknown", "mtp"])

    def test_dump_without_speculative(self):
        self.expect_error(["--dump-mtp-logits", os.path.join(ARGS.workdir, "x.safetensors")],
                          ["--dump-mtp-logits", "--speculative mtp"])

    def test_cuda(self):
        self.expect_error(["--speculative", "mtp", "--device", "cuda"], ["--speculative mtp", "CPU engine only"])

    def test_checkpoint_without_mtp(self):
        d = os.path.join(ARGS.workdir, "no_mtp")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for fn in os.listdir(Env.ckpt["fp32"]):
            os.symlink(os.path.abspath(os.path.join(Env.ckpt["fp32"], fn)), os.path.join(d, fn))
        os.remove(os.path.join(d, "config.json"))
        with open(os.path.join(Env.ckpt["fp32"], "config.json")) as f:
            cfg = json.load(f)
        cfg["num_nextn_predict_layers"] = 0
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
        r = run(["generate", "--checkpoint", d, "--prompts", Env.prompt_file, "--max-new-tokens", "3"])
        self.assertEqual(r.returncode, 0, "plain generation needs no MTP layer: " + r.stderr)
        r = run(["generate", "--checkpoint", d, "--prompts", Env.prompt_file, "--max-new-tokens", "3",
                 "--speculative", "mtp"])
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(r.stdout, "")
        self.assertIn("num_nextn_predict_layers = 0", r.stderr)
        self.assertIn("--speculative mtp", r.stderr)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--expertmesh", required=True)
    ap.add_argument("--workdir", default="speculative_tmp")
    ARGS, rest = ap.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
