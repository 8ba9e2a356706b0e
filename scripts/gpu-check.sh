#!/usr/bin/env bash
# Runs on a machine with an NVIDIA GPU and a CUDA 13 driver but no Rust toolchain and no
# network: every GPU test binary built beforehand by scripts/build-gpu-check.sh (carried in
# out/gpu-check/), with NVRTC and the CUDA headers taken from the machine's Python packages
# (PyTorch's nvidia-* wheels) or a CUDA toolkit. Results go to $OUT (default out/gpu-results).
#
# It checks every kernel and the cuBLAS GEMM against the CPU op on fresh random inputs
# (kernels/emu/tests/kernels.rs, the same checks `make test` runs on the emulated kernels),
# the PTX build for the device, the GPU backend on every tiny model against HF transformers' and
# the CPU backend's logits within the bf16 tolerance, greedy tokens against the CPU engine up to
# the first near-tie, the determinism contract (alone vs in a batch) on the GPU, TP 2 over NCCL
# when the machine has two GPUs (engine/tests/gpu_backend.rs), then HF transformers `generate`
# and `gristmill bench throughput --device cuda` on the same tiny model for a first comparison,
# and on $GRISTMILL_MODEL when one is there (the default model does not fit the 64 MiB carried).
# Summary: $OUT/summary.txt and $OUT/results.json.
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
for t in nvrtc kernels gpu_backend; do
  echo "== $t" | tee -a "$out/summary.txt"
  # The GPU tests are #[ignore]d where no GPU is (they must not count as passed there); the
  # CUDA ones sit in `cuda::` modules beside their emulated twins, which `make test` runs.
  filter=(); [ "$t" != nvrtc ] && filter=(cuda::)
  if "$bins/$t" --include-ignored --nocapture "${filter[@]}" >"$out/$t.log" 2>&1; then
    grep -E 'test result|skipped' "$out/$t.log" | tee -a "$out/summary.txt"
  else
    status=1
    tail -40 "$out/$t.log" | tee -a "$out/summary.txt"
  fi
done
# Throughput: gristmill on the GPU against transformers' generate on the same card and prompts.
bench() {
  local model=$1 name=$2
  echo "== throughput $name" | tee -a "$out/summary.txt"
  "$bins/gristmill" bench throughput --model "$model" --device cuda --num-prompts 256 \
    --input-len 128 --output-len 64 --max-num-seqs 256 --output-json "$out/throughput-$name.json" \
    >"$out/throughput-$name.log" 2>&1 || { status=1; tail -20 "$out/throughput-$name.log" | tee -a "$out/summary.txt"; }
  tail -3 "$out/throughput-$name.log" | tee -a "$out/summary.txt"
  if [ -n "$py" ] && [ -d "$model" ]; then
    timeout 300 "$py" - "$model" "$out/hf-generate-$name.json" <<'PY' 2>&1 | tail -3 | tee -a "$out/summary.txt"
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
path, dest = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
vocab = model.config.vocab_size
torch.manual_seed(0)
ids = torch.randint(3, vocab, (256, 128), device="cuda")
with torch.no_grad():
    model.generate(ids[:8], max_new_tokens=4, do_sample=False)
    torch.cuda.synchronize()
    t = time.time()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    torch.cuda.synchronize()
    secs = time.time() - t
tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
json.dump({"output_tokens": tokens, "seconds": secs, "output_tokens_per_second": tokens / secs}, open(dest, "w"))
print(f"HF generate: {tokens} tokens in {secs:.2f} s = {tokens / secs:.0f} tokens/s")
PY
  fi
}
bench tests/fixtures/tiny-llama3 tiny-llama3
[ -n "${GRISTMILL_MODEL:-}" ] && [ -e "$GRISTMILL_MODEL" ] && bench "$GRISTMILL_MODEL" model
"${py:-python3}" - "$out" <<'PY' || true
import glob, json, os, sys
out = sys.argv[1]
res = {"gpu": open(os.path.join(out, "gpu.csv")).read().strip().splitlines()[1:]}
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    if not f.endswith("results.json"):
        try:
            res[os.path.basename(f)[:-5]] = json.load(open(f))
        except ValueError:
            pass
json.dump(res, open(os.path.join(out, "results.json"), "w"), indent=2)
PY
echo "commit $(cat "$bins/commit" 2>/dev/null), exit $status" | tee -a "$out/summary.txt"
exit $status
