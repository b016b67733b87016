# shellcheck shell=bash
# slurm/common.sh: everything the job scripts of slurm/ share. Sourced, never run.
#
# #SBATCH lines cannot be sourced (sbatch reads them from the submitted file only), so each job
# script carries its own; this file holds the rest:
#   - where things are: the repository, the binary, the run directories;
#   - the launcher: `srun --mpi=pmix` (default) or `mpirun` (ULTRALONG_LAUNCHER=mpirun), or a
#     local `mpirun -np N` when not inside a Slurm job (slurm/debug.sh run with bash);
#   - the NCCL/UCX environment of multi-node GPU runs (placeholders: fill in for your fabric);
#   - preemption: the batch shell traps USR1 (sent by `#SBATCH --signal=B:USR1@LEAD` LEAD seconds
#     before the time limit, or by `scancel --signal=USR1 --batch`) and TERM, forwards USR1 to
#     the running step; `ultralong train` then finishes its step, writes a checkpoint and exits
#     75, and the shell requeues the job (`scontrol requeue`), which restarts it with `--resume`.
#
# Settings (environment; all optional):
#   ULTRALONG_ROOT          the repository (default: found from the submitted script's path)
#   ULTRALONG_BIN           the binary (default: $ULTRALONG_ROOT/target/release/ultralong)
#   ULTRALONG_CONFIG        the run config (default: the script's own, e.g. configs/ultralong-1m.toml)
#   ULTRALONG_LAUNCHER      srun (default in a job) | mpirun
#   ULTRALONG_LAUNCHER_ARGS extra arguments for srun / mpirun
#   ULTRALONG_RUNS          where runs go (default: $ULTRALONG_ROOT/runs)
#   ULTRALONG_RUN_DIR       the stable run directory: train.out_dir, with the checkpoints (default:
#                           $ULTRALONG_RUNS/$SLURM_JOB_NAME/run). Requeued jobs keep their id, but a
#                           resubmitted job gets a new one: it resumes from here all the same.
#   ULTRALONG_NP            ranks of a local run outside Slurm (default 4)
#   ULTRALONG_NO_REQUEUE=1  on exit 75 do not requeue (exit 75: e.g. to resubmit by hand)
#   ULTRALONG_SBATCH_ARGS   sbatch options when a script submits itself (`bash slurm/1m.sh`)
#   ULTRALONG_TP, _CP       the layout of the CPT/SFT/NIAH scripts (defaults: the paper's)
#   ULTRALONG_SITE          a file of site settings sourced first (default: slurm/site.sh when it
#                           exists; slurm/site.example.sh shows what goes there: account, partition,
#                           --time, `module load` lines, the fabric's NCCL/UCX variables, runs/);
#                           ULTRALONG_SITE=none reads none
#   ULTRALONG_SKIP_INPUT_CHECK=1  submit without checking the model and dataset (ul_need_inputs)
#
# Per job: $ULTRALONG_RUNS/$SLURM_JOB_NAME/$SLURM_JOB_ID/ (UL_JOB_DIR) gets job.log (one line per
# start of the job: restarts, nodes, layout, binary, git revision) and a link to the Slurm output.

# ---------------------------------------------------------------------------------------------
# Where things are.

UL_SLURM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Site settings first, so that they can set any ULTRALONG_* below (and load modules) on the login
# node and in the job alike.
UL_SITE=${ULTRALONG_SITE:-$UL_SLURM_DIR/site.sh}
if [ "$UL_SITE" = none ]; then
  : # ULTRALONG_SITE=none: no site settings (the tests, scripts/gen-doc-tables.sh)
elif [ -f "$UL_SITE" ]; then
  # shellcheck source=/dev/null
  source "$UL_SITE" || { echo "error: $UL_SITE failed" >&2; exit 1; }
elif [ -n "${ULTRALONG_SITE:-}" ]; then
  echo "error: ULTRALONG_SITE=$ULTRALONG_SITE: no such file" >&2
  exit 1
