#!/usr/bin/env bash
# Replacing a node that is gone for good, on the compose cluster (compose.yaml), narrated and
# checked:
#
#   1. docker compose up -d --wait: three healthy nodes, 8 shards, 3 replicas each
#   2. write N keys
#   3. kill n3 for good: its container and its data volume are deleted
#   4. raftkv admin member remove n3 --dead: its replicas are dropped from every group (the
#      groups run on two replicas until a node joins) and n3 leaves the view
#   5. docker compose --profile join up -d --wait n4: n4 joins (serve --join) and the replicas
#      move onto it
#   6. status: every shard (and the meta group) back at 3 replicas that agree, no move left
#   7. every key reads back intact (no acknowledged write lost); docker compose down -v on exit
#
# Usage: scripts/replace-demo.sh [N]     (N keys, default 100; or RAFTKV_DEMO_KEYS)
# Needs a Docker engine with compose v2 and the image raftkv:local (see compose.yaml).
# Exits non-zero if any check fails. Every wait is bounded by a deadline.
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS="${1:-${RAFTKV_DEMO_KEYS:-100}}"
DEADLINE_S="${RAFTKV_REPLACE_DEADLINE_S:-120}"
ENDPOINTS="n1:7001,n2:7001,n3:7001"
LIVE="n1:7001,n2:7001"
[[ "$KEYS" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [N keys > 0]" >&2; exit 2; }

DEMO_NAME="REPLACE DEMO"
# shellcheck source=scripts/demo-lib.sh
source scripts/demo-lib.sh

admin() { compose exec -T n1 raftkv admin --endpoints "$LIVE" --timeout 20 "$@"; }

# `wait_status SVC WHAT ARGS... -- WHY`: poll `status -o json` at SVC until status_fact WHAT
# holds, at most DEADLINE_S seconds; says OK with the time it took, or FAIL with the last answer.
wait_status() {
  local svc="$1" what="$2" why t last="" deadline
  shift 2
  local args=()
  while [ "$1" != "--" ]; do args+=("$1"); shift; done
  why="$2"
  t=$(now)
  deadline=$((SECONDS + DEADLINE_S))
  while true; do
    if last=$(compose exec -T "$svc" raftkv client --endpoints "$LIVE" --timeout 10 status -o json \
      2>/dev/null | status_fact "$what" "${args[@]}"); then
      ok "$why after $(since "$t")s"
      return 0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      fail "$why: not within ${DEADLINE_S}s (${last:-no status})"
      return 1
    fi
    sleep 1
  done
}

T_START=$(now)

say "1. Starting the cluster: docker compose up -d --wait (3 nodes, 8 shards, 3 replicas each)"
compose up -d --wait
ok "all three nodes healthy"

say "2. Writing $KEYS keys"
kvpy n1 "$PY_WRITE" "$ENDPOINTS" 0 "$KEYS" v1
compose exec -T n1 raftkv admin --endpoints "$ENDPOINTS" member list

say "3. Killing n3 for good: docker compose kill n3, then its container and data volume are deleted"
compose kill n3
compose rm -f n3
docker volume rm -f "$(compose config --format json | python3 -c \
  'import json,sys; print(json.load(sys.stdin)["name"])')_n3-data" >/dev/null
ok "n3 is gone for good (container and data volume deleted)"

say "4. raftkv admin member remove n3 --dead"
admin member remove n3 --dead
wait_status n1 settled 2 n3 -- "n3 removed as dead: every group runs on its two live replicas"
admin member list

say "5. A new node joins: docker compose --profile join up -d --wait n4"
compose --profile join up -d --wait n4
ok "n4 joined and is healthy"
wait_status n1 settled 3 n3 -- "every shard back at full replication (3 replicas agree, no move left)"
compose exec -T n1 raftkv client --endpoints "$LIVE,n4:7001" status
admin member list

say "6. Reading back all $KEYS keys through n4"
if kvpy n4 "$PY_READ" "n4:7001" "$KEYS" "$KEYS"; then
  ok "all $KEYS keys intact after replacing n3 with n4"
else
  fail "keys missing or wrong after replacing n3"
fi

say "Done in $(since "$T_START")s"
[ "$FAILED" = 0 ]
