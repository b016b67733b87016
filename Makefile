# ultralong: the two set-up commands (README.md). Both install what is missing, then build.
#   make demo   the recipe at toy scale on the CPU (scripts/demo.sh)
#   make test   formatting, clippy with warnings denied, every test
#   make build  the release binary only (what a cluster's login node needs: no Slurm, no munge)

CARGO ?= cargo
BIN := target/release/ultralong
# nvcc from PyPI (docs/DEVELOPERS.md, CUDA): build.rs compiles cuda/*.cu with it, warnings as errors;
# ULTRALONG_REQUIRE_NVCC=1 makes a missing nvcc a build error instead of a kernel-less binary.
CUDA_VENV := .venv-cuda
# NVCC: yours if set, else an nvcc on PATH, else $(CUDA_VENV)/nvcc, a wrapper that `deps` writes
# (decided when make starts, so it must not depend on files `deps` creates).
export NVCC ?= $(or $(shell command -v nvcc 2>/dev/null),$(CURDIR)/$(CUDA_VENV)/nvcc)
export ULTRALONG_REQUIRE_NVCC := 1

.PHONY: demo test deps build-deps test-deps build bench-cpu clean-demo

# build-deps: what `cargo build --release` needs (Rust, OpenMPI + libclang, nvcc): all a login node
# needs. test-deps: that, plus rustfmt, clippy, cargo-nextest, and Slurm + munge for tests/slurm.rs.
deps: test-deps

build-deps:
	@command -v $(CARGO) >/dev/null || { echo "error: cargo not found; install Rust with rustup (https://rustup.rs)"; exit 1; }
	@# MPI (the default `mpi` feature): OpenMPI's mpicc/mpirun, libclang for mpi-sys's bindgen.
	@command -v mpicc >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; \
	  elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "error: mpicc not found and not root without sudo: install libopenmpi-dev openmpi-bin libclang-dev clang pkg-config, or build with cargo --no-default-features (no MPI)"; exit 1; fi; \
	  command -v apt-get >/dev/null || { echo "error: mpicc not found and no apt-get: install OpenMPI (mpicc, mpirun) and libclang with your package manager, or build with cargo --no-default-features (no MPI)"; exit 1; }; \
	  echo "installing OpenMPI and libclang (apt-get)"; \
	  $$SUDO apt-get update && $$SUDO apt-get install -y libopenmpi-dev openmpi-bin libclang-dev clang pkg-config; \
	}
	@# nvcc (CUDA 13.0) for the kernels of cuda/, into $(CUDA_VENV); the metapackage pins matching parts.
	@[ -x "$(NVCC)" ] || { echo "installing nvcc 13.0 from PyPI into $(CUDA_VENV)"; \
	  python3 -m venv $(CUDA_VENV) && $(CUDA_VENV)/bin/pip install -q "cuda-toolkit[nvcc,nvvm,crt,cudart,cccl]==13.0.2" && \
	  real=$$(ls $(CURDIR)/$(CUDA_VENV)/lib/python3*/site-packages/nvidia/cu13/bin/nvcc | head -1) && \
	  printf '#!/bin/sh\nexec "%s" "$$@"\n' "$$real" > $(CUDA_VENV)/nvcc && chmod +x $(CUDA_VENV)/nvcc; }

test-deps: build-deps
	@rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt
	@rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy
	@$(CARGO) nextest --version >/dev/null 2>&1 || $(CARGO) install cargo-nextest --locked
	@# numpy for tests/hsa_numpy.rs (bench/np_hsa_check.py), into .venv.
	@.venv/bin/python -c "import numpy" 2>/dev/null || python3 -c "import numpy" 2>/dev/null || { \
	  echo "installing numpy into .venv"; python3 -m venv .venv && .venv/bin/pip install -q numpy; }
	@# Slurm + munge for tests/slurm.rs (a private one-node cluster: scripts/slurm-cluster.sh).
	@# slurmctld lives in /usr/sbin, often not on a user's PATH.
	@{ command -v sbatch >/dev/null && { command -v slurmctld >/dev/null || [ -x /usr/sbin/slurmctld ]; }; } || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; \
	  elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "error: Slurm (sbatch, slurmctld) not found and not root without sudo: install slurm-wlm munge (tests/slurm.rs needs them)"; exit 1; fi; \
	  command -v apt-get >/dev/null || { echo "error: Slurm (sbatch, slurmctld) not found and no apt-get: install Slurm (slurmctld, slurmd, client commands) and munge with your package manager (tests/slurm.rs needs them)"; exit 1; }; \
	  echo "installing Slurm and munge (apt-get)"; \
	  $$SUDO apt-get update && $$SUDO apt-get install -y slurm-wlm munge; \
	}

build: build-deps
	$(CARGO) build --release

demo: build
	bash scripts/demo.sh

test: test-deps
	$(CARGO) fmt --all -- --check
	python3 scripts/check-import-cycles.py src
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) nextest run --no-fail-fast

# The CPU training benchmark beside PyTorch eager (needs the Python venv of bench/README.md).
bench-cpu: build
	bash bench/run_cpu_bench.sh

clean-demo:
	rm -rf runs/demo
