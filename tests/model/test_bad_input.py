#!/usr/bin/env python3
"""`expertmesh generate` on bad input: broken checkpoints, configs, prompts, flags.

  python3 test_bad_input.py --expertmesh build/launch/expertmesh [--workdir DIR]

Each case copies a good tiny checkpoint (fp8: it has block scales; links for
the files left alone), breaks one thing by editing bytes, and expects:
  * exit code != 0 and not a signal (no crash), within a timeout (no hang);
  * nothing on stdout (no partial output);
  * one stderr line naming the file / tensor / field and what was expected
    (checked as: some single line contains every expected fragment,
    case-insensitively).
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import unittest

ARGS = None
GOOD = None            # the good checkpoint folder
SHARD = "model-00001-of-00001.safetensors"
INDEX = "model.safetensors.index.json"
TIMEOUT = 60
PROMPT = {"tokens": [5, 6, 7]}
RESULTS = []           # (case, ok, first stderr line) for the summary


def setUpModule():
    global GOOD
    os.makedirs(ARGS.workdir, exist_ok=True)
    GOOD = os.path.join(ARGS.workdir, "good_fp8")
    shutil.rmtree(GOOD, ignore_errors=True)
    r = subprocess.run([ARGS.expertmesh, "checkpoint", "--preset", "tiny", "--dtype", "fp8", "--seed", "3",
                        "--out", GOOD], capture_output=True, text=True, timeout=TIMEOUT)
    if r.returncode != 0:
        raise RuntimeError("cannot write the good checkpoint: " + r.stderr)
    assert os.path.exists(os.path.join(GOOD, SHARD)), os.listdir(GOOD)


def tearDownModule():
    bad = [r for r in RESULTS if not r[1]]
    sys.stderr.write("%d bad-input cases, %d failed\n" % (len(RESULTS), len(bad)))
    if ARGS.show:
        for case, _, line in RESULTS:
            sys.stderr.write("  %-40s %s\n" % (case, line[:400]))
    for case, _, line in bad:
        sys.stderr.write("  FAILED %-40s %s\n" % (case, line[:200]))


# ---- editing helpers ----

CLONES = []


def clone(name):
    """A copy of the good checkpoint in which every file is a hard link (or a
    copy); replace a file before editing it (see `own`)."""
    # neutral folder names, so that an expected fragment never matches the path
    CLONES.append(name)
    d = os.path.join(ARGS.workdir, "ck%02d" % len(CLONES))
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for fn in os.listdir(GOOD):
        src, dst = os.path.join(GOOD, fn), os.path.join(d, fn)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy(src, dst)
    return d


def own(path):
    """Breaks the hard link so edits do not reach the good checkpoint."""
    with open(path, "rb") as f:
        data = f.read()
    os.remove(path)
    with open(path, "wb") as f:
        f.write(data)
    return data


def read_st(path):
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    return json.loads(buf[8:8 + n]), buf[8 + n:]


def write_st(path, header, data):
    if os.path.exists(path):
        os.remove(path)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def edit_header(d, fn):
    """Applies fn(header) to the shard's header (data unchanged)."""
    p = os.path.join(d, SHARD)
    h, data = read_st(p)
    fn(h)
    write_st(p, h, data)


def edit_json(path, fn):
    with open(path) as f:
        j = json.load(f)
    fn(j)
    os.remove(path)
    with open(path, "w") as f:
        json.dump(j, f, indent=1)


def drop_from_index(d, names):
    def f(j):
        for n in names:
            del j["weight_map"][n]
    edit_json(os.path.join(d, INDEX), f)


