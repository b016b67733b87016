#!/usr/bin/env bash
# CPU training benchmark: ultralong (Rust, CPU backend) vs PyTorch eager, back to back,
# 2 threads each, two Llama-3.1-shaped configs (tiny @ seq 256, small @ seq 2048).
# Writes bench/results/cpu-train-<date>.json.
#
# Env overrides: ULTRALONG_BIN (default target/release/ultralong), VENV (default .venv),
#   THREADS (2), STEPS (default: 20 for tiny, 5 for small), WARMUP (2), TORCH_ONLY=1 (skip the Rust half: for testing the
#   torch half before the Rust bench exists; the result file then has only peer values),
#   OUT (result path), TORCH_OMP_WAIT_POLICY (unset: torch's default; PASSIVE on a busy box).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="${ULTRALONG_BIN:-$ROOT/target/release/ultralong}"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
THREADS="${THREADS:-2}"
STEPS_TINY="${STEPS:-20}"   # tiny steps are ~15 ms: more of them to tame the noise
STEPS_SMALL="${STEPS:-5}"
WARMUP="${WARMUP:-2}"
TORCH_ONLY="${TORCH_ONLY:-0}"
# The peer runs in torch's default OpenMP setup (libgomp, active waiting) unless
# TORCH_OMP_WAIT_POLICY is set. Measured on this 2-core box when quiet: PASSIVE is slower
# (tiny 42 vs 14 ms/step, small 1.40 vs 1.23 s/step); under other load ACTIVE collapses
# (tiny 0.6-1 s/step, small 7.5 s vs 3.0 s with PASSIVE). So: measure on a quiet machine.
OMP_POLICY="${TORCH_OMP_WAIT_POLICY:-}"
DATE="$(date -u +%Y-%m-%d)"
OUT="${OUT:-$ROOT/bench/results/cpu-train-$DATE.json}"

die() { echo "run_cpu_bench.sh: $*" >&2; exit 1; }

[ -x "$PY" ] || die "no Python venv at $VENV (create it: python3 -m venv .venv && .venv/bin/pip install -r bench/requirements.txt)"
"$PY" -c "import torch, transformers" 2>/dev/null || die "venv $VENV lacks torch/transformers (pip install -r bench/requirements.txt)"
if [ "$TORCH_ONLY" != "1" ]; then
  [ -x "$BIN" ] || die "ultralong binary not found at $BIN (build it: cargo build --release)"
  "$BIN" bench train --help >/dev/null 2>&1 || die "$BIN has no working 'bench train' subcommand"
fi

LOAD="$(cut -d' ' -f1 /proc/loadavg)"
if "$PY" -c "import sys; sys.exit(0 if float('$LOAD') > $THREADS else 1)"; then
  echo "run_cpu_bench.sh: warning: 1-minute load average is $LOAD (> $THREADS threads): timings will be noisy" >&2
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# Two Llama-3.1-shaped configs (llama3 rope scaling, theta 500000, untied embeddings), written in the
# installed transformers' config form (5.x: rope_parameters; 4.x: rope_theta + rope_scaling).
"$PY" - "$TMP" <<'EOF'
import json, sys, transformers
out = sys.argv[1]
major = int(transformers.__version__.split(".")[0])
rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
common = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
              rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
              bos_token_id=1, eos_token_id=2, initializer_range=0.02, max_position_embeddings=131072)
cfgs = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32),
}
for name, c in cfgs.items():
    d = dict(common, **c)
    if major >= 5:
        d["rope_parameters"] = dict(rope, rope_theta=500000.0)
    else:
        d["rope_theta"] = 500000.0
        d["rope_scaling"] = dict(rope)
    with open(f"{out}/{name}.json", "w") as f:
        json.dump(d, f, indent=2)
EOF

