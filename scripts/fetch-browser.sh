#!/usr/bin/env bash
# Makes sure a headless Chromium is there for the dashboard's browser test
# (gristmill/tests/dashboard.rs), printing nothing when it already is.
#
# Installs Debian's `chromium` package (about 100 MB with its libraries; no other source is
# reachable from CI) with apt-get when running as root; otherwise says how to.
# GRISTMILL_CHROMIUM may name another Chromium or Chrome binary instead.
set -euo pipefail
if [ -n "${GRISTMILL_CHROMIUM:-}" ] && [ -x "$GRISTMILL_CHROMIUM" ]; then
  exit 0
fi
for b in chromium chromium-browser google-chrome; do
  if command -v "$b" >/dev/null 2>&1; then
    exit 0
  fi
done
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "the dashboard's browser test needs a headless Chromium: install it with" >&2
  echo "  sudo apt-get install -y --no-install-recommends chromium" >&2
  echo "(or set GRISTMILL_CHROMIUM to a Chromium or Chrome binary)" >&2
  exit 1
fi
echo "installing Debian's chromium for the dashboard's browser test" >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends chromium >/dev/null; then
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends chromium >/dev/null
fi
chromium --version >&2