fi
UL_ROOT=${ULTRALONG_ROOT:-$(cd "$UL_SLURM_DIR/.." && pwd)}
UL_BIN=${ULTRALONG_BIN:-$UL_ROOT/target/release/ultralong}
UL_RUNS=${ULTRALONG_RUNS:-$UL_ROOT/runs}

# Progress lines go to stderr: a step's stdout may be redirected to a file (metrics).
ul_log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
ul_die() { echo "error: $*" >&2; exit 1; }

# Inside a Slurm batch job (as opposed to `bash slurm/x.sh` on a login node or a laptop)?
ul_in_slurm() { [ -n "${SLURM_JOB_ID:-}" ]; }

# ul_begin NAME: cd to the repository, set the run directories and the launcher, print and record
# the job's facts. NAME is the job name used outside Slurm (inside, $SLURM_JOB_NAME wins).
ul_begin() {
  local name=$1
  cd "$UL_ROOT" || ul_die "cannot cd to $UL_ROOT"
  UL_JOB_NAME=${SLURM_JOB_NAME:-$name}
  UL_JOB_ID=${SLURM_JOB_ID:-local-$(date +%Y%m%d-%H%M%S)}
  UL_RESTART=${SLURM_RESTART_COUNT:-0}
  UL_JOB_DIR=$UL_RUNS/$UL_JOB_NAME/$UL_JOB_ID
  UL_RUN_DIR=${ULTRALONG_RUN_DIR:-$UL_RUNS/$UL_JOB_NAME/run}
  mkdir -p "$UL_JOB_DIR"
  [ -x "$UL_BIN" ] || ul_die "no binary at $UL_BIN: build it (cargo build --release) or set ULTRALONG_BIN"
  ul_env_defaults
  ul_set_launcher
  local out=
  if ul_in_slurm; then
    out=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p')
    [ -n "$out" ] && [ ! -e "$UL_JOB_DIR/slurm.out" ] && ln -s "$out" "$UL_JOB_DIR/slurm.out" 2>/dev/null
  fi
  local rev
  rev=$(git -C "$UL_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
  {
    echo "== $(date -Is) job $UL_JOB_NAME $UL_JOB_ID restart $UL_RESTART"
    echo "   nodes ${SLURM_JOB_NUM_NODES:-1} (${SLURM_JOB_NODELIST:-$(hostname)}), tasks ${SLURM_NTASKS:-${ULTRALONG_NP:-4}}"
    echo "   launcher: ${UL_LAUNCH[*]}"
    echo "   binary $UL_BIN (git $rev), run dir $UL_RUN_DIR, job dir $UL_JOB_DIR"
  } | tee -a "$UL_JOB_DIR/job.log"
}

# ---------------------------------------------------------------------------------------------
# The launcher: UL_LAUNCH, an array to put before the binary and its arguments.

# ul_set_launcher [N]: the launcher for the whole allocation, or for N tasks of it (slurm/smoke-gpu.sh
# runs several layouts, and a 1-rank reference, inside one allocation).
ul_set_launcher() {
  local n=${1:-}
  local kind=${ULTRALONG_LAUNCHER:-}
  local extra=()
  # shellcheck disable=SC2206 # word splitting of the user's extra arguments is intended
  [ -n "${ULTRALONG_LAUNCHER_ARGS:-}" ] && extra=($ULTRALONG_LAUNCHER_ARGS)
  if [ -z "$kind" ]; then
    if ul_in_slurm; then kind=srun; else kind=local; fi
  fi
  case $kind in
    srun)
      # --mpi=pmix: OpenMPI gets its world from Slurm's PMIx server (--mpi=pmi2 for MPICH).
      # --kill-on-bad-exit: a rank that dies ends the step (the binary's MPI_Abort does too).
      # No --ntasks: the step takes the allocation (nodes × ntasks-per-node).
      UL_LAUNCH=(srun --mpi=pmix --kill-on-bad-exit=1 "${extra[@]}")
      if [ -n "$n" ]; then
        # N tasks packed on as few nodes as hold them (ntasks-per-node of the job, default 8).
        local per=${SLURM_NTASKS_PER_NODE:-8}
        UL_LAUNCH+=(--ntasks="$n" --nodes=$(((n + per - 1) / per)))
      fi
      ;;
    mpirun)
      # Inside an allocation OpenMPI reads the nodes and slots from Slurm (and starts its daemons
      # with srun); -x passes the NCCL/UCX/CUDA settings to remote ranks.
      local v pass=()
      for v in $(compgen -e | grep -E '^(NCCL|UCX|CUDA|RAYON|ULTRALONG)_|^LD_LIBRARY_PATH$' || true); do pass+=(-x "$v"); done
      UL_LAUNCH=(mpirun -np "${n:-${SLURM_NTASKS:-${ULTRALONG_NP:-4}}}" --bind-to none "${pass[@]}" "${extra[@]}")
      ;;
    local)
      # No Slurm: this machine only, as many ranks as asked, whatever its cores.
      UL_LAUNCH=(mpirun -np "${n:-${ULTRALONG_NP:-4}}" --oversubscribe --bind-to none "${extra[@]}")
      ;;
    *) ul_die "ULTRALONG_LAUNCHER=$kind: expected srun or mpirun" ;;
  esac
  UL_LAUNCHER=$kind
}

