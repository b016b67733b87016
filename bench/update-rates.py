#!/usr/bin/env python3
"""Rewrite a GPU section of bench/rates.toml from gpu-check results JSON files (bench/results/).

    python3 bench/update-rates.py h200 bench/results/gpu-check-DATE-main.json [more.json ...]

Reads, where present: attention rows `attn_fwd_causal_S{S}_h4k1` / `attn_bwd_causal_S{S}_h4k1`
(TFLOP/s; the rank4m layout's 4 query heads over 1 KV head), GEMM rows `gemm ... (bf16)` (the
mean of the layer shapes; the 8192^3 square is left out), `Device-to-device copy bandwidth`,
and the elementwise bandwidths (rope, rmsnorm, swiglu, adamw: their mean). Keys not found keep their value;
`source` names the files. The other sections are left as they are.
"""
import json
import re
import sys


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    key, files = sys.argv[1], sys.argv[2:]
    rows = {}
    for f in files:
        for r in json.load(open(f))["rows"]:
            rows[r["name"]] = r["value"]
    new = {}
    for kind in ("fwd", "bwd"):
        pts = sorted((int(m.group(1)), v) for n, v in rows.items()
                     if (m := re.fullmatch(rf"attn_{kind}_causal_S(\d+)_h4k1", n)))
        if pts:
            new[f"attention_{kind}_tflops"] = "[" + ", ".join(f"[{s}, {v:.1f}]" for s, v in pts) + "]"
    gemm = [v for n, v in rows.items() if n.startswith("gemm ") and "(bf16)" in n and "^3" not in n]
    if gemm:
        new["gemm_tflops"] = f"{sum(gemm) / len(gemm):.1f}"
    if "Device-to-device copy bandwidth" in rows:
        new["copy_gbps"] = f"{rows['Device-to-device copy bandwidth']:.1f}"
    ew = [v for n, v in rows.items() if n.endswith("bandwidth") and "fraction" not in n and n.split()[0] in ("rope", "rmsnorm", "swiglu", "adamw")]
    if ew:
        new["elementwise_gbps"] = f"{sum(ew) / len(ew):.1f}"
    new["source"] = json.dumps(", ".join(files))

    path = "bench/rates.toml"
    lines = open(path).read().split("\n")
    try:
        start = lines.index(f"[{key}]")
    except ValueError:
        sys.exit(f"{path}: no section [{key}]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    for i in range(start + 1, end):
        k = lines[i].split("=", 1)[0].strip()
        if k in new and "=" in lines[i]:
            lines[i] = f"{k} = {new.pop(k)}"
    if new:
        print("not in the section (left out):", ", ".join(new), file=sys.stderr)
    open(path, "w").write("\n".join(lines))
    print(f"updated [{key}] of {path}")


if __name__ == "__main__":
    main()
