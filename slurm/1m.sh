#!/usr/bin/env bash
# UltraLong stage 1 at 1,048,576 tokens: continued pretraining of Llama-3.1-8B-Instruct, one
# step from 128K with YaRN, as configs/ultralong-1m.toml says (data, steps, LR, RoPE).
#
# Layout: TP 8 x CP 4 (the paper's 1M layout; it gives the GPU count of the 4M run only, 256 H100s,
# and we use the same here: 32 nodes, DP 8).
# World = nodes x 8 GPUs = TP x CP x DP. The node count is the #SBATCH --nodes line below;
# change it there or with `sbatch --nodes=N`: DP must divide the config's global batch
# (train.micro_batch x train.grad_accum sequences).
# TP and CP: ULTRALONG_TP / ULTRALONG_CP. Other settings: slurm/common.sh (launcher, run dirs).
#
#   bash slurm/1m.sh [--set key=value]...   submits itself (mkdir runs/slurm; sbatch)
#   sbatch slurm/1m.sh [--set key=value]... from the repository (runs/slurm must exist)
# Preemption: 10 minutes before the time limit (one step and a checkpoint write: REPRODUCE.md §4)
# Slurm sends USR1 to this shell (--signal below), the
# binary checkpoints and exits 75, the job requeues itself and resumes (the stable run directory).
# Outputs: runs/ultralong-1m/run (checkpoints, metrics.jsonl, final/ = the exported model).
#SBATCH --job-name=ultralong-1m
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
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
config=${ULTRALONG_CONFIG:-configs/ultralong-1m.toml}
ul_need_inputs "$config" "$@"
ul_submit_or_continue "$0" "$@"

ul_stage ultralong-1m "$config" "${ULTRALONG_TP:-8}" "${ULTRALONG_CP:-4}" "$@"
