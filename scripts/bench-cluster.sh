#!/usr/bin/env bash
# Cluster benchmarks (docs/benchmarks.md), on loopback with a fresh nats-server:
#
#  1. routing: a 50,000-line batch through the coordinator with `--engine echo` workers (they
#     answer each request with its prompt, no model), timed from `submit` to the downloaded
#     output file — requests per second the coordinator and NATS route;
#  2. overhead: one file through `gristmill run` and through `submit --wait` with one model
#     worker, alternating, each REPEAT times; medians and their ratio.
#
# Usage: scripts/bench-cluster.sh [ECHO_WORKERS=4] [REPEAT=3]
set -euo pipefail
workers="${1:-4}"
repeat="${2:-3}"
# shellcheck source=scripts/loopback-nats.sh
. "$(dirname "$0")/loopback-nats.sh"
GRISTMILL_LOG=info NO_COLOR=1 "$g" coordinator --allow-unauthenticated --listen 127.0.0.1:0 --nats "$nats_url" 2>"$work/coordinator.log" &
pids+=($!)
for _ in $(seq 100); do grep -q 'listening on' "$work/coordinator.log" && break; sleep 0.1; done
api="$(sed -n 's/.*listening on //p' "$work/coordinator.log" | head -1)"

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

echo "== routing: 50,000 requests, $workers echo workers (commit $(git -C "$root" rev-parse --short HEAD), $(nproc) cores)"
"$g" bench dataset --num-prompts 50000 --input-len 32 --output-len 16 -o "$work/route.jsonl"
echo_pids=()
for i in $(seq "$workers"); do
  "$g" worker --engine echo --nats "$nats_url" --max-inflight-shards 8 2>"$work/echo$i.log" &
  echo_pids+=($!); pids+=($!)
done
sleep 1
rates=(); crates=()
for r in $(seq "$repeat"); do
  t0=$(now)
  "$g" submit "$work/route.jsonl" --url "$api" --wait -o "$work/route.out.jsonl" --errors "$work/route.err.jsonl" >/dev/null 2>&1
  t1=$(now)
  lines=$(wc -l <"$work/route.out.jsonl")
  rate=$(python3 -c "print(round($lines/($t1-$t0)))")
  # Coordinator side: from the batch's "validating" log line to its "batch finished" line.
  inside=$(python3 - "$work/coordinator.log" <<'PY'
import datetime, re, sys
t = {}
for l in open(sys.argv[1]):
    m = re.match(r"(\S+Z)\s+INFO .*?: (validating|batch finished)", l)
    if m:
        t[m.group(2)] = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
print(round((t["batch finished"] - t["validating"]).total_seconds(), 3))
PY
)
  crate=$(python3 -c "print(round($lines/$inside))")
  echo "run $r: $lines lines in $(python3 -c "print(round($t1-$t0,2))") s end to end = $rate requests/s; coordinator from validation to finished $inside s = $crate requests/s"
  rates+=("$rate"); crates+=("$crate")
done
route_median=$(printf '%s\n' "${rates[@]}" | median)
coord_median=$(printf '%s\n' "${crates[@]}" | median)
echo "median: $route_median requests/s end to end (upload, validation, sharding, routing, result collection, files, download); $coord_median requests/s inside the coordinator"
for p in "${echo_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
sleep 1

echo "== overhead: gristmill run vs submit --wait with one model worker"
"$g" worker --nats "$nats_url" 2>"$work/model-worker.log" &
pids+=($!)
sleep 2
runs=(); subs=()
for r in $(seq "$repeat"); do
  # Fresh prompts each round: the worker's prefix cache outlives a batch, and a repeated file
  # would be served from it.
  "$g" bench dataset --num-prompts 32 --input-len 128 --output-len 64 --seed "$r" -o "$work/over.jsonl"
  t0=$(now); "$g" run "$work/over.jsonl" -o "$work/run.out.jsonl" -q 2>/dev/null; t1=$(now)
  "$g" submit "$work/over.jsonl" --url "$api" --wait -o "$work/sub.out.jsonl" --errors "$work/sub.err.jsonl" >/dev/null 2>&1; t2=$(now)
  a=$(python3 -c "print(round($t1-$t0,2))"); b=$(python3 -c "print(round($t2-$t1,2))")
  echo "round $r: run $a s, submit --wait $b s"
  runs+=("$a"); subs+=("$b")
done
rm=$(printf '%s\n' "${runs[@]}" | median); sm=$(printf '%s\n' "${subs[@]}" | median)
ratio=$(python3 -c "print(round($sm/$rm,3))")
echo "median: run $rm s, submit --wait $sm s, ratio $ratio"
cat >"$root/out/bench-cluster.json" <<JSON
{"commit": "$(git -C "$root" rev-parse --short HEAD)", "cores": $(nproc), "echo_workers": $workers,
 "routing_requests_per_s": [$(IFS=,; echo "${rates[*]}")], "routing_median": $route_median,
 "coordinator_requests_per_s": [$(IFS=,; echo "${crates[*]}")], "coordinator_median": $coord_median,
 "run_s": [$(IFS=,; echo "${runs[*]}")], "submit_wait_s": [$(IFS=,; echo "${subs[*]}")],
 "run_median_s": $rm, "submit_wait_median_s": $sm, "ratio": $ratio}
JSON
echo "wrote out/bench-cluster.json"
