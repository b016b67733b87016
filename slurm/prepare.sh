#!/usr/bin/env bash
# Stage-1 data preparation as a Slurm job: `ultralong prepare cpt` for each length asked for, with
# --seq-len, --tokens and --out taken from configs/ultralong-<len>.toml (train.seq_len; steps ×
# micro_batch × grad_accum × seq_len tokens; data.dataset), so the dataset is the one the config
# reads. One node, one process, every core tokenizing.
#   ULTRALONG_CORPUS='corpus/*/*.jsonl.zst'   the input files (a glob, quoted; JSON Lines or Parquet)
#   ULTRALONG_PREPARE_ARGS='--domain-from-dir' how documents get their domain, and any other
#                                              `prepare cpt` option (e.g. --domain-field source)
#   ULTRALONG_TOKENIZER=DIR                    default models/Llama-3.1-8B-Instruct
#
#   ULTRALONG_CORPUS='corpus/*/*.jsonl.zst' bash slurm/prepare.sh 1m 2m 4m   submits itself
#
# Time and memory (measured on 2 cores, bench/results/prepare-cpt-2026-11-22.json: 722K tokens/s,
# 575 MB peak RSS, --buffer-mb 16): each length reads and tokenizes the whole corpus, at about 360K
# tokens/s per core if it scales with cores (not measured beyond 2): 32 cores ≈ 11M tokens/s, so a
# corpus of 10B tokens takes ~15 min per length, 45 min for the three. Memory is bounded by the
# tokenization buffer (about 10 × 16 MB per worker in flight: ~5 GB for 32 workers), not by the
# corpus. Disk: a temporary copy of every corpus token (4 bytes each, under <out>.tmp-PID) and ~5 GB
# of output per length (1.0–1.26e9 tokens × 4 bytes).
#SBATCH --job-name=ultralong-prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
set -euo pipefail
for UL_D in "${ULTRALONG_ROOT:-/nonexistent}/slurm" "$(dirname "$0")" \
  "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")" \
  "${SLURM_SUBMIT_DIR:-.}/slurm"; do
  [ -f "$UL_D/common.sh" ] && break
done
# shellcheck source=slurm/common.sh
source "$UL_D/common.sh" || { echo "error: slurm/common.sh not found: set ULTRALONG_ROOT" >&2; exit 1; }

[ $# -gt 0 ] || ul_die "usage: ULTRALONG_CORPUS='corpus/*/*.jsonl.zst' bash slurm/prepare.sh 1m [2m 4m]"
tok=${ULTRALONG_TOKENIZER:-models/Llama-3.1-8B-Instruct}
[ -n "${ULTRALONG_CORPUS:-}" ] || ul_die "set ULTRALONG_CORPUS to the input files (a quoted glob, e.g. 'corpus/*/*.jsonl.zst')"
cd "$UL_ROOT"
# shellcheck disable=SC2206 # the glob is meant to expand
inputs=($ULTRALONG_CORPUS)
[ -e "${inputs[0]}" ] || ul_die "ULTRALONG_CORPUS=$ULTRALONG_CORPUS matches no file (from $UL_ROOT)"
[ -f "$tok/tokenizer.json" ] || ul_die "no tokenizer at $tok/tokenizer.json: download the model (REPRODUCE.md §2) or set ULTRALONG_TOKENIZER"
[ -x "$UL_BIN" ] || ul_die "no binary at $UL_BIN: build it (make build) or set ULTRALONG_BIN"

# prepare_command LEN: the `prepare cpt` arguments of configs/ultralong-LEN.toml.
prepare_command() {
  local c=configs/ultralong-$1.toml
  ul_need_config "$c"
  local seq steps mb ga out
  seq=$(ul_config_value "$c" train seq_len)
  steps=$(ul_config_value "$c" train steps)
  mb=$(ul_config_value "$c" train micro_batch)
  ga=$(ul_config_value "$c" train grad_accum)
  out=$(ul_config_value "$c" data dataset)
  echo "--seq-len $seq --tokens $((steps * ${mb:-1} * ${ga:-1} * seq)) --out $out"
}
for m in "$@"; do
  case $m in 1m | 2m | 4m) prepare_command "$m" >/dev/null ;; *) ul_die "$m: expected 1m, 2m or 4m" ;; esac
done
ul_submit_or_continue "$0" "$@"

ul_begin ultralong-prepare
for m in "$@"; do
  # shellcheck disable=SC2207 # word splitting of the generated options is intended
  args=($(prepare_command "$m"))
  ul_log "prepare cpt $m: ${args[*]} (inputs: ${#inputs[@]} files)"
  # shellcheck disable=SC2086 # the user's options, split on spaces
  "$UL_BIN" prepare cpt --input "${inputs[@]}" --tokenizer "$tok" --short 4096 --long 8192 \
    ${ULTRALONG_PREPARE_ARGS:---domain-from-dir} --workers "${SLURM_CPUS_PER_TASK:-$(nproc)}" "${args[@]}"
done
ul_log "prepare: done"
