"""The OpenAI-compatible HTTP API driven by the official `openai` npm SDK.

A tiny-text checkpoint with the real DeepSeek-V3 tokenizer is served by a
local cluster started with --http-listen; test_openai_sdk.mjs talks to it
through the SDK. The expected texts come from elsewhere in the product:
the chat prompt rendered and encoded by `expertmesh tokenize`, its greedy
continuation by `expertmesh generate` in one process, decoded by
`expertmesh tokenize --decode`.

  SdkTest.test_sdk          mpirun PP1 x EP2: chat and completions, streamed and not, n > 1, stop strings,
                            usage, a 400 for each bad field, 404, cancel by disconnect, greedy = `generate`
  SdkTest.test_not_serving  standalone coordinator, no workers yet: 503; a worker joins: 200
  SdkTest.test_coordinator_sigkill_mid_stream
                            standalone (UCX), coordinator SIGKILLed mid-stream and restarted on its journal
                            and port: the retry with the same Idempotency-Key gets the whole, identical text

Run: EXPERTMESH=build/launch/expertmesh /usr/bin/python3 tests/text/test_openai_sdk.py [SdkTest.test_x]
"""
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
import cluster_util as cu  # noqa: E402

NODE_MODULES = os.path.join(ROOT, "tools", "node_modules")
JS = os.path.join(HERE, "test_openai_sdk.mjs")
NEW = 10            # greedy tokens compared with `generate`
LONG = 2000         # a stream the client aborts after two chunks
RESTART_NEW = 300   # a completion long enough to kill the coordinator in the middle of
MESSAGES = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Hello, 世界! Count to three: 1, 2, 3."}]
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


