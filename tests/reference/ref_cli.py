"""The command line of the numpy references (ds3_ref.py, dense_ref.py):

  python3 <ref>.py generate --checkpoint DIR --prompts FILE --max-new-tokens N [verb-specific flags]

FILE holds one JSON object {"tokens": [ids...]} per line (blank lines
skipped); each prompt's greedy tokens are printed as one JSON line
{"index": i, "tokens": [...]}, the format `expertmesh generate` prints.
"""
import argparse
import json


def generate_parser(doc):
    """The `generate` verb's parser; returns (parser, generate subparser) so a reference can add flags."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--prompts", required=True)
    g.add_argument("--max-new-tokens", type=int, default=8)
    return ap, g


def read_prompts(path):
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line)["tokens"])
    return out


def print_tokens(index, tokens):
    print(json.dumps({"index": index, "tokens": tokens}))
