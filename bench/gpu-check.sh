#!/usr/bin/env bash
# The CUDA backend's whole GPU check in one device call (docs/DEVELOPERS.md, CUDA):
#   here:   bash bench/gpu/pack-carry.sh            (builds .carry-gpu/: binary + OpenMPI)
#   device: run(command="bash bench/gpu-check.sh", carry=[".carry-gpu"])
# On the GPU machine (nvcc 13, driver 580, PyTorch; no Rust, no internet) it runs, in order:
#   1. every kernel against the CPU reference, fp32 and bf16 storage, outputs poisoned (gpu-check)
#      and one tiny-model training step against the CPU;
#   2. the same checks, small, under compute-sanitizer memcheck;
#   3. 2 ranks sharing the GPU through the MPI (host-staged) path equal to 1 rank (tp 2);
#   4. benchmarks: copy bandwidth, RoPE/RMSNorm/SwiGLU/AdamW bandwidth, GEMM TFLOP/s;
#   5. one Llama-3.1-8B decoder layer (TP-8 shapes, 32K tokens) beside PyTorch eager + SDPA;
#   6. the flash-attention kernels against the CPU f64 reference (GQA, head_dim 64/128, ring and
#      zigzag offsets, tails, fully masked rows, deterministic backward), also under memcheck;
#   7. flash attention TFLOP/s (causal, d 128, h4k1 and h32k8, S 8K/32K/128K) beside torch SDPA's
#      flash and cuDNN backends (bench/gpu/attn_torch.py), rows attn_{fwd,bwd,fwd_bwd}_causal_S*_h*k*;
#   8. one rank of the 4M run (TP 8 x CP 16, 256K local tokens, communication as device copies),
#      broken down by phase beside the phases' predictions from bench/rates.toml [h200];
#   1b (after 1): NCCL with a world of one rank (every buffer collective, the ring's stream).
# STEPS="attention attn-bench" (names: checks nccl memcheck mpi bench layer attention attn-bench
# rank4m; default all) runs a subset; each step has its own time limit (timeout), so one slow
# step costs its limit and the JSON is still written.
# Everything lands in $OUT (what comes back) as gpu-check-DATE.json in the bench/results form,
# plus the logs; the last lines printed are the summary table.
set -uo pipefail
cd "$(dirname "$0")/.."
C="${CARRY_DIR:-.carry-gpu}"
BIN="$PWD/$C/ultralong"
OUT="${OUT:-/tmp/gpu-check-out}"
mkdir -p "$OUT"
W=$(mktemp -d)
DATE=$(date -u +%F)
CMD="bash bench/gpu-check.sh"
LOG="$OUT/gpu-check.log"
: >"$LOG"
say() { echo "== $*" | tee -a "$LOG"; }
export PYTHONUNBUFFERED=1

[ -x "$BIN" ] || { echo "no $BIN: run bench/gpu/pack-carry.sh here and carry $C" | tee -a "$LOG"; exit 2; }
nvidia-smi -L 2>&1 | tee -a "$LOG"
nvcc --version 2>&1 | tail -1 | tee -a "$LOG"

