"""The R1-Distill tokenizers and chat template against the published files,
HF tokenizers and Jinja2.

`expertmesh checkpoint --preset tiny-qwen2-text --tokenizer r1-distill-qwen`
(and tiny-llama-text / r1-distill-llama) writes a checkpoint whose
tokenizer.json and tokenizer_config.json must hold:

* DeepSeek's tokens at the ids of the published files, with their "special"
  flags (the table below), BOS <｜begin▁of▁sentence｜> and EOS
  <｜end▁of▁sentence｜>, add_bos_token true;
* the distills' chat template, byte for byte the oracle
  tests/text/data/deepseek_r1_distill_chat_template.jinja.

Sources of the facts (docs/TEXT.md): the DeepSeek-R1-Distill-Qwen-1.5B
tokenizer.json + tokenizer_config.json quoted in full in a public question
about Esperanto/DeepSeek-R1-Distill-Qwen-1.5B-kvc-fp16-onnx (DeepSeek's
files) and the added tokens quoted in quic/ai-hub-models' deepseek_r1
model.py ("Ref: huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B/
blob/main/tokenizer_config.json"); the current template text (generation
prompt "<｜Assistant｜><think>\\n") as BerriAI/litellm's constants.py
known_tokenizer_config holds it, equal to the first revision
(Evilcarbon/DeepSeek-R1-Distill-Qwen-32B tokenizer_config.json) but for that
generation prompt. The Llama distill's ids, flags and neighbours: deepseek-ai/
DeepSeek-R1-Distill-Llama-8B's added_tokens_decoder as transformers 4.48.2
prints it, quoted in full in a public fine-tuning course text (128000,
128001, 128011-128015; model_max_length 131072; no pad token of its own).

Then: the C++ encoder equals HF tokenizers (Rust, via node) on the derived
tokenizer.json for texts around the special tokens and the corpus, decode
too; and the C++ template equals Jinja2 (python3-jinja2, configured as
transformers) rendering the oracle for the conversations of
test_chat_template.py (system, multi-turn, tools, reasoning), with and
without the generation prompt, ids included.

  python3 test_r1_distill.py --expertmesh build/launch/expertmesh --root . --workdir /tmp/em_distill
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus as corpus_mod  # noqa: E402
from test_chat_template import check_renderings, conversations, render_jinja  # noqa: E402
from textio import fail, run_jsonl  # noqa: E402

import jinja2  # noqa: E402

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# (id, content, special) in the published files.
QWEN = [(151643, EOS, True), (151644, "<｜User｜>", False), (151645, "<｜Assistant｜>", False),
        (151646, BOS, True), (151647, "<|EOT|>", False), (151648, "<think>", False), (151649, "</think>", False)]
LLAMA = [(128000, BOS, True), (128001, EOS, True), (128011, "<｜User｜>", False), (128012, "<｜Assistant｜>", False),
         (128013, "<think>", False), (128014, "</think>", False), (128015, "<｜▁pad▁｜>", True)]
CASES = [("r1-distill-qwen", "tiny-qwen2-text", QWEN), ("r1-distill-llama", "tiny-llama-text", LLAMA)]

AROUND = [
    BOS + "Hello" + EOS,
    "<｜User｜>What is 2+2?<｜Assistant｜><think>\nadd them</think>\n\n4" + EOS,
    "text<think>inside</think>after",
    " <think> spaced </think> ",
    "<think><think></think></think>",
    "<|EOT|> <｜User｜><｜User｜>x<｜Assistant｜>",
    "almost <think <｜User> </think",
    "中文<think>思考</think>答案",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--expertmesh", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    node_modules = os.path.join(a.root, "tools", "node_modules")
    if shutil.which("node") is None:
        fail("node is not installed (the HF tokenizers reference runs on it): run scripts/install-deps.sh")
    for pkg in ("tokenizer-qwen2_5", "tokenizer-llama3_1"):
        if not os.path.exists(os.path.join(node_modules, "@lenml", pkg, "models", "tokenizer.json")):
            fail(f"npm @lenml/{pkg} is missing under {node_modules}: run scripts/install-deps.sh")
    hf = os.path.join(a.root, "tools", "hf_tokenize.js")
    env = dict(os.environ, EXPERTMESH_NODE_MODULES=node_modules)
    template = open(os.path.join(a.root, "tests", "text", "data", "deepseek_r1_distill_chat_template.jinja"),
                    encoding="utf-8").read()
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    texts = AROUND + corpus_mod.corpus(a.root)[:400]
    try:
        for name, preset, table in CASES:
            ck = os.path.join(a.workdir, name)
            p = subprocess.run([a.expertmesh, "checkpoint", "--preset", preset, "--dtype", "bf16", "--tokenizer", name,
                                "--out", ck], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=300)
            if p.returncode != 0:
                fail(f"checkpoint --tokenizer {name}: rc {p.returncode}: {p.stderr.decode(errors='replace')[-2000:]}")
            tj = json.load(open(os.path.join(ck, "tokenizer.json"), encoding="utf-8"))
            cfg = json.load(open(os.path.join(ck, "tokenizer_config.json"), encoding="utf-8"))
            added = {t["id"]: t for t in tj["added_tokens"]}
            for tid, content, special in table:
                got = added.get(tid)
                if got is None or got["content"] != content or got["special"] != special:
                    fail(f"{name}: id {tid} is {got}, the published file has {content!r} special={special}")
            contents = [t["content"] for t in tj["added_tokens"]]
            if len(contents) != len(set(contents)):
                fail(f"{name}: an added token appears twice")
            pad = EOS if name == "r1-distill-qwen" else None  # the Llama distills have no pad token
            for key, want in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", pad)):
                v = cfg.get(key)
                v = v["content"] if isinstance(v, dict) else v
                if v != want:
                    fail(f"{name}: tokenizer_config.json {key} is {v!r}, not {want!r}")
            if cfg.get("add_bos_token") is not True:
                fail(f"{name}: add_bos_token must be true as in the published file")
            if cfg.get("chat_template") != template:
                fail(f"{name}: the chat_template differs from the oracle")
            # One `tokenize --jsonl` by name and one from the checkpoint folder, one HF encode and decode
            # (each loads the tokenizer once).
            singles = [{"text": c} for _, c, _ in table]
            reqs, want = [], []
            for conv in conversations():
                for gen in (False, True):
                    reqs.append({"messages": conv, "add_generation_prompt": gen})
                    want.append(render_jinja(template, conv, gen, BOS))
            ok_texts = [w for w, _ in want if w is not None]
            by_name = run_jsonl([a.expertmesh, "tokenize", "--tokenizer", name, "--jsonl"],
                                singles + [{"text": t} for t in texts], env)
            ref = run_jsonl(["node", hf, "encode", ck], [{"text": t} for t in texts + ok_texts])
            ref_ids, ref = ref[len(texts):], ref[:len(texts)]
            around = [{"tokens": r["tokens"]} for r in ref[:len(AROUND)]]
            by_dir = run_jsonl([a.expertmesh, "tokenize", "--tokenizer", ck, "--jsonl"],
                               [{"tokens": [tid], "skip_special": True} for tid, _, _ in table] +
                               [{"text": t} for t in texts] + around + [{"text": "Hi", "add_bos": True}] + reqs, env)
            ref_dec = run_jsonl(["node", hf, "decode", ck], around)
            mine, by_name = by_name[:len(table)], by_name[len(table):]
            dec, by_dir = by_dir[:len(table)], by_dir[len(table):]
            by_dir, mine_dec, bos, got = (by_dir[:len(texts)], by_dir[len(texts):len(texts) + len(AROUND)],
                                          by_dir[len(texts) + len(AROUND)]["tokens"], by_dir[len(texts) + len(AROUND) + 1:])
            # Each token alone: its id, its text back, dropped by skip_special only if special.
            for (tid, content, special), m, d in zip(table, mine, dec):
                if m.get("tokens") != [tid]:
                    fail(f"{name}: {content!r} encodes to {m}, not [{tid}]")
                if d.get("text") != ("" if special else content):
                    fail(f"{name}: decode([{tid}], skip_special) gave {d}")
            # Texts around them and the corpus: the named tokenizer, the checkpoint folder and HF agree.
            for t, m, d, r in zip(texts, by_name, by_dir, ref):
                if "error" in m or "error" in r or m != d:
                    fail(f"{name}: on {t[:80]!r}: by name {m}, by folder {d}, HF {r.get('error')}")
                if m["tokens"] != r["tokens"]:
                    fail(f"{name}: tokens differ from HF tokenizers on {t[:120]!r}: {m['tokens'][:20]} vs "
                         f"{r['tokens'][:20]}")
            for t, m, r in zip(AROUND, mine_dec, ref_dec):
                if m.get("text") != t or r.get("text") != t:
                    fail(f"{name}: decode of {t!r}: expertmesh {m}, HF {r}")
            if bos[0] != [tid for tid, c, _ in table if c == BOS][0]:
                fail(f"{name}: --add-bos gave {bos}")
            # The chat template against Jinja2 on the oracle text, with ids.
            n = check_renderings(name, reqs, want, got, ref_ids)
            think = [tid for tid, c, _ in table if c == "<think>"][0]
            gen = [g for r, g in zip(reqs, got) if r["add_generation_prompt"] and "prompt" in g
                   and g["prompt"].endswith("<｜Assistant｜><think>\n")]
            if not gen or gen[0]["tokens"][-2] != think:
                fail(f"{name}: no generation prompt ends with <｜Assistant｜><think>\\n as id {think}")
            print(f"{name}: {len(table)} DeepSeek tokens at the published ids; {len(texts)} texts equal to HF "
                  f"tokenizers; {n} renderings equal to jinja2 {jinja2.__version__} ({len(reqs) - n} refused by both), "
                  f"ids equal to HF")
        print("PASS")
    finally:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
