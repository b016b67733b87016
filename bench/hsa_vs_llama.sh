#!/usr/bin/env bash
# Training-step time and memory of the HSA model beside a Llama of the same width and attention
# layer count (bench/hsa-bench.json, bench/llama-bench.json: d 256, 8 heads, 4.1M / 4.3M
# parameters) at 4K-32K tokens on the CPU backend (f32): `bench train`, one process per model and
# length so each peak RSS is its own. HSA's SWA is O(T·W), its retrieval O(T²/S) in scores and
# O(T·K·S) in attention; the Llama's attention is O(T²). Writes bench/results/hsa-vs-llama-cpu-DATE.json.
# LENGTHS (default "4096 8192 16384 32768") and STEPS (default 1, no warm-up) shorten it.
set -euo pipefail
cd "$(dirname "$0")/.."
B=target/release/ultralong
LENGTHS=${LENGTHS:-"4096 8192 16384 32768"}
STEPS=${STEPS:-1}
raw="load before: $(cut -d' ' -f1-3 /proc/loadavg)"$'\n'
for t in $LENGTHS; do
  for m in llama hsa; do
    line=$("$B" bench train --model-config bench/$m-bench.json --seq-len "$t" --steps "$STEPS" --warmup 0 | tail -1)
    raw+="$m $t $line"$'\n'
    echo "$m $t: $(echo "$line" | python3 -c 'import json,sys; j=json.load(sys.stdin); print(round(j["step_ms"]), "ms,", round(j["peak_rss_bytes"]/2**20), "MiB")')"
  done
done
raw+="load after: $(cut -d' ' -f1-3 /proc/loadavg)"$'\n'
python3 - "$raw" <<'P'
import json, sys, datetime
raw = sys.argv[1]
runs = {}
for l in raw.splitlines():
    parts = l.split(" ", 2)
    if len(parts) == 3 and parts[0] in ("llama", "hsa"):
        runs[(parts[0], int(parts[1]))] = json.loads(parts[2])
rows = []
for t in sorted({t for _, t in runs}):
    h, l = runs[("hsa", t)], runs[("llama", t)]
    rows.append({"name": f"HSA training step, {t} tokens", "value": round(h["step_ms"] / 1e3, 3), "unit": "s",
                 "peer": "Llama of the same size (full causal attention), same binary and run", "peer_value": round(l["step_ms"] / 1e3, 3)})
    rows.append({"name": f"HSA peak RSS, {t} tokens", "value": round(h["peak_rss_bytes"] / 2**20, 1), "unit": "MiB",
                 "peer": "Llama of the same size", "peer_value": round(l["peak_rss_bytes"] / 2**20, 1)})
    rows.append({"name": f"HSA forward alone, {t} tokens", "value": round(h["profile_ms"]["forward"] / 1e3, 3), "unit": "s",
                 "peer": "Llama of the same size", "peer_value": round(l["profile_ms"]["forward"] / 1e3, 3)})
date = datetime.date.today().isoformat()
res = {"device": "CPU (2-core x86_64 VM, Debian bookworm), f32 CPU backend; cores shared with other jobs (load in raw)",
       "command": "bash bench/hsa_vs_llama.sh", "date": date, "rows": rows, "raw": raw}
path = f"bench/results/hsa-vs-llama-cpu-{date}.json"
open(path, "w").write(json.dumps(res, indent=1) + "\n")
print(path)
P
