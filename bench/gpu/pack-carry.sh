#!/usr/bin/env bash
# Build what bench/gpu-check.sh needs on the GPU machine (x86-64, no Rust, no internet, maybe no
# MPI) into .carry-gpu/ (ignored by git; name it in the device call's `carry`):
#   .carry-gpu/ultralong   release binary (features mpi + cuda, kernels embedded), stripped
#   .carry-gpu/ompi/       OpenMPI 4.1 + PMIx + hwloc + libevent as installed here (Debian), copied
#                          from the installed packages' file lists, relocated on the device with
#                          OPAL_PREFIX (for the 2-rank check; the binary also needs libmpi to start)
# Run from the repository root after `make deps` (nvcc in .venv-cuda). Size is printed: the
# device call carries at most 64 MiB with the working tree.
set -euo pipefail
cd "$(dirname "$0")/../.."
C=.carry-gpu
rm -rf "$C" && mkdir -p "$C"
export CARGO_INCREMENTAL=0 ULTRALONG_REQUIRE_NVCC=1
export NVCC="${NVCC:-$PWD/.venv-cuda/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc}"
cargo build --release
cp target/release/ultralong "$C/ultralong"
strip "$C/ultralong"
# OpenMPI and what it loads, file by file from the packages (no downloads).
O="$C/ompi"
for pkg in libopenmpi3 openmpi-bin openmpi-common libpmix2 libhwloc15 libevent-core-2.1-7 \
           libevent-pthreads-2.1-7; do
  dpkg -L "$pkg" | while read -r f; do
    case "$f" in /usr/share/doc/*|/usr/share/man/*|/usr/share/lintian/*) continue ;; esac
    [ -f "$f" ] || [ -L "$f" ] || continue
    mkdir -p "$O$(dirname "$f")"
    cp -a "$f" "$O$f"
  done
done
# Debian's alternatives: mpirun -> orterun.
ln -sf orterun "$O/usr/bin/mpirun"
du -sh "$C" "$C/ultralong" "$O"
