#!/usr/bin/env python3
"""Independent numpy reference of a DeepSeek-V3 model (the oracle of the tests).

Written from the model definition (DESIGN.md, the DeepSeek-V3 paper and the
semantics of HF `modeling_deepseek.py` / DeepSeek's `inference/model.py`), not
from the C++ engine. numpy only, so it runs with Debian's /usr/bin/python3.

  * safetensors reader (single file or `model.safetensors.index.json` shards),
    with its own bit-level decoders of BF16, F16 and F8_E4M3 ("fn") and the
    128x128 block scales of fp8 weights (`<weight>_scale_inv`);
  * the kernels as plain numpy functions (rms_norm, swiglu, rope, route, MLA
    attention), used by the kernel checks as well;
  * the whole model forward in float64 over one sequence (positions 0..T-1,
    causal), with no KV cache: greedy generation recomputes everything each
    step, so it is independent of any cache logic.

Command line (handy for debugging the engine):

  python3 ds3_ref.py generate --checkpoint DIR --prompts FILE --max-new-tokens N \
      [--dump-logits FILE]

prints `{"index": i, "tokens": [...]}` per prompt, like `expertmesh generate`.
"""

import json
import math
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ref_cli import generate_parser, print_tokens, read_prompts  # noqa: E402

# --------------------------------------------------------------------------
# Element types
# --------------------------------------------------------------------------

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def bf16_bits_to_f32(u16):
    """BF16 is the upper half of an IEEE float32."""
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f16_bits_to_f64(u16):
    """IEEE half: 1 sign, 5 exponent (bias 15), 10 mantissa bits."""
    u = np.asarray(u16, dtype=np.uint16).astype(np.int64)
    sign = np.where((u >> 15) & 1, -1.0, 1.0)
    exp = (u >> 10) & 0x1F
    man = (u & 0x3FF).astype(np.float64)
    normal = np.ldexp(1.0 + man / 1024.0, (exp - 15).astype(np.int64))
    sub = np.ldexp(man / 1024.0, -14)
    out = np.where(exp == 0, sub, normal)
    special = np.where(man == 0, np.inf, np.nan)
    out = np.where(exp == 31, special, out)
    return sign * out


def f8e4m3_bits_to_f64(u8):
    """OCP FP8 E4M3 "fn": 1 sign, 4 exponent (bias 7), 3 mantissa bits;
    no infinities, S.1111.111 is NaN, max finite 448; exponent 0 is subnormal."""
    u = np.asarray(u8, dtype=np.uint8).astype(np.int64)
    sign = np.where((u >> 7) & 1, -1.0, 1.0)
    exp = (u >> 3) & 0xF
    man = (u & 0x7).astype(np.float64)
    normal = np.ldexp(1.0 + man / 8.0, (exp - 7).astype(np.int64))
    sub = np.ldexp(man / 8.0, -6)
    out = np.where(exp == 0, sub, normal)
    out = np.where((exp == 15) & (u & 7 == 7), np.nan, out)
    return sign * out


def decode(dtype, raw, shape):
    """Bytes of one tensor -> float64 array of `shape`."""
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    if dtype == "F32":
        a = np.frombuffer(raw, dtype="<f4", count=n).astype(np.float64)
    elif dtype == "F64":
        a = np.frombuffer(raw, dtype="<f8", count=n).copy()
    elif dtype == "BF16":
        a = bf16_bits_to_f32(np.frombuffer(raw, dtype="<u2", count=n)).astype(np.float64)
    elif dtype == "F16":
        a = f16_bits_to_f64(np.frombuffer(raw, dtype="<u2", count=n))
    elif dtype == "F8_E4M3":
        a = f8e4m3_bits_to_f64(np.frombuffer(raw, dtype=np.uint8, count=n))
    elif dtype in ("I32", "I64", "I16", "I8", "U8"):
        np_t = {"I32": "<i4", "I64": "<i8", "I16": "<i2", "I8": "i1", "U8": "u1"}[dtype]
        a = np.frombuffer(raw, dtype=np_t, count=n).astype(np.float64)
    else:
        raise ValueError("unsupported dtype %s" % dtype)
    return a.reshape(shape)


# --------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------

