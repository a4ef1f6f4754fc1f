"""An R1-Distill checkpoint served over the OpenAI API: the reasoning split.

A standalone cluster (coordinator with --http-listen + one CPU worker) on a
tiny-qwen2-text checkpoint carrying the r1-distill-qwen tokenizer
(`checkpoint --tokenizer r1-distill-qwen`): the coordinator recognises the
distills' chat template, whose generation prompt opens <think>
(`<｜Assistant｜>` 151645, `<think>` 151648, "\\n" 198 in the Qwen vocabulary),
so a chat answer's text before `</think>` is reasoning_content and the rest
content (greedy: the text `expertmesh generate` + `tokenize --decode` give for
the same prompt ids), not streamed and streamed.

  EXPERTMESH=build/launch/expertmesh python3 tests/e2e/test_openai_distill.py [-v]
"""
import json
import os
import shutil
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_util as cu  # noqa: E402
from test_openai import Http, chat_text  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
cu.ENV["EXPERTMESH_NODE_MODULES"] = os.environ.get("EXPERTMESH_NODE_MODULES", os.path.join(ROOT, "tools", "node_modules"))
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
EOS, ASSISTANT, THINK, NEWLINE = 151643, 151645, 151648, 198


def split(text):
    """SGLang's deepseek-r1 reasoning parser, as docs/API.md describes it."""
    if "</think>" not in text:
        return text, ""
    reasoning, rest = text.split("</think>", 1)
    return reasoning, rest.lstrip(" \t\r\n\f\v")


class DistillReasoningTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="em_openai_distill_")
        cls.procs = []
        cls.ck = os.path.join(cls.tmp, "tiny-distill")
        cu.run(["checkpoint", "--preset", "tiny-qwen2-text", "--dtype", "bf16", "--tokenizer", "r1-distill-qwen",
                "--out", cls.ck], timeout=300)
        grpc_port, http_port = cu.free_port(), cu.free_port()
        cls.server = f"127.0.0.1:{grpc_port}"
        cls.coord = cu.start(["coordinator", "--checkpoint", cls.ck, "--pp", "1", "--ep", "1", "--listen", cls.server,
                              "--http-listen", f"127.0.0.1:{http_port}"], os.path.join(cls.tmp, "coordinator.log"))
        cls.procs.append(cls.coord)
        cls.http = Http(http_port)
        cls.worker = cu.start(["worker", "--coordinator", cls.server], os.path.join(cls.tmp, "worker.log"))
        cls.procs.append(cls.worker)
        end = time.time() + 90
        while True:
            try:
                if cls.http.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if cls.coord.poll() is not None or time.time() > end:
                raise AssertionError("the cluster does not serve:\n" + cu.read_log(cls.coord) + cu.read_log(cls.worker))
            time.sleep(0.1)

    @classmethod
    def tearDownClass(cls):
        for p in cls.procs:
            cu.kill(p)
        if not os.environ.get("EM_KEEP_TMP"):
            shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_chat_answer_is_split_at_think(self):
        req = json.dumps({"messages": CHAT, "add_generation_prompt": True}) + "\n"
        ids = json.loads(cu.run(["tokenize", "--tokenizer", self.ck, "--jsonl"], input=req).stdout)["tokens"]
        self.assertEqual(ids[-3:], [ASSISTANT, THINK, NEWLINE], ids)  # the prompt opens the reasoning
        prompts = os.path.join(self.tmp, "prompts.jsonl")
        with open(prompts, "w") as f:
            f.write(json.dumps({"tokens": ids}) + "\n")
        out = cu.run(["generate", "--checkpoint", self.ck, "--prompts", prompts, "--max-new-tokens", "16",
                      "--stop-token-ids", str(EOS)]).stdout
        tokens = cu.results(out)[0]
        text = cu.run(["tokenize", "--tokenizer", self.ck, "--decode", "--skip-special", "--text",
                       json.dumps(tokens)]).stdout
        reasoning, content = split(text)
        self.assertTrue(reasoning, text)
        body_req = {"messages": CHAT, "max_tokens": 16, "temperature": 0}
        status, body = self.http.post("/v1/chat/completions", body_req)
        self.assertEqual(status, 200, body)
        msg = body["choices"][0]["message"]
        self.assertEqual(msg["reasoning_content"], reasoning)
        self.assertEqual(msg["content"], content)
        self.assertEqual(body["usage"]["prompt_tokens"], len(ids))
        self.assertEqual(body["usage"]["completion_tokens"], len(tokens))
        status, events, done, _ = self.http.stream("/v1/chat/completions", dict(body_req, stream=True))
        self.assertEqual(status, 200, events)
        self.assertTrue(done)
        self.assertEqual(chat_text(events, "reasoning_content")[0], reasoning)
        self.assertEqual(chat_text(events)[0], content)


if __name__ == "__main__":
    unittest.main()
