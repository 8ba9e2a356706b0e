#!/usr/bin/env bash
# The dashboard to look at, on loopback: a fresh nats-server, a coordinator on
# 127.0.0.1:${PORT:-8000} with a generated API key (printed), three slowed-down echo workers
# (`--engine echo --echo-delay-ms`, no model), and a 20,000-line batch. After a while one worker
# is killed (its shards are redelivered to the others, as the batch page shows), and a second
# batch with no worker left to run it waits to be cancelled from the page. Ctrl-C stops it all.
#
# Usage: scripts/dashboard-demo.sh [LINES=20000] [DELAY_MS=3]
set -euo pipefail
lines="${1:-20000}"
delay="${2:-3}"
port="${PORT:-8000}"
# shellcheck source=scripts/loopback-nats.sh
. "$(dirname "$0")/loopback-nats.sh"
key="demo-$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
export GRISTMILL_API_KEY="$key"
GRISTMILL_LOG=info NO_COLOR=1 "$g" coordinator --listen "127.0.0.1:$port" --nats "$nats_url" \
  --ack-wait 5 --shard-max-lines 200 --autoscale-dry-run --autoscale-interval 2 2>"$work/coordinator.log" &
pids+=($!)
for _ in $(seq 100); do grep -q 'listening on' "$work/coordinator.log" && break; sleep 0.1; done
api="$(sed -n 's/.*listening on //p' "$work/coordinator.log" | head -1)"
workers=()
for name in echo-a echo-b echo-c; do
  "$g" worker --engine echo --echo-delay-ms "$delay" --nats "$nats_url" --max-inflight-shards 2 \
    --name "$name" 2>"$work/$name.log" &
  workers+=($!); pids+=($!)
done
"$g" bench dataset --num-prompts "$lines" --input-len 32 --output-len 16 -o "$work/demo.jsonl" 2>/dev/null
"$g" submit "$work/demo.jsonl" --url "$api" >/dev/null
echo "dashboard: $api/   API key: $key"
echo "a $lines-line batch is running on three echo workers; echo-a is killed in 20 s"
sleep 20
{ kill -9 "${workers[0]}"; wait "${workers[0]}"; } 2>/dev/null || true
echo "killed echo-a: its shards come back on echo-b and echo-c after --ack-wait (5 s)"
while "$g" status --url "$api" 2>/dev/null | grep -q in_progress; do sleep 2; done
for p in "${workers[@]:1}"; do { kill -9 "$p"; wait "$p"; } 2>/dev/null || true; done
"$g" bench dataset --num-prompts 50 --input-len 8 --output-len 8 -o "$work/stuck.jsonl" 2>/dev/null
"$g" submit "$work/stuck.jsonl" --url "$api" >/dev/null
echo "done; a 50-line batch now waits with no worker: cancel it from its page. Ctrl-C to stop."
wait
