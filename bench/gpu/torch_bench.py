"""PyTorch doing the same operations as em_gpu_bench, at the same sizes.

    python3 bench/gpu/torch_bench.py [--offsets-from bench.log] [--reps 20]

Prints one "RESULT {json}" line per operation with the same names as
em_gpu_bench (bench/gpu/summary.py joins them). Each operation is written the
way a PyTorch implementation of DeepSeek-V3 writes it (the reference
model.py's Gate, a per-expert loop, torch._grouped_mm where PyTorch has it,
MLA decode as two batched GEMMs around a softmax). Median of CUDA-event
timings after warm-up; random inputs.
"""

import argparse
import json
import math

import torch
import torch.nn.functional as F


def time_ms(fn, warmup=3, reps=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in ev)
    return ms[len(ms) // 2]


def result(name, ms, **kw):
    print("RESULT " + json.dumps(dict(name=name, ms=ms, **kw)), flush=True)


def route(logits, bias, n_group, topk_group, top_k, scale):
    """DeepSeek-V3 Gate (noaux_tc): sigmoid, biased group-limited top-k."""
    T, E = logits.shape
    scores = logits.sigmoid()
    s = scores + bias
    if n_group > 1:
        g = s.view(T, n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        gi = g.topk(topk_group, dim=-1)[1]
        mask = torch.ones(T, n_group, dtype=torch.bool, device=s.device).scatter_(1, gi, False)
        s = s.masked_fill(mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E), float("-inf"))
    idx = s.topk(top_k, dim=-1)[1]
    w = scores.gather(1, idx)
    w = w / w.sum(dim=-1, keepdim=True) * scale
    return idx, w


def permute(x, idx, E):
    flat = idx.view(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=E)
    return x.index_select(0, order // idx.shape[1]), order, counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--offsets-from", default="")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    reps = args.reps
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(f"torch {torch.__version__} cuda {torch.version.cuda} device {torch.cuda.get_device_name()}", flush=True)

    # Ceilings, measured the same way.
    n = (2 << 30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=dev).uniform_(-1, 1)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), reps=reps)
    result("ceiling.hbm_copy", ms, gbs=2 * a.numel() * 2 / ms / 1e6)
    del a, b
    m = 8192
    x = torch.empty(m, m, dtype=torch.bfloat16, device=dev).uniform_(-1, 1)
    w = torch.empty(m, m, dtype=torch.bfloat16, device=dev).uniform_(-1, 1)
    ms = time_ms(lambda: x @ w.t(), reps=10)
    result("ceiling.bf16_mma", ms, tflops=2 * m**3 / ms / 1e9)
    del x, w

    # Router + permute: 4096 tokens, V3 router, hidden 7168.
    T, E, K, H = 4096, 256, 8, 7168
    logits = torch.empty(T, E, device=dev).uniform_(-4, 4)
    bias = torch.empty(E, device=dev).uniform_(-0.1, 0.1)
    x = torch.empty(T, H, dtype=torch.bfloat16, device=dev).uniform_(-2, 2)
    result("router (fused, V3 grouped top-8)", time_ms(lambda: route(logits, bias, 8, 4, K, 2.5), reps=reps))
    idx, wts = route(logits, bias, 8, 4, K, 2.5)
    result("permute (4096 x 8 rows of 7168)", time_ms(lambda: permute(x, idx, E), reps=reps))

    def route_permute():
        i, _ = route(logits, bias, 8, 4, K, 2.5)
        return permute(x, i, E)

    result("router + permute", time_ms(route_permute, reps=reps))
    xp, order, _ = permute(x, idx, E)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=dev)
    pos = pos.view(T, K)

    def combine():
        return (xp.index_select(0, pos.view(-1)).view(T, K, H).float() * wts.unsqueeze(-1)).sum(dim=1).bfloat16()

    result("combine (weighted, 8 rows per token)", time_ms(combine, reps=reps))
    del logits, x, xp

    # Grouped experts: 32 local experts, 4096 tokens x top-8, hidden 7168, inter 2048.
    E, I = 32, 2048
    offs = None
    if args.offsets_from:
        for line in open(args.offsets_from):
            if line.startswith("RESULT ") and '"info.expert_rows"' in line:
                offs = json.loads(line[7:])["offsets"]
    if offs is None:
        li = torch.empty(T, E, device=dev).uniform_(-4, 4)
        ii = li.sigmoid().topk(K, dim=-1)[1]
        counts = torch.bincount(ii.view(-1), minlength=E).tolist()
        offs = [0]
        for c in counts:
            offs.append(offs[-1] + c)
    rows = offs[-1]
    xp = torch.empty(rows, H, dtype=torch.bfloat16, device=dev).uniform_(-2, 2)
    wgu = torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device=dev).uniform_(-0.03, 0.03)
    wd = torch.empty(E, H, I, dtype=torch.bfloat16, device=dev).uniform_(-0.03, 0.03)
    out = torch.empty(rows, H, dtype=torch.bfloat16, device=dev)

    def experts_loop():
        for e in range(E):
            s, t = offs[e], offs[e + 1]
            if s == t:
                continue
            h = xp[s:t] @ wgu[e].t()
            out[s:t] = (F.silu(h[:, :I]) * h[:, I:]) @ wd[e].t()

    result("grouped experts bf16 (cuBLASLt)", time_ms(experts_loop, reps=reps), impl="per-expert loop")
    if hasattr(torch, "_grouped_mm"):
        offs_t = torch.tensor(offs[1:], dtype=torch.int32, device=dev)
        wgu_t, wd_t = wgu.transpose(-2, -1), wd.transpose(-2, -1)

        def experts_grouped():
            h = torch._grouped_mm(xp, wgu_t, offs=offs_t)
            return torch._grouped_mm(F.silu(h[:, :I]) * h[:, I:], wd_t, offs=offs_t)

        try:
            result("grouped experts bf16 (cuBLASLt)", time_ms(experts_grouped, reps=reps), impl="torch._grouped_mm")
        except Exception as ex:  # noqa: BLE001
            print(f"torch._grouped_mm: {type(ex).__name__}: {str(ex)[:200]}", flush=True)
    del wgu, wd

    # fp8 experts through torch._scaled_mm, both block-scaling recipes (Hopper's
    # cuBLASLt accepts only one of the two operand assignments; ours is the second).
    wq_gu = torch.empty(E, 2 * I, H, device=dev).uniform_(-240, 240).to(torch.float8_e4m3fn)
    wq_d = torch.empty(E, H, I, device=dev).uniform_(-240, 240).to(torch.float8_e4m3fn)
    ws_gu = torch.empty(E, 2 * I // 128, H // 128, device=dev).uniform_(1e-4, 2e-4)
    ws_d = torch.empty(E, H // 128, I // 128, device=dev).uniform_(1e-4, 2e-4)

    def quant_1x128(t):  # DeepSeek's activation tiles; scales outer-dim-major
        M, Kd = t.shape
        blk = t.float().view(M, Kd // 128, 128)
        s = blk.abs().amax(dim=-1).clamp(min=1e-12) / 448.0
        q = (blk / s.unsqueeze(-1)).to(torch.float8_e4m3fn).view(M, Kd)
        return q, s.t().contiguous().t()

    def quant_128x128(t):  # 128 tokens x 128 channels; scales (MB, KB), rows padded to 4 (16-byte strides)
        M, Kd = t.shape
        MB, KB = (M + 127) // 128, Kd // 128
        pad = torch.zeros(MB * 128, Kd, dtype=torch.float32, device=t.device)
        pad[:M] = t.float()
        blk = pad.view(MB, 128, KB, 128)
        s = blk.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        q = (blk / s[:, None, :, None]).to(torch.float8_e4m3fn).view(MB * 128, Kd)[:M]
        L4 = (KB + 3) // 4 * 4
        sp = torch.ones(MB, L4, device=t.device)
        sp[:, :KB] = s
        return q, sp[:, :KB]

    # 1x128 weight scales (rows of the 128x128 blocks) as (KB, N) contiguous: the scale_b of a [K, N] operand.
    row_gu = ws_gu.repeat_interleave(128, dim=1).transpose(1, 2).contiguous()
    row_d = ws_d.repeat_interleave(128, dim=1).transpose(1, 2).contiguous()
    recipes = {
        "1x128 acts x 128x128 weights (DeepSeek)": (quant_1x128, lambda e: ws_gu[e].t(), lambda e: ws_d[e].t()),
        "128x128 acts x 1x128 weights (ours)": (
            quant_128x128, lambda e: row_gu[e], lambda e: row_d[e]),
    }
    for rname, (quant, sg, sd) in recipes.items():
        def experts_fp8():
            for e in range(E):
                s, t = offs[e], offs[e + 1]
                if s == t:
                    continue
                q, sc = quant(xp[s:t])
                h = torch._scaled_mm(q, wq_gu[e].t(), scale_a=sc, scale_b=sg(e), out_dtype=torch.bfloat16)
                q2, sc2 = quant(F.silu(h[:, :I]) * h[:, I:])
                out[s:t] = torch._scaled_mm(q2, wq_d[e].t(), scale_a=sc2, scale_b=sd(e), out_dtype=torch.bfloat16)

        try:
            result("grouped experts fp8 (cuBLASLt 128x128)", time_ms(experts_fp8, reps=reps),
                   impl=f"torch._scaled_mm loop, {rname}")
        except Exception as ex:  # noqa: BLE001
            print(f"fp8 experts, torch._scaled_mm {rname}: {type(ex).__name__}: {str(ex)[:240]}", flush=True)
    del wq_gu, wq_d
    del xp, out

    # MLA decode: batch 64, 4K context, 128 heads, kv_lora 512, rope 64 (contiguous cache).
    B, S, Hh, L, R = 64, 4096, 128, 512, 64
    scale = (192 ** -0.5) * (0.1 * math.log(40) + 1) ** 2
    kv = torch.empty(B, S, L + R, dtype=torch.bfloat16, device=dev).uniform_(-1, 1)
    q = torch.empty(B, Hh, L + R, dtype=torch.bfloat16, device=dev).uniform_(-1, 1)

    def mla_decode():
        s = torch.bmm(q, kv.transpose(1, 2)).float() * scale
        p = torch.softmax(s, dim=-1).to(torch.bfloat16)
        return torch.bmm(p, kv[:, :, :L])

    result("MLA decode (B64, 4K ctx, 128 heads)", time_ms(mla_decode, reps=reps), impl="bmm-softmax-bmm")
    qn = torch.empty(B, Hh, 192, dtype=torch.bfloat16, device=dev).uniform_(-1, 1)
    wkvb = torch.empty(Hh, 256, L, dtype=torch.bfloat16, device=dev).uniform_(-0.05, 0.05)

    def mla_full():
        qa = torch.einsum("bhd,hdl->bhl", qn[..., :128], wkvb[:, :128])
        qq = torch.cat([qa, qn[..., 128:]], dim=-1)
        s = torch.bmm(qq, kv.transpose(1, 2)).float() * scale
        p = torch.softmax(s, dim=-1).to(torch.bfloat16)
        o = torch.bmm(p, kv[:, :, :L])
        return torch.einsum("bhl,hvl->bhv", o, wkvb[:, 128:])

    result("MLA absorbed: absorb + decode + out-proj", time_ms(mla_full, reps=reps), impl="einsum + bmm")


if __name__ == "__main__":
    main()
