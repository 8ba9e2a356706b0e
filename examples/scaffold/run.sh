#!/usr/bin/env bash
# Generates five service skeletons (examples/scaffold/services.jsonl) from one template with
# `gristmill scaffold`: one request per service, each answered with a JSON file tree that is
# checked (no absolute paths, no `..`, no symbolic links) and written under OUT/<name>/.
#
#   examples/scaffold/run.sh [OUT] [extra gristmill scaffold flags…]
#
# The report is OUT/.gristmill/scaffold-report.html; a second run sends no request.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${GRISTMILL_BIN:-$here/../../target/release/gristmill}"
out="${1:-$(mktemp -d)}"
shift || true
"$bin" scaffold --template "$here/template.md" --specs "$here/services.jsonl" --out "$out" \
  --max-tokens 768 "$@"
