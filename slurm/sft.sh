#!/usr/bin/env bash
# UltraLong stage 2: short-context instruction tuning (samples < 8K tokens, Llama-3 chat template,
# loss on the assistant turns) of a stage-1 model, as configs/sft-<model>.toml says
# (the paper: LR 5e-6, global batch 128, 480 / 140 / 150 steps for the 1M / 2M / 4M models; the
# config's model.path is the stage-1 export, runs/ultralong-<model>/run/final).
#   ULTRALONG_MODEL=1m|2m|4m   which stage-1 model (default 1m); the run goes to
#                              runs/ultralong-sft-<model>/run (final/ = the exported model)
# Layout: TP 8 (the paper's stage 2) x CP 1 x DP = nodes x 8 / 8. The node count is the #SBATCH
# --nodes line below (4 nodes = 32 H100s: DP 4); change it there or with `sbatch --nodes=N`: DP
# must divide the global batch. TP and CP: ULTRALONG_TP / ULTRALONG_CP; the rest: slurm/common.sh.
#
#   ULTRALONG_MODEL=4m bash slurm/sft.sh [--set key=value]...   submits itself
# Preemption and requeue as the CPT scripts (slurm/1m.sh), USR1 5 minutes before the limit.
#SBATCH --job-name=ultralong-sft
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=06:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
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
M=${ULTRALONG_MODEL:-1m}
case $M in 1m | 2m | 4m) ;; *) ul_die "ULTRALONG_MODEL=$M: expected 1m, 2m or 4m" ;; esac
config=${ULTRALONG_CONFIG:-configs/sft-$M.toml}
# runs/ moved (ULTRALONG_RUNS, e.g. to a shared file system): the stage-1 model is there too.
if [ -n "${ULTRALONG_RUNS:-}" ]; then
  set -- --set "model.path=\"$UL_RUNS/ultralong-$M/run/final\"" "$@"
fi
ul_need_inputs "$config" "$@"
ul_submit_or_continue "$0" "$@"

export ULTRALONG_RUN_DIR=${ULTRALONG_RUN_DIR:-$UL_RUNS/ultralong-sft-$M/run}
ul_stage ultralong-sft "$config" "${ULTRALONG_TP:-8}" "${ULTRALONG_CP:-1}" "$@"
