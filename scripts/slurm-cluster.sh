#!/usr/bin/env bash
# A private one-node Slurm cluster for tests: its own munged (own key and socket), slurmctld and
# slurmd, on ports other than Slurm's defaults, every file under one directory. Nothing system-wide
# is touched (no systemd, no /etc/slurm, no /run/munge), so it can run beside a real Slurm or
# beside another test's private cluster.
#
#   scripts/slurm-cluster.sh up DIR      start a cluster in DIR (created if missing); prints
#                                        `export SLURM_CONF=DIR/slurm.conf` (also in DIR/env)
#   scripts/slurm-cluster.sh down DIR    kill its jobs' processes, stop its daemons; safe to call
#                                        twice or after a failed up
#   scripts/slurm-cluster.sh status DIR  sinfo + squeue of that cluster
#
# Every Slurm command must then see SLURM_CONF=DIR/slurm.conf (source DIR/env). Settings, from the
# environment of `up`:
#   SLURM_TEST_CPUS    CPUs of the node (default: nproc)
#   SLURM_TEST_PORTS   "CTLD_PORT DAEMON_PORT" (default: two free ports in 20000-59999)
# Needs slurm-wlm and munge (apt-get install slurm-wlm munge; `make deps` does it). As root the
# daemons run as root and munged as the `munge` user; otherwise all run as the current user
# (untested: slurmd normally wants root).
set -euo pipefail

usage() { sed -n '2,20p' "$0" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
D=$2

for b in munged slurmctld slurmd sinfo scontrol; do
  command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] || {
    echo "error: $b not found: install slurm-wlm and munge (apt-get install slurm-wlm munge, or make deps)" >&2
    exit 3
  }
done
PATH=$PATH:/usr/sbin:/sbin

# The marker that every daemon of this cluster (and slurmstepd, which inherits slurmd's
# environment) carries, so `down` finds exactly this cluster's processes.
marker() { echo "ULTRALONG_SLURM_CLUSTER=$D"; }

