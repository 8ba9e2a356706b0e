#!/usr/bin/env bash
# Runs on a machine with an NVIDIA GPU and a CUDA 13 driver but no Rust toolchain and no
# network: every GPU test binary built beforehand by scripts/build-gpu-check.sh (carried in
# out/gpu-check/), with NVRTC and the CUDA headers taken from the machine's Python packages
# (PyTorch's nvidia-* wheels) or a CUDA toolkit. Results go to $OUT (default out/gpu-results).
#
# Today it checks every kernel against the CPU op (tests/gpu_kernels.rs) and the PTX build for
# the device. The CUDA backend's model-level checks and the throughput benchmark join it as the
# backend lands (the CUDA issue).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu-results}"
mkdir -p "$out"
bins=out/gpu-check
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.csv" 2>&1 || true
# libnvrtc and headers: a CUDA toolkit, else Python's nvidia packages.
libs=(); incs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do [ -d "$d" ] && libs+=("$d"); done
for d in /usr/local/cuda/include; do [ -d "$d" ] && incs+=("$d"); done
py=$(command -v python3 || true)
if [ -n "$py" ]; then
  while IFS= read -r d; do libs+=("$d"); done < <("$py" - <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
seen = set()
for r in roots:
    for f in glob.glob(os.path.join(r, "nvidia", "**", "libnvrtc.so*"), recursive=True):
        d = os.path.dirname(f)
        if d not in seen:
            seen.add(d)
            print(d)
PY
)
  while IFS= read -r d; do incs+=("$d"); done < <("$py" - <<'PY'
import glob, os, site
for r in site.getsitepackages():
    for f in glob.glob(os.path.join(r, "nvidia", "**", "cuda_bf16.h"), recursive=True):
        d = os.path.dirname(f)
        print(d)
        if os.path.isdir(os.path.join(d, "cccl")):
            print(os.path.join(d, "cccl"))
PY
)
fi
export LD_LIBRARY_PATH="$(IFS=:; echo "${libs[*]}"):${LD_LIBRARY_PATH:-}"
export GRISTMILL_CUDA_INCLUDE="$(IFS=:; echo "${incs[*]}")"
export GRISTMILL_REQUIRE_NVRTC=1 GRISTMILL_REQUIRE_GPU=1
status=0
for t in nvrtc gpu_kernels; do
  echo "== $t" | tee -a "$out/summary.txt"
  # The GPU tests are #[ignore]d where no GPU is (they must not count as passed there).
  if "$bins/$t" --include-ignored --nocapture >"$out/$t.log" 2>&1; then
    grep -E 'test result|skipped' "$out/$t.log" | tee -a "$out/summary.txt"
  else
    status=1
    tail -40 "$out/$t.log" | tee -a "$out/summary.txt"
  fi
done
echo "commit $(cat "$bins/commit" 2>/dev/null), exit $status" | tee -a "$out/summary.txt"
exit $status
