#!/usr/bin/env bash
# The failover story on the compose cluster (compose.yaml), narrated and checked:
#
#   1. docker compose up -d --wait: the certs service makes the credentials, then three healthy
#      nodes, 8 shards, 3 replicas each
#   2. the protections hold: no node container holds the CA key; plaintext gRPC fails; a call
#      over TLS without a token, or with a token signed by another key, is UNAUTHENTICATED; a
#      `read` token can Get but not Put (PERMISSION_DENIED); the Raft port refuses a TLS client
#      without a node certificate
#   3. write N keys (one client process, concurrent puts) and show the cluster status
#   4. docker compose kill the container that leads the most shards
#   5. time how long until a write succeeds on every shard again (must be <= 10 s)
#   6. show the new leaders, read every key back (all present and equal), write N more
#   7. docker compose start the killed node and wait until every shard's replicas agree
#   8. read all 2N keys back; docker compose down -v on exit, also on failure
#
# Every client here runs inside a node container the way an operator would: over TLS with the
# cluster CA and with the admin token, both named by the container's environment
# (RAFTKV_CACERT, RAFTKV_TOKEN_FILE; see compose.yaml).
#
# Usage: scripts/failover-demo.sh [N]     (N keys, default 100; or RAFTKV_DEMO_KEYS)
# DEMO_BACKUP_OUT=PATH also copies the backup it takes out of the cluster, to PATH.
# Needs a Docker engine with compose v2 and the image raftkv:local (see compose.yaml).
# Exits non-zero if any check fails. Every wait is bounded by a deadline.
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS="${1:-${RAFTKV_DEMO_KEYS:-100}}"
FAILOVER_LIMIT_S="${RAFTKV_FAILOVER_LIMIT_S:-10}"
CATCHUP_DEADLINE_S="${RAFTKV_CATCHUP_DEADLINE_S:-60}"
SERVICES=(n1 n2 n3)
ENDPOINTS="n1:7001,n2:7001,n3:7001"
[[ "$KEYS" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [N keys > 0]" >&2; exit 2; }

DEMO_NAME="FAILOVER DEMO"
# shellcheck source=scripts/demo-lib.sh
source scripts/demo-lib.sh


# One write per shard (probe keys chosen with the ring to cover every shard), retried until it
# succeeds or the deadline passes. Prints the seconds it took inside the container.
PY_PROBE='
import asyncio, sys, time
from raftkv.ring import Ring
endpoints, shards, deadline = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ring, keys, i = Ring(shards), {}, 0
while len(keys) < shards:
    k = f"probe-{i}".encode()
    keys.setdefault(ring.shard_for(k), k)
    i += 1
start = time.monotonic()
async def main():
    async with client(endpoints, timeout=deadline) as c:
        await asyncio.gather(*(c.put(k, b"after-failover") for k in keys.values()))
asyncio.run(main())
print(f"every shard ({shards}) accepted a write after {time.monotonic() - start:.2f}s in the client")
'

# Lists the node's listening gRPC/Raft sockets (from /proc/net/tcp: no ss in slim images) and
# checks they are bound to the address the service name resolves to, not to 0.0.0.0.
# Scrapes every node's Prometheus endpoint (compose sets RAFTKV_METRICS_ADDR=<node>:9101):
# each shard must have exactly one node reporting itself its leader, and the leaders together
# must hold at least the keys written so far.
PY_METRICS='
import sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families as parse
hosts, writes = sys.argv[1].split(","), int(sys.argv[2])
leaders, keys, committed = {}, 0, 0
for h in hosts:
    text = urllib.request.urlopen(f"http://{h}:9101/metrics", timeout=5).read().decode()
    samples = [s for family in parse(text) for s in family.samples]
    led = {s.labels["shard"] for s in samples if s.name == "raftkv_server_is_leader" and s.value == 1}
    for shard in led:
        leaders[shard] = leaders.get(shard, 0) + 1
    for s in samples:
        if s.name == "raftkv_server_keys" and s.labels["shard"] in led and s.labels["shard"] != "meta":
            keys += int(s.value)
        if s.name == "raftkv_server_proposals_committed_total":
            committed += int(s.value)
    print(f"{h}: leads {sorted(led)}")
bad = [str(i) for i in range(8) if leaders.get(str(i)) != 1]
print(f"keys held by the shard leaders: {keys}; proposals committed (batched): {committed}")
sys.exit(1 if bad or keys < writes or committed < 1 else 0)
'

PY_LISTEN='
import socket, sys
name = sys.argv[1]
ip = socket.gethostbyname(name)
found = set()
for line in open("/proc/net/tcp").readlines()[1:]:
    f = line.split()
    if f[3] != "0A":  # LISTEN
        continue
    addr, port = f[1].split(":")
    addr, port = socket.inet_ntoa(bytes.fromhex(addr)[::-1]), int(port, 16)
    if port in (7001, 7101):
        print(f"{name} listens on {addr}:{port}")
        found.add((addr, port))
ok = found == {(ip, 7001), (ip, 7101)}
print(f"{name} resolves to {ip}: " + ("both ports bound to it" if ok else f"unexpected {sorted(found)}"))
sys.exit(0 if ok else 1)
'


# The protections, one case per call. Prints what it saw, one line per probe, and exits 0 only
# if that is what a secured cluster must do:
#   tls HOST:PORT,...            plaintext gRPC fails; over TLS with the CA, and no token, the
#                                health service answers SERVING (so the failure is the plaintext)
#   no-token ENDPOINTS           a Get over TLS without a token: UNAUTHENTICATED
#   forged ENDPOINTS             a Get with an admin token signed by another key: UNAUTHENTICATED
#   read-role ENDPOINTS TOKEN    the admin token Puts a key; TOKEN (role read) Gets it back, and
#                                its own Put is PERMISSION_DENIED
#   raft HOST:PORT,...           the Raft port presents the certificate of node HOST and refuses
#                                a TLS client that has no certificate
PY_SECURITY='
import asyncio, socket, ssl, sys
import grpc
from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg
from raftkv.auth import Role, generate_key, mint_token
from raftkv.errors import RaftKVError, status_for
case, target = sys.argv[1], sys.argv[2]
KEY, VALUE = b"demo-auth", b"written-with-the-admin-token"

def health(channel):
    """(answered, the serving status or the gRPC code of the failure)"""
    try:
        r = hg.HealthStub(channel).Check(h.HealthCheckRequest(service=""), timeout=5)
        return True, h.HealthCheckResponse.ServingStatus.Name(r.status)
    except grpc.RpcError as e:
        return False, e.code().name

def attempt(token, op):
    """How one Put or Get of KEY with token ends: OK, or the gRPC code of its error."""
    async def go():
        async with client(target, token=token, timeout=5) as c:
            if op == "put":
                await c.put(KEY, VALUE)
                return "OK"
            got = (await c.get(KEY)).value
            return "OK" if got == VALUE else f"OK, but it read {got!r}"
    try:
        return asyncio.run(go())
    except RaftKVError as e:
        return status_for(e).name

def refused_without_cert(host, port):
    """Whether a TLS client with no certificate is turned away, and how. TLS 1.3 only: the
    handshake completes on our side (the node certificate verified), then the server checks
    our empty certificate and its refusal arrives as an alert on the first read. A port
    without TLS fails the handshake, and counts as not refusing."""
    ctx = ssl.create_default_context(cafile=str(CACERT))  # no client certificate
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        raw = socket.create_connection((host, port), timeout=5)
    except OSError as e:
        return False, f"cannot connect: {e}"
    with raw:
        try:
            s = ctx.wrap_socket(raw, server_hostname=host)
        except (ssl.SSLError, OSError) as e:
            return False, f"no TLS 1.3 handshake: {e}"
        with s:
            uris = [v for k, v in s.getpeercert().get("subjectAltName", ()) if k == "URI"]
            if uris != [f"raftkv://node/{host}"]:
                return False, f"its certificate names {uris}, not raftkv://node/{host}"
            try:
                data = s.recv(1)
            except ssl.SSLError as e:
                return True, f"refused after the handshake ({e.reason or e})"
            except ConnectionResetError:
                return True, "refused after the handshake (connection reset)"
            except TimeoutError:
                return False, "accepted: it waited 5s for our first Raft frame"
    if data:
        return False, f"accepted: it sent {data!r}"
    return True, "refused after the handshake (connection closed)"

good = True
if case == "tls":
    creds = grpc.ssl_channel_credentials(root_certificates=CACERT.read_bytes())
    for ep in target.split(","):
        plain = health(grpc.insecure_channel(ep))
        tls = health(grpc.secure_channel(ep, creds))
        print(f"{ep}: plaintext -> {plain[1]}; TLS with the CA, no token -> {tls[1]}")
        good &= not plain[0] and tls == (True, "SERVING")
elif case == "no-token":
    got = attempt(None, "get")
    print(f"Get over TLS without a token -> {got}")
    good = got == "UNAUTHENTICATED"
elif case == "forged":
    got = attempt(mint_token(generate_key(), "intruder", Role.ADMIN), "get")
    print(f"Get with an admin token signed by another key -> {got}")
    good = got == "UNAUTHENTICATED"
elif case == "read-role":
    admin_put, read_get, read_put = (
        attempt(ADMIN_TOKEN, "put"), attempt(sys.argv[3], "get"), attempt(sys.argv[3], "put")
    )
    print(f"Put with the admin token -> {admin_put}")
    print(f"Get with the read token -> {read_get}")
    print(f"Put with the read token -> {read_put}")
    good = (admin_put, read_get, read_put) == ("OK", "OK", "PERMISSION_DENIED")
elif case == "raft":
    for ep in target.split(","):
        host, port = ep.rsplit(":", 1)
        refused, how = refused_without_cert(host, int(port))
        print(f"{ep}: TLS client without a certificate -> {how}")
        good &= refused
else:
    sys.exit(f"unknown case {case}")
sys.exit(0 if good else 1)
'

# `check SVC WHAT CASE ARGS...`: runs PY_SECURITY CASE ARGS in service SVC, shows what it saw,
# and reports WHAT as OK if that is what a secured cluster must do, else as FAIL.
check() {
  local svc="$1" what="$2" out rc=0
  shift 2
  out=$(kvpy "$svc" "$PY_SECURITY" "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | sed 's/^/    /'
  if [ "$rc" = 0 ]; then ok "$what"; else fail "$what"; fi
}

T_START=$(now)

say "Starting the cluster: docker compose up -d --wait (3 nodes, 8 shards, 3 replicas each)"
t=$(now)
compose up -d --wait
compose ps -a
ok "all three nodes healthy after $(since "$t")s"

say "Waiting for every shard to elect a leader"
deadline=$((SECONDS + 30))
until status_json n1 2>/dev/null | status_fact leaders-ok none; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    fail "not every shard had a leader within 30s"
    exit 1
  fi
  sleep 0.5
done
ok "every shard has a leader"

say "Each node binds gRPC (7001) and Raft (7101) to the address of its service name"
for s in "${SERVICES[@]}"; do
  kvpy "$s" "$PY_LISTEN" "$s" || fail "$s does not listen where its cluster file entry says"
done

say "Credentials: made once by the certs service; every node mounts them read-only, without the CA key"
compose logs --no-color certs
mounts_ok=1
for s in "${SERVICES[@]}"; do
  if compose exec -T "$s" sh -c \
    'test -r /certs/ca.crt && test -r /certs/admin.token && test ! -e /certs/ca.key && ! touch /certs/.w 2>/dev/null'; then
    printf '    %s: /certs readable, read-only, no ca.key\n' "$s"
  else
    fail "$s: /certs is not readable, is writable, or holds the CA key"
    mounts_ok=0
  fi
done
[ "$mounts_ok" = 0 ] || ok "no node container holds the CA key, and /certs is read-only in each"

say "TLS on the gRPC port: plaintext calls fail; over TLS with the CA the health service answers"
check n1 "every gRPC port refuses plaintext and serves TLS" tls "$ENDPOINTS"

say "Bearer tokens: over TLS, a call without a token or with a forged one is UNAUTHENTICATED"
check n1 "a call without a token is refused" no-token "$ENDPOINTS"
check n1 "a token signed by another key is refused" forged "$ENDPOINTS"

say "Roles: raftkv auth mint --key-file /certs/auth.key --name demo-reader --role read"
READ_TOKEN=$(compose exec -T n1 raftkv auth mint --key-file /certs/auth.key --name demo-reader --role read)
check n1 "a read token can Get but not Put" read-role "$ENDPOINTS" "$READ_TOKEN"

say "Mutual TLS on the Raft port: a TLS client without a node certificate is turned away"
check n1 "every Raft port refuses a TLS client without a certificate" raft "n1:7101,n2:7101,n3:7101"

say "Writing $KEYS keys through all three nodes (one client, concurrent puts)"
t=$(now)
kvpy n1 "$PY_WRITE" "$ENDPOINTS" 0 "$KEYS" v1
ok "wrote $KEYS keys in $(since "$t")s"

say "Cluster status: every shard has a leader; commit indexes agree"
compose exec -T n1 raftkv client --endpoints "$ENDPOINTS" status

say "Prometheus metrics: every node serves http://<node>:9101/metrics inside the network"
if compose exec -T n1 python -c "$PY_METRICS" n1,n2,n3 "$KEYS"; then
  ok "one leader per shard, and the leaders hold the $KEYS keys, as scraped from /metrics"
else
  fail "the nodes' /metrics disagree with the cluster (see above)"
fi

say "Backup: raftkv admin snapshot save, every shard at a linearizable read index (admin token)"
if compose exec -T n1 raftkv admin -e "$ENDPOINTS" snapshot save /data/demo.backup &&
  compose exec -T n1 raftkv admin snapshot status /data/demo.backup -w json |
  python3 -c 'import json, sys; d = json.load(sys.stdin); sys.exit(0 if d["keys"] >= int(sys.argv[1]) else 1)' "$KEYS"; then
  ok "the backup holds every key written so far, and its checksums verify"
else
  fail "snapshot save or status failed on the secure cluster"
fi
if [ -n "${DEMO_BACKUP_OUT:-}" ]; then
  # for scripts/compose-e2e, which restores it into a local cluster on the host
  if compose cp n1:/data/demo.backup "$DEMO_BACKUP_OUT" >/dev/null; then
    ok "the backup copied out of n1 to $DEMO_BACKUP_OUT"
  else
    fail "docker compose cp n1:/data/demo.backup failed"
  fi
fi

read -r VICTIM LED < <(status_json n1 | status_fact busiest)
SURVIVORS=()
for s in "${SERVICES[@]}"; do [ "$s" = "$VICTIM" ] || SURVIVORS+=("$s"); done
CLIENT="${SURVIVORS[0]}"
SURVIVOR_ENDPOINTS="${SURVIVORS[0]}:7001,${SURVIVORS[1]}:7001"

say "Killing $VICTIM (docker compose kill, SIGKILL): it leads shards $LED"
compose kill "$VICTIM"
T_KILL=$(now)
compose ps -a

say "Writing to every shard through $SURVIVOR_ENDPOINTS until each write succeeds (limit ${FAILOVER_LIMIT_S}s)"
if kvpy "$CLIENT" "$PY_PROBE" "$SURVIVOR_ENDPOINTS" 8 "$FAILOVER_LIMIT_S"; then
  took=$(since "$T_KILL")
  if awk -v t="$took" -v l="$FAILOVER_LIMIT_S" 'BEGIN { exit !(t <= l) }'; then
    ok "writes succeeded on every shard ${took}s after the kill (limit ${FAILOVER_LIMIT_S}s)"
  else
    fail "writes took ${took}s after the kill (limit ${FAILOVER_LIMIT_S}s)"
  fi
else
  fail "writes did not succeed on every shard within ${FAILOVER_LIMIT_S}s of the kill"
fi

say "New leaders ($VICTIM shows as unreachable)"
deadline=$((SECONDS + 30))
until status_json "$CLIENT" 2>/dev/null | status_fact leaders-ok "$VICTIM"; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    fail "some shard had no leader outside $VICTIM 30s after the kill"
    break
  fi
  sleep 0.5
done
compose exec -T "$CLIENT" raftkv client --endpoints "$SURVIVOR_ENDPOINTS" status || true

say "raftkv top, one frame (live: docker compose exec n1 raftkv top -e $ENDPOINTS)"
COLUMNS=120 compose exec -T -e COLUMNS=120 "$CLIENT" raftkv top -n 1 --endpoints "$SURVIVOR_ENDPOINTS" ||
  fail "raftkv top failed with $VICTIM down"

say "Reading back all $KEYS keys with $VICTIM down"
if kvpy "$CLIENT" "$PY_READ" "$SURVIVOR_ENDPOINTS" "$KEYS" "$KEYS"; then
  ok "all $KEYS keys read back intact after killing $VICTIM"
else
  fail "keys missing or wrong after killing $VICTIM"
fi

say "Writing $KEYS more keys with $VICTIM down"
t=$(now)
if kvpy "$CLIENT" "$PY_WRITE" "$SURVIVOR_ENDPOINTS" "$KEYS" "$KEYS" v2; then
  ok "wrote $KEYS more keys with $VICTIM down in $(since "$t")s"
else
  fail "writes failed with $VICTIM down"
fi

say "Restarting $VICTIM: docker compose start, then up -d --wait $VICTIM (start has no --wait)"
t=$(now)
compose start "$VICTIM"
compose up -d --wait "$VICTIM"
ok "$VICTIM healthy again after $(since "$t")s"

say "Waiting (at most ${CATCHUP_DEADLINE_S}s) until $VICTIM has caught up: every shard's replicas agree"
t=$(now)
deadline=$((SECONDS + CATCHUP_DEADLINE_S))
last=""
while true; do
  if last=$(status_json "$VICTIM" 2>/dev/null | status_fact caught-up 3); then
    ok "$VICTIM caught up after $(since "$t")s: every shard's replicas have the same commit index"
    break
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    fail "$VICTIM did not catch up within ${CATCHUP_DEADLINE_S}s (${last:-no status})"
    break
  fi
  sleep 1
done
compose exec -T "$VICTIM" raftkv client --endpoints "$ENDPOINTS" status

say "Reading all $((2 * KEYS)) keys back through the restarted $VICTIM"
if kvpy "$VICTIM" "$PY_READ" "$VICTIM:7001" "$((2 * KEYS))" "$KEYS"; then
  ok "all $((2 * KEYS)) keys intact across the whole story"
else
  fail "keys missing or wrong at the end"
fi

say "Done in $(since "$T_START")s"
[ "$FAILED" = 0 ]
