# Shared by the compose demos (scripts/failover-demo.sh, scripts/replace-demo.sh): sourced,
# never run. Sets DEMO_NAME before sourcing; gives say/ok/fail, the cleanup trap that tears the
# cluster down (docker compose down -v) and prints "<DEMO_NAME> PASSED" or "... FAILED", and the
# Python snippets that run inside a node container as an operator would (TLS with the cluster
# CA, the admin token; both named by the container's environment).
# shellcheck shell=bash

compose() { docker compose "$@"; }
say() { printf '\n==> %s\n' "$*"; }
ok() { printf 'OK: %s\n' "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

FAILED=0
fail() {
  printf 'FAIL: %s\n' "$*" >&2
  FAILED=1
}

cleanup() {
  local rc=$?
  set +e
  if [ "$rc" != 0 ] || [ "$FAILED" != 0 ]; then
    say "Something failed: container states and the last log lines"
    compose ps -a
    compose logs --no-color --tail 30
  fi
  say "Tearing down: docker compose --profile join down -v"
  compose --profile join down -v --remove-orphans --timeout 10
  if [ "$rc" = 0 ] && [ "$FAILED" != 0 ]; then rc=1; fi
  if [ "$rc" = 0 ]; then
    printf '\n%s PASSED\n' "$DEMO_NAME"
  else
    printf '\n%s FAILED (exit %s)\n' "$DEMO_NAME" "$rc" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Python run inside a node container (the image has raftkv, grpc and python on PATH).
# `kvpy SVC SCRIPT ARGS...` runs PY_CLIENT then SCRIPT with `python -c` in service SVC.
kvpy() {
  local svc="$1" script="$2"
  shift 2
  compose exec -T "$svc" python -c "$PY_CLIENT$script" "$@"
}

# Prepended to every script: client(endpoints, ...) is a raftkv Client that verifies the nodes
# with the cluster CA and sends the admin token, both found through the container's environment.
PY_CLIENT='
import os
from pathlib import Path
from raftkv import Client
from raftkv.network import ClientTLS
CACERT = Path(os.environ["RAFTKV_CACERT"])
ADMIN_TOKEN = Path(os.environ["RAFTKV_TOKEN_FILE"]).read_text().strip()
def client(endpoints, token=ADMIN_TOKEN, **kwargs):
    return Client(endpoints, tls=ClientTLS(cacert=CACERT), token=token, **kwargs)
'

# Writes keys demo-<i> = <tag>-<i> for i in [start, start+count), 32 in flight at a time.
PY_WRITE='
import asyncio, sys
endpoints, start, count, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
async def main():
    sem = asyncio.Semaphore(32)
    async with client(endpoints, timeout=30) as c:
        async def put(i):
            async with sem:
                await c.put(f"demo-{i}".encode(), f"{tag}-{i}".encode())
        await asyncio.gather(*(put(i) for i in range(start, start + count)))
asyncio.run(main())
print(f"wrote demo-{start} .. demo-{start + count - 1} ({count} keys)")
'

# Reads every demo-<i> for i in [0, count) (linearizable) and checks its value: v1-<i> below
# split, v2-<i> from split on. Prints a one-line summary; exits 1 on any missing or wrong value.
PY_READ='
import asyncio, sys
from raftkv import KeyNotFound
endpoints, count, split = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def main():
    sem = asyncio.Semaphore(32)
    bad = []
    async with client(endpoints, timeout=30) as c:
        async def check(i):
            want = (f"v1-{i}" if i < split else f"v2-{i}").encode()
            async with sem:
                try:
                    got = (await c.get(f"demo-{i}".encode())).value
                except KeyNotFound:
                    got = None
            if got != want:
                bad.append((i, got))
        await asyncio.gather(*(check(i) for i in range(count)))
    return sorted(bad)
bad = asyncio.run(main())
print(f"{count - len(bad)}/{count} keys present with the value written")
for i, got in bad[:10]:
    print(f"  demo-{i}: got {got!r}")
sys.exit(1 if bad else 0)
'

status_json() { compose exec -T "$1" raftkv client --endpoints "$ENDPOINTS" --timeout 10 status -o json; }

# Reads `status -o json` on stdin; prints one fact about it (see the cases).
PY_STATUS='
import json, sys
s = json.load(sys.stdin)
what = sys.argv[1]
shards = s["shards"]
if what == "busiest":
    counts = {}
    for sh in shards:
        if sh["leader"]:
            counts[sh["leader"]] = counts.get(sh["leader"], 0) + 1
    node = max(sorted(counts), key=lambda n: counts[n])
    led = sorted(sh["shard"] for sh in shards if sh["leader"] == node)
    print(node, ",".join(map(str, led)))
elif what == "leaders-ok":
    # every shard has a leader, and it is not the excluded node
    bad = [sh["shard"] for sh in shards if not sh["leader"] or sh["leader"] == sys.argv[2]]
    sys.exit(1 if bad or not shards else 0)
elif what in ("caught-up", "settled"):
    want = int(sys.argv[2])
    if what == "settled":
        # no move in progress, the removed node gone from the view, then as caught-up
        gone = sys.argv[3]
        if s.get("moves") or gone in [n["id"] for n in s["nodes"]]:
            print("moves: " + "; ".join(s.get("moves") or []) + f"; nodes: {[n['id'] for n in s['nodes']]}")
            sys.exit(1)
    lagging = []
    for sh in shards:
        rs = sh["replica_status"]
        commits = {r["node"]: r["commit_index"] for r in rs}
        applied = {r["node"]: r["last_applied"] for r in rs}
        keys = {r["keys"] for r in rs}
        if len(rs) != want or len(set(commits.values())) != 1 or len(keys) != 1 \
                or set(applied.values()) != set(commits.values()):
            sid = sh["shard"]
            lagging.append(f"shard {sid}: " + " ".join(f"{n}={c}" for n, c in commits.items()))
    print("; ".join(lagging) if lagging else "all shards agree")
    sys.exit(1 if lagging else 0)
'
status_fact() { python3 -c "$PY_STATUS" "$@"; }
