#!/usr/bin/env python3
"""Independent float64 numpy reference of the HSA-UltraLong model (DRTForCausalLM).

Written from docs/HSA.md and the authors' code (RamstorageAI/long-context-modeling:
model/modeling_swa_hsa.py, model/hsa_layers.py, model/swa.py, model/encoder.py,
ops/hsa_triton.py), not from ultralong's Rust. Every tensor of the checkpoint must be read (a
misnamed or stray tensor is an error). Reads an HF-layout directory (config.json + model.safetensors, parsed here with
numpy alone: F64, F32 or BF16 tensors), the token ids, and ultralong's logits (raw little-endian
float64 [T, vocab]); recomputes the logits and compares: max |ours - numpy| / max |numpy|.

Usage: python3 bench/np_hsa_check.py --model DIR --ids ids.json --logits logits.f64 [--tol 1e-5]
Exit status 0 when within the tolerance, 1 otherwise.
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np

HSA_EPS = 1e-6  # Liger RMSNorm's default eps, used by every HSA module's norm
# create_encoder builds a LlamaConfig without rms_norm_eps or rope_theta: their defaults.
ENC_EPS = 1e-6
ENC_THETA = 10000.0


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        raw = data[a:b]
        dt = meta["dtype"]
        if dt == "F64":
            x = np.frombuffer(raw, "<f8")
        elif dt == "F32":
            x = np.frombuffer(raw, "<f4").astype(np.float64)
        elif dt == "BF16":
            x = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view("<f4").astype(np.float64)
        else:
            raise ValueError(f"{path}: {name}: dtype {dt} not handled")
        out[name] = x.reshape(meta["shape"])
    return out


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1.0 + np.exp(-x))


def rope_tables(cfg, positions, dh, theta=None):
    if theta is None:
        rs = cfg.get("rope_scaling") or {}
        if rs and rs.get("rope_type", rs.get("type", "default")) != "default":
            raise ValueError("only default RoPE is handled here")
        theta = float(cfg.get("rope_theta", 10000.0))
    inv = theta ** (-np.arange(0, dh, 2, dtype=np.float64) / dh)
    ang = positions[:, None].astype(np.float64) * inv[None, :]
    ang = np.concatenate([ang, ang], -1)
    return np.cos(ang), np.sin(ang)  # [T, dh]


def rotate(x, cos, sin):  # x [T, h, dh], HF rotate_half
    h = x.shape[-1] // 2
    rot = np.concatenate([-x[..., h:], x[..., :h]], -1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


class Model:
    def __init__(self, cfg, W):
        self.c, self.W = cfg, W
        c = cfg
        self.d = c["hidden_size"]
        self.H = c["num_attention_heads"]
        self.Hkv = c.get("num_key_value_heads", self.H)
        self.G = c["num_kv_heads"]
        self.dh = self.d // self.H
        self.S = c["chunk_size"]
        self.K = c["chunk_topk"]
        self.dr = c["retrieval_dim"]
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.opt = lambda k, d=False: bool(c.get(k, d))
        self.enc_layers = c.get("encoder_layers", 0)
        self.used = set()

    def w(self, name):
        self.used.add(name)
        return self.W[name]

    def swa(self, p, x, window, cos, sin):
        """Sliding-window attention output (o_proj applied) of x [T, d] (already normed)."""
        T = x.shape[0]
        q = (x @ self.w(p + ".q_proj.weight").T).reshape(T, self.H, self.dh)
        k = (x @ self.w(p + ".k_proj.weight").T).reshape(T, self.Hkv, self.dh)
        v = (x @ self.w(p + ".v_proj.weight").T).reshape(T, self.Hkv, self.dh)
        q = rotate(rms(q, self.w(p + ".q_norm.weight"), self.eps), cos, sin)
        k = rotate(rms(k, self.w(p + ".k_norm.weight"), self.eps), cos, sin)
        rep = self.H // self.Hkv
        k, v = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
        s = np.einsum("thd,jhd->htj", q, k) / math.sqrt(self.dh)
        t, j = np.arange(T)[:, None], np.arange(T)[None, :]
        visible = (j <= t) & (j >= t - window)
        s = np.where(visible[None], s, -np.inf)
        p_ = np.exp(s - s.max(-1, keepdims=True))
        p_ /= p_.sum(-1, keepdims=True)
        o = np.einsum("htj,jhd->thd", p_, v).reshape(T, self.d)
        return o @ self.w(p + ".o_proj.weight").T

    def mlp(self, p, x):
        g = x @ self.w(p + ".gate_proj.weight").T
        u = x @ self.w(p + ".up_proj.weight").T
        return (silu(g) * u) @ self.w(p + ".down_proj.weight").T

    def swa_layer(self, p, x, cos, sin):
        x = x + self.swa(p + ".self_attn", rms(x, self.w(p + ".input_layernorm.weight"), self.eps),
                         self.c["sliding_window"], cos, sin)
        return x + self.mlp(p + ".mlp", rms(x, self.w(p + ".post_attention_layernorm.weight"), self.eps))

    def encode(self, p, x):
        """ChunkingLayer._encode: (E [T, d], landmark input [C, d])."""
        T, S, d = x.shape[0], self.S, self.d
        C = T // S
        if self.enc_layers == 0:
            e = rms(x, self.w(p + ".norm.weight"), HSA_EPS)
            return e, e.reshape(C, S, d).mean(1)
        cls = self.opt("enable_enc_cls", True)
        xc = x.reshape(C, S, d)
        if cls:
            row = np.broadcast_to(self.w(p + ".cls_emb").reshape(1, 1, d), (C, 1, d))
            xc = np.concatenate([xc, row], 1)
        if self.opt("enc_prenorm"):
            xc = rms(xc, self.w(p + ".enc_prenorm.weight"), HSA_EPS)
        L, H, Hkv, dh = xc.shape[1], self.H, self.Hkv, self.dh
        cos, sin = rope_tables(self.c, np.arange(L), dh, ENC_THETA)
        cos, sin = np.tile(cos, (C, 1)), np.tile(sin, (C, 1))
        width = int((d * 8 / 3) // 64 * 64)  # create_encoder's intermediate_size
        for j in range(self.enc_layers):
            q_ = f"{p}.encoder.layers.{j}"
            a = f"{q_}.self_attn"
            h = rms(xc, self.w(q_ + ".input_layernorm.weight"), ENC_EPS).reshape(C * L, d)
            proj = lambda n, heads: (h @ self.w(f"{a}.{n}.weight").T + self.w(f"{a}.{n}.bias")).reshape(C * L, heads, dh)
            q, k, v = proj("q_proj", H), proj("k_proj", Hkv), proj("v_proj", Hkv)
            q = rotate(rms(q, self.w(a + ".q_norm.weight"), ENC_EPS), cos, sin)
            k = rotate(rms(k, self.w(a + ".k_norm.weight"), ENC_EPS), cos, sin)
            rep = H // Hkv
            q = q.reshape(C, L, H, dh)
            k = np.repeat(k, rep, 1).reshape(C, L, H, dh)
            v = np.repeat(v, rep, 1).reshape(C, L, H, dh)
            sc = np.einsum("clhd,cmhd->chlm", q, k) / math.sqrt(dh)  # bidirectional
            pr = np.exp(sc - sc.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            o = np.einsum("chlm,cmhd->clhd", pr, v).reshape(C, L, d)
            xc = xc + o @ self.w(a + ".o_proj.weight").T
            assert self.W[q_ + ".mlp.gate_proj.weight"].shape == (width, d), "encoder MLP width"
            xc = xc + self.mlp(q_ + ".mlp", rms(xc, self.w(q_ + ".post_attention_layernorm.weight"), ENC_EPS))
        xc = rms(xc, self.w(p + ".encoder.norm.weight"), ENC_EPS)
        if cls:
            return xc[:, :S].reshape(T, d), xc[:, S]
        return xc.reshape(T, d), xc.mean(1)

    def chunking(self, p, x):
        T, S, G = x.shape[0], self.S, self.G
        e, lmk_in = self.encode(p, x)
        lmk = lmk_in @ self.w(p + ".lmk_ln.weight").T
        km = (e @ self.w(p + ".proj_k.weight").T).reshape(T, G, self.dh)
        if self.opt("enable_qk_norm"):
            km = rms(km, self.w(p + ".k_rmsnorm.weight"), HSA_EPS)
        vm = (e @ self.w(p + ".proj_v.weight").T).reshape(T, G, self.dh)
        return lmk.reshape(T // S, G, self.dr // G), km, vm

    def retrieval(self, p, x, lmk):
        """(weights, indices) [T, G, k] as RetrievalLayer.forward (training path)."""
        T, S, G = x.shape[0], self.S, self.G
        C = T // S
        q = (rms(x, self.w(p + ".pre_norm.weight"), HSA_EPS) @ self.w(p + ".ln.weight").T)
        q = q.reshape(T, G, self.dr // G)
        if self.opt("enable_lmk_norm"):
            q = rms(q, self.w(p + ".lmk_q_norm.weight"), HSA_EPS)
            lmk = rms(lmk, self.w(p + ".lmk_k_norm.weight"), HSA_EPS)
        scores = np.einsum("tgd,cgd->tgc", q, lmk) / math.sqrt(self.dr // G)
        t = np.arange(T)[:, None, None]
        c = np.arange(C)[None, None, :]
        if self.opt("mask_slide_window"):
            masked = t - self.c["sliding_window"] + S < (c + 1) * S
        else:
            masked = t < (c + 1) * S
        scores = np.where(masked, -np.inf, scores)
        k = min(self.K, C)
        idx = np.argsort(-scores, axis=-1, kind="stable")[..., :k]  # topk, best first
        valid = (np.arange(T)[:, None, None] // S) > np.arange(k)[None, None, :]
        idx = np.where(valid, idx, -1)
        idx = -np.sort(-idx, axis=-1)  # descending chunk index, invalid (-1) last
        mask = idx == -1
        idx = np.where(mask, 0, idx)
        s = np.take_along_axis(scores, idx, -1)
        s = np.where(mask, -np.inf, s)
        if self.opt("enable_softmax"):
            all_inf = np.all(s == -np.inf, -1, keepdims=True)
            s2 = np.where(s == -np.inf, -1e7, s)
            e = np.exp(s2 - s2.max(-1, keepdims=True))
            w = np.where(all_inf, 0.0, e / e.sum(-1, keepdims=True))
        else:
            sp = np.where(s > 15.0, s, np.log1p(np.exp(np.minimum(s, 15.0))))
            w = np.exp(s - np.cumsum(sp, -1))
        return w, idx

    def hsa(self, p, x, km, vm, w, idx, cos, sin):
        T, S, G, H, dh = x.shape[0], self.S, self.G, self.H, self.dh
        if not self.opt("hsa_only", True):
            win = self.c.get("hsa_sliding_window") or self.c["sliding_window"]
            x = x + self.swa(p + ".attn", rms(x, self.w(p + ".swa_prenorm.weight"), HSA_EPS), win, cos, sin)
        r = x
        q = (rms(x, self.w(p + ".pre_norm.weight"), HSA_EPS) @ self.w(p + ".q_proj.weight").T)
        q = q.reshape(T, H, dh)
        if self.opt("enable_qk_norm"):
            q = rms(q, self.w(p + ".q_norm.weight"), HSA_EPS)
        sm_n = 1.0 if self.opt("enable_softmax1") else 0.0
        rows = idx[..., None] * S + np.arange(S)  # [T, G, k, S]
        g_of_h = np.arange(H) // (H // G)
        o = np.zeros((T, H, dh))
        for h in range(H):
            g = g_of_h[h]
            kc = km[rows[:, g], g]  # [T, k, S, dh]
            vc = vm[rows[:, g], g]
            a = np.einsum("td,tksd->tks", q[:, h], kc) / math.sqrt(dh)
            m = a.max(-1, keepdims=True)
            e = np.exp(a - m)
            pr = e / (sm_n * np.exp(-m) + e.sum(-1, keepdims=True))
            ob = np.einsum("tks,tksd->tkd", pr, vc)
            o[:, h] = np.einsum("tk,tkd->td", w[:, g], ob)
        out = o.reshape(T, self.d) @ self.w(p + ".o_proj.weight").T
        hmid = rms(r + out, self.w(p + "._mlp_norm.weight"), HSA_EPS)
        if self.opt("reset_hsa_residual"):
            r = r + out
        return r + self.mlp(p + "._mlp", hmid)

    def logits(self, ids, pos0=0):
        c = self.c
        T = len(ids)
        assert T % self.S == 0
        cos, sin = rope_tables(c, np.arange(pos0, pos0 + T), self.dh)
        x = self.w("backbone.embeddings.weight")[np.array(ids)]
        i = 0
        for _ in range(c["num_lower_layers"]):
            x = self.swa_layer(f"backbone.layers.{i}", x, cos, sin)
            i += 1
        lmk, km, vm = self.chunking(f"backbone.layers.{i}", x)
        i += 1
        per = c["num_upper_layers"] // c["num_upper_groups"]
        for _ in range(c["num_upper_groups"]):
            w, idx = self.retrieval(f"backbone.layers.{i}", x, lmk)
            i += 1
            x = self.hsa(f"backbone.layers.{i}", x, km, vm, w, idx, cos, sin)
            i += 1
            for _ in range(per):
                x = self.swa_layer(f"backbone.layers.{i}", x, cos, sin)
                i += 1
        x = rms(x, self.w("backbone.norm_f.weight"), c.get("layer_norm_epsilon", 1e-5))
        out = x @ self.w("lm_head.weight").T
        unused = sorted(set(self.W) - self.used)
        if unused:
            raise ValueError(f"tensors the model does not read: {unused}")
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="JSON: {\"ids\": [...], \"pos0\": 0}")
    ap.add_argument("--logits", required=True, help="raw little-endian float64 [T, vocab]")
    ap.add_argument("--tol", type=float, default=1e-5)
    a = ap.parse_args()
    with open(os.path.join(a.model, "config.json")) as f:
        cfg = json.load(f)
    W = load_safetensors(os.path.join(a.model, "model.safetensors"))
    with open(a.ids) as f:
        spec = json.load(f)
    ids, pos0 = spec["ids"], spec.get("pos0", 0)
    ref = Model(cfg, W).logits(ids, pos0)
    ours = np.fromfile(a.logits, "<f8").reshape(ref.shape)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"np_hsa_check: {len(ids)} tokens, vocab {ref.shape[1]}: max |ours - numpy| / max |numpy| = {err:.3e} (tol {a.tol:g})")
    sys.exit(0 if err <= a.tol else 1)


if __name__ == "__main__":
    main()
