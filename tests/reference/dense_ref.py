#!/usr/bin/env python3
"""Independent numpy reference of the dense R1-Distill architectures
(HF `Qwen2ForCausalLM` and `LlamaForCausalLM`), the oracle of the tests.

Written from the math of HF `modeling_qwen2.py` / `modeling_llama.py` and
`modeling_rope_utils.py` (`_compute_llama3_parameters`), not from the C++
engine. numpy only. The safetensors / checkpoint reader is ds3_ref's (the
file format, not the model).

  * decoder layer: x + o_proj(attn(input_layernorm(x))), then
    h + down(silu(gate(n)) * up(n)) with n = post_attention_layernorm(h);
  * attention: q/k/v projections (+ bias for Qwen2), `rotate_half` RoPE over
    the whole head (pairs (i, i + d/2)), grouped-query attention (query head h
    uses KV head h // (heads / kv_heads)), causal softmax at head_dim^-0.5;
  * llama3 rope scaling of inv_freq (factor, low/high_freq_factor,
    original_max_position_embeddings);
  * lm_head, or embed_tokens when tie_word_embeddings.

The whole forward runs in float64 over one sequence with no KV cache; greedy
generation recomputes everything each step.

  python3 dense_ref.py generate --checkpoint DIR --prompts FILE --max-new-tokens N
"""

import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ds3_ref import Checkpoint, rel_err  # noqa: E402,F401  (file format only)
from ref_cli import generate_parser, print_tokens, read_prompts  # noqa: E402


def rms_norm(x, w, eps):
    x = np.asarray(x, dtype=np.float64)
    var = np.mean(x * x, axis=-1, keepdims=True)
    return w * (x / np.sqrt(var + eps))


def silu(x):
    return x / (1.0 + np.exp(-x))


def inv_freq(cfg, dim):
    """HF rope_init_fn: default, or llama3 (modeling_rope_utils._compute_llama3_parameters)."""
    base = float(cfg.get("rope_theta", 10000.0))
    f = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rs = cfg.get("rope_scaling")
    if not rs:
        return f
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return f
    assert kind == "llama3", kind
    factor = rs["factor"]
    low, high = rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / f
    scaled = np.where(wavelen > low_wavelen, f / factor, f)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled)


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rotary(x, positions, freqs):
    """x: [T, heads, d]; HF: emb = cat(freqs, freqs); x*cos + rotate_half(x)*sin."""
    ang = np.outer(positions.astype(np.float64), freqs)          # [T, d/2]
    emb = np.concatenate([ang, ang], axis=-1)[:, None, :]        # [T, 1, d]
    return x * np.cos(emb) + rotate_half(x) * np.sin(emb)


class Model:
    """Qwen2 / Llama forward over one sequence, float64, no cache."""

    def __init__(self, folder):
        self.ck = Checkpoint(folder)
        c = self.cfg = self.ck.config
        assert c["model_type"] in ("qwen2", "llama"), c["model_type"]
        self.H = c["hidden_size"]
        self.heads = c["num_attention_heads"]
        self.kv_heads = c.get("num_key_value_heads") or self.heads
        self.d = c.get("head_dim") or self.H // self.heads
        self.eps = float(c["rms_norm_eps"])
        self.freqs = inv_freq(c, self.d)
        self.bias = c["model_type"] == "qwen2" or bool(c.get("attention_bias", False))
        self._w = {}

    def w(self, name):
        if name not in self._w:
            self._w[name] = self.ck.get(name).astype(np.float64)
        return self._w[name]

    def proj(self, x, name):
        y = x @ self.w(name + ".weight").T
        if self.bias and not name.endswith("o_proj"):
            y = y + self.w(name + ".bias")
        return y

    def attention(self, x, a):
        T = x.shape[0]
        pos = np.arange(T)
        q = self.proj(x, a + "q_proj").reshape(T, self.heads, self.d)
        k = self.proj(x, a + "k_proj").reshape(T, self.kv_heads, self.d)
        v = self.proj(x, a + "v_proj").reshape(T, self.kv_heads, self.d)
        q = apply_rotary(q, pos, self.freqs)
        k = apply_rotary(k, pos, self.freqs)
        rep = self.heads // self.kv_heads                      # repeat_kv
        k = np.repeat(k, rep, axis=1)
        v = np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(self.d)
        s = s + np.triu(np.full((T, T), -np.inf), 1)[None]
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        p = s / s.sum(axis=-1, keepdims=True)
        o = np.einsum("hts,shd->thd", p, v).reshape(T, self.heads * self.d)
        return o @ self.w(a + "o_proj.weight").T

    def mlp(self, x, m):
        g = x @ self.w(m + "gate_proj.weight").T
        u = x @ self.w(m + "up_proj.weight").T
        return (silu(g) * u) @ self.w(m + "down_proj.weight").T

    def forward(self, tokens):
        """Logits [T, vocab] for every position of one sequence."""
        x = self.w("model.embed_tokens.weight")[np.asarray(tokens, dtype=np.int64)]
        for layer in range(self.cfg["num_hidden_layers"]):
            p = "model.layers.%d." % layer
            x = x + self.attention(rms_norm(x, self.w(p + "input_layernorm.weight"), self.eps), p + "self_attn.")
            x = x + self.mlp(rms_norm(x, self.w(p + "post_attention_layernorm.weight"), self.eps), p + "mlp.")
        x = rms_norm(x, self.w("model.norm.weight"), self.eps)
        head = "model.embed_tokens.weight" if self.cfg.get("tie_word_embeddings") else "lm_head.weight"
        return x @ self.w(head).T

    def greedy(self, tokens, max_new_tokens):
        """(generated ids, [logits before each generated token])."""
        seq = list(tokens)
        out, all_logits = [], []
        for _ in range(max_new_tokens):
            lg = self.forward(seq)[-1]
            all_logits.append(lg)
            t = int(np.argmax(lg))
            out.append(t)
            seq.append(t)
        return out, all_logits


def main(argv):
    ap, _ = generate_parser(__doc__)
    a = ap.parse_args(argv)
    model = Model(a.checkpoint)
    for i, p in enumerate(read_prompts(a.prompts)):
        toks, _ = model.greedy(p, a.max_new_tokens)
        print_tokens(i, toks)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
