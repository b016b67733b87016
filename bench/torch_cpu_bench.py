#!/usr/bin/env python3
"""PyTorch-eager peer for ultralong's CPU training benchmark.

Builds LlamaForCausalLM(config) in float32 from a HF config.json, AdamW(lr 1e-4), batch 1,
random token ids (fixed seed), and times W warm-up + S measured training steps of
(forward with labels, backward, optimizer step, zero_grad). Prints ONE JSON line:

  {"impl": "torch-eager", "torch": ..., "threads": n, "seq_len": N, "step_ms": median,
   "tokens_per_s": N*1000/step_ms, "peak_rss_bytes": maxrss*1024, "n_params": ..., ...}

Usage: .venv/bin/python bench/torch_cpu_bench.py --config CONFIG.json --seq-len N \
           [--steps S] [--warmup W] [--threads 2] [--attn sdpa|eager]
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time


def rss_now_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def loadavg_1m():
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="HF Llama config.json")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.seq_len < 2:
        ap.error("need --steps >= 1, --warmup >= 0, --seq-len >= 2")
    if not os.path.isfile(args.config):
        print(f"torch_cpu_bench: config not found: {args.config}", file=sys.stderr)
        return 2

    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    rss_after_import = rss_now_bytes()

    config = LlamaConfig.from_json_file(args.config)
    config._attn_implementation = args.attn
    config.use_cache = False
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).float()
    model.train()
    impl = model.config._attn_implementation
    if impl != args.attn:
        print(f"torch_cpu_bench: asked for attention {args.attn}, model uses {impl}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=g)

    load_start = loadavg_1m()
    times, cpu_times, losses = [], [], []
    for i in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        losses.append(out.loss.item())
        if i >= args.warmup:
            times.append(dt * 1000.0)
            cpu_times.append(dc * 1000.0)
        del out

    step_ms = statistics.median(times)
    row = {
        "impl": "torch-eager",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn": impl,
        "threads": torch.get_num_threads(),
        "seq_len": args.seq_len,
        "batch": 1,
        "steps": args.steps,
        "warmup": args.warmup,
        "step_ms": round(step_ms, 3),
        "step_ms_min": round(min(times), 3),
        "step_ms_max": round(max(times), 3),
        # process CPU time (all threads) per step: insensitive to other load on the machine
        "step_cpu_ms": round(statistics.median(cpu_times), 3),
        "tokens_per_s": round(args.seq_len * 1000.0 / step_ms, 3),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_import_bytes": rss_after_import,
        # torch from PyPI is the CUDA build: importing it costs ~0.7 GB RSS before any model exists
        "peak_rss_above_import_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                                        - rss_after_import) if rss_after_import else None,
        "n_params": n_params,
        "loss_first": round(losses[0], 6),
        "loss_last": round(losses[-1], 6),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default (active)",
        "loadavg_1m_start": load_start,
        "loadavg_1m_end": loadavg_1m(),
        "config": os.path.abspath(args.config),
    }
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