# cudarc opens libcublasLt.so / libnccl.so by unversioned (or CUDA 12) names: link what is here.
L="$W/lib"
mkdir -p "$L"
find_lib() {  # first file matching $1 in the usual places
  local d
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu \
           $(python3 -c 'import nvidia,os;[print(os.path.join(p,q,"lib")) for p in nvidia.__path__ for q in os.listdir(p)]' 2>/dev/null); do
    ls "$d"/$1 2>/dev/null | head -1
  done | head -1
}
for pair in "libcublasLt.so:libcublasLt.so*" "libnccl.so:libnccl.so*"; do
  name=${pair%%:*}; pat=${pair#*:}
  f=$(find_lib "$pat")
  if [ -n "$f" ]; then ln -sf "$f" "$L/$name"; echo "$name -> $f" | tee -a "$LOG"; else echo "$name: not found" | tee -a "$LOG"; fi
done
export LD_LIBRARY_PATH="$L:${LD_LIBRARY_PATH:-}"

# OpenMPI: the system's if any, else the carried one (relocated with OPAL_PREFIX).
O="$PWD/$C/ompi/usr"
if ! ldconfig -p | grep -q 'libmpi.so.40' && [ -d "$O" ]; then
  export LD_LIBRARY_PATH="$O/lib/x86_64-linux-gnu:$LD_LIBRARY_PATH"
  export OPAL_PREFIX="$O" PATH="$O/bin:$PATH"
  export PMIX_INSTALL_PREFIX="$O/lib/x86_64-linux-gnu/pmix2"
  export PMIX_MCA_mca_base_component_path="$O/lib/x86_64-linux-gnu/pmix2/lib/pmix"
  export OMPI_MCA_mca_base_component_path="$O/lib/x86_64-linux-gnu/openmpi/lib/openmpi3"
  echo "using the carried OpenMPI at $O" | tee -a "$LOG"
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_hwloc_base_binding_policy=none OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader OMPI_MCA_mca_base_component_show_load_errors=0
# Step 3 runs 2 ranks on the one GPU: allowed only when asked for (src/parallel/local_rank.rs).
export ULTRALONG_SHARE_GPU=1
if ldd "$BIN" | grep -q 'not found'; then
  ldd "$BIN" | tee -a "$LOG"
  echo "the binary's libraries are missing (above)" | tee -a "$LOG"
  exit 2
fi

ROWS="$W/rows"
mkdir -p "$ROWS"
extra_row() {  # name value unit error  -> one JSON row file
  python3 -c 'import json,sys; n,v,u,e=sys.argv[1:5]; print(json.dumps([{"name":n,"value":float(v),"unit":u,"error":e,"peer":None,"peer_value":None}]))' "$@" >"$ROWS/$(date +%s%N).json"
}

ran_or_fail() {  # step-name json-file: a failing row if the step wrote no rows
  [ -s "$ROWS/$2" ] || extra_row "check: $1 did not run ($( (grep -m1 -i 'error\|panicked\|timed out' "$LOG.step" || echo 'no output') | tr -d '"' | cut -c1-200))" 0 pass "not run"
}
# The device call ends at 600 s whatever runs: steps start only while their typical time fits in
# BUDGET seconds (default 560), so the summary below is always written.
BUDGET=${BUDGET:-560}
want() {  # step-name typical-seconds: whether STEPS selects it and the budget allows it
  case " ${STEPS:-all} " in *" all "*|*" $1 "*) ;; *) return 1 ;; esac
  if [ $((SECONDS + ${2:-0})) -gt "$BUDGET" ]; then
    extra_row "check: step $1 skipped (time budget: ${SECONDS}s used of ${BUDGET}s; run STEPS=$1 in another call)" 0 pass "not run"
    return 1
  fi
  return 0
}
# limit SECONDS command...: run with a time limit; a timeout is logged so ran_or_fail can say so.
limit() {  # (capped at what is left of BUDGET)
  local s=$1; shift
  local left=$((BUDGET - SECONDS))
  [ "$left" -lt "$s" ] && s=$left
  [ "$s" -lt 5 ] && s=5
  timeout --signal=TERM --kill-after=10 "$s" "$@"
  local rc=$?
  [ $rc = 124 ] && echo "error: timed out after ${s}s: $*"
  return $rc
}

if want checks 60; then
say "1. kernel checks and training step"
limit 240 "$BIN" gpu-check --out "$ROWS" --only checks --name checks.json --date "$DATE" --command "$CMD" 2>&1 | tee "$LOG.step" | tee -a "$LOG"
ran_or_fail "gpu-check --only checks" checks.json
fi

if want nccl 20; then
say "1b. NCCL with a world of one rank: every buffer collective on CUDA buffers, the ring exchange on its stream"
limit 60 "$BIN" gpu-check --out "$ROWS" --only nccl --name nccl.json --date "$DATE" --command "$CMD" 2>&1 | tee "$LOG.step" | tee -a "$LOG"
ran_or_fail "gpu-check --only nccl" nccl.json
fi

