#!/usr/bin/env bash
# Coordinator failover benchmark (docs/benchmarks.md), on loopback with a fresh nats-server and
# coordinators with the default --lease-ttl (15 s) unless LEASE_TTL is given:
#
#  1. forwarding: GET /v1/batches/{id} from the leader and through a standby (which forwards it),
#     ROUNDS requests each, alternating; median latencies and their difference;
#  2. clean handover: SIGTERM to the leader → a standby leads (it deletes its lease);
#  3. crash: SIGKILL to the leader → a standby leads (the lease must expire first).
#
# Usage: scripts/bench-failover.sh [ROUNDS=300] [LEASE_TTL=15]
set -euo pipefail
rounds="${1:-300}"
ttl="${2:-15}"
# shellcheck source=scripts/loopback-nats.sh
. "$(dirname "$0")/loopback-nats.sh"

# start NAME: a coordinator; its URL goes to $work/NAME.url.
start() {
  GRISTMILL_LOG=info NO_COLOR=1 "$g" coordinator --allow-unauthenticated --listen 127.0.0.1:0 --nats "$nats_url" \
    --instance-id "$1" --lease-ttl "$ttl" >/dev/null 2>"$work/$1.log" &
  pids+=($!)
  echo $! >"$work/$1.pid"
  for _ in $(seq 100); do grep -q 'listening on' "$work/$1.log" && break; sleep 0.1; done
  sed -n 's/.*listening on //p' "$work/$1.log" | head -1 >"$work/$1.url"
}
start a
sleep 1
start b
start c
a=$(cat "$work/a.url") b=$(cat "$work/b.url") c=$(cat "$work/c.url")

python3 - "$a" "$b" "$c" "$rounds" "$work" "$ttl" <<'PY'
import json, os, signal, statistics, sys, time, urllib.request, urllib.error

a, b, c, rounds, work, ttl = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], float(sys.argv[6])

def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()

def leads(url):
    try:
        return any(l == b"gristmill_coordinator_leader 1" for l in get(url + "/metrics").splitlines())
    except (urllib.error.URLError, ConnectionError):
        return False

def wait_leader(urls, since):
    while True:
        for u in urls:
            if leads(u):
                return u, time.monotonic() - since
        if time.monotonic() - since > 120:
            sys.exit("no coordinator took over within 120 s")
        time.sleep(0.02)

wait_leader([a], time.monotonic())
# A batch to read (its file fails validation at once: nothing else runs).
boundary = "b0undary"
body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jsonl\"\r\n\r\n"
        "{\"custom_id\": \"x\"}\n\r\n" f"--{boundary}--\r\n").encode()
req = urllib.request.Request(a + "/v1/files", data=body, method="POST",
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
fid = json.loads(urllib.request.urlopen(req).read())["id"]
req = urllib.request.Request(a + "/v1/batches", method="POST", headers={"Content-Type": "application/json"},
                             data=json.dumps({"input_file_id": fid, "endpoint": "/v1/chat/completions",
                                              "completion_window": "24h"}).encode())
bid = json.loads(urllib.request.urlopen(req).read())["id"]

direct, forwarded = [], []
for _ in range(rounds):
    for url, out in ((a, direct), (b, forwarded)):
        t = time.perf_counter()
        get(f"{url}/v1/batches/{bid}")
        out.append((time.perf_counter() - t) * 1e3)
md, mf = statistics.median(direct), statistics.median(forwarded)
print(f"GET /v1/batches/{{id}}, {rounds} each: leader median {md:.3f} ms, through a standby {mf:.3f} ms (+{mf - md:.3f} ms)")

pid = lambda n: int(open(f"{work}/{n}.pid").read())
t = time.monotonic()
os.kill(pid("a"), signal.SIGTERM)
new, handover = wait_leader([b, c], t)
print(f"SIGTERM to the leader: {'b' if new == b else 'c'} leads after {handover:.2f} s (lease TTL {ttl:g} s)")
other = c if new == b else b
t = time.monotonic()
os.kill(pid("b" if new == b else "c"), signal.SIGKILL)
_, crash = wait_leader([other], t)
print(f"SIGKILL to the leader: the standby leads after {crash:.2f} s (lease TTL {ttl:g} s)")
print(json.dumps({"rounds": rounds, "leader_get_ms_median": round(md, 3), "forwarded_get_ms_median": round(mf, 3),
                  "sigterm_handover_s": round(handover, 2), "sigkill_takeover_s": round(crash, 2), "lease_ttl_s": ttl}))
PY
