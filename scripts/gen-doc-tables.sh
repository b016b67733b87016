#!/usr/bin/env bash
# scripts/gen-doc-tables.sh: the figures in the docs that come from a command, regenerated from
# that command, so that they cannot go stale unnoticed:
#   - REPRODUCE.md, between `<!-- gen-doc-tables: NAME begin -->` and `<!-- gen-doc-tables: NAME
#     end -->`: `plan` (the §3 table: `ultralong plan` of each paper config at the GPU count of its
#     slurm script) and `walltime` (plan's hours against each script's --time and USR1 lead);
#   - each paper config's `# plan (scripts/gen-doc-tables.sh): ...` comment line.
# The GPU counts, --time and --signal lead come from the #SBATCH lines of slurm/{1m,2m,4m,sft}.sh.
#
#   bash scripts/gen-doc-tables.sh           rewrite the blocks and lines in place
#   bash scripts/gen-doc-tables.sh --check   exit 1 and show the difference if any is stale
#                                            (tests/cluster_docs.rs runs this)
# ULTRALONG_BIN: the binary (default target/release/ultralong, else target/debug/ultralong).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-write}
case $mode in write | --check) ;; *) echo "usage: $0 [--check]" >&2; exit 2 ;; esac
BIN=${ULTRALONG_BIN:-}
if [ -z "$BIN" ]; then
  for b in target/release/ultralong target/debug/ultralong; do [ -x "$b" ] && BIN=$b && break; done
fi
[ -n "$BIN" ] && [ -x "$BIN" ] || { echo "error: no ultralong binary: cargo build, or set ULTRALONG_BIN" >&2; exit 1; }
MODEL=configs/llama-3.1-8b-instruct.json
GPU=h100-80g
# One rank of the 4M run measured on an H200 on 2026-12-04 (bench/results/
# gpu-check-2026-12-04-main.json, rank4m_step, 32 layers extrapolated from 1 and 2): seconds.
MEASURED_4M_STEP_S=1667
# What a checkpoint write may take (seconds), inside the USR1 lead: 128.5 GB per checkpoint of the
# 8B model (f32 weights, master, m, v), the 8 weight shards (4.0 GB each) written and hashed from
# the first node. An allowance, not a measurement.
CKPT_S=120