if want memcheck 150; then
say "2. compute-sanitizer memcheck (kernel checks, then the flash-attention checks)"
if command -v compute-sanitizer >/dev/null; then
  for what in checks attention; do
    limit 240 compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN" gpu-check --out "$W/san-$what" --only $what --small 2>&1 | tee "$OUT/memcheck-$what.log" | tail -5 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    errs=$(grep -o 'ERROR SUMMARY: [0-9]* error' "$OUT/memcheck-$what.log" | tail -1 | grep -o '[0-9]*' || echo "?")
    if [ "$rc" = 9 ] || [ "$errs" != 0 ]; then v=0; else v=1; fi
    extra_row "check: compute-sanitizer memcheck on gpu-check --only $what --small (errors: ${errs:-?}, exit $rc)" "$v" pass "${errs:-?}"
  done
else
  extra_row "check: compute-sanitizer memcheck (skipped: not installed)" 0 pass "not run"
fi
fi

if want mpi 45; then
say "3. two ranks sharing the GPU (MPI) vs one rank: tp 2 (tiny, head_dim 16: simple attention), cp 2 (head_dim 64: the ring drives the flash kernels)"
python3 -c 'import json,random; random.seed(1); print(json.dumps([random.randrange(512) for _ in range(128)]))' >"$W/ids.json"
# A small model with head_dim 64, so attention runs the flash kernels (configs/tiny.json has 16).
python3 -c 'import json; c=json.load(open("configs/tiny.json")); c.update(hidden_size=256, intermediate_size=512, head_dim=64); print(json.dumps(c))' >"$W/flash64.json"
for case in "tiny:configs/tiny.json:--tp 2" "flash64:$W/flash64.json:--cp 2"; do
  name=${case%%:*}; rest=${case#*:}; cfg=${rest%%:*}; par=${rest#*:}
  M="$W/model-$name"
  "$BIN" init --config "$cfg" --seed 3 --out "$M" >>"$LOG" 2>&1
  limit 60 "$BIN" forward --backend cuda --model "$M" --tokens "$W/ids.json" --grads "$W/g1-$name.safetensors" >"$W/l1-$name.json" 2>>"$LOG"
  r1=$?
  if command -v mpirun >/dev/null; then
    # shellcheck disable=SC2086
    limit 90 mpirun -np 2 "$BIN" forward --backend cuda $par --model "$M" --tokens "$W/ids.json" --grads "$W/g2-$name.safetensors" >"$W/l2-$name.json" 2>"$W/mpi-$name.err"
    r2=$?
    tail -5 "$W/mpi-$name.err" >>"$LOG"
    if [ $r1 = 0 ] && [ $r2 = 0 ]; then
      python3 bench/gpu/layer_torch.py --label "$name, $par" --compare "$W/g2-$name.safetensors" "$W/g1-$name.safetensors" "$W/l2-$name.json" "$W/l1-$name.json" --out "$ROWS/mpi-$name.json" | tee -a "$LOG"
    else
      extra_row "check: 2 ranks (MPI fallback, $name, $par) vs 1 rank (failed: exit $r1/$r2, $(grep -m1 -i 'error' "$W/mpi-$name.err" | tr -d '"' | cut -c1-200))" 0 pass "run failed"
    fi
  else
    extra_row "check: 2 ranks (MPI fallback, $name) vs 1 rank (skipped: no mpirun, none carried)" 0 pass "not run"
  fi
done
fi

if want bench 40; then
say "4. kernel benchmarks"
limit 120 "$BIN" gpu-check --out "$ROWS" --only bench --name bench.json 2>&1 | tee "$LOG.step" | tee -a "$LOG"
ran_or_fail "gpu-check --only bench" bench.json
fi

if want layer 50; then
say "5. decoder layer beside PyTorch"
limit 120 python3 bench/gpu/layer_torch.py --tokens 32768 --out "$W/torch-layer.json" 2>&1 | tee -a "$LOG"
PEER=()
[ -s "$W/torch-layer.json" ] && PEER=(--peer "$W/torch-layer.json")
limit 120 "$BIN" gpu-check --out "$ROWS" --only layer --layer-tokens 32768 "${PEER[@]}" --name layer.json 2>&1 | tee "$LOG.step" | tee -a "$LOG"
ran_or_fail "gpu-check --only layer" layer.json
cp "$W/torch-layer.json" "$OUT/" 2>/dev/null
fi

if want attention 45; then
say "6. flash attention vs the CPU f64 reference"
limit 180 "$BIN" gpu-check --out "$ROWS" --only attention --name attention.json 2>&1 | tee "$LOG.step" | tee -a "$LOG"
ran_or_fail "gpu-check --only attention" attention.json
fi

if want attn-bench 150; then
say "7. flash attention TFLOP/s beside torch SDPA (flash, cuDNN)"
limit 200 python3 bench/gpu/attn_torch.py --seqlens "${ATTN_SEQLENS:-8192,32768,131072}" --out "$W/torch-attn.json" 2>&1 | tee -a "$LOG"
APEER=()
if [ -s "$W/torch-attn.json" ]; then
  APEER=(--attn-peer "$W/torch-attn.json")
  cp "$W/torch-attn.json" "$OUT/"
  python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])).get("checks", [])))' "$W/torch-attn.json" >"$ROWS/torch-attn-checks.json"