# ---------------------------------------------------------------------------------------------
# Environment of the ranks.

ul_env_defaults() {
  # OpenMPI as root (containers, test clusters), and in containers without CMA/hwloc binding.
  if [ "$(id -u)" = 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi
  export OMPI_MCA_hwloc_base_binding_policy=${OMPI_MCA_hwloc_base_binding_policy:-none}
  export OMPI_MCA_btl_vader_single_copy_mechanism=${OMPI_MCA_btl_vader_single_copy_mechanism:-none}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # Multi-node H100 fabric: fill in for your cluster (values are site-specific; these are the
  # knobs that matter for TP inside a node over NVLink and CP/DP rings across nodes over IB).
  # export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7   # the IB HCAs
  # export NCCL_IB_GID_INDEX=3            # RoCE only
  # export NCCL_IB_TIMEOUT=22             # long ring exchanges at 4M tokens
  # export NCCL_IB_QPS_PER_CONNECTION=4
  # export NCCL_SOCKET_IFNAME=ib0         # bootstrap interface (e.g. ib0, eth0, bond0)
  # export NCCL_NVLS_ENABLE=1             # NVLink SHARP on H100 NVSwitch systems
  # export NCCL_CROSS_NIC=0
  # export UCX_TLS=rc,sm,self             # OpenMPI over UCX (the MPI side: small control traffic)
  # export UCX_NET_DEVICES=mlx5_0:1
  # export OMPI_MCA_pml=ucx
  # export CUDA_DEVICE_MAX_CONNECTIONS=1  # ordering of compute and communication streams
  :
}

# ---------------------------------------------------------------------------------------------
# Preemption: run a command in the background, forward signals to it, wait for it.

# UL_CHILD: the pid of the running step (srun or mpirun). srun forwards USR1 to every task;
# mpirun does the same. TERM is forwarded as USR1 too: srun answers its own TERM by SIGKILLing
# the tasks (no checkpoint), and the binary treats USR1 and TERM alike.
UL_CHILD=
UL_SIGNALLED=

ul_forward_signal() {
  UL_SIGNALLED=$1
  if [ -n "$UL_CHILD" ] && kill -0 "$UL_CHILD" 2>/dev/null; then
    ul_log "batch shell got SIG$1: forwarding USR1 to the step (pid $UL_CHILD): checkpoint and exit"
    kill -USR1 "$UL_CHILD" 2>/dev/null || true
  else
    ul_log "batch shell got SIG$1 with no step running"
  fi
}

# ul_run_preemptible CMD...: run CMD (which must be one process: srun, mpirun or the binary, not
# a shell function) in the background with USR1/TERM forwarding; returns its exit status.
ul_run_preemptible() {
  UL_SIGNALLED=
  # The step's stderr also goes to a file of the job directory (srun's own messages are checked
  # below): restart-R.step-N.stderr, N counting the steps of this run of the job.
  UL_STEP_N=$((${UL_STEP_N:-0} + 1))
  local err=${UL_JOB_DIR:-.}/restart-${UL_RESTART:-0}.step-$UL_STEP_N.stderr
  "$@" 2> >(tee "$err" >&2) &
  UL_CHILD=$!
  trap 'ul_forward_signal USR1' USR1
  trap 'ul_forward_signal TERM' TERM
  local rc
  while :; do
    rc=0
    wait "$UL_CHILD" || rc=$?
    # A trapped signal ends `wait` early with 128+n while the step still runs: wait again.
    if [ "$rc" -gt 128 ] && kill -0 "$UL_CHILD" 2>/dev/null; then continue; fi
    break
  done
  trap - USR1 TERM
  UL_CHILD=
  # srun (Slurm 22.05) exits 0 when the tasks fail to launch (e.g. its PMIx server cannot bind
  # its socket): "task N launch failed". That must not pass for a finished run.
  if [ "$rc" = 0 ] && grep -q -e '^srun: error: .*launch failed' "$err" 2>/dev/null; then
    ul_log "srun reported a failed launch (see above) but exited 0: the step failed"
    rc=1
  fi
  ul_log "step exited with status $rc"
  return "$rc"
}

# The binary's exit status for "preempted: checkpoint written, requeue me".
UL_EXIT_PREEMPTED=75

# ul_after_step RC: what the job does once a preemptible step ended with RC: 0 goes on, 75
# requeues the job (inside Slurm) and ends the script with 0, anything else ends it with RC.
ul_after_step() {
  local rc=$1
  case $rc in
    0) return 0 ;;
    "$UL_EXIT_PREEMPTED")
      ul_log "preempted: checkpoint written in $UL_RUN_DIR (exit $rc)"
      echo "   $(date -Is) preempted (restart $UL_RESTART), exit $rc" >> "$UL_JOB_DIR/job.log"
      if ul_in_slurm && [ -z "${ULTRALONG_NO_REQUEUE:-}" ]; then
        ul_log "requeueing job $SLURM_JOB_ID"
        # The requeue ends this job's processes (this shell included): nothing after it may
        # matter. --open-mode=append keeps this output in the requeued job's log.
        if scontrol requeue "$SLURM_JOB_ID"; then
          sleep 30 & wait $! || true
          exit 0
        fi
        ul_log "scontrol requeue failed (is the job --requeue-able?): exit $rc; resubmit to resume"
      fi
      exit "$rc"
      ;;
    *)
      if [ -n "$UL_SIGNALLED" ]; then
        ul_log "the step ended with $rc after SIG$UL_SIGNALLED: no checkpoint promised (is preemption support in this binary?)"
      fi
      ul_die "step failed with exit $rc"
      ;;
  esac
}

