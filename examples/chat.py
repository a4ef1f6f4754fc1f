#!/usr/bin/env python3
"""Chat with a model served by expertmesh, over its OpenAI-compatible HTTP API.

Python standard library only (urllib, json): POST /v1/chat/completions with
"stream": true and print the answer as the server-sent events arrive. The
coordinator must be started with --http-listen HOST:PORT (docs/API.md).

  python3 examples/chat.py --server 127.0.0.1:8000 "Hello!"
  python3 examples/chat.py --server 127.0.0.1:8000            # interactive; empty line or Ctrl-D ends
  python3 examples/chat.py --server 127.0.0.1:8000 --system "Be brief." --max-tokens 64 --temperature 0.7 "Hi"

$EXPERTMESH_API_KEY (or --api-key) is sent as `Authorization: Bearer KEY`.
"""
import argparse
import json
import os
import sys
import urllib.error
import urllib.request


class ApiError(Exception):
    pass


def request(base, path, body=None, api_key="", timeout=600):
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = "Bearer " + api_key
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers=headers, method="POST" if data else "GET")
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:  # OpenAI's error shape: {"error": {"message": ...}}
        text = e.read().decode("utf-8", "replace")
        try:
            text = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise ApiError(f"HTTP {e.code}: {text}") from None
    except urllib.error.URLError as e:
        raise ApiError(f"cannot reach {base}: {e.reason} (is the coordinator started with --http-listen?)") from None


def sse_events(response):
    """Yields the data of each server-sent event (its data: lines joined), until [DONE]."""
    data = []
    for raw in response:  # lines; the server ends each one with \n
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                payload = "\n".join(data)
                data = []
                if payload == "[DONE]":
                    return
                yield payload
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    raise ApiError("the stream ended without [DONE]")


def chat(base, model, messages, args):
    body = {"model": model, "messages": messages, "stream": True}
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    answer = []
    with request(base, "/v1/chat/completions", body, args.api_key) as resp:
        for payload in sse_events(resp):
            chunk = json.loads(payload)
            if "error" in chunk:
                raise ApiError(chunk["error"].get("message", str(chunk["error"])))
            for choice in chunk.get("choices", []):
                delta = choice.get("delta") or {}
                if args.show_reasoning and delta.get("reasoning_content"):
                    sys.stdout.write(delta["reasoning_content"])
                if delta.get("content"):
                    answer.append(delta["content"])
                    sys.stdout.write(delta["content"])
                sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(answer)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("message", nargs="?", help="one message (default: interactive)")
    ap.add_argument("--server", required=True, help="the coordinator's --http-listen HOST:PORT")
    ap.add_argument("--model", help="default: the first of GET /v1/models")
    ap.add_argument("--system")
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--api-key", default=os.environ.get("EXPERTMESH_API_KEY", ""))
    ap.add_argument("--show-reasoning", action="store_true", help="also print reasoning_content (DeepSeek-R1)")
    args = ap.parse_args()
    base = args.server if args.server.startswith("http://") else "http://" + args.server
    base = base.rstrip("/")
    try:
        model = args.model
        if not model:
            with request(base, "/v1/models", api_key=args.api_key) as resp:
                model = json.load(resp)["data"][0]["id"]
        messages = [{"role": "system", "content": args.system}] if args.system else []
        if args.message:
            messages.append({"role": "user", "content": args.message})
            chat(base, model, messages, args)
            return 0
        while True:
            try:
                text = input("> ").strip()
            except EOFError:
                return 0
            if not text or text == "/exit":
                return 0
            messages.append({"role": "user", "content": text})
            messages.append({"role": "assistant", "content": chat(base, model, messages, args)})
    except ApiError as e:
        print(f"chat.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
