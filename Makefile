# ultralong: the two set-up commands (README.md). Both install what is missing, then build.
#   make demo   the recipe at toy scale on the CPU (scripts/demo.sh)
#   make test   formatting, clippy with warnings denied, every test

CARGO ?= cargo
BIN := target/release/ultralong

.PHONY: demo test deps build bench-cpu clean-demo

deps:
	@command -v $(CARGO) >/dev/null || { echo "error: cargo not found; install Rust with rustup (https://rustup.rs)"; exit 1; }
	@rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt
	@rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy
	@$(CARGO) nextest --version >/dev/null 2>&1 || $(CARGO) install cargo-nextest --locked

build: deps
	$(CARGO) build --release

demo: build
	bash scripts/demo.sh

test: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) nextest run --no-fail-fast

# The CPU training benchmark beside PyTorch eager (needs the Python venv of bench/README.md).
bench-cpu: build
	bash bench/run_cpu_bench.sh

clean-demo:
	rm -rf runs/demo
