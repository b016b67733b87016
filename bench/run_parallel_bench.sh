#!/usr/bin/env bash
# CPU step time of the parallel layouts at a fixed total sequence, and the share of the ring's
# communication hidden behind compute. Runs `ultralong train` under mpirun for
# (tp, cp) = (1,1), (1,2), (2,1), (2,2) on one model and one sequence length; for cp > 1 it runs
# twice: normally (exchanges overlapped with the local block) and with ULTRALONG_RING_NO_OVERLAP=1
# (each exchange waited for at once, so the time blocked is the whole ring communication).
#   hidden share = 1 - blocked(overlapped) / blocked(not overlapped)
# Writes bench/results/cpu-parallel-<date>.json.
#
# Env: ULTRALONG_BIN (target/release/ultralong), SEQ (4096), STEPS (4; the first is dropped),
#      CORES (nproc): rayon threads per rank = max(1, CORES / ranks), OUT (result path).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="${ULTRALONG_BIN:-$ROOT/target/release/ultralong}"
SEQ="${SEQ:-4096}"
STEPS="${STEPS:-4}"
CORES="${CORES:-$(nproc)}"
DATE="$(date -u +%Y-%m-%d)"
OUT="${OUT:-$ROOT/bench/results/cpu-parallel-$DATE.json}"
[ -x "$BIN" ] || { echo "run_parallel_bench.sh: build first: cargo build --release" >&2; exit 1; }
command -v mpirun >/dev/null || { echo "run_parallel_bench.sh: mpirun not found (make deps)" >&2; exit 1; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 \
  OMPI_MCA_hwloc_base_binding_policy=none OMPI_MCA_btl_vader_single_copy_mechanism=none

TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
# A small Llama-3.1-shaped model: 4 layers, hidden 256, 8 query / 2 KV heads of 32, FFN 768.
cat > "$TMP/config.json" <<JSON
{"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
 "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-5,
 "rope_theta": 500000.0, "max_position_embeddings": $SEQ,
 "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": $((SEQ / 4)),
                  "beta_fast": 4.0, "beta_slow": 1.0}, "tie_word_embeddings": false}
JSON
"$BIN" init --config "$TMP/config.json" --out "$TMP/m" --seed 1 >/dev/null
python3 -c "import json,random; random.seed(0); json.dump([random.randrange(2048) for _ in range($SEQ * ($STEPS + 1) + 1)], open('$TMP/ids.json','w'))"
cat > "$TMP/run.toml" <<TOML
[model]
path = "$TMP/m"
[data]
tokens = "$TMP/ids.json"
[train]
steps = $STEPS
seq_len = $SEQ
out_dir = "$TMP/run"
[checkpoint]
interval = 0
keep = 1
[log]
quiet = true
TOML

RAW="$TMP/raw.txt"; : > "$RAW"
run() {  # tp cp overlap(1|0)
  local tp=$1 cp=$2 ov=$3 np=$(( $1 * $2 ))
  local thr=$(( CORES / np )); [ "$thr" -ge 1 ] || thr=1
  local env=(); [ "$ov" = 0 ] && env=(-x ULTRALONG_RING_NO_OVERLAP=1)
  rm -rf "$TMP/run"
  mpirun -np "$np" -x RAYON_NUM_THREADS="$thr" "${env[@]}" "$BIN" train --config "$TMP/run.toml" \
    --tp "$tp" --cp "$cp" > "$TMP/out.jsonl"
  while read -r line; do echo "tp=$tp cp=$cp overlap=$ov threads/rank=$thr $line" >> "$RAW"; done < "$TMP/out.jsonl"
}
for l in "1 1 1" "1 2 1" "1 2 0" "2 1 1" "2 2 1" "2 2 0"; do run $l; done

python3 - "$RAW" "$OUT" "$SEQ" "$STEPS" "$CORES" <<'PY'
import json, re, statistics, sys, subprocess, platform
raw, out, seq, steps, cores = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
runs = {}
for line in open(raw):
    m = re.match(r"tp=(\d+) cp=(\d+) overlap=(\d) threads/rank=(\d+) (\{.*\})", line)
    tp, cp, ov, thr = map(int, m.groups()[:4]); j = json.loads(m.group(5))
    runs.setdefault((tp, cp, ov), []).append(j)
def med(xs): return statistics.median(xs)
rows = []
base = med([j["step_ms"] for j in runs[(1, 1, 1)][1:]])
for (tp, cp, ov), js in sorted(runs.items()):
    js = js[1:]  # first step: warm-up
    step = med([j["step_ms"] for j in js])
    tag = f"tp{tp}_cp{cp}" + ("" if ov else "_no_overlap")
    rows.append({"name": f"step_ms_{tag}_S{seq}", "value": round(step, 1), "unit": "ms",
                 "peer": "ultralong tp1_cp1 (same run)", "peer_value": round(base, 1)})
    if cp > 1:
        rows.append({"name": f"ring_wait_ms_{tag}_S{seq}", "value": round(med([j["ring_wait_ms"] for j in js]), 1), "unit": "ms"})
for tp in (1, 2):
    if (tp, 2, 1) in runs and (tp, 2, 0) in runs:
        w_ov = med([j["ring_wait_ms"] for j in runs[(tp, 2, 1)][1:]])
        w_no = med([j["ring_wait_ms"] for j in runs[(tp, 2, 0)][1:]])
        rows.append({"name": f"ring_comm_hidden_share_tp{tp}_cp2", "value": round(1 - w_ov / w_no, 3), "unit": "fraction",
                     "peer": "blocked ms without overlap", "peer_value": round(w_no, 1)})
        step = med([j["step_ms"] for j in runs[(tp, 2, 1)][1:]])
        rows.append({"name": f"ring_exposed_share_of_step_tp{tp}_cp2", "value": round(w_ov / step, 4), "unit": "fraction"})
res = {"device": f"CPU: {platform.processor() or platform.machine()}, {cores} cores (ranks oversubscribe the cores; rayon threads per rank = max(1, cores/ranks))",
       "command": "bash bench/run_parallel_bench.sh", "date": subprocess.check_output(["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"]).decode().strip(),
       "model": "4 layers, hidden 256, 8/2 heads x 32, FFN 768, vocab 2048, YaRN x4", "seq_len": seq, "steps_timed": steps - 1,
       "rows": rows, "raw": open(raw).read()}
json.dump(res, open(out, "w"), indent=1)
for r in rows: print(f'{r["name"]:45s} {r["value"]:>10} {r["unit"]}')
PY
echo "wrote $OUT"