class Fixture:
    dir = None

    @classmethod
    def get(cls):
        if cls.dir is not None:
            return cls
        if not os.path.exists(os.path.join(NODE_MODULES, "openai", "package.json")):
            raise AssertionError(f"{NODE_MODULES}/openai is missing: run scripts/install-deps.sh")
        cls.dir = tempfile.mkdtemp(prefix="em-sdk-")
        if not os.environ.get("EM_KEEP_TMP"):
            atexit.register(shutil.rmtree, cls.dir, True)
        cls.ckpt = os.path.join(cls.dir, "tiny-text")
        cu.ENV["EXPERTMESH_NODE_MODULES"] = NODE_MODULES
        cu.run(["checkpoint", "--preset", "tiny-text", "--dtype", "bf16", "--seed", "0", "--tokenizer", "deepseek-v3",
                "--out", cls.ckpt])
        chat = cls.tokenize(json.dumps({"messages": MESSAGES, "add_generation_prompt": True}))
        comp = cls.tokenize(json.dumps({"text": PROMPT}), add_bos=True)
        chat_ids = cls.generate(chat["tokens"], RESTART_NEW)
        comp_ids = cls.generate(comp["tokens"], NEW)
        expect = {
            "model": None,
            "greedy": {"messages": MESSAGES, "prompt": PROMPT, "prompt_ids": comp["tokens"],
                       "chat_prompt_tokens": len(chat["tokens"]), "prompt_tokens": len(comp["tokens"]),
                       "max_tokens": NEW, "chat_text": cls.decode(chat_ids[:NEW]),
                       "completion_text": cls.decode(comp_ids)},
            "long_max_tokens": LONG,
            "restart_max_tokens": RESTART_NEW,
            "restart_text": cls.decode(chat_ids),
        }
        g = expect["greedy"]
        # A stop string across a token boundary: the last 2 characters of token 3's text and the first of token 4's.
        cut = len(cls.decode(chat_ids[:3]))
        assert 2 <= cut < len(g["chat_text"]) - 1, g
        expect["stop_cut"] = [cut - 2, 3]
        ctext = g["completion_text"]
        expect["completion_stop"] = ctext[len(ctext) // 2:len(ctext) // 2 + 2]
        assert expect["completion_stop"].strip(), ctext
        cls.expect_path = os.path.join(cls.dir, "expect.json")
        with open(cls.expect_path, "w") as f:
            json.dump(expect, f, ensure_ascii=False)
        cls.expect = expect
        return cls

    @classmethod
    def tokenize(cls, line, add_bos=False):
        p = subprocess.run([cu.EXPERTMESH, "tokenize", "--tokenizer", cls.ckpt, "--jsonl"] +
                           (["--add-bos"] if add_bos else []), input=line + "\n", capture_output=True, text=True,
                           env=cu.ENV, timeout=60)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    @classmethod
    def generate(cls, tokens, new):
        path = os.path.join(cls.dir, "prompt.jsonl")
        with open(path, "w") as f:
            f.write(json.dumps({"tokens": tokens}) + "\n")
        return cu.results(cu.run(["generate", "--checkpoint", cls.ckpt, "--prompts", path, "--max-new-tokens",
                                  str(new)]).stdout)[0]

    @classmethod
    def decode(cls, ids):
        return cu.run(["tokenize", "--tokenizer", cls.ckpt, "--decode", "--skip-special", "--text",
                       json.dumps(ids)]).stdout.rstrip("\n")


class SdkTest(unittest.TestCase):
    def setUp(self):
        self.f = Fixture.get()
        self.tmp = tempfile.mkdtemp(prefix="case-", dir=self.f.dir)
        self.procs = []

    def tearDown(self):
        for p in self.procs:
            cu.kill(p)

    def node(self, base, case, grpc=None, extra=(), timeout=120):
        cmd = ["node", JS, "--base", base, "--expect", self.f.expect_path, "--case", case, "--root", ROOT,
               "--expertmesh", cu.EXPERTMESH] + (["--grpc", grpc] if grpc else []) + list(extra)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cu.ENV)
        sys.stderr.write(p.stdout)
        self.assertEqual(p.returncode, 0, p.stdout[-4000:] + p.stderr[-4000:] + self.logs())
        return p.stdout

    def logs(self):
        return "".join(f"\n--- {getattr(p, 'log_path', '?')}:\n{cu.read_log(p)[-2000:]}" for p in self.procs)

    def start_coordinator(self, grpc_port, http_port, journal, log):
        p = cu.start(["coordinator", "--checkpoint", self.f.ckpt, "--pp", "1", "--ep", "2", "--listen",
                      f"127.0.0.1:{grpc_port}", "--journal", journal, "--http-listen", f"127.0.0.1:{http_port}"],
                     os.path.join(self.tmp, log))
        self.procs.append(p)
        return p

    def start_workers(self, server, n=2):
        ws = [cu.start(["worker", "--coordinator", server], os.path.join(self.tmp, f"worker{i}.log")) for i in range(n)]
        self.procs += ws
        return ws

    def test_sdk(self):
        http_port = cu.free_port()
        addr = os.path.join(self.tmp, "addr")
        p = cu.start(["launch", "--checkpoint", self.f.ckpt, "--pp", "1", "--ep", "2", "--listen", "127.0.0.1:0",
                      "--address-file", addr, "--http-listen", f"127.0.0.1:{http_port}"],
                     os.path.join(self.tmp, "launch.log"), mpirun_np=3)
        self.procs.append(p)
        server = cu.wait_for_file(addr, 120, [p])
        cu.wait_serving(server)
        self.node(f"http://127.0.0.1:{http_port}", "all", grpc=server)
        cu.run(["shutdown", "--server", server], timeout=90)
        self.assertEqual(p.wait(timeout=60), 0, cu.read_log(p))

    def test_not_serving(self):
        grpc_port, http_port = cu.free_port(), cu.free_port()
        server = f"127.0.0.1:{grpc_port}"
        coord = self.start_coordinator(grpc_port, http_port, os.path.join(self.tmp, "journal"), "coordinator.log")
        base = f"http://127.0.0.1:{http_port}"
        cu.wait_status(server, lambda st: True, "the coordinator answering", timeout=60)
        self.node(base, "not_serving")
        workers = self.start_workers(server)
        cu.wait_serving(server)
        self.node(base, "health,chat_greedy")
        cu.run(["shutdown", "--server", server], timeout=90)
        for q in [coord] + workers:
            self.assertEqual(q.wait(timeout=60), 0, cu.read_log(q))

    def test_coordinator_sigkill_mid_stream(self):
        grpc_port, http_port = cu.free_port(), cu.free_port()
        server = f"127.0.0.1:{grpc_port}"
        journal = os.path.join(self.tmp, "journal")
        coord = self.start_coordinator(grpc_port, http_port, journal, "coordinator.log")
        workers = self.start_workers(server)
        cu.wait_serving(server)
        cmd = ["node", JS, "--base", f"http://127.0.0.1:{http_port}", "--expect", self.f.expect_path, "--case",
               "retry_after_restart", "--root", ROOT, "--request-id", f"sdk-restart-{os.getpid()}"]
        node = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cu.ENV)
        out = []
        coord2 = None
        deadline = time.time() + 150
        try:
            for line in node.stdout:
                out.append(line)
                sys.stderr.write(line)
                if line.strip() == "KILL-ME" and coord2 is None:
                    cu.kill(coord, signal.SIGKILL)
                    coord2 = self.start_coordinator(grpc_port, http_port, journal, "coordinator2.log")
                if time.time() > deadline:
                    break
            rc = node.wait(timeout=max(1, deadline - time.time()))
        finally:
            if node.poll() is None:
                node.kill()
                node.wait()
        self.assertIsNotNone(coord2, "the client never asked for the kill:\n" + "".join(out) + self.logs())
        self.assertEqual(rc, 0, "".join(out)[-4000:] + self.logs())
        cu.run(["shutdown", "--server", server], timeout=90)
        for q in [coord2] + workers:
            self.assertEqual(q.wait(timeout=60), 0, cu.read_log(q))


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1] + sys.argv[1:], verbosity=2)