port_free() { # port -> 0 if nothing listens on it
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

pick_port() {
  # Below the kernel's ephemeral range: a port there can be taken by any outgoing connection
  # between this check and slurmctld's bind ("Address already in use", seen in CI).
  local p lo=20000 hi=59999 eph
  if read -r eph _ < /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null && [ "$eph" -gt 21000 ]; then
    hi=$((eph - 1))
  fi
  for _ in $(seq 200); do
    p=$((lo + RANDOM % (hi - lo + 1)))
    if port_free "$p"; then echo "$p"; return; fi
  done
  echo "error: no free port found" >&2
  exit 1
}

pid_of() { # pid file -> pid, if that process is alive
  local f=$1 p
  [ -s "$f" ] || return 1
  p=$(cat "$f")
  kill -0 "$p" 2>/dev/null && echo "$p"
}

# Processes whose environment carries this cluster's marker (our daemons and their slurmstepd).
marked_pids() {
  grep -lzxF "$(marker)" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | grep -vx "$$" || true
}

descendants() { # pid -> its descendants, deepest last
  local c
  # shellcheck disable=SC2013 # the file holds pids separated by spaces
  for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
    echo "$c"
    descendants "$c"
  done
}

up() {
  mkdir -p "$D"
  D=$(cd "$D" && pwd)
  if [ -e "$D/slurm.conf" ] && pid_of "$D/slurmctld.pid" >/dev/null; then
    echo "error: a cluster is already running in $D (scripts/slurm-cluster.sh down $D)" >&2
    exit 1
  fi
  mkdir -p "$D"/{munge,spool/ctld,spool/d,log,tmp}
  # munged runs as `munge` when we are root: it must reach its socket through $D.
  chmod 755 "$D"
  chmod 1777 "$D/tmp"
  local me cpus mem ctld_port d_port first_job
  me=$(id -un)
  cpus=${SLURM_TEST_CPUS:-$(nproc)}
  mem=$(awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.8 }' /proc/meminfo)
  if [ -n "${SLURM_TEST_PORTS:-}" ]; then
    read -r ctld_port d_port <<< "$SLURM_TEST_PORTS"
  else
    ctld_port=$(pick_port)
    d_port=$(pick_port)
    while [ "$d_port" = "$ctld_port" ]; do d_port=$(pick_port); done
  fi
  # Job ids from a random start: two private clusters side by side must not both have job 1
  # (PMIx and slurmstepd name files after the job id).
  first_job=$((1000 + RANDOM * 16 + RANDOM % 16))

  # munge: a key of our own, a socket of our own.
  local munge_user=$me
  [ "$(id -u)" = 0 ] && id munge >/dev/null 2>&1 && munge_user=munge
  head -c 1024 /dev/urandom > "$D/munge/munge.key"
  chmod 700 "$D/munge"
  chmod 400 "$D/munge/munge.key"
  if [ "$munge_user" != "$me" ]; then chown -R munge: "$D/munge"; fi
  local as_munge=()
  [ "$munge_user" != "$me" ] && as_munge=(runuser -u munge --)
  env "$(marker)" "${as_munge[@]}" munged --socket="$D/munge/sock" --pid-file="$D/munge/munged.pid" \
    --log-file="$D/munge/munged.log" --seed-file="$D/munge/seed" --key-file="$D/munge/munge.key" \
    --num-threads=2 --force
  # (--force: munged refuses some directory permissions otherwise, e.g. a world-writable /tmp parent.)

  cat > "$D/slurm.conf" <<CONF
# Private one-node test cluster written by scripts/slurm-cluster.sh (see docs/DEVELOPERS.md).
ClusterName=ultralong-test
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=$me
SlurmdUser=$me
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/sock
StateSaveLocation=$D/spool/ctld
SlurmdSpoolDir=$D/spool/d
TmpFS=$D/tmp
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmdDebug=info
SlurmctldDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
FirstJobId=$first_job
# Keep finished jobs visible to scontrol show job for 5 minutes (no accounting database here).
MinJobAge=300
KillWait=5
# Requeued jobs may start again at once (a one-node test cluster has nothing to wait for).
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  echo "export SLURM_CONF=$D/slurm.conf" > "$D/env"
  export SLURM_CONF=$D/slurm.conf
  env "$(marker)" slurmctld -c
  env "$(marker)" slurmd -N localhost
  # Wait at most 30 s of wall time (sinfo alone can block for its message timeout when no
  # controller answers) and give up at once when a daemon has exited.
  local start=$SECONDS state=
  while [ $((SECONDS - start)) -lt 30 ]; do
    state=$(timeout 5 sinfo -h -o %T 2>/dev/null || true)
    [ "$state" = idle ] && break
    if [ $((SECONDS - start)) -ge 2 ] &&
      { ! pid_of "$D/slurmctld.pid" >/dev/null || ! pid_of "$D/slurmd.pid" >/dev/null; }; then
      state="a daemon exited"
      break
    fi
    sleep 0.2
  done
  if [ "$state" != idle ]; then
    echo "error: the node did not come up (state '${state}'); logs in $D/log:" >&2
    tail -n 20 "$D"/log/*.log "$D/munge/munged.log" >&2 || true
    down
    exit 1
  fi
  echo "export SLURM_CONF=$D/slurm.conf"
}

down() {
  [ -d "$D" ] || return 0
  D=$(cd "$D" && pwd)
  export SLURM_CONF=$D/slurm.conf
  local p c f t
  # The jobs first, at once: every job process descends from a slurmstepd of this cluster
  # (which carries the marker), and a stopped slurmd would leave them running. A plain scancel
  # would not do: the job scripts trap TERM to checkpoint and requeue themselves.
  for p in $(marked_pids); do
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = slurmstepd ] || continue
    for c in $(descendants "$p") "$p"; do kill -9 "$c" 2>/dev/null || true; done
  done
  if [ -e "$SLURM_CONF" ] && pid_of "$D/slurmctld.pid" >/dev/null; then
    scontrol shutdown >/dev/null 2>&1 || true
  fi
  for f in slurmctld.pid slurmd.pid; do
    t=0
    while pid_of "$D/$f" >/dev/null && [ $t -lt 40 ]; do sleep 0.25; t=$((t + 1)); done
    if p=$(pid_of "$D/$f"); then kill -9 "$p" 2>/dev/null || true; fi
  done
  # Whatever is left of this cluster (a slurmstepd started meanwhile, slurmscriptd).
  for p in $(marked_pids); do
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = munged ] && continue
    for c in $(descendants "$p") "$p"; do kill -9 "$c" 2>/dev/null || true; done
  done
  if p=$(pid_of "$D/munge/munged.pid"); then
    kill "$p" 2>/dev/null || true
    t=0
    while kill -0 "$p" 2>/dev/null && [ $t -lt 20 ]; do sleep 0.1; t=$((t + 1)); done
    kill -9 "$p" 2>/dev/null || true
  fi
  return 0
}

case $cmd in
  up) up ;;
  down) down ;;
  status)
    export SLURM_CONF=$D/slurm.conf
    sinfo
    squeue
    ;;
  *) usage ;;
esac