def set_path(j, dotted, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        j = j[k]
    j[keys[-1]] = value


class BadInputTest(unittest.TestCase):
    def expect_error(self, case, args, fragments, prompts=None, stdin_prompts=True):
        if prompts is None:
            prompts = [json.dumps(PROMPT)]
        pf = os.path.join(ARGS.workdir, "prompts%02d.jsonl" % len(RESULTS))
        with open(pf, "w") as f:
            f.write("".join(l + "\n" for l in prompts))
        cmd = [ARGS.expertmesh, "generate", "--prompts", pf, "--max-new-tokens", "3"] + args
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            RESULTS.append((case, False, "hang: no exit within %d s" % TIMEOUT))
            self.fail("%s: no exit within %d s (hang)" % (case, TIMEOUT))
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        hit = [l for l in lines if all(fr.lower() in l.lower() for fr in fragments)]
        problems = []
        if r.returncode == 0:
            problems.append("exit code 0")
        elif r.returncode < 0 or r.returncode >= 128:
            problems.append("killed by a signal / crashed (exit %d)" % r.returncode)
        if r.stdout.strip():
            problems.append("partial stdout: %r" % r.stdout[:200])
        if not hit:
            problems.append("no stderr line contains all of %s" % fragments)
        RESULTS.append((case, not problems, "; ".join(problems) + " | stderr: " + " / ".join(lines)[:300]))
        self.assertFalse(problems, "%s: %s\n  command: %s\n  stderr:\n%s" % (
            case, "; ".join(problems), " ".join(cmd), r.stderr[-3000:]))

    # ---- safetensors files ----

    def test_files(self):
        shard = SHARD
        cases = []

        cases.append(("missing_checkpoint_dir", lambda d: shutil.rmtree(d), ["{dir}"]))

        def missing_shard(d):
            os.remove(os.path.join(d, shard))
        cases.append(("missing_shard", missing_shard, [shard]))

        def truncated(d):
            data = own(os.path.join(d, shard))
            with open(os.path.join(d, shard), "wb") as f:
                f.write(data[:len(data) * 6 // 10])
        cases.append(("truncated_shard", truncated, [shard]))

        def tiny_file(d):
            os.remove(os.path.join(d, shard))
            with open(os.path.join(d, shard), "wb") as f:
                f.write(b"\x10\x00\x00")
        cases.append(("truncated_to_3_bytes", tiny_file, [shard, "truncated"]))

        def empty_file(d):
            os.remove(os.path.join(d, shard))
            open(os.path.join(d, shard), "wb").close()
        cases.append(("empty_shard", empty_file, [shard]))

        def corrupt_json(d):
            data = bytearray(own(os.path.join(d, shard)))
            data[8] = ord("x")
            with open(os.path.join(d, shard), "wb") as f:
                f.write(data)
        cases.append(("corrupt_header_json", corrupt_json, [shard, "JSON"]))

        def header_len(value):
            def f(d):
                data = bytearray(own(os.path.join(d, shard)))
                data[:8] = struct.pack("<Q", value(len(data)))
                with open(os.path.join(d, shard), "wb") as fh:
                    fh.write(data)
            return f
        cases.append(("header_length_beyond_file", header_len(lambda n: n + 100), [shard, "header"]))
        cases.append(("header_length_2^63", header_len(lambda n: 1 << 63), [shard, "header"]))

        name_a = "model.layers.2.self_attn.q_a_proj.weight"

        def offsets_out_of_range(d):
            def f(h):
                data_len = max(e["data_offsets"][1] for k, e in h.items() if k != "__metadata__")
                b, e = h[name_a]["data_offsets"]
                h[name_a]["data_offsets"] = [data_len - (e - b) + 64, data_len + 64]
            edit_header(d, f)
        cases.append(("data_offsets_out_of_range", offsets_out_of_range, [name_a, "range"]))

        def offsets_reversed(d):
            def f(h):
                b, e = h[name_a]["data_offsets"]
                h[name_a]["data_offsets"] = [e, b]
            edit_header(d, f)
        cases.append(("data_offsets_reversed", offsets_reversed, [name_a]))

        n1, n2 = "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"

        def overlap(d):
            def f(h):
                h[n2]["data_offsets"] = list(h[n1]["data_offsets"])
            edit_header(d, f)
        cases.append(("overlapping_offsets", overlap, ["overlap", n1.rsplit(".", 2)[0]]))

        def byte_size(d):
            def f(h):
                h[n1]["shape"] = [159]
            edit_header(d, f)
        cases.append(("bytes_do_not_match_shape", byte_size, [n1]))

        def wrong_shape(d):
            def f(h):
                h[name_a]["shape"] = list(reversed(h[name_a]["shape"]))
            edit_header(d, f)
        cases.append(("wrong_shape", wrong_shape, [name_a, "[96, 160]"]))

        norm = "model.norm.weight"

        def f8_not_allowed(d):
            def f(h):
                b, _ = h[norm]["data_offsets"]
                h[norm] = {"dtype": "F8_E4M3", "shape": [160], "data_offsets": [b, b + 160]}
            edit_header(d, f)
        cases.append(("f8_where_not_allowed", f8_not_allowed, [norm, "F8_E4M3"]))

        def unknown_dtype(d):
            def f(h):
                h[norm]["dtype"] = "F4"
            edit_header(d, f)
        cases.append(("unknown_dtype", unknown_dtype, [norm, "F4"]))

        scale = "model.layers.1.self_attn.o_proj.weight_scale_inv"

        def f8_without_scale(d):
            edit_header(d, lambda h: h.pop(scale))
            drop_from_index(d, [scale])
        cases.append(("f8_without_scale", f8_without_scale, [scale]))

        def scale_wrong_shape(d):
            def f(h):
                h[scale]["shape"] = list(reversed(h[scale]["shape"]))
            edit_header(d, f)
        cases.append(("scale_wrong_shape", scale_wrong_shape, [scale, "[2, 1]"]))

        def scale_wrong_dtype(d):
            def f(h):
                b, _ = h[scale]["data_offsets"]
                h[scale]["dtype"] = "BF16"
                h[scale]["data_offsets"] = [b, b + 4]
            edit_header(d, f)
        cases.append(("scale_wrong_dtype", scale_wrong_dtype, [scale, "F32"]))

        gone = "model.layers.2.mlp.experts.17.up_proj.weight"

        def missing_tensor(d):
            edit_header(d, lambda h: (h.pop(gone), h.pop(gone + "_scale_inv")))
            drop_from_index(d, [gone, gone + "_scale_inv"])
        cases.append(("missing_tensor", missing_tensor, [gone, "missing"]))

        def listed_not_present(d):
            edit_header(d, lambda h: (h.pop(gone), h.pop(gone + "_scale_inv")))
        cases.append(("indexed_tensor_absent_from_shard", listed_not_present, [gone]))

        def deep_json(d):
            os.remove(os.path.join(d, shard))
            h = b"[" * 2000000          # a parser that recurses would overflow the stack
            with open(os.path.join(d, shard), "wb") as f:
                f.write(struct.pack("<Q", len(h)) + h)
        cases.append(("header_deeply_nested_json", deep_json, [shard]))

        def index_corrupt(d):
            own(os.path.join(d, INDEX))
            with open(os.path.join(d, INDEX), "w") as f:
                f.write('{"weight_map": {"a": ')
        cases.append(("index_corrupt_json", index_corrupt, [INDEX]))

        def index_bad_shard(d):
            def f(j):
                j["weight_map"][norm] = "model-00009-of-00009.safetensors"
            edit_json(os.path.join(d, INDEX), f)
        cases.append(("index_names_missing_shard", index_bad_shard, ["model-00009-of-00009.safetensors"]))

        for case, mutate, fragments in cases:
            with self.subTest(case=case):
                d = clone("bad_" + case)
                mutate(d)
                self.expect_error(case, ["--checkpoint", d],
                                  [f.replace("{dir}", os.path.basename(d)) for f in fragments])

    # ---- config.json ----

    def test_config(self):
        cases = [
            ("hidden_size", -1, ["hidden_size"]),
            ("vocab_size", "big", ["vocab_size"]),
            ("n_group", 7, ["n_group"]),
            ("topk_group", 9, ["topk_group"]),
            ("num_experts_per_tok", 0, ["num_experts_per_tok"]),
            ("rope_scaling.type", "linear", ["rope_scaling", "yarn"]),
            ("rope_scaling.factor", 0.5, ["rope_scaling.factor"]),
            ("rms_norm_eps", 0, ["rms_norm_eps"]),
            ("model_type", "mixtral", ["model_type", "deepseek_v3", "qwen2", "llama"]),
            ("qk_rope_head_dim", 15, ["qk_rope_head_dim"]),
            ("scoring_func", "tanh", ["scoring_func", "sigmoid"]),
            ("quantization_config.fmt", "e5m2", ["quantization_config.fmt", "e4m3"]),
            ("num_key_value_heads", 2, ["num_key_value_heads"]),
            ("kv_lora_rank", 0, ["kv_lora_rank"]),
            ("first_k_dense_replace", 9, ["first_k_dense_replace"]),
            # valid config that does not match the tensors
            ("hidden_size", 128, ["model.embed_tokens.weight", "[1024, 128]"]),
        ]
        for field, value, fragments in cases:
            case = "config_%s_%s" % (field, value)
            with self.subTest(case=case):
                d = clone("bad_" + case)
                edit_json(os.path.join(d, "config.json"), lambda j: set_path(j, field, value))
                self.expect_error(case, ["--checkpoint", d], fragments)

        with self.subTest(case="config_not_json"):
            d = clone("bad_config_not_json")
            os.remove(os.path.join(d, "config.json"))
            with open(os.path.join(d, "config.json"), "w") as f:
                f.write("{\"hidden_size\": 160,")
            self.expect_error("config_not_json", ["--checkpoint", d], ["config.json"])
        with self.subTest(case="config_missing"):
            d = clone("bad_config_missing")
            os.remove(os.path.join(d, "config.json"))
            self.expect_error("config_missing", ["--checkpoint", d], ["config.json"])

    # ---- prompts ----

    def test_prompts(self):
        ok = json.dumps(PROMPT)
        cases = [
            ("empty_prompt", [ok, '{"tokens": []}'], [".jsonl", "prompt index 1", "empty"]),
            ("token_id_eq_vocab", [ok, ok, '{"tokens": [3, 1024]}'], [".jsonl", "prompt index 2", "1024", "vocab_size = 1024"]),
            ("token_id_negative", ['{"tokens": [-1]}'], [".jsonl", "-1", "vocab_size = 1024"]),
            ("malformed_line", [ok, '{"tokens": [1, 2'], [".jsonl:2", "tokens"]),
            ("missing_tokens_key", ['{"toks": [1, 2]}'], [".jsonl:1", "tokens"]),
            ("token_not_integer", ['{"tokens": [1, "a"]}'], [".jsonl:1", "token 1", "integer"]),
            ("token_fraction", ['{"tokens": [1, 2.5]}'], [".jsonl:1", "token 1", "integer"]),
        ]
        for case, lines, fragments in cases:
            with self.subTest(case=case):
                self.expect_error(case, ["--checkpoint", GOOD], fragments, prompts=lines)
        with self.subTest(case="prompt_longer_than_context"):
            long = json.dumps({"tokens": [i % 1024 for i in range(5000)]})
            self.expect_error("prompt_longer_than_context", ["--checkpoint", GOOD], ["prompt index 0", "4096"],
                              prompts=[long])
        with self.subTest(case="no_prompts"):
            self.expect_error("no_prompts", ["--checkpoint", GOOD], [".jsonl", "prompts"], prompts=[])
        with self.subTest(case="crlf_and_blank_lines_are_fine"):
            pf = os.path.join(ARGS.workdir, "crlf.jsonl")
            with open(pf, "wb") as f:
                f.write(b'{"tokens":[1,2]}\r\n\r\n  \n{"tokens":[3]}\r\n')
            r = subprocess.run([ARGS.expertmesh, "generate", "--checkpoint", GOOD, "--prompts", pf,
                                "--max-new-tokens", "2"], capture_output=True, text=True, timeout=TIMEOUT)
            self.assertEqual(r.returncode, 0, r.stderr)
            lines = r.stdout.splitlines()
            self.assertEqual([json.loads(l)["index"] for l in lines], [0, 1], r.stdout)
        with self.subTest(case="prompts_file_missing"):
            missing = os.path.join(ARGS.workdir, "no_such_prompts.jsonl")
            cmd = [ARGS.expertmesh, "generate", "--checkpoint", GOOD, "--prompts", missing, "--max-new-tokens", "2"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
            ok_ = r.returncode > 0 and r.returncode < 128 and not r.stdout and "no_such_prompts.jsonl" in r.stderr
            RESULTS.append(("prompts_file_missing", ok_, r.stderr.strip()[:200]))
            self.assertTrue(ok_, "rc %d stdout %r stderr %r" % (r.returncode, r.stdout, r.stderr))

    # ---- non-finite weights (issue 15): the logits turn NaN; greedy argmax
    # would give token 0 with exit 0, so generate must fail naming the prompt
    # and the step ----

    def test_non_finite_weights(self):
        nan = {"F32": struct.pack("<I", 0x7FC00000), "BF16": struct.pack("<H", 0x7FC0),
               "F16": struct.pack("<H", 0x7E00)}
        inf = {"F32": struct.pack("<I", 0x7F800000), "BF16": struct.pack("<H", 0x7F80),
               "F16": struct.pack("<H", 0x7C00)}

        def poison(name, pattern, count=None):
            """Overwrites `count` values (all when None) of tensor `name` with `pattern`."""
            def f(d):
                p = os.path.join(d, SHARD)
                h, data = read_st(p)
                e = h[name]
                pat = pattern[e["dtype"]]
                b, end = e["data_offsets"]
                n = (end - b) // len(pat) if count is None else count
                data = bytearray(data)
                data[b:b + n * len(pat)] = pat * n
                write_st(p, h, bytes(data))
            return f

        scale = "model.layers.1.self_attn.o_proj.weight_scale_inv"
        frags = ["prompt 0", "step 0", "not finite", "weight_scale_inv"]
        cases = [
            ("nan_lm_head", poison("lm_head.weight", nan), frags),
            ("inf_lm_head_one_value", poison("lm_head.weight", inf, 1), frags),
            ("nan_one_weight_scale_inv", poison(scale, nan, 1), frags),
        ]
        for case, mutate, fragments in cases:
            with self.subTest(case=case):
                d = clone("bad_" + case)
                mutate(d)
                self.expect_error(case, ["--checkpoint", d], fragments)
        with self.subTest(case="nan_lm_head_speculative"):
            d = clone("bad_nan_lm_head_speculative")
            poison("lm_head.weight", nan)(d)
            self.expect_error("nan_lm_head_speculative", ["--checkpoint", d, "--speculative", "mtp"], frags)

    # ---- flags ----

    def test_flags(self):
        cases = [
            ("max_new_tokens_negative", ["--max-new-tokens", "-1"], ["--max-new-tokens -1"]),
            ("max_new_tokens_huge", ["--max-new-tokens", "2000000000"], ["2000000000", "4096"]),
            ("top_p_above_1", ["--temperature", "1", "--top-p", "1.5"], ["--top-p 1.5"]),
            ("top_p_zero", ["--temperature", "1", "--top-p", "0"], ["--top-p 0"]),
            ("temperature_negative", ["--temperature", "-1"], ["--temperature -1"]),
            ("top_k_negative", ["--temperature", "1", "--top-k", "-3"], ["--top-k -3"]),
            ("dump_logits_unwritable", ["--dump-logits", "/nonexistent-dir/x.safetensors"], ["/nonexistent-dir"]),
        ]
        for case, extra, fragments in cases:
            with self.subTest(case=case):
                self.expect_error(case, ["--checkpoint", GOOD] + extra, fragments)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--expertmesh", required=True)
    ap.add_argument("--workdir", default="bad_input_tmp")
    ap.add_argument("--show", action="store_true", help="print every case's stderr")
    ARGS, rest = ap.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