else
  extra_row "check: bench/gpu/attn_torch.py (SDPA peer) did not run" 0 pass "not run"
fi
limit 200 "$BIN" gpu-check --out "$ROWS" --only attn-bench --attn-seqlens "${ATTN_SEQLENS:-8192,32768,131072}" "${APEER[@]}" --name attn-bench.json 2>&1 | tee "$LOG.step" | tee -a "$LOG"
ran_or_fail "gpu-check --only attn-bench" attn-bench.json
fi

if want rank4m 150; then
say "8. one rank of the 4M run (TP 8 x CP 16, 256K local tokens, local copies for communication; 1 and 2 layers, extrapolated to 32)"
limit "${RANK4M_LIMIT:-$((BUDGET - SECONDS))}" "$BIN" gpu-check --out "$ROWS" --only rank4m --rank4m-layers "${RANK4M_LAYERS:-1,2}" --name rank4m.json 2>&1 | tee "$LOG.step" | tee -a "$LOG"
ran_or_fail "gpu-check --only rank4m" rank4m.json
fi

say "summary"
rm -f "$LOG.step"
python3 - "$ROWS" "$OUT" "$DATE" "$CMD" "$LOG" <<'PY'
import glob, json, os, sys
rows_dir, out, date, cmd, log = sys.argv[1:6]
rows, device = [], ""
for f in sorted(glob.glob(os.path.join(rows_dir, "*.json"))):
    d = json.load(open(f))
    if isinstance(d, dict):
        device = d.get("device") or device
        rows += d.get("rows", [])
    else:
        rows += d
doc = {"device": device, "command": cmd, "date": date, "rows": rows, "raw": open(log).read()[-200000:]}
path = os.path.join(out, f"gpu-check-{date}.json")
json.dump(doc, open(path, "w"), indent=1)
checks = [r for r in rows if r["unit"] == "pass"]
failed = [r for r in checks if r["value"] != 1]
for r in rows:
    if r["unit"] != "pass":
        peer = f'   [{r["peer"]}: {r["peer_value"]:.4g}]' if r.get("peer_value") is not None else ""
        print(f'{r["value"]:>12.4g} {r["unit"]:<8} {r["name"]}{peer}')
for r in failed:
    print("FAILED:", r["name"], r.get("error"))
print(f"{len(checks) - len(failed)}/{len(checks)} checks passed; wrote {path} (copy it to bench/results/)")
PY
