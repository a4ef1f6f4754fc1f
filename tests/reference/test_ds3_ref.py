#!/usr/bin/env python3
"""Self-checks of the numpy reference (ds3_ref.py): the oracle is tested on
hand-computed values and mathematical identities, never against the engine.

  python3 test_ds3_ref.py
"""

import json
import math
import os
import sys
import tempfile
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ds3_ref as ref  # noqa: E402


class Decoders(unittest.TestCase):
    def test_f8e4m3(self):
        known = {0x00: 0.0, 0x01: 2.0 ** -9, 0x07: 7 * 2.0 ** -9, 0x08: 2.0 ** -6, 0x38: 1.0,
                 0x39: 1.125, 0x40: 2.0, 0x7e: 448.0, 0xfe: -448.0, 0xb8: -1.0, 0x77: 240.0}
        for code, v in known.items():
            self.assertEqual(ref.f8e4m3_bits_to_f64(np.array([code], np.uint8))[0], v, hex(code))
        allv = ref.f8e4m3_bits_to_f64(np.arange(256, dtype=np.uint8))
        self.assertEqual(np.isnan(allv).sum(), 2)          # 0x7f and 0xff only
        self.assertTrue(np.isnan(allv[0x7f]) and np.isnan(allv[0xff]))
        finite = allv[~np.isnan(allv)]
        self.assertEqual(len(np.unique(finite[finite > 0])), 126)
        self.assertTrue(np.signbit(allv[0x80]))

    def test_f16_matches_ieee(self):
        codes = np.arange(65536, dtype=np.uint16)
        mine = ref.f16_bits_to_f64(codes)
        ieee = codes.view(np.float16).astype(np.float64)
        nan = np.isnan(ieee)
        np.testing.assert_array_equal(np.isnan(mine), nan)
        np.testing.assert_array_equal(mine[~nan], ieee[~nan])

    def test_bf16(self):
        v = ref.bf16_bits_to_f32(np.array([0x3f80, 0xc000, 0x7f80, 0x0001, 0x3e20], np.uint16))
        self.assertEqual(v.tolist()[:3], [1.0, -2.0, math.inf])
        self.assertEqual(v[3], np.float32(2.0 ** -133))
        self.assertEqual(v[4], 0.15625)