# ul_train CONFIG [ARGS...]: `ultralong train --resume` on every rank through the launcher, into
# the stable run directory, requeueing on preemption. ARGS go to `ultralong train`.
ul_train() {
  local config=$1
  shift
  [ -f "$config" ] || ul_die "run config $config not found (in $PWD)"
  local rc=0
  ul_log "train $config -> $UL_RUN_DIR (${UL_LAUNCHER}; restart $UL_RESTART)"
  ul_run_preemptible "${UL_LAUNCH[@]}" "$UL_BIN" train --config "$config" --resume \
    --set "train.out_dir=\"$UL_RUN_DIR\"" "$@" || rc=$?
  ul_after_step "$rc"
}

# ---------------------------------------------------------------------------------------------
# Layout: world = nodes × 8 GPUs = tp × cp × dp.

# ul_layout TP CP: check that the allocation divides into TP × CP × DP, set UL_DP, print it.
ul_layout() {
  local tp=$1 cp=$2 world=${SLURM_NTASKS:-${ULTRALONG_NP:-4}}
  if [ $((world % (tp * cp))) -ne 0 ]; then
    ul_die "$world ranks do not divide into tp $tp × cp $cp (need a multiple of $((tp * cp)); nodes × 8 GPUs)"
  fi
  UL_DP=$((world / (tp * cp)))
  ul_log "layout: tp $tp × cp $cp × dp $UL_DP = $world ranks"
  echo "   layout: tp $tp × cp $cp × dp $UL_DP = $world ranks" >> "$UL_JOB_DIR/job.log"
}

