#!/usr/bin/env bash
#SBATCH --job-name=ultralong-debug
#SBATCH --nodes=1
#SBATCH --ntasks=4
#SBATCH --overcommit
#SBATCH --time=00:15:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
# The toy pipeline on the CPU backend, in under a minute on 2 cores: the scripts' plumbing
# (launcher, run directories, signal forwarding, requeue) checked without GPUs.
#   0. a corpus of documents with facts, a byte-level BPE tokenizer, `prepare cpt` datasets
#   1. a tiny Llama (llama3 RoPE, 128-token window) pretrained at 128 tokens on one rank
#   2. the window extended 4x in one step with YaRN (beta_fast 4, beta_slow 1) and continued at
#      512 tokens on 4 ranks through the launcher (tensor parallel 2 x context parallel 2)
#   3. export to a Hugging Face directory; the held-out loss at 512 tokens, before and after
#
#   sbatch slurm/debug.sh                     (from the repository; mkdir -p runs/slurm first)
#   bash slurm/debug.sh                       (no Slurm: the same with a local mpirun -np 4)
#   ULTRALONG_LAUNCHER=mpirun sbatch slurm/debug.sh
# --overcommit: 4 ranks on fewer cores (one compute thread each). Outputs: runs/ultralong-debug/
# <job id>/ (final/ is the exported model; summary.txt the losses).
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

ul_begin ultralong-debug
# One compute thread per rank: the ranks share the cores. And MPI ranks that yield while they
# wait: `mpirun --oversubscribe` sets this by itself, but under `srun` OpenMPI does not know the
# cores are overcommitted and busy-polls (stage 2 took 14x longer on 2 cores without it).
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1}
export OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}
ul_set_launcher
D=$UL_JOB_DIR
B=$UL_BIN
t0=$(date +%s)

if [ ! -e "$D/data-512/.done" ]; then
  ul_log "0. corpus, tokenizer, datasets"
  awk 'BEGIN {
    srand(11);
    split("red blue green amber violet silver golden black white orange", col, " ");
    split("door box key lamp gate ship tower river bridge garden", obj, " ");
    for (d = 0; d < 400; d++) {
      printf "Document %d.\n", d;
      n = 5 + int(rand() * 8);
      for (i = 0; i < n; i++) {
        c[i] = col[1 + int(rand() * 10)]; o[i] = obj[1 + int(rand() * 10)]; v[i] = 1000 + int(rand() * 9000);
        printf "The code of the %s %s is %d. ", c[i], o[i], v[i];
      }
      for (i = 0; i < n; i++) { j = int(rand() * n); printf "Recall: the %s %s has code %d. ", c[j], o[j], v[j]; }
      printf "\n\n";
    }
  }' > "$D/all.txt"
  head -n 1140 "$D/all.txt" > "$D/corpus.txt"
  tail -n +1141 "$D/all.txt" | awk 'NR % 3 == 1 { h = $0 } NR % 3 == 2 { printf "%s%s\n%s", (n++ ? "<s>" : ""), h, $0 }' > "$D/eval.txt"
  "$B" init --config configs/demo/model.json --seed 1 --out "$D/init" --train-tokenizer "$D/corpus.txt"
  awk 'NR % 3 == 1 { h = $0 } NR % 3 == 2 { gsub(/"/, "\\\""); printf "{\"text\": \"%s\\n%s\", \"domain\": \"facts\"}\n", h, $0 }' \
    "$D/corpus.txt" > "$D/corpus.jsonl"
  for L in 128 512; do
    "$B" prepare cpt --input "$D/corpus.jsonl" --tokenizer "$D/init" --seq-len $L --tokens 60000 \
      --short 150 --long 300 --domain-field domain --seed 1 --out "$D/data-$L" > /dev/null 2> "$D/data-$L.report"
  done
  touch "$D/data-512/.done"
fi

cat > "$D/stage0.toml" <<TOML
[model]
path = "$D/init"
[data]
dataset = "$D/data-128"
[train]
steps = 30
seq_len = 128
micro_batch = 2
seed = 1
out_dir = "$D/stage0"
[optim]
lr = 3e-3
warmup_steps = 5
schedule = "cosine"
[checkpoint]
interval = 10
keep = 1
[log]
quiet = true
TOML
# YaRN against the original window of 64 (as the paper takes 8192): factor 512 / 64 = 8.
cat > "$D/stage1.toml" <<TOML
[model]
path = "$D/stage0-hf"
[model.rope_scaling]
rope_type = "yarn"
factor = 8.0
original_max_position_embeddings = 64
beta_fast = 4.0
beta_slow = 1.0
max_position_embeddings = 512
[data]
dataset = "$D/data-512"
[train]
steps = 12
seq_len = 512
micro_batch = 1
seed = 2
recompute = true
out_dir = "$D/stage1"
[optim]
lr = 1e-3
warmup_steps = 2
[checkpoint]
interval = 4
keep = 2
[log]
quiet = true
[parallel]
tp = 2
cp = 2
TOML

loss_at() { # model dir, tokens -> held-out loss
  "$B" forward --model "$1" --text "$D/eval.txt" --max-tokens "$2" | sed -E 's/.*"loss":([0-9.eE+-]+).*/\1/' | xargs printf '%.4f'
}
step_rc() { # a preemptible step's exit status, without tripping set -e
  local rc=0
  ul_run_preemptible "$@" || rc=$?
  ul_after_step "$rc"
}

ul_log "1. pretrain at 128 tokens, one rank"
step_rc "$B" train --config "$D/stage0.toml" --resume > "$D/stage0.jsonl"
"$B" export --checkpoint "$D/stage0" --out "$D/stage0-hf" --dtype f32
before=$(loss_at "$D/stage0-hf" 512)

ul_log "2. YaRN x8 to 512 tokens, $UL_LAUNCHER on 4 ranks (tp 2 x cp 2)"
ul_layout 2 2
step_rc "${UL_LAUNCH[@]}" "$B" train --config "$D/stage1.toml" --resume > "$D/stage1.jsonl"

ul_log "3. export, held-out loss"
"$B" export --checkpoint "$D/stage1" --out "$D/final" --dtype bf16
after=$(loss_at "$D/final" 512)
steps1=$(wc -l < "$D/stage1/metrics.jsonl")
{
  echo "stage 0 (128 tokens, 1 rank): $(wc -l < "$D/stage0/metrics.jsonl") steps"
  echo "stage 1 (YaRN x8, 512 tokens, $UL_LAUNCHER, 4 ranks): $steps1 steps"
  echo "held-out loss at 512 tokens: $before before the extension, $after after"
  echo "exported: $D/final"
  echo "time: $(($(date +%s) - t0)) s"
} | tee "$D/summary.txt"
ul_log "debug: OK"
