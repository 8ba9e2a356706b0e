#!/usr/bin/env bash
# Says plainly which of the system tools `make demo` and `make test` need is missing, and how
# to install it on Debian; prints nothing when all are there.
set -uo pipefail
missing=()
hint=()
command -v cargo >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/cargo" ] || {
  missing+=("cargo (the Rust toolchain)")
  hint+=("curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y")
}
command -v cc >/dev/null 2>&1 || { missing+=("a C compiler"); hint+=("sudo apt-get install -y build-essential"); }
# The CUDA kernels' CPU emulation (kernels/emu) is C++20: g++ 10 or newer.
command -v c++ >/dev/null 2>&1 || { missing+=("a C++ compiler"); hint+=("sudo apt-get install -y build-essential"); }
command -v python3 >/dev/null 2>&1 || { missing+=("python3"); hint+=("sudo apt-get install -y python3"); }
if command -v python3 >/dev/null 2>&1; then
  python3 -m pip --version >/dev/null 2>&1 || { missing+=("pip for python3"); hint+=("sudo apt-get install -y python3-pip"); }
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || { missing+=("python3's venv module"); hint+=("sudo apt-get install -y python3-venv"); }
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing: ${missing[*]}" >&2
  echo "install with:" >&2
  printf '  %s\n' "${hint[@]}" >&2
  exit 1
fi