RAW="$TMP/raw.jsonl"
: > "$RAW"
run_pair() {  # name seq steps
  local name="$1" seq="$2" STEPS="$3" cfg="$TMP/$1.json" line
  if [ "$TORCH_ONLY" != "1" ]; then
    echo "== ultralong  $name seq $seq" >&2
    line="$(RAYON_NUM_THREADS="$THREADS" "$BIN" bench train --model-config "$cfg" --seq-len "$seq" \
            --steps "$STEPS" --warmup "$WARMUP" | tail -n 1)" || die "ultralong bench failed ($name seq $seq)"
    echo "$line" | "$PY" -c 'import json,sys; d=json.loads(sys.stdin.read()); assert d.get("impl")=="ultralong-cpu"' \
      || die "ultralong bench printed no ultralong-cpu JSON line: $line"
    echo "{\"config\": \"$name\", \"seq_len\": $seq, \"row\": $line}" >> "$RAW"
    echo "$line" >&2
  fi
  echo "== torch-eager $name seq $seq" >&2
  local envs=(OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS")
  [ -n "$OMP_POLICY" ] && envs+=(OMP_WAIT_POLICY="$OMP_POLICY")
  line="$(env "${envs[@]}" "$PY" "$ROOT/bench/torch_cpu_bench.py" \
          --config "$cfg" --seq-len "$seq" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" \
          | tail -n 1)" || die "torch bench failed ($name seq $seq)"
  echo "{\"config\": \"$name\", \"seq_len\": $seq, \"row\": $line}" >> "$RAW"
  echo "$line" >&2
}
run_pair tiny 256 "$STEPS_TINY"
run_pair small 2048 "$STEPS_SMALL"

mkdir -p "$(dirname "$OUT")"
"$PY" - "$RAW" "$OUT" "$THREADS" "$TORCH_ONLY" "$DATE" "$LOAD" <<'EOF'
import json, sys
raw_path, out_path, threads, torch_only, date = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
load_start = float(sys.argv[6])
entries = [json.loads(l) for l in open(raw_path) if l.strip()]

def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown cpu"

def find(cfg, impl):
    for e in entries:
        if e["config"] == cfg and e["row"].get("impl") == impl:
            return e["row"], e["seq_len"]
    return None, None

rows = []
peer_name = None
for cfg in ("tiny", "small"):
    ours, seq = find(cfg, "ultralong-cpu")
    theirs, seq2 = find(cfg, "torch-eager")
    seq = seq or seq2
    peer_name = f"pytorch eager ({theirs['attn']}) {theirs['torch']}" if theirs else "pytorch eager"
    def r(name, key, unit):
        rows.append({"name": f"{name} {cfg} seq{seq}", "value": ours.get(key) if ours else None,
                     "unit": unit, "peer": peer_name, "peer_value": theirs.get(key) if theirs else None})
    r("train tokens/s", "tokens_per_s", "tokens/s")
    r("train step time", "step_ms", "ms")
    r("train peak RSS", "peak_rss_bytes", "bytes")
    # torch from PyPI is the CUDA build; its import alone is ~0.7 GB RSS. Same row with the
    # peer's RSS measured after import subtracted (ours: plain peak RSS).
    rows.append({"name": f"train peak RSS (peer minus import baseline) {cfg} seq{seq}",
                 "value": ours.get("peak_rss_bytes") if ours else None, "unit": "bytes",
                 "peer": peer_name + " minus RSS after import",
                 "peer_value": theirs.get("peak_rss_above_import_bytes") if theirs else None})
    if ours and theirs:
        rows.append({"name": f"train tokens/s ratio ours/peer {cfg} seq{seq}",
                     "value": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 4), "unit": "x"})
        rows.append({"name": f"train peak RSS ratio ours/peer {cfg} seq{seq}",
                     "value": round(ours["peak_rss_bytes"] / theirs["peak_rss_bytes"], 4), "unit": "x"})

doc = {
    "device": f"{cpu_model()}, {threads} cores",
    "command": "bench/run_cpu_bench.sh" + (" (TORCH_ONLY=1: peer half only)" if torch_only else ""),
    "date": date,
    "rows": rows,
    "loadavg_1m": {"start": load_start, "end": float(open("/proc/loadavg").read().split()[0])},
    "raw": "\n".join(json.dumps(e["row"]) for e in entries),
}
with open(out_path, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
print(out_path)
EOF
