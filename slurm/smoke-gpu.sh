#!/usr/bin/env bash
# The first job to run on a new cluster, before any paper run: does training on this cluster's GPUs,
# MPI launcher and fabric give the same losses in every parallel layout as on one GPU?
#
# A small random Llama (2 layers, head_dim 128 as Llama-3.1-8B, heads = KV heads = the largest TP,
# default RoPE) trains 20 steps on random tokens, first on 1 rank (the reference), then in each
# tp × cp × dp layout of the allocation: TP over a node's GPUs, CP and DP within and across nodes.
# Each layout's loss at every step is compared with the reference's (relative difference, tolerance
# 1e-2 on the GPU: bf16 GEMM operands round differently when a layout splits a product; 1e-3 on the
# CPU), and one line per layout says PASS or FAIL with its median step time (steps 2..20).
#
#   bash slurm/smoke-gpu.sh                        submits itself: 1 node × 8 GPUs
#   ULTRALONG_SBATCH_ARGS=--nodes=2 bash slurm/smoke-gpu.sh     2 nodes × 8 GPUs
#   bash slurm/smoke-gpu.sh --local [--np N] [--backend cpu|cuda]
#                                                  no Slurm: this machine, `mpirun -np N` (default 2)
# Options: --steps N (20), --tol X, --backend cuda|cpu (cuda), --layouts "TPxCP ..." (default: the
# list below for the world size). Output: runs/smoke-gpu/<job id>/ (summary.txt, one directory per
# layout with its metrics.jsonl and stderr). Exit status 0 when every layout passes.
# What it needs from the cluster (slurm/README.md "The GPU smoke test"): the binary built with the
# `cuda` feature, a CUDA driver >= 580, OpenMPI with PMIx under srun (or ULTRALONG_LAUNCHER=mpirun);
# NCCL is not used yet (collectives are staged through host memory over MPI), so MPI needs no CUDA
# awareness.
#SBATCH --job-name=ultralong-smoke-gpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=00:30:00
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

backend=cuda steps=20 tol= local=0 np=2 layouts=
args=("$@")
while [ $# -gt 0 ]; do
  case $1 in
    --local) local=1 ;;
    --np) np=$2; shift ;;
    --backend) backend=$2; shift ;;
    --steps) steps=$2; shift ;;
    --tol) tol=$2; shift ;;
    --layouts) layouts=$2; shift ;;
    *) ul_die "smoke-gpu.sh: unknown argument $1 (see the header of slurm/smoke-gpu.sh)" ;;
  esac
  shift
done
case $backend in cuda | cpu) ;; *) ul_die "--backend $backend: expected cuda or cpu" ;; esac
[ -n "$tol" ] || { [ "$backend" = cuda ] && tol=1e-2 || tol=1e-3; }
if [ "$local" = 0 ]; then
  ul_submit_or_continue "$0" "${args[@]}"
else
  export ULTRALONG_NP=$np
  unset SLURM_JOB_ID
fi

# World and GPUs per node.
if ul_in_slurm; then
  world=${SLURM_NTASKS:?}
  per_node=${SLURM_NTASKS_PER_NODE:-$world}
else
  world=$np
  per_node=$np
fi

# smoke_layouts WORLD PER_NODE: the layouts tried, "TPxCP" (dp = world / (tp·cp)), one per line:
# all TP inside a node, all CP, all DP, TP 2 × CP 2, and TP over a node with CP across nodes.
smoke_layouts() {
  local w=$1 g=$2 t
  t=$((g < 8 ? g : 8))
  {
    echo "${t}x1"
    echo "1x$w"
    echo "1x1"
    [ "$w" -ge 4 ] && echo "2x2"
    [ "$w" -gt "$g" ] && echo "${t}x$((w / t))"
    if [ "$w" -ge 8 ]; then echo "2x$((w / 4))"; fi
  } | awk '!seen[$0]++'
}
if [ -z "$layouts" ]; then layouts=$(smoke_layouts "$world" "$per_node"); fi
maxtp=1
for l in $layouts; do
  tp=${l%x*} cp=${l#*x}
  [ $((world % (tp * cp))) -eq 0 ] || ul_die "layout $l does not divide the $world ranks"
  if [ "$tp" -gt "$maxtp" ]; then maxtp=$tp; fi
done

ul_begin ultralong-smoke-gpu
D=$UL_JOB_DIR
if [ "$backend" = cuda ]; then
  ul_cuda_libs
else
  export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1} # ranks share the cores
fi

# The model: head_dim 128; heads = KV heads = the largest TP (at least 2); sizes divisible by every
# tp. The data: random ids, enough for every step. seq_len: a multiple of 2·cp·tp for every layout.
heads=$((maxtp < 2 ? 2 : maxtp))
hidden=$((heads * 128))
seq=$((2 * world * 64))
if [ "$seq" -lt 512 ]; then seq=512; fi
H=$heads HID=$hidden FFN=$((2 * hidden)) SEQ=$seq awk 'BEGIN {
  printf "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", \"vocab_size\": 1024,\n"
  printf " \"hidden_size\": %d, \"intermediate_size\": %d, \"num_hidden_layers\": 2,\n", ENVIRON["HID"], ENVIRON["FFN"]
  printf " \"num_attention_heads\": %d, \"num_key_value_heads\": %d, \"head_dim\": 128,\n", ENVIRON["H"], ENVIRON["H"]
  printf " \"rms_norm_eps\": 1e-05, \"rope_theta\": 10000.0, \"max_position_embeddings\": %d,\n", ENVIRON["SEQ"]
  printf " \"tie_word_embeddings\": false, \"initializer_range\": 0.02, \"bos_token_id\": 0,\n"
  printf " \"eos_token_id\": 1, \"torch_dtype\": \"float32\"}\n" }' >"$D/model.json"