class SafetensorsFile:
    """One .safetensors file: 8-byte LE header length, JSON header, data."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.buf = f.read()
        if len(self.buf) < 8:
            raise ValueError("%s: truncated (%d bytes)" % (path, len(self.buf)))
        (hlen,) = struct.unpack("<Q", self.buf[:8])
        if hlen > len(self.buf) - 8:
            raise ValueError("%s: header length %d beyond the file" % (path, hlen))
        self.header = json.loads(self.buf[8:8 + hlen].decode("utf-8"))
        self.data_start = 8 + hlen
        self.metadata = self.header.pop("__metadata__", {})
        data_len = len(self.buf) - self.data_start
        for name, e in self.header.items():
            b, en = e["data_offsets"]
            want = DTYPE_SIZES[e["dtype"]] * int(np.prod(e["shape"], dtype=np.int64))
            if not (0 <= b <= en <= data_len) or en - b != want:
                raise ValueError("%s: tensor %s has bad data_offsets" % (path, name))

    def names(self):
        return list(self.header.keys())

    def entry(self, name):
        return self.header[name]

    def raw(self, name):
        e = self.header[name]
        b, en = e["data_offsets"]
        return self.buf[self.data_start + b:self.data_start + en]

    def get(self, name):
        e = self.header[name]
        return decode(e["dtype"], self.raw(name), tuple(e["shape"]))


def read_safetensors(path):
    """All tensors of a file as float64 arrays: {name: array}."""
    f = SafetensorsFile(path)
    return {n: f.get(n) for n in f.names()}


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: (dtype, shape, bytes)} or {name: float32 array}."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    blobs = []
    off = 0
    for name, v in tensors.items():
        if isinstance(v, np.ndarray):
            v = ("F32", list(v.shape), np.ascontiguousarray(v, dtype="<f4").tobytes())
        dtype, shape, raw = v
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


class Checkpoint:
    """An HF checkpoint folder: config.json + shards (+ index)."""

    def __init__(self, folder):
        self.folder = folder
        with open(os.path.join(folder, "config.json")) as f:
            self.config = json.load(f)
        index = os.path.join(folder, "model.safetensors.index.json")
        self.files = {}
        self.where = {}
        if os.path.exists(index):
            with open(index) as f:
                wm = json.load(f)["weight_map"]
            for name, shard in wm.items():
                if shard not in self.files:
                    self.files[shard] = SafetensorsFile(os.path.join(folder, shard))
                self.where[name] = shard
        else:
            for fn in sorted(os.listdir(folder)):
                if fn.endswith(".safetensors"):
                    self.files[fn] = SafetensorsFile(os.path.join(folder, fn))
                    for n in self.files[fn].names():
                        self.where[n] = fn
        q = self.config.get("quantization_config") or {}
        self.block = tuple(q.get("weight_block_size", [128, 128]))

    def names(self):
        return list(self.where.keys())

    def dtype(self, name):
        return self.files[self.where[name]].entry(name)["dtype"]

    def get(self, name):
        """A tensor as float64; fp8 weights are dequantised with their block scales:
        w[r, c] = q[r, c] * scale_inv[r // br, c // bc]."""
        f = self.files[self.where[name]]
        w = f.get(name)
        if f.entry(name)["dtype"] == "F8_E4M3":
            s = self.get(name + "_scale_inv")
            br, bc = self.block
            rows, cols = w.shape
            assert s.shape == (-(-rows // br), -(-cols // bc)), (name, s.shape)
            w = w * np.repeat(np.repeat(s, br, axis=0), bc, axis=1)[:rows, :cols]
        return w


# --------------------------------------------------------------------------
# Kernels (numpy, float64 unless the inputs are otherwise)
# --------------------------------------------------------------------------

def linear(x, w):
    """PyTorch Linear without bias: x[..., K] . w[N, K]^T."""
    return x @ w.T


def rms_norm(x, w, eps):
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x):
    x = np.asarray(x, dtype=np.float64)
    # x * sigmoid(x), written to avoid overflow for large |x|
    return x * np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))),
                        np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def swiglu(x, w_gate, w_up, w_down):
    return linear(silu(linear(x, w_gate)) * linear(x, w_up), w_down)


def yarn_mscale(scale, m):
    return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0


