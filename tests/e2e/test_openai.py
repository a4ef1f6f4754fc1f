"""The OpenAI-compatible HTTP API end to end (stdlib only: http.client).

One standalone tiny-text cluster (coordinator with --http-listen + one CPU
worker) on a checkpoint with the real DeepSeek-V3 tokenizer serves every test:
chat and completions, streamed (SSE) and not, n > 1, stop strings, usage,
each 400, 404, 503 before the cluster serves, a client that disconnects
cancels its job, a retry with the same Idempotency-Key gets the same job,
and greedy text equals `expertmesh generate`'s tokens detokenised. (A
coordinator SIGKILLed mid-stream and the retry after its restart: the SDK's
e2e.openai_sdk.test_coordinator_sigkill_mid_stream, tests/text.)

  EXPERTMESH=build/launch/expertmesh python3 tests/e2e/test_openai.py [-v] [Class.test]
"""
import http.client
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_util as cu  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
NODE_MODULES = os.environ.get("EXPERTMESH_NODE_MODULES", os.path.join(ROOT, "tools", "node_modules"))
cu.ENV["EXPERTMESH_NODE_MODULES"] = NODE_MODULES  # `checkpoint --tokenizer deepseek-v3` finds it there
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, 世界! What is 2+2?"}]


class Http:
    def __init__(self, port):
        self.port = port

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def request(self, method, path, body=None, headers=None, raw=None):
        c = self.conn()
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            c.request(method, path, body=data, headers=dict({"Content-Type": "application/json"}, **(headers or {})))
            r = c.getresponse()
            text = r.read().decode()
            return r.status, json.loads(text) if text else None, r
        finally:
            c.close()

    def post(self, path, body, headers=None):
        status, j, _ = self.request("POST", path, body, headers)
        return status, j

    def stream(self, path, body, headers=None):
        """POSTs a streaming request; returns (status, [event JSON...], saw_done, response headers)."""
        c = self.conn()
        try:
            c.request("POST", path, body=json.dumps(body).encode(),
                      headers=dict({"Content-Type": "application/json"}, **(headers or {})))
            r = c.getresponse()
            if r.status != 200:
                return r.status, [json.loads(r.read().decode())], False, r
            assert r.getheader("Content-Type", "").startswith("text/event-stream"), r.getheaders()
            events, done, buf = [], False, b""
            while True:
                chunk = r.read1(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n\n" in buf:
                    ev, buf = buf.split(b"\n\n", 1)
                    assert ev.startswith(b"data: "), ev
                    payload = ev[len(b"data: "):]
                    if payload == b"[DONE]":
                        done = True
                    else:
                        assert not done, "an event after [DONE]"
                        events.append(json.loads(payload))
            assert buf == b"", buf
            return r.status, events, done, r
        finally:
            c.close()


def chat_text(events, field="content"):
    """Concatenated deltas per choice index."""
    out = {}
    for e in events:
        for ch in e.get("choices", []):
            out.setdefault(ch["index"], "")
            out[ch["index"]] += (ch.get("delta", {}).get(field) or "") if "delta" in ch else ch.get("text", "")
    return out


def finishes(events):
    return {ch["index"]: ch["finish_reason"] for e in events for ch in e.get("choices", []) if ch["finish_reason"]}


class OpenAiTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="em_openai_")
        cls.procs = []
        cls.ck = os.path.join(cls.tmp, "tiny-text")
        cu.run(["checkpoint", "--preset", "tiny-text", "--dtype", "bf16", "--tokenizer", "deepseek-v3",
                "--out", cls.ck])
        with open(os.path.join(cls.ck, "tokenizer.json")) as f:
            added = json.load(f)["added_tokens"]
        with open(os.path.join(cls.ck, "tokenizer_config.json")) as f:
            eos = json.load(f)["eos_token"]
        eos = eos["content"] if isinstance(eos, dict) else eos
        cls.eos = [t["id"] for t in added if t["content"] == eos][0]
        grpc_port, http_port = cu.free_port(), cu.free_port()
        cls.server = f"127.0.0.1:{grpc_port}"
        cls.coord_args = ["coordinator", "--checkpoint", cls.ck, "--pp", "1", "--ep", "1", "--listen", cls.server,
                          "--journal", os.path.join(cls.tmp, "journal"), "--http-listen", f"127.0.0.1:{http_port}"]
        cls.coord = cu.start(cls.coord_args, os.path.join(cls.tmp, "coordinator.log"))
        cls.procs.append(cls.coord)
        cls.http = Http(http_port)
        # Not serving yet (no worker): /health and requests answer 503.
        status, body = cls.wait_health(lambda s: s in (200, 503))
        cls.unserved = (status, body, cls.http.post("/v1/chat/completions",
                                                    {"messages": CHAT, "max_tokens": 2}))
        cls.worker = cu.start(["worker", "--coordinator", cls.server], os.path.join(cls.tmp, "worker.log"))
        cls.procs.append(cls.worker)
        cls.wait_health(lambda s: s == 200)

    @classmethod
    def wait_health(cls, ok, timeout=90):
        end = time.time() + timeout
        status, body = None, None
        while time.time() < end:
            try:
                status, body, _ = cls.http.request("GET", "/health")
                if ok(status):
                    return status, body
            except OSError:
                pass
            if cls.coord.poll() is not None:
                raise AssertionError("the coordinator exited:\n" + cu.read_log(cls.coord))
            time.sleep(0.1)
        raise AssertionError(f"GET /health: {status} {body} after {timeout}s:\n" + cu.read_log(cls.coord))

    @classmethod
    def tearDownClass(cls):
        for p in cls.procs:
            cu.kill(p)
        if not os.environ.get("EM_KEEP_TMP"):
            shutil.rmtree(cls.tmp, ignore_errors=True)

    # ---- helpers
    def generate_text(self, prompt_ids, max_new_tokens):
        """`expertmesh generate` greedy tokens for the prompt, detokenised by `expertmesh tokenize --decode`."""
        prompts = os.path.join(self.tmp, "prompts.jsonl")
        with open(prompts, "w") as f:
            f.write(json.dumps({"tokens": prompt_ids}) + "\n")
        out = cu.run(["generate", "--checkpoint", self.ck, "--prompts", prompts, "--max-new-tokens",
                      str(max_new_tokens), "--stop-token-ids", str(self.eos)]).stdout
        tokens = cu.results(out)[0]
        text = cu.run(["tokenize", "--tokenizer", self.ck, "--decode", "--skip-special", "--text",
                       json.dumps(tokens)]).stdout
        return tokens, text

    def chat_prompt_ids(self, messages):
        req = json.dumps({"messages": messages, "add_generation_prompt": True}) + "\n"
        out = cu.run(["tokenize", "--tokenizer", self.ck, "--jsonl"], input=req).stdout
        return json.loads(out)["tokens"]

    def job_state(self, job_id):
        jobs = json.loads(cu.run(["jobs", "--server", self.server, "--json", "--limit", "100"]).stdout)["jobs"]
        return [j for j in jobs if j["job_id"] == job_id][0]["state"]

    def wait_job_state(self, job_id, want, timeout=20):
        end = time.time() + timeout
        while time.time() < end:
            state = self.job_state(job_id)
            if state == want:
                return
            time.sleep(0.2)
        self.fail(f"{job_id}: {state}, not {want} within {timeout}s")

    # ---- tests
    def test_unserved_cluster_answers_503(self):
        status, body, (pstatus, pbody) = self.unserved
        self.assertEqual(status, 503, body)
        self.assertEqual(pstatus, 503, pbody)
        self.assertIn("not serving", pbody["error"]["message"])
        status, body, _ = self.http.request("GET", "/health")
        self.assertEqual(status, 200, body)

    def test_models(self):
        status, body, _ = self.http.request("GET", "/v1/models")
        self.assertEqual(status, 200)
        self.assertEqual([m["id"] for m in body["data"]], ["tiny-text"])
        self.assertEqual(body["object"], "list")

    def test_chat_greedy_equals_generate_streamed_or_not(self):
        ids = self.chat_prompt_ids(CHAT)
        tokens, text = self.generate_text(ids, 12)
        req = {"model": "tiny-text", "messages": CHAT, "max_tokens": 12, "temperature": 0}
        status, body = self.http.post("/v1/chat/completions", req)
        self.assertEqual(status, 200, body)
        self.assertTrue(body["id"].startswith("chatcmpl-job-"), body["id"])
        self.assertEqual(body["object"], "chat.completion")
        self.assertEqual(body["model"], "tiny-text")
        self.assertIsInstance(body["created"], int)
        msg = body["choices"][0]["message"]
        self.assertEqual(msg["role"], "assistant")
        self.assertEqual(msg["content"], text)
        want_finish = "stop" if tokens[-1] == self.eos else "length"
        self.assertEqual(body["choices"][0]["finish_reason"], want_finish)
        self.assertEqual(body["usage"], {"prompt_tokens": len(ids), "completion_tokens": len(tokens),
                                         "total_tokens": len(ids) + len(tokens)})
        # Streamed: the same text in deltas, the role first, usage last, then [DONE].
        status, events, done, _ = self.http.stream("/v1/chat/completions", dict(
            req, stream=True, stream_options={"include_usage": True}))
        self.assertEqual(status, 200, events)
        self.assertTrue(done)
        self.assertEqual(events[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        self.assertTrue(all(e["object"] == "chat.completion.chunk" for e in events))
        self.assertEqual(chat_text(events)[0], text)
        self.assertEqual(finishes(events), {0: want_finish})
        self.assertEqual(events[-1]["choices"], [])
        self.assertEqual(events[-1]["usage"], body["usage"])
        self.assertTrue(all(e["usage"] is None for e in events[:-1]))
        self.assertGreater(len(events), 3)  # token by token, not one blob

    def test_completions_text_and_token_ids_n2_seeded(self):
        req = {"prompt": "The capital of France is", "max_tokens": 6, "n": 2, "temperature": 0.9, "seed": 7}
        status, body = self.http.post("/v1/completions", req)
        self.assertEqual(status, 200, body)
        self.assertEqual(body["object"], "text_completion")
        self.assertTrue(body["id"].startswith("cmpl-job-"))
        self.assertEqual([c["index"] for c in body["choices"]], [0, 1])
        texts = [c["text"] for c in body["choices"]]
        if all(c["finish_reason"] == "length" for c in body["choices"]):
            self.assertEqual(body["usage"]["completion_tokens"], 12)
        # Seeded: the stream is the same completion, choice by choice.
        status, events, done, _ = self.http.stream("/v1/completions", dict(req, stream=True))
        self.assertEqual(status, 200)
        self.assertTrue(done)
        self.assertEqual(chat_text(events), {0: texts[0], 1: texts[1]})
        # Token ids in: the same as the text's ids (BOS added as the tokenizer config says).
        ids = json.loads(cu.run(["tokenize", "--tokenizer", self.ck, "--add-bos", "--text",
                                 "The capital of France is"]).stdout)
        ids = ids["tokens"] if isinstance(ids, dict) else ids
        status, body2 = self.http.post("/v1/completions", dict(req, prompt=ids))
        self.assertEqual(status, 200, body2)
        self.assertEqual([c["text"] for c in body2["choices"]], texts)
        self.assertEqual(body2["usage"]["prompt_tokens"], len(ids))

    def test_stop_string_ends_the_choice(self):
        req = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
        status, body = self.http.post("/v1/completions", req)
        self.assertEqual(status, 200, body)
        full = body["choices"][0]["text"]
        self.assertGreater(len(full), 8, full)
        stop = full[len(full) // 2: len(full) // 2 + 3]
        want = full[:full.index(stop)]
        for stream in (False, True):
            if stream:
                status, events, done, _ = self.http.stream("/v1/completions", dict(req, stop=[stop, "\x00"],
                                                                                   stream=True))
                text, finish = chat_text(events)[0], finishes(events)[0]
            else:
                status, b = self.http.post("/v1/completions", dict(req, stop=stop))
                text, finish = b["choices"][0]["text"], b["choices"][0]["finish_reason"]
                self.assertLess(b["usage"]["completion_tokens"], 24)
            self.assertEqual(status, 200)
            self.assertEqual(text, want, f"stop {stop!r} in {full!r}")
            self.assertEqual(finish, "stop")

    def test_bad_requests_get_400_naming_the_field(self):
        cases = [
            ({"messages": CHAT, "temperature": 5}, "temperature"),
            ({"messages": CHAT, "max_tokens": 0}, "max_tokens"),
            ({"messages": CHAT, "max_tokens": 10 ** 6}, "max_tokens"),
            ({"messages": CHAT, "n": 0}, "n"),
            ({"messages": CHAT, "top_p": 1.5}, "top_p"),
            ({"messages": CHAT, "stop": 3}, "stop"),
            ({"messages": CHAT, "stream": "yes"}, "stream"),
            ({"messages": CHAT, "logprobs": True}, "logprobs"),
            ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
            ({"messages": CHAT, "frobnicate": 1}, "frobnicate"),
            ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
            ({"messages": [{"role": "user", "content": "x" * 40000}]}, "messages"),  # longer than the context
            ({"max_tokens": 3}, "messages"),
        ]
        for body, param in cases:
            status, b = self.http.post("/v1/chat/completions", body)
            self.assertEqual(status, 400, (body if len(json.dumps(body)) < 300 else param, b))
            self.assertEqual(b["error"]["param"], param, b)
            self.assertEqual(b["error"]["type"], "invalid_request_error")
        status, b = self.http.post("/v1/completions", {"prompt": [5, 200000], "max_tokens": 2})
        self.assertEqual(status, 400, b)
        self.assertIn("out of range", b["error"]["message"])
        status, b, _ = self.http.request("POST", "/v1/chat/completions", raw=b"{not json")
        self.assertEqual(status, 400)
        self.assertIn("JSON", b["error"]["message"])
        # 404: another model, another route.
        status, b = self.http.post("/v1/chat/completions", {"model": "gpt-4", "messages": CHAT})
        self.assertEqual(status, 404, b)
        self.assertEqual(b["error"]["code"], "model_not_found")
        status, b = self.http.post("/v1/embeddings", {"input": "x"})
        self.assertEqual(status, 404, b)

    def test_client_disconnect_cancels_the_job(self):
        # Streaming: read the first chunk, then hang up.
        c = self.http.conn()
        c.request("POST", "/v1/chat/completions", body=json.dumps(
            {"messages": CHAT, "max_tokens": 3000, "temperature": 0, "stream": True}).encode(),
            headers={"Content-Type": "application/json"})
        r = c.getresponse()
        self.assertEqual(r.status, 200)
        job = r.getheader("X-Expertmesh-Job-Id")
        self.assertTrue(job)
        self.assertTrue(r.read1(100).startswith(b"data: "))
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
        self.wait_job_state(job, "JOB_STATE_CANCELLED")
        # Not streaming: send the request and hang up before the answer.
        s = socket.create_connection(("127.0.0.1", self.http.port), timeout=10)
        body = json.dumps({"messages": CHAT, "max_tokens": 3000, "temperature": 0}).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.5)
        s.close()
        end = time.time() + 20
        while True:  # its job: the newest one
            newest = json.loads(cu.run(["jobs", "--server", self.server, "--json", "--limit", "1"]).stdout)["jobs"]
            if newest[0]["job_id"] != job:
                break
            self.assertLess(time.time(), end, "the non-streamed request made no job")
            time.sleep(0.2)
        self.wait_job_state(newest[0]["job_id"], "JOB_STATE_CANCELLED")

    def test_submit_stream_prints_each_token_once_before_the_results(self):
        prompts = os.path.join(self.tmp, "submit_prompts.jsonl")
        with open(prompts, "w") as f:
            f.write(json.dumps({"tokens": [1, 500, 600]}) + "\n" + json.dumps({"tokens": [1, 700]}) + "\n")
        out = cu.run(["submit", "--server", self.server, "--prompts", prompts, "--max-new-tokens", "7",
                      "--stream"]).stdout
        lines = [json.loads(l) for l in out.splitlines() if l.strip()]
        deltas = [l for l in lines if "new_tokens" in l]
        results = [l for l in lines if "tokens" in l]
        self.assertEqual([r["index"] for r in results], [0, 1])
        self.assertEqual(lines[-2:], results)  # results last
        for r in results:
            got = []
            for d in deltas:
                if d["index"] == r["index"]:
                    self.assertEqual(d["offset"], len(got))
                    got += d["new_tokens"]
            self.assertEqual(got, r["tokens"])

    def test_same_idempotency_key_is_the_same_job(self):
        req = {"messages": CHAT, "max_tokens": 5, "temperature": 1.0}  # sampled: the seed comes from the key
        h = {"Idempotency-Key": f"test-{os.getpid()}-{time.time()}"}
        status, a = self.http.post("/v1/chat/completions", req, h)
        self.assertEqual(status, 200, a)
        # A retry as a stream streams the same job.
        status, events, done, _ = self.http.stream("/v1/chat/completions", dict(req, stream=True), h)
        self.assertEqual(status, 200, events)
        self.assertTrue(done)
        self.assertEqual(events[0]["id"], a["id"])
        self.assertEqual(chat_text(events)[0], a["choices"][0]["message"]["content"])
        status, b = self.http.post("/v1/chat/completions", req, h)
        self.assertEqual(status, 200, b)
        self.assertEqual(a["id"], b["id"])
        self.assertEqual(a["choices"], b["choices"])
        self.assertEqual(a["created"], b["created"])


if __name__ == "__main__":
    unittest.main()
