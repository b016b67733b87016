"""The PyTorch peer of `ultralong gpu-check --only layer`: one Llama-3.1-8B decoder layer at the
per-rank shapes of TP 8 (4 query heads, 1 KV head, FFN 1792, hidden 4096, head_dim 128), bf16,
eager PyTorch with SDPA (causal, GQA), forward + backward over T local tokens. Same FLOP count
(DESIGN.md: causal, 6·N + 6·heads·head_dim·S per token), same timing method (CUDA events, median).
Writes {"layer_ms","peak_gib","mfu","attn_ms","layer_minus_attn_ms","torch","device"} as JSON.

Also `--compare A.safetensors B.safetensors`: loss/gradient agreement of two `ultralong forward`
runs (the 2-rank MPI check), printed as JSON rows.
"""
import argparse
import json
import sys

H, NQ, NKV, D, FFN, EPS = 4096, 4, 1, 128, 1792, 1e-5
PEAK = 989e12


def median(v):
    v = sorted(v)
    return v[len(v) // 2]


def layer_bench(t, reps):
    import torch
    import torch.nn.functional as F

    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def w(o, i):
        return (torch.randn(o, i, device=dev, dtype=torch.float32, generator=g) * 0.02).to(dt).requires_grad_()

    wq, wk, wv, wo = w(NQ * D, H), w(NKV * D, H), w(NKV * D, H), w(H, NQ * D)
    wg, wu, wd = w(FFN, H), w(FFN, H), w(H, FFN)
    n1 = torch.ones(H, device=dev, dtype=dt, requires_grad=True)
    n2 = torch.ones(H, device=dev, dtype=dt, requires_grad=True)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float64) / D))
    ang = torch.arange(t, device=dev, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(dt)[:, None, :], ang.sin().to(dt)[:, None, :]

    def rms(x, wt):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(dt) * wt

    def rope(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def layer(x):
        h = rms(x, n1)
        q = rope((h @ wq.t()).view(t, NQ, D)).transpose(0, 1)[None]
        k = rope((h @ wk.t()).view(t, NKV, D)).transpose(0, 1)[None]
        v = (h @ wv.t()).view(t, NKV, D).transpose(0, 1)[None]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x2 = x + a[0].transpose(0, 1).reshape(t, NQ * D) @ wo.t()
        h2 = rms(x2, n2)
        return x2 + (F.silu(h2 @ wg.t()) * (h2 @ wu.t())) @ wd.t()

    x = torch.randn(t, H, device=dev, dtype=dt, generator=g).requires_grad_()
    dy = torch.randn(t, H, device=dev, dtype=dt, generator=g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()

    def step():
        for p in (x, wq, wk, wv, wo, wg, wu, wd, n1, n2):
            p.grad = None
        layer(x).backward(dy)

    def timed(f, warm, n):
        for _ in range(warm):
            f()
        torch.cuda.synchronize()
        out = []
        for _ in range(n):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            f()
            e1.record()
            e1.synchronize()
            out.append(e0.elapsed_time(e1))
        return median(out)

    ms = timed(step, 2, reps)
    peak = torch.cuda.max_memory_allocated() - base
    q = torch.randn(1, NQ, t, D, device=dev, dtype=dt, generator=g).requires_grad_()
    k = torch.randn(1, NKV, t, D, device=dev, dtype=dt, generator=g).requires_grad_()
    v = torch.randn(1, NKV, t, D, device=dev, dtype=dt, generator=g).requires_grad_()
    do = torch.randn(1, NQ, t, D, device=dev, dtype=dt, generator=g)

    def attn():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(do)

    attn_ms = timed(attn, 2, reps)
    params = H * (NQ + 2 * NKV) * D + NQ * D * H + 3 * H * FFN
    flops = t * (6 * params + 6 * NQ * D * t)
    return {
        "layer_ms": ms,
        "peak_gib": peak / 2**30,
        "mfu": flops / (ms / 1e3) / PEAK,
        "attn_ms": attn_ms,
        "layer_minus_attn_ms": ms - attn_ms,
        "tokens": t,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
    }


def compare(a, b, la, lb, label="tp 2"):
    """Rows: loss of `forward` JSON lines la/lb, gradient cosine per tensor of two safetensors."""
    import numpy as np
    from safetensors.numpy import load_file

    rows = []
    fa, fb = json.loads(open(la).read().strip().splitlines()[-1]), json.loads(open(lb).read().strip().splitlines()[-1])
    rel = abs(fa["loss"] - fb["loss"]) / abs(fb["loss"])
    rows.append({"name": f"check: 2 ranks (MPI fallback, {label}, one GPU) loss vs 1 rank, relative", "value": int(rel < 1e-3), "unit": "pass", "error": rel, "tolerance": 1e-3, "peer": None, "peer_value": None})
    ta, tb = load_file(a), load_file(b)
    worst = 1.0
    for n in sorted(tb):
        x, y = ta[n].astype(np.float64).ravel(), tb[n].astype(np.float64).ravel()
        c = float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-300))
        worst = min(worst, c)
    rows.append({"name": f"check: 2 ranks (MPI fallback, {label}) gradients vs 1 rank, min cosine over tensors", "value": int(worst > 0.999), "unit": "pass", "error": 1 - worst, "tolerance": 1e-3, "peer": None, "peer_value": None})
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out")
    p.add_argument("--compare", nargs=4, metavar=("GRADS_A", "GRADS_B", "LOSS_A", "LOSS_B"))
    p.add_argument("--label", default="tp 2", help="what the 2 ranks split (for the row names)")
    a = p.parse_args()
    if a.compare:
        res = compare(*a.compare, label=a.label)
    else:
        res = layer_bench(a.tokens, a.reps)
    s = json.dumps(res, indent=1)
    print(s)
    if a.out:
        open(a.out, "w").write(s + "\n")


if __name__ == "__main__":
    sys.exit(main())
