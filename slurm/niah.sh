#!/usr/bin/env bash
# Needle-in-a-haystack evaluation (the paper: 100% at every length and depth up to the window) of
# an UltraLong model with `ultralong eval niah`, on the launcher's ranks.
#   ULTRALONG_MODEL=1m|2m|4m     which model (default 4m): its window (the longest haystack) and
#                                its CP size: 32 (1M), 64 (2M, 4M) ranks per prompt
#   ULTRALONG_CP=N               override the CP size (ranks that share one prompt and its KV cache)
#   ULTRALONG_EVAL_MODEL=DIR     the model directory (default: runs/ultralong-sft-<model>/run/final)
#   extra arguments              go to `ultralong eval niah` (see its --help), e.g.
#                                --lengths 128K,512K,1M --depths 0,25,50,75,100 --trials 2
# Generation runs with tp = 1 (every rank holds the whole model): a prompt's prefill (ring
# attention) and its KV cache are split over CP ranks; DP = ranks / CP groups share the grid cells.
# The node count is the #SBATCH --nodes line below. Output: runs/ultralong-niah/<job id>/ (niah.json,
# niah.png).
#SBATCH --job-name=ultralong-niah
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=02:00:00
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
set -euo pipefail
# sbatch runs a copy of this script from its spool directory: find slurm/common.sh through
# ULTRALONG_ROOT, this file's directory, the job's Command (the submitted path), or the submit dir.
for UL_D in "${ULTRALONG_ROOT:-/nonexistent}/slurm" "$(dirname "$0")" \
  "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")" \
  "${SLURM_SUBMIT_DIR:-.}/slurm"; do
  [ -f "$UL_D/common.sh" ] && break
done
# shellcheck source=slurm/common.sh
source "$UL_D/common.sh" || { echo "error: slurm/common.sh not found: set ULTRALONG_ROOT" >&2; exit 1; }

# Fail on the login node already, not after waiting for 16 nodes.
[ -x "$UL_BIN" ] || ul_die "no binary at $UL_BIN: build it (cargo build --release) or set ULTRALONG_BIN"
if ! "$UL_BIN" eval --help 2>/dev/null | grep -q niah; then
  ul_die "$UL_BIN has no \`ultralong eval niah\` subcommand: rebuild it"
fi
M=${ULTRALONG_MODEL:-4m}
case $M in
  1m) len=1048576 cp=32 ;;
  2m) len=2097152 cp=64 ;;
  4m) len=4194304 cp=64 ;;
  *) ul_die "ULTRALONG_MODEL=$M: expected 1m, 2m or 4m" ;;
esac
model=${ULTRALONG_EVAL_MODEL:-$UL_RUNS/ultralong-sft-$M/run/final}
[ -f "$model/config.json" ] || ul_die "no model at $model (config.json): set ULTRALONG_EVAL_MODEL"
ul_submit_or_continue "$0" "$@"

cp=${ULTRALONG_CP:-$cp}
ul_begin ultralong-niah
ul_layout 1 "$cp"
ul_log "NIAH of $model up to $len tokens"
"${UL_LAUNCH[@]}" "$UL_BIN" eval niah --model "$model" --max-len "$len" --cp "$cp" \
  --out "$UL_JOB_DIR" "$@"
ul_log "niah: done ($UL_JOB_DIR/niah.json, $UL_JOB_DIR/niah.png)"
