#!/usr/bin/env bash
# Ports the small Python 2 application in examples/migrate/repo/ to Python 3 with
# `gristmill migrate`: it copies the files into a new git repository (migrate works on a
# repository's HEAD), then runs the instruction over every app/*.py file with `python3 -m
# py_compile` as the verifier, up to 3 attempts per file, and commits what verifies on a branch.
#
#   examples/migrate/run.sh [DIR] [extra gristmill migrate flags…]
#
# DIR (default: a new temporary folder) receives the repository; the report is
# DIR/report.html. Run it twice: the second run sends no request (the answers are cached in
# DIR/repo/.git/gristmill/cache) and makes the same branch.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${GRISTMILL_BIN:-$here/../../target/release/gristmill}"
dir="${1:-$(mktemp -d)}"
shift || true
if [ ! -d "$dir/repo/.git" ]; then
  mkdir -p "$dir/repo"
  cp -r "$here/repo/." "$dir/repo/"
  git -C "$dir/repo" init -q -b main
  git -C "$dir/repo" add -A
  git -C "$dir/repo" -c user.name=example -c user.email=example@example.invalid \
    commit -q -m "A Python 2 application"
fi
"$bin" migrate --repo "$dir/repo" \
  --include 'app/*.py' \
  --instruction "$here/instruction.md" \
  --verify 'python3 -m py_compile {path}' \
  --max-attempts 3 \
  --report "$dir/report.json" "$@"
echo "repository: $dir/repo (see: git -C $dir/repo log --all --oneline)"
