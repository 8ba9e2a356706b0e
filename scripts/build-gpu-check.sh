#!/usr/bin/env bash
# Builds, on this x86-64 machine, what scripts/gpu-check.sh runs on a GPU machine that has no
# Rust toolchain and no network: the GPU test binaries (CUDA feature: the kernels against the
# CPU ops, the GPU backend on the tiny models against transformers and the CPU backend) and the
# CUDA build of `gristmill` (the throughput benchmark), stripped, into out/gpu-check/. Carry
# that folder (the tiny fixtures travel with the working tree) to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=out/gpu-check
rm -rf "$dest" && mkdir -p "$dest"
json=$(cargo test -p gristmill-kernels -p gristmill-kernels-emu -p gristmill-engine \
  --features gristmill-kernels/cuda,gristmill-kernels-emu/cuda,gristmill-engine/cuda \
  --release --locked --no-run --message-format=json 2>/dev/null)
# nvrtc: every kernel compiles for the card; kernels: every kernel and the GEMM against the CPU
# op; gpu_backend: the model-level checks.
for name in nvrtc kernels gpu_backend; do
  bin=$(printf '%s\n' "$json" | python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == name and m.get("executable"):
        print(m["executable"])
' "$name" | tail -1)
  cp "$bin" "$dest/$name"
  strip "$dest/$name"
done
cargo build -p gristmill --features cuda --release --locked
cp target/release/gristmill "$dest/gristmill"
strip "$dest/gristmill"
git rev-parse --short HEAD >"$dest/commit"
du -sh "$dest"
ls -la "$dest"
