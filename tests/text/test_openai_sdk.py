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
RESTART_NEW = 100   # a completion long enough to kill the coordinator in the middle of
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
# Candidates: the first whose greedy continuation stays inside the tokenizer (random weights also pick the
# 465 ids past DeepSeek-V3's 128815 tokens, which have no text) and has no EOS is used.
USER_MESSAGES = ["Hello, 世界! Count to three: 1, 2, 3.", "Write a haiku about experts.",
                 "¿Qué hora es? Réponds en français.", "def f(x):\n\treturn x * 2  # why?", "Tell me a joke 🙂"]
PROMPTS = ["The quick brown fox jumps over the lazy dog. Once upon a time", "In 1969, the first",
           "日本語のテキスト: こんにちは", "Numbers: 3.14159 and 2.71828"]
TOKENIZER_SIZE = 128815
EOS = 1


class Fixture:
    """The tiny-text checkpoint and the expected texts (expect.json). With $EM_SDK_FIXTURE (a folder that
    ctest's setup test filled, see tests/text/CMakeLists.txt) they are made once for all the tests."""
    dir = None

    @classmethod
    def get(cls):
        if cls.dir is not None:
            return cls
        if not os.path.exists(os.path.join(NODE_MODULES, "openai", "package.json")):
            raise AssertionError(f"{NODE_MODULES}/openai is missing: run scripts/install-deps.sh")
        cu.ENV["EXPERTMESH_NODE_MODULES"] = NODE_MODULES
        shared = os.environ.get("EM_SDK_FIXTURE")
        if shared:
            cls.dir = shared
        else:
            cls.dir = tempfile.mkdtemp(prefix="em-sdk-")
            if not os.environ.get("EM_KEEP_TMP"):
                atexit.register(shutil.rmtree, cls.dir, True)
        cls.ckpt = os.path.join(cls.dir, "tiny-text")
        cls.expect_path = os.path.join(cls.dir, "expect.json")
        if not os.path.exists(cls.expect_path):
            cls.prepare()
        with open(cls.expect_path) as f:
            cls.expect = json.load(f)
        return cls

    @classmethod
    def prepare(cls):
        shutil.rmtree(cls.ckpt, ignore_errors=True)
        cu.run(["checkpoint", "--preset", "tiny-text", "--dtype", "bf16", "--seed", "0", "--tokenizer", "deepseek-v3",
                "--out", cls.ckpt])
        convs = [[SYSTEM, {"role": "user", "content": u}] for u in USER_MESSAGES]
        enc = cls.jsonl([{"messages": c, "add_generation_prompt": True} for c in convs] +
                        [{"text": p, "add_bos": True} for p in PROMPTS])
        ids = [e["tokens"] for e in enc]
        path = os.path.join(cls.dir, "prompts.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"tokens": t}) + "\n" for t in ids)
        gen = cu.results(cu.run(["generate", "--checkpoint", cls.ckpt, "--prompts", path, "--max-new-tokens",
                                 str(RESTART_NEW)]).stdout)
        clean = lambda g: all(t < TOKENIZER_SIZE and t != EOS for t in g)
        nc = len(convs)
        ci = next((i for i in range(nc) if clean(gen[i])), None)
        pi = next((i for i in range(len(PROMPTS)) if clean(gen[nc + i][:NEW])), None)
        assert ci is not None and pi is not None, f"no candidate prompt has a clean greedy continuation: {gen}"
        chat_ids, comp_ids = gen[ci], gen[nc + pi][:NEW]
        dec = cls.jsonl([{"tokens": chat_ids[:NEW], "skip_special": True}, {"tokens": chat_ids[:3], "skip_special": True},
                         {"tokens": comp_ids, "skip_special": True}, {"tokens": chat_ids, "skip_special": True}])
        chat_text, chat3, comp_text, restart_text = [d["text"] for d in dec]
        expect = {
            "model": os.path.basename(cls.ckpt),  # --served-model-name's default: the checkpoint folder's name
            "greedy": {"messages": convs[ci], "prompt": PROMPTS[pi], "prompt_ids": ids[nc + pi],
                       "chat_prompt_tokens": len(ids[ci]), "prompt_tokens": len(ids[nc + pi]),
                       "max_tokens": NEW, "chat_text": chat_text, "completion_text": comp_text},
            "long_max_tokens": LONG,
            "restart_max_tokens": RESTART_NEW,
            "restart_text": restart_text,
        }
        # A stop string across a token boundary: the last 2 characters of token 3's text and the first of token 4's.
        cut = len(chat3)
        assert 2 <= cut < len(chat_text) - 1, (chat3, chat_text)
        expect["stop_cut"] = [cut - 2, 3]
        expect["completion_stop"] = comp_text[len(comp_text) // 2:len(comp_text) // 2 + 2]
        assert expect["completion_stop"].strip(), comp_text
        with open(cls.expect_path + ".tmp", "w") as f:
            json.dump(expect, f, ensure_ascii=False, indent=1)
        os.replace(cls.expect_path + ".tmp", cls.expect_path)

    @classmethod
    def jsonl(cls, lines):
        p = subprocess.run([cu.EXPERTMESH, "tokenize", "--tokenizer", cls.ckpt, "--jsonl"],
                           input="".join(json.dumps(l, ensure_ascii=False) + "\n" for l in lines), capture_output=True,
                           text=True, env=cu.ENV, timeout=120)
        out = [json.loads(l) for l in p.stdout.splitlines() if l.strip()]
        assert p.returncode == 0 and len(out) == len(lines), p.stdout + p.stderr
        return out


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

    def wait_http(self, base, procs, timeout=60):
        """Until the HTTP port answers GET /health (200 or 503)."""
        import urllib.error
        import urllib.request
        end = time.time() + timeout
        while time.time() < end:
            for p in procs:
                self.assertIsNone(p.poll(), "exited while starting:\n" + cu.read_log(p))
            try:
                with urllib.request.urlopen(base + "/health", timeout=5):
                    return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.1)
        self.fail(f"{base} did not answer within {timeout} s" + self.logs())

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
        self.wait_http(base, [coord])
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
        # The HTTP listener may come up after gRPC serves (workers load in milliseconds now).
        self.wait_http(f"http://127.0.0.1:{http_port}", [coord])
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
            node.stdout.close()
        self.assertIsNotNone(coord2, "the client never asked for the kill:\n" + "".join(out) + self.logs())
        self.assertEqual(rc, 0, "".join(out)[-4000:] + self.logs())
        # The retry may be answered before every worker has registered again; a worker that is not
        # registered when the coordinator shuts down waits for a successor, so shut down a whole cluster.
        cu.wait_serving(server)
        cu.run(["shutdown", "--server", server], timeout=90)
        for q in [coord2] + workers:
            self.assertEqual(q.wait(timeout=60), 0, cu.read_log(q))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--prepare"]:  # ctest's fixture setup: a fresh checkpoint and expect.json in $EM_SDK_FIXTURE
        shutil.rmtree(os.environ["EM_SDK_FIXTURE"], ignore_errors=True)
        os.makedirs(os.environ["EM_SDK_FIXTURE"])
        Fixture.get()
        print("prepared", Fixture.expect_path)
        sys.exit(0)
    unittest.main(verbosity=2)