"$UL_BIN" init --config "$D/model.json" --seed 1 --out "$D/init" >/dev/null
batch=$world # dp = world divides it; every layout sees the same global batch
awk -v n=$(((steps + 1) * batch * seq + 1)) 'BEGIN { srand(7); printf "["; for (i = 0; i < n; i++) printf "%s%d", (i ? "," : ""), int(rand() * 1024); print "]" }' >"$D/tokens.json"

# run_layout NAME RANKS TP CP: train the smoke config on RANKS ranks; its losses in NAME/metrics.jsonl.
run_layout() {
  local name=$1 n=$2 tp=$3 cp=$4
  mkdir -p "$D/$name"
  cat >"$D/$name/run.toml" <<TOML
[model]
path = "$D/init"
[data]
tokens = "$D/tokens.json"
[train]
steps = $steps
seq_len = $seq
micro_batch = 1
grad_accum = $batch
seed = 1
recompute = true
ce_chunk = 256
backend = "$backend"
out_dir = "$D/$name"
[optim]
lr = 1e-3
warmup_steps = 0
[checkpoint]
interval = 0
keep = 1
[log]
quiet = true
plots = false
TOML
  ul_set_launcher "$n"
  local rc=0
  "${UL_LAUNCH[@]}" "$UL_BIN" train --config "$D/$name/run.toml" --tp "$tp" --cp "$cp" \
    >"$D/$name/stdout" 2>"$D/$name/stderr" || rc=$?
  return $rc
}

# compare REF DIR: "max_rel_diff median_step_ms steps" of DIR's losses against REF's.
compare() {
  awk '
    function num(line, key,   s) { s = line; if (!sub(".*\"" key "\":", "", s)) return ""; sub(/[,}].*/, "", s); return s + 0 }
    FNR == 1 { f++ }
    f == 1 { ref[num($0, "step")] = num($0, "loss"); next }
    { st = num($0, "step"); l = num($0, "loss"); n++
      d = (ref[st] == 0) ? ((l == 0) ? 0 : 1) : (l - ref[st]) / ref[st]; if (d < 0) d = -d
      if (!(st in ref) || l != l) d = 1e9
      if (d > m) m = d
      if (st > 1) t[++k] = num($0, "step_ms") }
    END { for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (t[j] < t[i]) { x = t[i]; t[i] = t[j]; t[j] = x }
          med = (k == 0) ? 0 : (k % 2) ? t[(k + 1) / 2] : (t[k / 2] + t[k / 2 + 1]) / 2
          printf "%.3e %.1f %d\n", m, med, n }' "$1/metrics.jsonl" "$2/metrics.jsonl"
}

ul_log "smoke test: $world ranks ($per_node per node), backend $backend, $steps steps, seq_len $seq, $heads heads × 128, layouts: $(echo $layouts)"
fail=0
run_layout ref 1 1 1 || ul_die "the 1-rank reference run failed: $D/ref/stderr"
[ "$(wc -l <"$D/ref/metrics.jsonl")" -eq "$steps" ] || ul_die "the reference run logged $(wc -l <"$D/ref/metrics.jsonl") of $steps steps"
read -r _ ref_ms _ <<<"$(compare "$D/ref" "$D/ref")"
{
  printf "%-22s %6s %12s %14s  %s\n" layout ranks "max rel diff" "step ms (med)" result
  printf "%-22s %6s %12s %14s  %s\n" "reference tp1 cp1 dp1" 1 - "$ref_ms" "(1 rank)"
} | tee "$D/summary.txt"
for l in $layouts; do
  tp=${l%x*} cp=${l#*x}
  dp=$((world / (tp * cp)))
  name=tp$tp-cp$cp-dp$dp
  res=FAIL diff=- ms=-
  if run_layout "$name" "$world" "$tp" "$cp"; then
    read -r diff ms n <<<"$(compare "$D/ref" "$D/$name")"
    if [ "$n" -eq "$steps" ] && awk -v d="$diff" -v t="$tol" 'BEGIN { exit !(d <= t) }'; then res=PASS; fi
    [ "$n" -eq "$steps" ] || res="FAIL ($n of $steps steps logged)"
  else
    res="FAIL (exit status; $D/$name/stderr)"
  fi
  [ "$res" = PASS ] || fail=1
  printf "%-22s %6s %12s %14s  %s\n" "tp$tp cp$cp dp$dp" "$world" "$diff" "$ms" "$res" | tee -a "$D/summary.txt"
done
ul_log "tolerance $tol relative; summary in $D/summary.txt"
exit $fail
