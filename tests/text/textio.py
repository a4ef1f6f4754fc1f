"""Helpers the text tests share: failing with one line, and driving a
JSON-lines command (`expertmesh tokenize --jsonl`, tools/hf_tokenize.js)."""
import json
import subprocess
import sys


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def run_jsonl(cmd, requests, env=None):
    """Sends one JSON line per request to cmd's stdin; returns one parsed answer per request."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in requests).encode("utf-8")
    p = subprocess.run(cmd, input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=600)
    lines = [l for l in p.stdout.decode("utf-8").split("\n") if l]
    if len(lines) != len(requests):
        fail(f"{cmd[:3]} answered {len(lines)} lines for {len(requests)} requests (rc {p.returncode}): "
             f"{p.stderr.decode(errors='replace')[-2000:]}")
    return [json.loads(l) for l in lines]
