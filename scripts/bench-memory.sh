#!/usr/bin/env bash
# Coordinator memory and speed on one large batch (docs/benchmarks.md), on loopback with a fresh
# nats-server: LINES short requests through `--engine echo` workers (no model), timed from
# `submit` to the downloaded output file, with the coordinator's peak RSS (VmHWM) and its RSS
# after the batch ended (VmRSS, sampled 5 s later).
#
# Usage: scripts/bench-memory.sh [LINES=1000000] [ECHO_WORKERS=2]
set -euo pipefail
lines="${1:-1000000}"
workers="${2:-2}"
# shellcheck source=scripts/loopback-nats.sh
. "$(dirname "$0")/loopback-nats.sh"
"$g" bench dataset --num-prompts "$lines" --input-len 8 --output-len 4 -o "$work/big.jsonl" >/dev/null
bytes=$(stat -c %s "$work/big.jsonl")
GRISTMILL_LOG=info NO_COLOR=1 "$g" coordinator --allow-unauthenticated --listen 127.0.0.1:0 --nats "$nats_url" \
  --max-lines "$((lines + 1))" --max-file-bytes "$((bytes * 2))" 2>"$work/coordinator.log" &
coord=$!
pids+=($coord)
for _ in $(seq 100); do grep -q 'listening on' "$work/coordinator.log" && break; sleep 0.1; done
api="$(sed -n 's/.*listening on //p' "$work/coordinator.log" | head -1)"
for i in $(seq "$workers"); do
  "$g" worker --engine echo --nats "$nats_url" --max-inflight-shards 8 2>"$work/echo$i.log" &
  pids+=($!)
done
sleep 1
rss() { awk -v k="$1:" '$1==k {print int($2/1024)}' "/proc/$coord/status"; }
echo "== $lines lines ($((bytes / 1000000)) MB), $workers echo workers (commit $(git -C "$root" rev-parse --short HEAD), $(nproc) cores); coordinator RSS before: $(rss VmRSS) MB"
t0=$(date +%s.%N)
"$g" submit "$work/big.jsonl" --url "$api" --wait -o "$work/big.out.jsonl" --errors "$work/big.err.jsonl" >/dev/null 2>&1
t1=$(date +%s.%N)
done_lines=$(wc -l <"$work/big.out.jsonl")
failed=$(wc -l <"$work/big.err.jsonl" 2>/dev/null || echo 0)
peak=$(rss VmHWM)
sleep 5
after=$(rss VmRSS)
rate=$(python3 -c "print(round($done_lines/($t1-$t0)))")
echo "$done_lines completed, $failed failed in $(python3 -c "print(round($t1-$t0,1))") s = $rate lines/s end to end; coordinator peak RSS $peak MB, $after MB 5 s after the batch ended"
