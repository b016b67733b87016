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
#   5. one Llama-3.1-8B decoder layer (TP-8 shapes, 32K tokens) beside PyTorch eager + SDPA.
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
  [ -s "$ROWS/$2" ] || extra_row "check: $1 did not run ($(grep -m1 -i 'error' "$LOG.step" | tr -d '"' | cut -c1-200))" 0 pass "not run"
}

say "1. kernel checks and training step"
"$BIN" gpu-check --out "$ROWS" --only checks --name checks.json --date "$DATE" --command "$CMD" 2>&1 | tee "$LOG.step" | tee -a "$LOG"
ran_or_fail "gpu-check --only checks" checks.json

say "2. compute-sanitizer memcheck"
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN" gpu-check --out "$W/san" --only checks --small 2>&1 | tee "$OUT/memcheck.log" | tail -5 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  errs=$(grep -o 'ERROR SUMMARY: [0-9]* error' "$OUT/memcheck.log" | tail -1 | grep -o '[0-9]*' || echo "?")
  if [ "$rc" = 9 ] || [ "$errs" != 0 ]; then v=0; else v=1; fi
  extra_row "check: compute-sanitizer memcheck on the kernel checks (errors: $errs, exit $rc)" "$v" pass "$errs"
else
  extra_row "check: compute-sanitizer memcheck (skipped: not installed)" 0 pass "not run"
fi

say "3. two ranks sharing the GPU (MPI, tp 2) vs one rank"
M="$W/tiny"
"$BIN" init --config configs/tiny.json --seed 3 --out "$M" >>"$LOG" 2>&1
python3 -c 'import json,random; random.seed(1); print(json.dumps([random.randrange(512) for _ in range(128)]))' >"$W/ids.json"
"$BIN" forward --backend cuda --model "$M" --tokens "$W/ids.json" --grads "$W/g1.safetensors" >"$W/l1.json" 2>>"$LOG"
r1=$?
if command -v mpirun >/dev/null; then
  mpirun -np 2 "$BIN" forward --backend cuda --tp 2 --model "$M" --tokens "$W/ids.json" --grads "$W/g2.safetensors" >"$W/l2.json" 2>"$W/mpi.err"
  r2=$?
  tail -5 "$W/mpi.err" >>"$LOG"
  if [ $r1 = 0 ] && [ $r2 = 0 ]; then
    python3 bench/gpu/layer_torch.py --compare "$W/g2.safetensors" "$W/g1.safetensors" "$W/l2.json" "$W/l1.json" --out "$ROWS/mpi.json" | tee -a "$LOG"
  else
    extra_row "check: 2 ranks (MPI fallback) vs 1 rank (failed: exit $r1/$r2, $(grep -m1 -i 'error' "$W/mpi.err" | tr -d '"' | cut -c1-200))" 0 pass "run failed"
  fi
else
  extra_row "check: 2 ranks (MPI fallback) vs 1 rank (skipped: no mpirun, none carried)" 0 pass "not run"
fi

say "4. kernel benchmarks"
"$BIN" gpu-check --out "$ROWS" --only bench --name bench.json 2>&1 | tee "$LOG.step" | tee -a "$LOG"
ran_or_fail "gpu-check --only bench" bench.json

say "5. decoder layer beside PyTorch"
python3 bench/gpu/layer_torch.py --tokens 32768 --out "$W/torch-layer.json" 2>&1 | tee -a "$LOG"
PEER=()
[ -s "$W/torch-layer.json" ] && PEER=(--peer "$W/torch-layer.json")
"$BIN" gpu-check --out "$ROWS" --only layer --layer-tokens 32768 "${PEER[@]}" --name layer.json 2>&1 | tee "$LOG.step" | tee -a "$LOG"
ran_or_fail "gpu-check --only layer" layer.json
cp "$W/torch-layer.json" "$OUT/" 2>/dev/null

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
