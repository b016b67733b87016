"""The PyTorch peer of `ultralong gpu-check --only attn-bench`: causal GQA attention, head_dim 128,
bf16, through torch's scaled_dot_product_attention with one backend forced at a time
(`torch.nn.attention.sdpa_kernel`: FLASH_ATTENTION = FlashAttention-2 inside torch, and
CUDNN_ATTENTION), at the shapes of the benchmark: 4 query heads over 1 KV head (TP 8) and 32 over 8,
S = 8K, 32K, 128K. Forward, backward and forward+backward, CUDA events, warm-up, median, TFLOP/s by
FlashAttention's convention (forward 4·S²·d·heads / 2 when causal, backward 2.5× the forward), the
same count gpu-check uses.

Where a backend refuses `enable_gqa`, K and V are expanded to the query heads before timing (the
row says "gqa": "expanded"); a backend that refuses the shape altogether gets no number.

Also a correctness check of each backend at a small shape against an fp32 math reference on the
same bf16 inputs (rows named "check: ..."), so the bf16 error of torch's kernels sits beside ours.

Writes {"device", "torch", "rows": {name: {"sdpa_flash": TFLOP/s, "sdpa_cudnn": TFLOP/s, ...}},
"checks": [row, ...]} (rows named like attn_fwd_bwd_causal_S32768_h4k1).
"""
import argparse
import json
import sys
import time

D = 128


def median(v):
    v = sorted(v)
    return v[len(v) // 2]


def timed(torch, f, reps):
    f()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        f()
        e1.record()
        e1.synchronize()
        out.append(e0.elapsed_time(e1))
    return median(out)


def inputs(torch, s, nq, nkv, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: torch.randn(1, h, s, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v, do = mk(nq), mk(nkv), mk(nkv), mk(nq)
    return q, k, v, do


def sdpa_call(torch, backend, q, k, v, nq, nkv):
    """A function computing SDPA with `backend`, and how GQA was done; raises if unsupported."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def with_gqa():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    try:
        with_gqa()
        return with_gqa, "native"
    except RuntimeError:
        pass
    ke = k.detach().repeat_interleave(nq // nkv, dim=1).requires_grad_()
    ve = v.detach().repeat_interleave(nq // nkv, dim=1).requires_grad_()

    def expanded():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)

    expanded()
    return expanded, "expanded"


def bench(torch, lens, budget_s):
    from torch.nn.attention import SDPBackend

    backends = [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]
    rows = {}
    for nq, nkv in [(4, 1), (32, 8)]:
        for s in lens:
            key = f"S{s}_h{nq}k{nkv}"
            fwd_flops = 4.0 * s * s * D * nq / 2
            for label, backend in backends:
                q, k, v, do = inputs(torch, s, nq, nkv, 1)
                q.requires_grad_()
                k.requires_grad_()
                v.requires_grad_()
                try:
                    f, gqa = sdpa_call(torch, backend, q, k, v, nq, nkv)
                except RuntimeError as e:
                    print(f"{label} {key}: not supported ({str(e).splitlines()[0][:160]})", flush=True)
                    continue
                t0 = time.time()
                o = f()
                o.backward(do, retain_graph=True)
                torch.cuda.synchronize()
                once = time.time() - t0
                reps = max(1, min(10, int(budget_s / max(once, 1e-3))))
                ms_f = timed(torch, f, reps)
                ms_b = timed(torch, lambda: o.backward(do, retain_graph=True), reps)
                ms_fb = timed(torch, lambda: f().backward(do), reps)
                for what, ms, fl in [("attn_fwd_causal", ms_f, fwd_flops),
                                     ("attn_bwd_causal", ms_b, 2.5 * fwd_flops),
                                     ("attn_fwd_bwd_causal", ms_fb, 3.5 * fwd_flops)]:
                    r = rows.setdefault(f"{what}_{key}", {})
                    r[label] = fl / (ms / 1e3) / 1e12
                    r[label + "_ms"] = ms
                    r[label + "_gqa"] = gqa
                print(f"{label} {key}: fwd {ms_f:.3f} ms, bwd {ms_b:.3f} ms, fwd+bwd {ms_fb:.3f} ms ({gqa} GQA)", flush=True)
                del q, k, v, do, o, f
                torch.cuda.empty_cache()
    return rows


def check(torch):
    """Each backend against an fp32 math reference on the same bf16 inputs: out, dq, dk, dv."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    nq, nkv, s = 8, 2, 1000
    q, k, v, do = inputs(torch, s, nq, nkv, 7)
    q32, k32, v32 = [x.float().requires_grad_() for x in (q, k, v)]
    ke, ve = k32.repeat_interleave(nq // nkv, dim=1), v32.repeat_interleave(nq // nkv, dim=1)
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q32, ke, ve, is_causal=True)
    ref.backward(do.float())
    refs = [ref.detach(), q32.grad, k32.grad, v32.grad]
    for label, backend in [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]:
        qb, kb, vb = [x.clone().requires_grad_() for x in (q, k, v)]
        try:
            f, gqa = sdpa_call(torch, backend, qb, kb, vb, nq, nkv)
            o = f()
            o.backward(do)
        except RuntimeError as e:
            rows.append({"name": f"check: {label} vs fp32 math (not supported: {str(e).splitlines()[0][:120]})", "value": 0, "unit": "pass", "error": "not run", "peer": None, "peer_value": None})
            continue
        # With expanded K/V the gradients land on the expanded copies: fold them back.
        grads = [qb.grad, kb.grad, vb.grad]
        if gqa == "expanded":
            grads = [qb.grad] + [None, None]
            rows.append({"name": f"check: {label} gradients of K/V not compared (GQA expanded)", "value": 1, "unit": "pass", "error": 0, "peer": None, "peer_value": None})
        for name, got, want in zip(["out", "dq", "dk", "dv"], [o.detach()] + grads, refs):
            if got is None:
                continue
            err = float((got.float() - want).norm() / want.norm())
            rows.append({"name": f"check: {label} {name} vs fp32 math, 8/2 heads, S 1000 causal, relative", "value": int(err < 3e-2), "unit": "pass", "error": err, "tolerance": 3e-2, "peer": None, "peer_value": None})
            print(f"{label} {name}: relative error {err:.2e} vs fp32 math", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", default="8192,32768,131072")
    p.add_argument("--budget", type=float, default=1.5, help="seconds of timed runs per measurement")
    p.add_argument("--out")
    a = p.parse_args()
    import torch

    lens = [int(x) for x in a.seqlens.split(",")]
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    res["checks"] = check(torch)
    res["rows"] = bench(torch, lens, a.budget)
    s = json.dumps(res, indent=1)
    if a.out:
        open(a.out, "w").write(s + "\n")
    for name, r in sorted(res["rows"].items()):
        print(name, {k: round(v, 1) for k, v in r.items() if isinstance(v, float) and not k.endswith("_ms")})


if __name__ == "__main__":
    sys.exit(main())