def rope_inv_freq(cfg):
    """Per-pair inverse frequencies, YaRN-corrected when rope_scaling.type is yarn.

    Base: theta^(-2i/dim). YaRN (DeepSeek): the dims whose wavelength is long
    relative to the original context (fewer than beta_slow rotations over it)
    are interpolated (freq / factor), those with more than beta_fast rotations
    are kept, and a linear ramp blends the ones in between."""
    dim = cfg["qk_rope_head_dim"]
    base = float(cfg.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rs = cfg.get("rope_scaling")
    if not rs:
        return freqs
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ValueError("rope_scaling type %r not supported by the reference" % kind)
    factor = float(rs["factor"])
    orig = float(rs["original_max_position_embeddings"])
    beta_fast = float(rs.get("beta_fast", 32))
    beta_slow = float(rs.get("beta_slow", 1))

    def correction_dim(rotations):
        # the dim index at which a pair makes `rotations` turns over `orig` positions
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp          # 1: extrapolate (keep the frequency), 0: interpolate
    return freqs / factor * (1.0 - keep) + freqs * keep


def rope_attention_factor(cfg):
    """HF multiplies cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    (1 for DeepSeek-V3, where both are 1)."""
    rs = cfg.get("rope_scaling")
    if not rs:
        return 1.0
    f = float(rs["factor"])
    return yarn_mscale(f, float(rs.get("mscale", 1))) / yarn_mscale(f, float(rs.get("mscale_all_dim", 0)))


def apply_rope(x, positions, inv_freq, attn_factor=1.0):
    """Rotates interleaved pairs (x[..., 2i], x[..., 2i+1]) of x[T, ..., dim] by
    angle positions[t] * inv_freq[i]."""
    x = np.asarray(x, dtype=np.float64)
    pos = np.asarray(positions, dtype=np.float64)
    ang = pos[:, None] * inv_freq[None, :]                  # [T, dim/2]
    shape = (len(pos),) + (1,) * (x.ndim - 2) + (len(inv_freq),)
    c = (np.cos(ang) * attn_factor).reshape(shape)
    s = (np.sin(ang) * attn_factor).reshape(shape)
    x0 = x[..., 0::2]
    x1 = x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def softmax_scale(cfg):
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
    d = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    s = d ** -0.5
    rs = cfg.get("rope_scaling")
    if rs and rs.get("mscale_all_dim"):
        m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
        s = s * m * m
    return s


def route(logits, bias, n_group, topk_group, top_k, norm_topk_prob=True, scaling=1.0,
          group_limited=True):
    """DeepSeek-V3 noaux_tc routing of T tokens. logits [T, E] = x . gate^T.

    Returns ids [T, k] ordered by descending biased score (ties: lower id),
    weights [T, k]."""
    logits = np.asarray(logits, dtype=np.float64)
    T, E = logits.shape
    scores = 1.0 / (1.0 + np.exp(-logits))
    choice = scores + (0.0 if bias is None else np.asarray(bias, dtype=np.float64)[None, :])
    if group_limited and n_group > 1:
        per = E // n_group
        g = choice.reshape(T, n_group, per)
        group_score = np.sort(g, axis=-1)[..., -2:].sum(axis=-1)           # [T, G] top-2 sum
        keep = np.argsort(-group_score, axis=-1, kind="stable")[:, :topk_group]
        gmask = np.zeros((T, n_group), dtype=bool)
        gmask[np.arange(T)[:, None], keep] = True
        choice = np.where(np.repeat(gmask, per, axis=1), choice, -np.inf)
    ids = np.argsort(-choice, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(scores, ids, axis=-1)
    if norm_topk_prob:
        w = w / w.sum(axis=-1, keepdims=True)
    return ids, w * scaling


def route_margins(logits, bias, n_group, topk_group, top_k):
    """Per token, how far the routing decision is from a tie: the smaller of the
    gap between the last kept and the first dropped group score, and between
    the k-th and (k+1)-th biased score inside the kept groups. Engines that
    compute in fp32 may legitimately route differently below ~1e-6."""
    logits = np.asarray(logits, dtype=np.float64)
    T, E = logits.shape
    choice = 1.0 / (1.0 + np.exp(-logits)) + (0.0 if bias is None else bias[None, :])
    margin = np.full(T, np.inf)
    if n_group > 1 and topk_group < n_group:
        per = E // n_group
        gs = np.sort(np.sort(choice.reshape(T, n_group, per), axis=-1)[..., -2:].sum(-1), axis=-1)[:, ::-1]
        margin = np.minimum(margin, gs[:, topk_group - 1] - gs[:, topk_group])
        keep = np.argsort(-np.sort(choice.reshape(T, n_group, per), axis=-1)[..., -2:].sum(-1),
                          axis=-1, kind="stable")[:, :topk_group]
        gmask = np.zeros((T, n_group), dtype=bool)
        gmask[np.arange(T)[:, None], keep] = True
        choice = np.where(np.repeat(gmask, per, axis=1), choice, -np.inf)
    cs = np.sort(choice, axis=-1)[:, ::-1]
    if top_k < E:
        margin = np.minimum(margin, cs[:, top_k - 1] - cs[:, top_k])
    return margin


def mla_attention(q, latent, k_pe, w_kv_b, heads, nope, v_dim, scale, q_positions=None):
    """Naive multi-head latent attention (expanded keys/values).

    q [Tq, heads, nope + rope] (rope part already rotated), latent [S, kv_lora]
    (normalised), k_pe [S, rope] (rotated, shared by all heads), w_kv_b
    [heads * (nope + v), kv_lora] (per head: nope rows of k, then v rows).
    Query j sits at position q_positions[j] (default S - Tq + j) and sees keys
    at positions <= its own. Returns [Tq, heads, v]."""
    q = np.asarray(q, dtype=np.float64)
    Tq = q.shape[0]
    S = latent.shape[0]
    if q_positions is None:
        q_positions = np.arange(S - Tq, S)
    kv = (latent @ w_kv_b.T).reshape(S, heads, nope + v_dim)
    k_nope = kv[..., :nope]
    v = kv[..., nope:]
    s = np.einsum("qhd,khd->hqk", q[..., :nope], k_nope)
    s = s + np.einsum("qhd,kd->hqk", q[..., nope:], k_pe)
    s = s * scale
    mask = np.arange(S)[None, :] > np.asarray(q_positions)[:, None]    # [Tq, S]
    s = np.where(mask[None], -np.inf, s)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p = p / p.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p, v)


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------

class Model:
    """DeepSeek-V3 forward over one sequence, float64, no cache."""

    def __init__(self, folder):
        self.ck = Checkpoint(folder)
        self.cfg = self.ck.config
        c = self.cfg
        self.eps = float(c.get("rms_norm_eps", 1e-6))
        self.H = c["hidden_size"]
        self.heads = c["num_attention_heads"]
        self.nope = c["qk_nope_head_dim"]
        self.rope = c["qk_rope_head_dim"]
        self.vdim = c["v_head_dim"]
        self.kv_lora = c["kv_lora_rank"]
        self.q_lora = c.get("q_lora_rank") or 0
        self.inv_freq = rope_inv_freq(c)
        self.rope_factor = rope_attention_factor(c)
        self.scale = softmax_scale(c)
        self._w = {}
        # Smallest routing margin (see route_margins) seen since the last
        # reset_margins(): test data whose routing is within fp32 noise of a tie
        # cannot be compared bit-for-bit in expert choice.
        self.min_route_margin = np.inf

    def reset_margins(self):
        self.min_route_margin = np.inf

    def w(self, name):
        if name not in self._w:
            self._w[name] = self.ck.get(name)
        return self._w[name]

    def is_moe(self, layer):
        c = self.cfg
        return (c.get("n_routed_experts") or 0) > 0 and layer >= c["first_k_dense_replace"] \
            and layer % c.get("moe_layer_freq", 1) == 0

    def attention(self, x, p):
        T = x.shape[0]
        a = p + "self_attn."
        if self.q_lora > 0:
            q = linear(rms_norm(linear(x, self.w(a + "q_a_proj.weight")),
                                self.w(a + "q_a_layernorm.weight"), self.eps),
                       self.w(a + "q_b_proj.weight"))
        else:
            q = linear(x, self.w(a + "q_proj.weight"))
        q = q.reshape(T, self.heads, self.nope + self.rope)
        pos = np.arange(T)
        q = np.concatenate([q[..., :self.nope],
                            apply_rope(q[..., self.nope:], pos, self.inv_freq, self.rope_factor)], axis=-1)
        kv_a = linear(x, self.w(a + "kv_a_proj_with_mqa.weight"))
        latent = rms_norm(kv_a[:, :self.kv_lora], self.w(a + "kv_a_layernorm.weight"), self.eps)
        k_pe = apply_rope(kv_a[:, self.kv_lora:], pos, self.inv_freq, self.rope_factor)
        o = mla_attention(q, latent, k_pe, self.w(a + "kv_b_proj.weight"), self.heads, self.nope,
                          self.vdim, self.scale)
        return linear(o.reshape(T, self.heads * self.vdim), self.w(a + "o_proj.weight"))

    def dense_mlp(self, x, p):
        return swiglu(x, self.w(p + "gate_proj.weight"), self.w(p + "up_proj.weight"),
                      self.w(p + "down_proj.weight"))

    def moe(self, x, p):
        c = self.cfg
        m = p + "mlp."
        logits = linear(x, self.w(m + "gate.weight"))
        bias_name = m + "gate.e_score_correction_bias"
        bias = self.w(bias_name) if bias_name in self.ck.where else None
        ids, wts = route(logits, bias, c["n_group"], c["topk_group"], c["num_experts_per_tok"],
                         c.get("norm_topk_prob", True), float(c.get("routed_scaling_factor", 1.0)))
        self.min_route_margin = min(self.min_route_margin, float(np.min(route_margins(
            logits, bias, c["n_group"], c["topk_group"], c["num_experts_per_tok"]))))
        y = np.zeros_like(x)
        for e in np.unique(ids):
            rows, slot = np.nonzero(ids == e)
            ep = "%sexperts.%d." % (m, e)
            y[rows] += wts[rows, slot][:, None] * self.dense_mlp(x[rows], ep)
        if (c.get("n_shared_experts") or 0) > 0:
            y += self.dense_mlp(x, m + "shared_experts.")
        return y

    def block(self, x, layer):
        p = "model.layers.%d." % layer
        h = x + self.attention(rms_norm(x, self.w(p + "input_layernorm.weight"), self.eps), p)
        hn = rms_norm(h, self.w(p + "post_attention_layernorm.weight"), self.eps)
        return h + (self.moe(hn, p) if self.is_moe(layer) else self.dense_mlp(hn, p + "mlp."))

    def hidden(self, tokens):
        """The final hidden states after the final RMSNorm (model.norm), [T, H]."""
        tokens = np.asarray(tokens, dtype=np.int64)
        x = self.w("model.embed_tokens.weight")[tokens]
        for layer in range(self.cfg["num_hidden_layers"]):
            x = self.block(x, layer)
        return rms_norm(x, self.w("model.norm.weight"), self.eps)

    def forward(self, tokens):
        """Logits [T, vocab] for every position of one sequence."""
        return linear(self.hidden(tokens), self.w("lm_head.weight"))

    def mtp_forward(self, tokens):
        """The first multi-token-prediction module (layer L = num_hidden_layers;
        DeepSeek-V3 paper section 2.2, as vLLM / SGLang run it) over one
        sequence t_0 .. t_T (T + 1 tokens): logits [T, vocab], row i predicting
        t_{i+2} from the main model's final-normed hidden state h_i and t_{i+1}:

          x_i = eh_proj([enorm(embed_L(t_{i+1})), hnorm(h_i)])   (embedding first)
          y   = block_L(x) at positions 0 .. T-1 (causal MLA + MoE, like a main layer)
          logits = shared_head.head(shared_head.norm(y))

        No position-0 masking of the embedding (vLLM zeroes it there; the
        paper and SGLang do not)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        assert len(tokens) >= 2, "the MTP needs t_{i+1}: at least two tokens"
        L = self.cfg["num_hidden_layers"]
        p = "model.layers.%d." % L
        h = self.hidden(tokens[:-1])
        e = self.w(p + "embed_tokens.weight")[tokens[1:]]
        x = np.concatenate([rms_norm(e, self.w(p + "enorm.weight"), self.eps),
                            rms_norm(h, self.w(p + "hnorm.weight"), self.eps)], axis=-1)
        x = linear(x, self.w(p + "eh_proj.weight"))
        x = self.block(x, L)
        x = rms_norm(x, self.w(p + "shared_head.norm.weight"), self.eps)
        return linear(x, self.w(p + "shared_head.head.weight"))

    def last_logits(self, tokens):
        return self.forward(tokens)[-1]

    def greedy(self, tokens, max_new_tokens):
        """Greedy decoding by full recompute. Returns (generated ids, [logits
        before each generated token]) — logits[0] is the prefill's last row."""
        seq = list(tokens)
        out, all_logits = [], []
        for _ in range(max_new_tokens):
            lg = self.last_logits(seq)
            all_logits.append(lg)
            t = int(np.argmax(lg))
            out.append(t)
            seq.append(t)
        return out, all_logits


def rel_err(a, ref):
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300))


def main(argv):
    ap, g = generate_parser(__doc__)
    g.add_argument("--dump-logits", default="")
    a = ap.parse_args(argv)
    model = Model(a.checkpoint)
    prompts = read_prompts(a.prompts)
    first = []
    for i, p in enumerate(prompts):
        toks, lg = model.greedy(p, max(a.max_new_tokens, 1))
        first.append(lg[0])
        print_tokens(i, toks[:a.max_new_tokens])
    if a.dump_logits:
        write_safetensors(a.dump_logits, {"logits": np.stack(first).astype(np.float32)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
