"""Prompt files in and `expertmesh generate` output out, shared by the tests
of this folder (JSON lines: {"tokens": [...]} in, {"index": i, "tokens": [...]}
out, one line per prompt in input order)."""
import json
import os
import shutil


def read_prompts(path):
    with open(path) as f:
        return [json.loads(l)["tokens"] for l in f if l.strip()]


def write_prompts(path, prompts):
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"tokens": p}) + "\n")


def parse_output(test, stdout, n):
    """The token lists of generate's stdout; fails `test` unless there are n lines, in index order."""
    lines = [l for l in stdout.splitlines() if l.strip()]
    test.assertEqual(len(lines), n, "expected one stdout line per prompt, got:\n" + stdout[:2000])
    out = []
    for i, l in enumerate(lines):
        obj = json.loads(l)
        test.assertEqual(obj.get("index"), i, "line %d: %s" % (i, l))
        test.assertIsInstance(obj.get("tokens"), list, l)
        out.append(obj["tokens"])
    return out


def make_tiny_checkpoints(run, workdir, dtypes, seed, extra=None):
    """`expertmesh checkpoint --preset tiny` once per dtype into workdir/tiny_<dtype>
    (extra: dtype -> more flags); returns {dtype: folder}. `run(args)` runs expertmesh."""
    out = {}
    for dt in dtypes:
        d = os.path.join(workdir, "tiny_" + dt)
        shutil.rmtree(d, ignore_errors=True)
        args = ["checkpoint", "--preset", "tiny", "--dtype", dt, "--seed", str(seed), "--out", d]
        args += (extra or {}).get(dt, [])
        r = run(args)
        if r.returncode != 0:
            raise RuntimeError("expertmesh %s failed: %s" % (" ".join(args), r.stderr))
        out[dt] = d
    return out