# sbatch_value SCRIPT OPTION: the value of `#SBATCH --OPTION=VALUE` in SCRIPT.
sbatch_value() { sed -n "s/^#SBATCH --$2=\(.*\)$/\1/p" "$1" | head -1; }
gpus_of() { echo $(($(sbatch_value "$1" nodes) * $(sbatch_value "$1" ntasks-per-node))); }
# Seconds of a Slurm time limit [D-]HH:MM:SS.
secs() {
  local t=$1 d=0
  case $t in *-*) d=${t%%-*}; t=${t#*-} ;; esac
  IFS=: read -r h m s <<<"$t"
  echo $(((10#$d * 24 + 10#$h) * 3600 + 10#$m * 60 + 10#${s:-0}))
}
lead_of() { sbatch_value "$1" signal | sed -n 's/.*@\([0-9]*\)$/\1/p'; }

# plan_fields CONFIG GPUS BACKEND: "tp cp dp peak step_value step_unit wall_h gpu_hours h_per_1b"
# from plan's text output (the chosen row and the budget lines).
plan_fields() {
  "$BIN" plan --config "$1" --model-config "$MODEL" --gpus "$2" --gpu "$GPU" --backend "$3" | awk '
    /<- chosen/ { tp = $1; cp = $2; dp = $3; peak = $4; sv = $6; su = $7 }
    /^budget +configured:/ { for (i = 1; i <= NF; i++) { if ($(i+1) == "wall,") wall = ($i == "h") ? $(i-1) : ($i == "min") ? sprintf("%.2f", $(i-1) / 60) : ""; if ($i == "GPU-hours") gh = $(i-1) } }
    /^ +per 1B tokens:/ { for (i = 1; i <= NF; i++) if ($i == "GPU-hours") g1 = $(i-1) }
    END { if (tp == "") exit 1; print tp, cp, dp, peak, sv, su, wall, gh, g1 }'
}
# peak32 CONFIG GPUS: the device peak (GiB) of the same layout with every buffer in fp32, as the
# CUDA backend stores them today (`plan --backend cpu-train`: f32 everywhere; it leaves out the
# backend's pooled bf16 GEMM scratch, so it is a lower bound).
peak32() {
  "$BIN" plan --config "$1" --model-config "$MODEL" --gpus "$2" --gpu "$GPU" --backend cpu-train | awk '
    /^  device:/ { for (i = 1; i < NF; i++) if ($i == "peak" && $(i+2) ~ /^GiB/) p = $(i+1) }
    END { if (p == "") exit 1; printf "%.1f\n", p }'
}
# config_value CONFIG SECTION KEY: as slurm/common.sh's ul_config_value, which prepare.sh uses.
config_value() { (ULTRALONG_SITE=none; source slurm/common.sh && ul_config_value "$@"); }
to_s() { awk -v v="$1" -v u="$2" 'BEGIN { f = (u == "s") ? 1 : (u == "min") ? 60 : (u == "h") ? 3600 : -1; if (f < 0) exit 1; printf "%.0f", v * f }'; }

runs=("ultralong-1m slurm/1m.sh 1M" "ultralong-2m slurm/2m.sh 2M" "ultralong-4m slurm/4m.sh 4M"
  "sft-1m slurm/sft.sh SFT-1M" "sft-2m slurm/sft.sh SFT-2M" "sft-4m slurm/sft.sh SFT-4M")
declare -A F F32 GPUS
for r in "${runs[@]}"; do
  read -r cfg script _ <<<"$r"
  GPUS[$cfg]=$(gpus_of "$script")
  F[$cfg]=$(plan_fields "configs/$cfg.toml" "${GPUS[$cfg]}" cuda) || { echo "error: plan of $cfg printed no chosen layout" >&2; exit 1; }
  F32[$cfg]=$(peak32 "configs/$cfg.toml" "${GPUS[$cfg]}") || { echo "error: plan --backend cpu-train of $cfg printed no device peak" >&2; exit 1; }
done
read -r _ _ _ _ sv su _ <<<"${F[ultralong-4m]}"
PLAN_4M_STEP_S=$(to_s "$sv" "$su")
RATIO=$(awk -v m=$MEASURED_4M_STEP_S -v p="$PLAN_4M_STEP_S" 'BEGIN { printf "%.1f", m / p }')

new=$(mktemp -d)
trap 'rm -rf "$new"' EXIT

# --- REPRODUCE.md: plan
{
  echo '```bash'
  echo "for m in 1m 2m 4m; do   # the GPUs of slurm/1m.sh, 2m.sh, 4m.sh: $(sbatch_value slurm/1m.sh nodes) nodes × 8"
  echo "  ultralong plan --config configs/ultralong-\$m.toml \\"
  echo "      --model-config $MODEL --gpus ${GPUS[ultralong-1m]} --gpu $GPU"
  echo "done"
  echo "for m in 1m 2m 4m; do   # slurm/sft.sh: $(sbatch_value slurm/sft.sh nodes) nodes × 8"
  echo "  ultralong plan --config configs/sft-\$m.toml --model-config $MODEL --gpus ${GPUS[sft-1m]} --gpu $GPU"
  echo "done"
  echo '```'
  echo
  echo "| run | GPUs (tp × cp × dp) | peak per GPU, bf16 storage (design) | peak per GPU, fp32 storage (today, ≈) | step | configured tokens: wall, GPU-hours | GPU-hours per 1B tokens |"
  echo "|-----|---------------------|------:|------:|-----:|------:|------:|"
  for r in "${runs[@]}"; do
    read -r cfg _ name <<<"$r"
    read -r tp cp dp peak sv su wall gh g1 <<<"${F[$cfg]}"
    peak32=${F32[$cfg]}
    echo "| $name | ${GPUS[$cfg]} ($tp × $cp × $dp) | $peak GiB | $peak32 GiB | $sv $su | $wall h, $gh | $g1 |"
  done
} >"$new/plan"

# --- REPRODUCE.md: prepare (the `prepare cpt` command of each CPT config)
{
  echo '```bash'
  for m in 1m 2m 4m; do
    c=configs/ultralong-$m.toml
    seq=$(config_value "$c" train seq_len)
    tok=$(($(config_value "$c" train steps) * $(config_value "$c" train micro_batch) * $(config_value "$c" train grad_accum) * seq))
    echo "ultralong prepare cpt --input corpus/*/*.jsonl.zst --domain-from-dir \\"
    echo "    --tokenizer models/Llama-3.1-8B-Instruct --short 4096 --long 8192 \\"
    echo "    --seq-len $seq --tokens $tok --out $(config_value "$c" data dataset)     # $c"
  done
  echo '```'
} >"$new/prepare"

# --- REPRODUCE.md: walltime
{
  echo "| run | plan: step | × $RATIO + ${CKPT_S} s checkpoint | USR1 lead (\`--signal\`) | plan: wall for the configured tokens | × $RATIO | \`--time\` | jobs at plan's speed | jobs at the measured speed |"
  echo "|-----|------:|------:|------:|------:|------:|------:|------:|------:|"
  for r in "${runs[@]}"; do
    read -r cfg script name <<<"$r"
    read -r _ _ _ _ sv su wall _ <<<"${F[$cfg]}"
    t=$(sbatch_value "$script" time)
    lead=$(lead_of "$script")
    need=$(awk -v s="$(to_s "$sv" "$su")" -v k="$RATIO" -v c=$CKPT_S 'BEGIN { printf "%.0f", s * k + c }')
    if [ "$lead" -lt "$need" ]; then
      echo "error: $script: USR1 lead ${lead} s does not cover a step and a checkpoint (${need} s): raise its --signal=B:USR1@" >&2
      exit 1
    fi
    awk -v w="$wall" -v k="$RATIO" -v T="$(secs "$t")" -v L="$lead" -v N="$need" -v name="$name" -v t="$t" -v st="$sv $su" 'function ceil(x) { return (x == int(x)) ? x : int(x) + 1 }
      BEGIN { use = (T - L) / 3600; printf "| %s | %s | %.1f min | %.0f min | %.1f h | %.1f h | %s | %d | %d |\n", name, st, N / 60, L / 60, w, w * k, t, ceil(w / use), ceil(w * k / use) }'
  done
} >"$new/walltime"

# splice FILE NAME CONTENT_FILE: replace the lines between the NAME markers of FILE.
splice() {
  local file=$1 name=$2 body=$3
  grep -q "<!-- gen-doc-tables: $name begin -->" "$file" || { echo "error: $file has no '<!-- gen-doc-tables: $name begin -->' marker" >&2; exit 1; }
  awk -v name="$name" -v body="$body" '
    $0 == "<!-- gen-doc-tables: " name " begin -->" { print; while ((getline l < body) > 0) print l; skip = 1; next }
    $0 == "<!-- gen-doc-tables: " name " end -->" { skip = 0 }
    !skip' "$file"
}
cp REPRODUCE.md "$new/REPRODUCE.md"
for n in prepare plan walltime; do splice "$new/REPRODUCE.md" "$n" "$new/$n" >"$new/R" && mv "$new/R" "$new/REPRODUCE.md"; done

# --- the configs' plan lines
for r in "${runs[@]}"; do
  read -r cfg script _ <<<"$r"
  read -r tp cp dp peak sv su wall gh g1 <<<"${F[$cfg]}"
  peak32=${F32[$cfg]}
  line="# plan (scripts/gen-doc-tables.sh): --gpus ${GPUS[$cfg]} --gpu $GPU ($script) chooses tp $tp × cp $cp × dp $dp: $peak GiB per GPU with bf16 storage ($peak32 GiB with today's fp32), $sv $su per step, $wall h and $gh GPU-hours for the configured tokens (time model not calibrated: REPRODUCE.md §3)"
  f=configs/$cfg.toml
  grep -q '^# plan (scripts/gen-doc-tables.sh):' "$f" || { echo "error: $f has no '# plan (scripts/gen-doc-tables.sh):' line" >&2; exit 1; }
  awk -v line="$line" '/^# plan \(scripts\/gen-doc-tables.sh\):/ { print line; next } { print }' "$f" >"$new/$cfg.toml"
done

stale=0
for f in REPRODUCE.md $(for r in "${runs[@]}"; do read -r cfg _ <<<"$r"; echo "configs/$cfg.toml"; done); do
  g=$new/$(basename "$f")
  if ! cmp -s "$f" "$g"; then
    if [ "$mode" = --check ]; then
      echo "stale: $f (run bash scripts/gen-doc-tables.sh):" >&2
      diff -u "$f" "$g" >&2 || true
      stale=1
    else
      cp "$g" "$f"
      echo "updated $f"
    fi
  fi
done
exit $stale
