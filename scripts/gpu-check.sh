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
# when the machine has two GPUs (engine/tests/gpu_backend.rs), then the throughput benchmark on
# models of the default model's and Llama-3-8B's shapes made from their configuration alone
# (--load-format dummy: the default model's 98 MB would not fit the 64 MiB carried), the first
# beside HF transformers `generate` on the same card and shapes.
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
# Throughput, on models made of their configuration alone (--load-format dummy: no weights to
# carry, the same work as the real ones with ignore_eos): the default model's shape
# (SmolLM2-135M) at 256 sequences beside transformers' generate on the same card and shapes, and
# Llama-3-8B's shape at 1000 × (1024 in, 128 out), the issue's target case.
shaped() {
  local dir="$out/models/$1"
  mkdir -p "$dir"
  cp tests/fixtures/tiny-llama3/tokenizer.json "$dir/"
  printf '%s\n' "$2" >"$dir/config.json"
  echo "$dir"
}
smol=$(shaped smollm2-135m '{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
 "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
 "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
 "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
 "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}')
llama8b=$(shaped llama3-8b '{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
 "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
 "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
 "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
 "tie_word_embeddings": false, "bos_token_id": 128000, "eos_token_id": 128001,
 "hidden_act": "silu"}')
bench() {
  local model=$1 name=$2 prompts=$3 in=$4 outlen=$5 seqs=$6 secs=$7
  echo "== throughput $name: $prompts x ($in in, $outlen out), $seqs sequences" | tee -a "$out/summary.txt"
  timeout "$secs" "$bins/gristmill" bench throughput --model "$model" --load-format dummy \
    --device cuda --dataset random-ids --num-prompts "$prompts" --input-len "$in" \
    --output-len "$outlen" --max-num-seqs "$seqs" --max-num-batched-tokens 8192 \
    --quiet-load 1000 --output-json "$out/throughput-$name.json" \
    >"$out/throughput-$name.log" 2>&1 || { status=1; tail -20 "$out/throughput-$name.log" | tee -a "$out/summary.txt"; }
  tail -2 "$out/throughput-$name.log" | tee -a "$out/summary.txt"
}
bench "$smol" smollm2-135m-shaped 256 128 128 256 120
if [ -n "$py" ]; then
  echo "== HF transformers generate, smollm2-135m-shaped: 256 x (128 in, 128 out)" | tee -a "$out/summary.txt"
  timeout 300 "$py" - "$smol" "$out/hf-generate-smollm2-135m-shaped.json" <<'PY' 2>&1 | tail -3 | tee -a "$out/summary.txt"
import json, sys, time
import torch
from transformers import AutoConfig, AutoModelForCausalLM
path, dest = sys.argv[1], sys.argv[2]
cfg = AutoConfig.from_pretrained(path)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
torch.manual_seed(0)
ids = torch.randint(3, cfg.vocab_size, (256, 128), device="cuda")
kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
with torch.no_grad():
    model.generate(ids[:8], max_new_tokens=4, min_new_tokens=4, **kw)
    torch.cuda.synchronize()
    t = time.time()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=128, min_new_tokens=128, **kw)
    torch.cuda.synchronize()
    secs = time.time() - t
tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
json.dump({"output_tokens": tokens, "seconds": secs, "output_tokens_per_second": tokens / secs}, open(dest, "w"))
print(f"HF generate: {tokens} output tokens in {secs:.2f} s = {tokens / secs:.0f} tokens/s")
PY
fi
bench "$llama8b" llama3-8b-shaped 1000 1024 128 256 300
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