# ul_need_config CONFIG: fail early (before submitting, before waiting for nodes) if the run
# config is missing; relative paths are from the repository, where the jobs run.
ul_need_config() {
  (cd "$UL_ROOT" && [ -f "$1" ]) || ul_die "run config $1 not found (paths are relative to $UL_ROOT)"
}

# ul_config_value CONFIG SECTION KEY: the string value of KEY in [SECTION] of a run config (TOML
# as the shipped configs write it: `key = "value"  # comment`), or nothing. An argument
# `--set SECTION.KEY=VALUE` among the rest wins, as it does for `ultralong train`.
ul_config_value() {
  local config=$1 section=$2 key=$3
  shift 3
  local a v=
  for a in "$@"; do
    case $a in "$section.$key="*) v=${a#*=} ;; esac
  done
  if [ -z "$v" ]; then
    v=$(awk -v sec="[$section]" -v key="$key" '
      /^[ \t]*\[/ { cur = $1; next }
      cur == sec && $1 == key && $2 == "=" { sub(/^[^=]*=[ \t]*/, ""); sub(/[ \t]*#.*$/, ""); print; exit }' "$UL_ROOT/$config" 2>/dev/null)
  fi
  v=${v#\"}
  v=${v%\"}
  echo "$v"
}

# ul_need_inputs CONFIG [TRAIN ARGS...]: fail before submitting (and before waiting for nodes)
# unless the run config, its model directory (config.json, *.safetensors, tokenizer.json) and its
# prepared dataset (tokens.bin/.idx of `ultralong prepare`) exist; paths relative to the
# repository. ULTRALONG_SKIP_INPUT_CHECK=1 skips the model and dataset (e.g. when the login node
# does not mount the file system the jobs read).
ul_need_inputs() {
  local config=$1
  shift
  ul_need_config "$config"
  [ -n "${ULTRALONG_SKIP_INPUT_CHECK:-}" ] && return 0
  local model data p
  model=$(ul_config_value "$config" model path "$@")
  data=$(ul_config_value "$config" data dataset "$@")
  p=$model
  case $p in /*) ;; *) p=$UL_ROOT/$p ;; esac
  [ -n "$model" ] || ul_die "$config: no model.path"
  [ -f "$p/config.json" ] && [ -f "$p/tokenizer.json" ] && compgen -G "$p/*.safetensors" >/dev/null ||
    ul_die "model.path of $config: $p is not a Hugging Face model directory (config.json, *.safetensors, tokenizer.json): download the weights (REPRODUCE.md §2) or finish the stage that exports it; ULTRALONG_SKIP_INPUT_CHECK=1 skips this check"
  if [ -n "$data" ]; then
    p=$data
    case $p in /*) ;; *) p=$UL_ROOT/$p ;; esac
    [ -f "$p/tokens.idx" ] && [ -f "$p/tokens.bin" ] ||
      ul_die "data.dataset of $config: $p has no tokens.bin/tokens.idx: prepare it first (REPRODUCE.md §2, slurm/prepare.sh); ULTRALONG_SKIP_INPUT_CHECK=1 skips this check"
  fi
}

# ul_cuda_libs: cudarc 0.19 (built for CUDA 12.9) opens libcublasLt and libnccl by the names
# libX.so, libX.so.12, .so.11, .so.10, .so.9, .so.1, never CUDA 13's libcublasLt.so.13 nor NCCL's
# libnccl.so.2, and the runtime packages install only those versioned names (the unversioned link
# comes with the -dev packages). When the unversioned name is missing from the library path, link
# the versioned file under it in $UL_JOB_DIR/lib (on the shared file system, so every node sees
# it) and put that directory first on LD_LIBRARY_PATH (srun passes the environment on; the mpirun
# launcher passes LD_LIBRARY_PATH with -x).
ul_cuda_libs() {
  local dir=${UL_JOB_DIR:-$UL_RUNS}/lib name pat f d
  local search=()
  IFS=: read -r -a search <<<"${LD_LIBRARY_PATH:-}"
  search+=("${CUDA_HOME:-/usr/local/cuda}/lib64" /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib
    /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib)
  for pat in "libcublasLt.so:libcublasLt.so.13 libcublasLt.so.12" "libnccl.so:libnccl.so.2"; do
    name=${pat%%:*}
    f=
    for d in "${search[@]}"; do
      [ -n "$d" ] && [ -e "$d/$name" ] && { f=found; break; }
    done
    [ -n "$f" ] && continue
    ldconfig -p 2>/dev/null | grep -q " $name " && continue
    for n in ${pat#*:}; do
      for d in "${search[@]}"; do
        [ -n "$d" ] && [ -e "$d/$n" ] && { f=$d/$n; break 2; }
      done
      f=$(ldconfig -p 2>/dev/null | awk -v n="$n" '$1 == n { print $NF; exit }')
      [ -n "$f" ] && break
    done
    if [ -z "$f" ]; then
      ul_log "warning: neither $name nor ${pat#*:} found (LD_LIBRARY_PATH, CUDA_HOME, ldconfig): load the CUDA/NCCL modules (slurm/site.sh)"
      continue
    fi
    mkdir -p "$dir"
    ln -sfn "$f" "$dir/$name"
    ul_log "cudarc opens $name: linked to $f in $dir"
  done
  if [ -d "$dir" ]; then
    case ":${LD_LIBRARY_PATH:-}:" in *":$dir:"*) ;; *) export LD_LIBRARY_PATH=$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ;; esac
  fi
}

# ul_submit_or_continue SCRIPT ARGS...: outside Slurm, submit SCRIPT with sbatch (creating the
# directory of its #SBATCH --output first) and exit; inside a job, return.
ul_submit_or_continue() {
  local script
  script=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
  shift
  ul_in_slurm && return 0
  command -v sbatch >/dev/null || ul_die "not in a Slurm job and no sbatch here: run this on a Slurm login node"
  cd "$UL_ROOT" || exit 1
  mkdir -p runs/slurm
  # shellcheck disable=SC2086 # ULTRALONG_SBATCH_ARGS: sbatch options, split on spaces
  exec sbatch ${ULTRALONG_SBATCH_ARGS:-} "$script" "$@"
}

# ---------------------------------------------------------------------------------------------
# The stages.

# ul_export: the finished run's newest checkpoint as a Hugging Face directory, $UL_RUN_DIR/final,
# in f32 (the paper's released weights are F32; SFT starts from it). One process, on this node.
ul_export() {
  ul_log "export $UL_RUN_DIR -> $UL_RUN_DIR/final (f32)"
  "$UL_BIN" export --checkpoint "$UL_RUN_DIR" --out "$UL_RUN_DIR/final" --dtype f32
}

# ul_stage NAME CONFIG TP CP [TRAIN ARGS...]: one training stage (CPT or SFT) on the allocation:
# layout check, `train --resume` through the launcher (requeue on preemption), export.
ul_stage() {
  local name=$1 config=$2 tp=$3 cp=$4
  shift 4
  ul_begin "$name"
  ul_layout "$tp" "$cp"
  if [ "$(ul_config_value "$config" train backend "$@")" = cuda ]; then
    ul_cuda_libs
    ul_set_launcher # again: mpirun's -x list now includes LD_LIBRARY_PATH
  fi
  ul_train "$config" --tp "$tp" --cp "$cp" "$@"
  ul_export
  ul_log "$name: done"
}
