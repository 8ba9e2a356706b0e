#!/usr/bin/env bash
# Renders every kustomize overlay with the pinned kubectl (1.37.1) and validates the result
# against the Kubernetes 1.33 schemas with the pinned kubernetes-validate (CRDs such as KEDA's
# ScaledObject have no bundled schema: reported, not failed), the stand-alone manifests of
# k8s/jobs/, and k8s/observability/ (rendered and validated the same way, then the Grafana
# dashboard and the alerting rules checked by scripts/check-observability.py). Run by
# `make test`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${GRISTMILL_CACHE_DIR:-$HOME/.cache/gristmill}/tools-venv/bin"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for overlay in dev-cpu gpu/tp2 gpu/tp8 keda observability; do
  file="$out/$(echo "$overlay" | tr / -).yaml"
  dir="$root/k8s/overlays/$overlay"
  [ "$overlay" = observability ] && dir="$root/k8s/observability"
  "$bin/kubectl" kustomize "$dir" >"$file"
  if ! "$bin/kubernetes-validate" --quiet -k 1.33.0 "$file"; then
    echo "${dir#"$root"/}: invalid manifests (rendered in $file)" >&2
    exit 1
  fi
  echo "${dir#"$root"/}: $(grep -c '^kind:' "$file") resources valid"
done
# Stand-alone manifests: the jobs (docs/workflows.md).
for manifest in "$root"/k8s/jobs/*.yaml; do
  if ! "$bin/kubernetes-validate" --quiet -k 1.33.0 "$manifest"; then
    echo "${manifest#"$root"/}: invalid manifests" >&2
    exit 1
  fi
  echo "${manifest#"$root"/}: $(grep -c '^kind:' "$manifest") resources valid"
done
"$bin/python" "$root/scripts/check-observability.py"