class Files(unittest.TestCase):
    def test_sharded_fp8_checkpoint(self):
        rng = np.random.default_rng(0)
        rows, cols = 130, 200                                  # partial edge blocks
        q = rng.integers(0, 256, size=(rows, cols), dtype=np.uint8)
        q[(q & 0x7f) == 0x7f] = 0x30                          # no NaN codes
        scale = rng.uniform(0.5, 2.0, size=(2, 2)).astype(np.float32)
        norm = rng.normal(size=7).astype(np.float32)
        bf = (norm.view(np.uint32) >> 16).astype(np.uint16)
        with tempfile.TemporaryDirectory() as d:
            ref.write_safetensors(os.path.join(d, "a.safetensors"), {
                "w": ("F8_E4M3", [rows, cols], q.tobytes()), "w_scale_inv": scale})
            ref.write_safetensors(os.path.join(d, "b.safetensors"), {"n": ("BF16", [7], bf.tobytes())})
            with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
                json.dump({"weight_map": {"w": "a.safetensors", "w_scale_inv": "a.safetensors",
                                          "n": "b.safetensors"}}, f)
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump({"quantization_config": {"weight_block_size": [128, 128]}}, f)
            ck = ref.Checkpoint(d)
            w = ck.get("w")
            dec = ref.f8e4m3_bits_to_f64(q)
            for r in (0, 127, 128, 129):
                for c in (0, 127, 128, 199):
                    self.assertEqual(w[r, c], dec[r, c] * float(scale[r // 128, c // 128]))
            np.testing.assert_array_equal(ck.get("n"), ref.bf16_bits_to_f32(bf))
            self.assertEqual(sorted(ck.names()), ["n", "w", "w_scale_inv"])


TINY = {"qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 128,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}}


class Rope(unittest.TestCase):
    def test_yarn_frequencies(self):
        base = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
        inv = ref.rope_inv_freq(TINY)
        # correction dims for 128 original positions: beta_fast 32 -> floor(-0.18) -> 0,
        # beta_slow 1 -> ceil(2.48) = 3: ramp over pairs 0..3
        low = 16 * math.log(128 / (32 * 2 * math.pi)) / (2 * math.log(10000))
        high = 16 * math.log(128 / (1 * 2 * math.pi)) / (2 * math.log(10000))
        lo, hi = max(math.floor(low), 0), min(math.ceil(high), 15)
        self.assertEqual((lo, hi), (0, 3))
        self.assertAlmostEqual(inv[0], base[0])                       # extrapolated (kept)
        for i in range(3, 8):
            self.assertAlmostEqual(inv[i], base[i] / 40.0)            # interpolated
        self.assertAlmostEqual(inv[1], base[1] * (2 / 3) + base[1] / 40 * (1 / 3))
        plain = dict(TINY, rope_scaling=None)
        np.testing.assert_allclose(ref.rope_inv_freq(plain), base)

    def test_rotation(self):
        inv = ref.rope_inv_freq(TINY)
        x = np.zeros((1, 16))
        x[0, 2] = 1.0                                                  # pair 1, first element
        y = ref.apply_rope(x, [5], inv)
        self.assertAlmostEqual(y[0, 2], math.cos(5 * inv[1]))
        self.assertAlmostEqual(y[0, 3], math.sin(5 * inv[1]))
        z = np.random.default_rng(1).normal(size=(3, 2, 16))
        r = ref.apply_rope(z, [0, 7, 1000], inv)
        np.testing.assert_allclose(r[0], z[0])                         # position 0: identity
        np.testing.assert_allclose(np.hypot(r[..., 0::2], r[..., 1::2]), np.hypot(z[..., 0::2], z[..., 1::2]))
        # relative: <R(m) a, R(n) b> depends on m - n only
        a, b = z[1, 0], z[2, 1]
        d1 = ref.apply_rope(a[None], [10], inv)[0] @ ref.apply_rope(b[None], [3], inv)[0]
        d2 = ref.apply_rope(a[None], [107], inv)[0] @ ref.apply_rope(b[None], [100], inv)[0]
        self.assertAlmostEqual(d1, d2)

    def test_softmax_scale(self):
        v3 = {"qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rope_scaling": TINY["rope_scaling"]}
        self.assertAlmostEqual(ref.softmax_scale(v3), 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
        self.assertAlmostEqual(ref.softmax_scale(dict(v3, rope_scaling=None)), 192 ** -0.5)


class Routing(unittest.TestCase):
    def test_hand_example(self):
        # 8 experts in 4 groups of 2; keep 2 groups; top-2.
        s = np.array([[0.9, 0.1, 0.6, 0.55, 0.95, 0.0, 0.3, 0.3]])
        logits = np.log(s / (1 - s + 1e-300) + 1e-300)
        logits[0, 5] = -50
        # group sums: g0 1.0, g1 1.15, g2 0.95, g3 0.6 -> keep g1, g0; top-2 of {0,1,2,3}: 0 (0.9), 2 (0.6)
        ids, w = ref.route(logits, None, 4, 2, 2, True, 2.5)
        self.assertEqual(ids.tolist(), [[0, 2]])
        np.testing.assert_allclose(w, [[2.5 * 0.9 / 1.5, 2.5 * 0.6 / 1.5]])
        # a bias lifts group 2 (sum 1.45) over group 0, so expert 0 (0.9) is out;
        # the weights stay the raw scores
        bias = np.array([0, 0, 0, 0, 0.5, 0, 0, 0])
        ids, w = ref.route(logits, bias, 4, 2, 2, False, 1.0)
        self.assertEqual(ids.tolist(), [[4, 2]])
        np.testing.assert_allclose(w, [[0.95, 0.6]])
        self.assertTrue(np.all(ref.route_margins(logits, bias, 4, 2, 2) > 0))


class Attention(unittest.TestCase):
    def test_expanded_equals_absorbed_and_loop(self):
        rng = np.random.default_rng(3)
        H, dn, dr, dv, L, S, Tq = 3, 8, 4, 6, 10, 7, 3
        q = rng.normal(size=(Tq, H, dn + dr))
        lat = rng.normal(size=(S, L))
        kpe = rng.normal(size=(S, dr))
        w = rng.normal(size=(H * (dn + dv), L))
        out = ref.mla_attention(q, lat, kpe, w, H, dn, dv, 0.3)
        wr = w.reshape(H, dn + dv, L)
        for h in range(H):
            wk, wv = wr[h, :dn], wr[h, dn:]
            for j in range(Tq):
                pos = S - Tq + j
                qa = q[j, h, :dn] @ wk                                 # absorbed query
                sc = np.array([(qa @ lat[t] + q[j, h, dn:] @ kpe[t]) * 0.3 for t in range(pos + 1)])
                p = np.exp(sc - sc.max())
                p /= p.sum()
                o = (p @ lat[:pos + 1]) @ wv.T
                np.testing.assert_allclose(out[j, h], o, rtol=1e-10, atol=1e-12)
        one = ref.mla_attention(q[:1], lat[:1], kpe[:1], w, H, dn, dv, 0.3)
        np.testing.assert_allclose(one[0], (lat[0] @ w.T).reshape(H, dn + dv)[:, dn:])


class ModelInvariants(unittest.TestCase):
    def test_causal_and_batch_free(self):
        """A micro checkpoint (1 dense + 1 MoE layer): prefix logits do not
        depend on later tokens, and greedy equals argmax of recomputed logits."""
        cfg = {"model_type": "deepseek_v3", "vocab_size": 50, "hidden_size": 24, "intermediate_size": 40,
               "moe_intermediate_size": 8, "num_hidden_layers": 2, "first_k_dense_replace": 1,
               "moe_layer_freq": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 8,
               "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
               "norm_topk_prob": True, "routed_scaling_factor": 2.5, "q_lora_rank": 12, "kv_lora_rank": 10,
               "qk_nope_head_dim": 6, "qk_rope_head_dim": 4, "v_head_dim": 6, "rope_theta": 10000.0,
               "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                                "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
               "rms_norm_eps": 1e-6}
        rng = np.random.default_rng(5)
        H, heads = 24, 2
        t = {"model.embed_tokens.weight": (50, H), "model.norm.weight": (H,), "lm_head.weight": (50, H)}
        for l in range(3):                      # layer 2: the MTP layer (MoE)
            p = "model.layers.%d." % l
            t.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                      p + "self_attn.q_a_proj.weight": (12, H), p + "self_attn.q_a_layernorm.weight": (12,),
                      p + "self_attn.q_b_proj.weight": (heads * 10, 12),
                      p + "self_attn.kv_a_proj_with_mqa.weight": (14, H),
                      p + "self_attn.kv_a_layernorm.weight": (10,),
                      p + "self_attn.kv_b_proj.weight": (heads * 12, 10),
                      p + "self_attn.o_proj.weight": (H, heads * 6)})
            mlps = ["mlp."] if l == 0 else ["mlp.experts.%d." % e for e in range(8)] + ["mlp.shared_experts."]
            inter = 40 if l == 0 else 8
            for m in mlps:
                t.update({p + m + "gate_proj.weight": (inter, H), p + m + "up_proj.weight": (inter, H),
                          p + m + "down_proj.weight": (H, inter)})
            if l >= 1:
                t.update({p + "mlp.gate.weight": (8, H), p + "mlp.gate.e_score_correction_bias": (8,)})
        t.update({"model.layers.2.embed_tokens.weight": (50, H), "model.layers.2.enorm.weight": (H,),
                  "model.layers.2.hnorm.weight": (H,), "model.layers.2.eh_proj.weight": (H, 2 * H),
                  "model.layers.2.shared_head.norm.weight": (H,), "model.layers.2.shared_head.head.weight": (50, H)})
        tensors = {n: (rng.normal(size=s) * (0.3 if len(s) == 2 else 0.1) + (1.0 if "norm" in n else 0.0))
                   .astype(np.float32) for n, s in t.items()}
        with tempfile.TemporaryDirectory() as d:
            ref.write_safetensors(os.path.join(d, "model.safetensors"), tensors)
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cfg, f)
            m = ref.Model(d)
            seq = rng.integers(0, 50, size=9).tolist()
            full = m.forward(seq)
            for k in (1, 4, 8):
                np.testing.assert_allclose(m.forward(seq[:k]), full[:k], rtol=1e-12, atol=1e-12)
            toks, lg = m.greedy(seq[:3], 4)
            self.assertEqual(toks[0], int(np.argmax(full[2])))
            for i in range(4):
                np.testing.assert_allclose(lg[i], m.last_logits(seq[:3] + toks[:i]))

            # MTP: row i depends on t_0 .. t_{i+1} only (causal), and is built
            # from [enorm(embed(t_{i+1})), hnorm(h_i)] in that order
            mtp = m.mtp_forward(seq)
            self.assertEqual(mtp.shape, (8, 50))
            for k in (1, 4, 7):
                np.testing.assert_allclose(m.mtp_forward(seq[:k + 1]), mtp[:k], rtol=1e-12, atol=1e-12)
            p = "model.layers.2."
            eh = m.w(p + "eh_proj.weight").copy()
            m._w[p + "eh_proj.weight"] = np.concatenate([eh[:, :H], 0 * eh[:, H:]], axis=1)   # embedding only
            x0 = ref.rms_norm(m.w(p + "embed_tokens.weight")[seq[1]], m.w(p + "enorm.weight"), m.eps)
            x0 = ref.linear(x0, m._w[p + "eh_proj.weight"][:, :H])
            y0 = m.block(x0[None], 2)              # position 0 attends only to itself
            want = ref.linear(ref.rms_norm(y0, m.w(p + "shared_head.norm.weight"), m.eps),
                              m.w(p + "shared_head.head.weight"))[0]
            np.testing.assert_allclose(m.mtp_forward(seq[:2])[0], want, rtol=1e-12)
            other = [(seq[0] + 1) % 50] + seq[1:2]   # another t_0: h_0 changes, no effect with hidden columns 0
            np.testing.assert_allclose(m.mtp_forward(other)[0], want, rtol=1e-12)
            m._w[p + "eh_proj.weight"] = eh


if __name__ == "__main__":
    unittest.main(verbosity=2)
