"""Joins em_gpu_bench's and torch_bench.py's RESULT lines into one markdown table.

    python3 bench/gpu/summary.py OUT_DIR     # reads OUT_DIR/bench.log, OUT_DIR/torch.log
"""

import json
import os
import sys


def results(path):
    out = []
    if not os.path.exists(path):
        return out
    for line in open(path, errors="replace"):
        if line.startswith("RESULT "):
            try:
                out.append(json.loads(line[7:]))
            except json.JSONDecodeError:
                pass
    return out


def main():
    d = sys.argv[1]
    ours = results(os.path.join(d, "bench.log"))
    torch = results(os.path.join(d, "torch.log"))
    best = {}
    for r in torch:
        cur = best.get(r["name"])
        if cur is None or r["ms"] < cur["ms"]:
            best[r["name"]] = r
    ceil = {r["name"]: r for r in ours if r["name"].startswith("ceiling.")}
    if "ceiling.hbm_copy" in ceil:
        t = best.get("ceiling.hbm_copy", {})
        print(f"HBM copy bandwidth (read + write): {ceil['ceiling.hbm_copy']['gbs']:.0f} GB/s"
              + (f" (PyTorch copy_: {t['gbs']:.0f} GB/s)" if t else ""))
    if "ceiling.bf16_mma" in ceil:
        t = best.get("ceiling.bf16_mma", {})
        print(f"bf16 matrix peak (8192^3): {ceil['ceiling.bf16_mma']['tflops']:.0f} TFLOP/s"
              + (f" (PyTorch matmul: {t['tflops']:.0f} TFLOP/s)" if t else ""))
    print()
    print("| operation | ours (ms) | floor (ms) | achieved | goal | PyTorch (ms) | vs PyTorch |")
    print("| --- | ---: | ---: | --- | --- | ---: | ---: |")
    for r in ours:
        if r["name"].startswith(("ceiling.", "info.")):
            continue
        if "error" in r:
            print(f"| {r['name']} | FAILED | | | | | |")
            continue
        kind = {"hbm": "of HBM BW", "mma": "of bf16 peak"}.get(r["goal_kind"], "of floor")
        achieved = f"{r['pct']:.1f}% {kind}"
        if r["goal_pct"] > 0:
            goal = f">= {r['goal_pct']:.0f}%: " + ("met" if r["pct"] >= r["goal_pct"] else "MISSED")
        else:
            goal = "-"
        t = best.get(r["name"])
        if t:
            impl = f" ({t['impl']})" if "impl" in t else ""
            vs = f"{t['ms'] / r['ms']:.2f}x faster" if t["ms"] >= r["ms"] else f"{r['ms'] / t['ms']:.2f}x SLOWER"
            tms = f"{t['ms']:.3f}{impl}"
        else:
            tms, vs = "n/a", "-"
        print(f"| {r['name']} | {r['ms']:.3f} | {r['floor_ms']:.3f} | {achieved} | {goal} | {tms} | {vs} |")


if __name__ == "__main__":
    main()
