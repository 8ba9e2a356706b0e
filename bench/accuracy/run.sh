#!/usr/bin/env bash
# Greedy agreement with HF transformers, side by side: Gristmill exact, Gristmill fast and
# llama.cpp continue the same prompt tokens (bench/accuracy/prompts.json, chat-templated by
# Gristmill) for 64 tokens each; score.py counts, per engine, the tokens equal to HF's before
# the first divergence. Run by hand, never in CI:
#
#   bench/accuracy/run.sh [OUT_DIR]
#
# Needs: a release build's `greedy` example (built here), llama.cpp built by bench/compare.py
# (its sources and libraries under $GRISTMILL_CACHE_DIR/llama.cpp), and a Python with torch,
# transformers and gguf ($HF_PYTHON, default $GRISTMILL_CACHE_DIR/fixvenv/bin/python, as for
# scripts/make_fixtures.py).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${GRISTMILL_CACHE_DIR:-$HOME/.cache/gristmill}
out=${1:-$root/out/accuracy}
tokens=${TOKENS:-64}
model=${GRISTMILL_MODEL:-$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}
llama=${LLAMA_CPP_DIR:-$cache/llama.cpp}
python=${HF_PYTHON:-$cache/fixvenv/bin/python}
mkdir -p "$out"

cargo build --release -q -p gristmill-engine --example greedy --manifest-path "$root/Cargo.toml"
"$root/target/release/examples/greedy" "$here/prompts.json" "$tokens" "$out/gristmill.json"

g++ -O2 -std=c++17 -I"$llama/src/include" -I"$llama/src/ggml/include" "$here/llama_greedy.cpp" \
    -L"$llama/build/bin" -lllama -lggml -lggml-base -Wl,-rpath,"$llama/build/bin" -o "$out/llama_greedy"
python3 -c 'import json, sys
j = json.load(open(sys.argv[1]))
for p in j["prompts"]: print(sys.argv[2], *p)' "$out/gristmill.json" "$tokens" \
    | "$out/llama_greedy" "$model" 2 > "$out/llama.txt" 2> "$out/llama.log"

"$python" "$here/hf_greedy.py" "$model" "$out/gristmill.json" "$out/hf.json"
python3 "$here/score.py" "$out/gristmill.json" "$out/hf.json" "$out/llama.txt" "$out/agreement.json"
