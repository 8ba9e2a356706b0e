#!/usr/bin/env bash
# Renders every kustomize overlay with the pinned kubectl (1.37.1) and validates the result
# against the Kubernetes 1.33 schemas with the pinned kubernetes-validate (CRDs such as KEDA's
# ScaledObject have no bundled schema: reported, not failed), and the stand-alone manifests of
# k8s/jobs/. Run by `make test`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${GRISTMILL_CACHE_DIR:-$HOME/.cache/gristmill}/tools-venv/bin"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for overlay in dev-cpu gpu/tp2 gpu/tp8 keda; do
  file="$out/$(echo "$overlay" | tr / -).yaml"
  "$bin/kubectl" kustomize "$root/k8s/overlays/$overlay" >"$file"
  if ! "$bin/kubernetes-validate" --quiet -k 1.33.0 "$file"; then
    echo "k8s/overlays/$overlay: invalid manifests (rendered in $file)" >&2
    exit 1
  fi
  echo "k8s/overlays/$overlay: $(grep -c '^kind:' "$file") resources valid"
done
# Stand-alone manifests: the jobs (docs/workflows.md).
for manifest in "$root"/k8s/jobs/*.yaml; do
  if ! "$bin/kubernetes-validate" --quiet -k 1.33.0 "$manifest"; then
    echo "${manifest#"$root"/}: invalid manifests" >&2
    exit 1
  fi
  echo "${manifest#"$root"/}: $(grep -c '^kind:' "$manifest") resources valid"
done
