"""Attacks from outside on the Raft port and the gRPC port of real nodes, and what stops them.

Each test reproduces a finding of the security review (issue #7) against real processes:
the pickle frame that used to run code, a stranger posing as a peer with the published
fingerprint, pre-authentication buffering and idle connections, start-up refusals for exposed
ports, TLS and token authentication with roles.
"""

import asyncio
import contextlib
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from raftkv import auth
from raftkv._pb.raftkv.v1 import forward_pb2 as fwd
from raftkv._pb.raftkv.v1 import forward_pb2_grpc as fwd_grpc
from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv._pb.raftkv.v1 import kv_pb2_grpc as kv_grpc
from raftkv._pb.raftkv.v1 import raft_pb2 as rpb
from raftkv.errors import KeyNotFound, PermissionDenied, Unauthenticated
from raftkv.raft import handshake as hs
from raftkv.testing.cluster import LocalCluster, open_fds, rss_mb, wait_for


def raft_address(cluster: LocalCluster, node: str) -> tuple[str, int]:
    host, port = cluster.nodes[node].address.raft.rsplit(":", 1)
    return host, int(port)


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the node sends until it closes the connection (fails if it never does)."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the node kept the connection open for {timeout}s")


def frames(data: bytes) -> list[bytes]:
    out, off = [], 0
    while off + 4 <= len(data):
        (size,) = struct.unpack_from(">I", data, off)
        out.append(data[off + 4 : off + 4 + size])
        off += 4 + size
    return out


async def put_get(cluster: LocalCluster, endpoint: str, key: bytes) -> bytes:
    async with cluster.client([endpoint], timeout=15) as c:
        await c.put(key, b"v-" + key)
        return (await c.get(key)).value


class _RunsCode:
    """The old exploit: unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("secret", [None, "a-long-enough-cluster-secret"])
def test_the_pickle_exploit_has_no_effect_and_the_node_stays_up(
    tmp_path: Path, secret: str | None
) -> None:
    env = {"RAFTKV_RAFT_SECRET": secret} if secret else None
    marker = tmp_path / "pwned"
    payload = pickle.dumps((0, {"type": "request_vote", "evil": _RunsCode(marker)}))
    with LocalCluster.create(tmp_path, nodes=3, shards=2, replicas=3, env=env) as c:
        c.start()
        for framing in (struct.pack("<I", len(payload)), struct.pack(">I", len(payload))):
            with socket.create_connection(raft_address(c, "n1"), timeout=5) as s:
                s.sendall(framing + payload)
                reply = read_until_closed(s, 10)
            # all the node ever says to a stranger: its hello, then why it hangs up
            assert all(f[:1] in (b"H", b"R") for f in frames(reply)), reply[:80]
        assert not marker.exists(), "the pickle payload ran code on the node"
        assert c.nodes["n1"].running
        assert asyncio.run(put_get(c, c.endpoint("n1"), b"after-exploit")) == b"v-after-exploit"


def test_a_stranger_with_the_fingerprint_cannot_pose_as_a_peer(tmp_path: Path) -> None:
    env = {"RAFTKV_RAFT_SECRET": "only-the-nodes-know-this"}
    with LocalCluster.create(tmp_path, nodes=3, shards=4, replicas=3, env=env) as c:
        c.start()
        status = c.status("n1")
        fingerprint = status.cluster_fingerprint  # published: it must not be a credential
        terms_before = max(s.term for s in status.shards)
        log = c.nodes["n1"].log_dir / "n1" / "raftkv.log"

        # 1. A hello as "n2" with the right fingerprint, then a made-up proof.
        with socket.create_connection(raft_address(c, "n1"), timeout=5) as s:
            own = hs.hello_body("n2", fingerprint, os.urandom(32), True)
            s.sendall(struct.pack(">I", len(own) + 1) + b"H" + own)
            s.sendall(struct.pack(">I", 33) + b"P" + os.urandom(32))
            reply = frames(read_until_closed(s, 10))
        assert reply[-1][:1] == b"R" and b"proof does not match" in reply[-1]

        # 2. The same hello, then straight to a RequestVote with term 10^9 (no proof at all).
        vote = rpb.RaftFrame(shard_id=0)
        vote.request_vote.term = 10**9
        vote.request_vote.last_log_index = 10**9
        body = vote.SerializeToString()
        with socket.create_connection(raft_address(c, "n1"), timeout=5) as s:
            s.sendall(struct.pack(">I", len(own) + 1) + b"H" + own)
            s.sendall(struct.pack(">I", len(body)) + body)
            read_until_closed(s, 10)

        # The real n2's link was never replaced, and no term moved.
        assert "replaced by a new authenticated link" not in log.read_text()
        after = c.status("n1")
        assert {n.id: n.raft_link for n in after.nodes if n.id != "n1"} == {
            "n2": "up",
            "n3": "up",
        }
        assert max(s.term for s in after.shards) < terms_before + 3 < 10**9
        assert "closed the connection from n2" in log.read_text()


def test_preauth_bytes_idle_sockets_and_connection_floods_are_bounded(tmp_path: Path) -> None:
    env = {"RAFTKV_RAFT_SECRET": "only-the-nodes-know-this"}
    with LocalCluster.create(tmp_path, nodes=3, shards=2, replicas=3, env=env) as c:
        c.start()
        n1 = c.pid("n1")
        rss_before, fds_before = rss_mb(n1), open_fds(n1)

        # A header claiming 4 GiB, then filler: the node hangs up after the 4-byte header.
        with socket.create_connection(raft_address(c, "n1"), timeout=5) as s:
            s.sendall(struct.pack(">I", 0xFFFFFFFF))
            sent = 0
            try:
                for _ in range(64):  # up to 64 MiB
                    s.sendall(b"\0" * (1 << 20))
                    sent += 1 << 20
            except (BrokenPipeError, ConnectionResetError):
                pass
            read_until_closed(s, 10)
        assert sent < 32 << 20, f"the node kept reading ({sent} bytes) after a 4 GiB header"

        # 300 idle connections and 100 that sent garbage: capped, then closed by the deadline.
        socks = []
        for i in range(400):
            s = socket.create_connection(raft_address(c, "n1"), timeout=5)
            if i % 4 == 0:
                s.sendall(os.urandom(100))
            socks.append(s)
        try:
            peak_fds = open_fds(n1)
            assert peak_fds < fds_before + 100, (fds_before, peak_fds)
            # while the flood lasts the node keeps serving, through its Raft links too
            assert asyncio.run(put_get(c, c.endpoint("n1"), b"during-flood")) == b"v-during-flood"
            # every one of them is closed within the handshake deadline (5 s) plus slack
            deadline = time.monotonic() + 15
            for s in socks:
                read_until_closed(s, max(0.1, deadline - time.monotonic()))
        finally:
            for s in socks:
                s.close()
        assert rss_mb(n1) < rss_before + 60, (rss_before, rss_mb(n1))
        assert {n.raft_link for n in c.status("n1").nodes if n.id != "n1"} == {"up"}


def test_strangers_cannot_lock_peers_out_or_flood_the_log(tmp_path: Path) -> None:
    """Idle connections used to fill the pending cap and refuse the real peers; now the oldest
    pending connection makes room. Made-up node ids used to log one line each."""
    env = {"RAFTKV_RAFT_SECRET": "only-the-nodes-know-this"}
    with LocalCluster.create(tmp_path, nodes=3, shards=2, replicas=3, env=env) as c:
        c.start()
        log = c.nodes["n1"].log_dir / "n1" / "raftkv.log"
        before = log.read_text().count("raft port: closed the connection")
        for i in range(30):  # thirty hellos, each claiming another node id
            with socket.create_connection(raft_address(c, "n1"), timeout=5) as s:
                own = hs.hello_body(f"intruder-{i}", "fp", os.urandom(32), True)
                s.sendall(struct.pack(">I", len(own) + 1) + b"H" + own)
                read_until_closed(s, 10)
        assert log.read_text().count("raft port: closed the connection") - before <= 2

        held: list[socket.socket] = []
        stop = threading.Event()

        def hold_the_door() -> None:  # keep 100 idle connections open, renewing them
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    held.append(socket.create_connection(raft_address(c, "n1"), timeout=5))
                if len(held) > 100:
                    held.pop(0).close()
                stop.wait(0.02)

        thread = threading.Thread(target=hold_the_door, daemon=True)
        thread.start()
        try:
            wait_for(lambda: len(held) >= 100, 20, "100 idle connections")
            c.restart("n2")  # n2 dials n1: it must get in past the idle crowd
            wait_for(
                lambda: {n.raft_link for n in c.status("n1").nodes if n.id != "n1"} == {"up"},
                15,
                "n1's links to come back up",
            )
        finally:
            stop.set()
            thread.join(10)
            for s in held:
                s.close()


def _serve_refuses(tmp_path: Path, toml: str, *extra: str) -> str:
    cluster_file = tmp_path / "exposed.toml"
    cluster_file.write_text(toml)
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "raftkv", "serve", "--cluster", str(cluster_file)),
            *("--id", "n1", "--data-dir", str(tmp_path / "d"), "--log-dir", str(tmp_path / "l")),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("RAFTKV_")},
    )
    assert proc.returncode == 5, proc.stderr  # a configuration it must not run with
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_exposed_ports_without_protection_refuse_to_start(tmp_path: Path) -> None:
    raft_exposed = (
        '[nodes.n1]\ngrpc = "127.0.0.1:7981"\nraft = "0.0.0.0:7982"\n'  # Raft on every address
    )
    line = _serve_refuses(tmp_path, raft_exposed)
    assert "Raft port 0.0.0.0:7982 is not a loopback address" in line
    assert "--secret-file" in line and "--peer-cert-file" in line
    grpc_exposed = '[nodes.n1]\ngrpc = "0.0.0.0:7981"\nraft = "127.0.0.1:7982"\n'
    line = _serve_refuses(tmp_path, grpc_exposed)
    assert "gRPC port 0.0.0.0:7981" in line and "--auth-token-file" in line


@pytest.fixture(scope="module")
def secure3(tmp_path_factory: pytest.TempPathFactory) -> LocalCluster:
    base = tmp_path_factory.mktemp("secure3")
    with LocalCluster.create(base, nodes=3, shards=4, replicas=3, secure=True) as c:
        c.start()
        yield c


def test_a_secure_cluster_serves_only_tls_clients_with_tokens(secure3: LocalCluster) -> None:
    c = secure3
    creds = c.credentials
    assert creds is not None
    # Every node forwards with the caller's token: write through each one, read everywhere.
    for i, ep in enumerate(c.endpoints):
        assert asyncio.run(put_get(c, ep, f"tls-{i}".encode())) == f"v-tls-{i}".encode()

    # Plaintext is refused at the TLS layer.
    with grpc.insecure_channel(c.endpoint("n1")) as ch, pytest.raises(grpc.RpcError) as e:
        kv_grpc.KVStub(ch).Get(kv.GetRequest(key=b"tls-0"), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE

    # TLS without a token: UNAUTHENTICATED; health and reflection stay open.
    tls = grpc.ssl_channel_credentials(creds.ca.read_bytes())
    with grpc.secure_channel(c.endpoint("n2"), tls) as ch:
        with pytest.raises(grpc.RpcError) as e:
            kv_grpc.KVStub(ch).Get(kv.GetRequest(key=b"tls-0"), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in (e.value.details() or "")
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            kv_grpc.KVStub(ch).Get(
                kv.GetRequest(key=b"k"), timeout=5, metadata=(("authorization", "Bearer junk"),)
            )
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_cli_says_what_a_secure_cluster_wants(secure3: LocalCluster) -> None:
    c = secure3
    assert c.credentials is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAFTKV_")}
    cli = [sys.executable, "-m", "raftkv", "client", "-e", c.endpoint("n1"), "--timeout", "3"]
    plain = subprocess.run([*cli, "get", "x"], capture_output=True, text=True, env=env)
    assert plain.returncode == 4
    assert "does the node require TLS? pass --cacert" in plain.stderr, plain.stderr
    tls = subprocess.run(
        [*cli, "--cacert", str(c.credentials.ca), "get", "x"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert tls.returncode == 6
    assert "needs a bearer token" in tls.stderr and "--token-file" in tls.stderr, tls.stderr
    assert tls.stderr.count("--token") == 2, tls.stderr  # one hint, not two


def test_roles_decide_what_a_token_may_do(secure3: LocalCluster) -> None:
    c = secure3
    assert c.credentials is not None
    key = auth.read_key_file(c.credentials.directory / "auth.key")
    reader = auth.mint_token(key, "reader", auth.Role.READ)
    writer = auth.mint_token(key, "writer", auth.Role.READWRITE)
    expired = auth.mint_token(key, "late", auth.Role.ADMIN, ttl_s=1, now=time.time() - 60)
    tls = c.credentials.client_tls()

    async def run() -> None:
        from raftkv import Client

        async with Client(c.endpoints, tls=tls, token=writer, timeout=10) as w:
            await w.put(b"role-key", b"1")
            with pytest.raises(PermissionDenied, match="Status with digest needs admin"):
                await _digest(w)
        async with Client(c.endpoints, tls=tls, token=reader, timeout=10) as r:
            assert (await r.get(b"role-key")).value == b"1"
            with pytest.raises(PermissionDenied, match="reader has role read"):
                await r.put(b"role-key", b"2")
        async with Client(c.endpoints, tls=tls, token=expired, timeout=10) as x:
            with pytest.raises(Unauthenticated, match="expired"):
                await x.get(b"role-key")
        async with c.client(timeout=10) as admin:  # the admin token: digests allowed
            status = await _digest(admin)
            assert all(r.digest for s in status.shards for r in s.replica_status)

    asyncio.run(run())


def test_only_nodes_may_send_forward_batches(secure3: LocalCluster) -> None:
    """Forward runs many requests for one admission slot: a client, even with the admin
    token, is refused it, and nothing in its batch is applied."""
    c = secure3
    put = kv.PutRequest(key=b"smuggled", value=b"x").SerializeToString()
    batch = fwd.ForwardRequest(
        calls=[
            fwd.ForwardedCall(
                method=fwd.FORWARDED_PUT,
                request=put,
                timeout_ms=5000,
                authorization=c.metadata[0][1],
            )
        ]
        * 3
    )
    for node in ("n1", "n2"):
        with c.channel(node) as ch, pytest.raises(grpc.RpcError) as e:
            fwd_grpc.ForwardingStub(ch).Forward(batch, timeout=5, metadata=c.metadata)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "for the nodes of this cluster" in (e.value.details() or "")

    async def absent() -> None:
        async with c.client(timeout=10) as admin:
            with pytest.raises(KeyNotFound):
                await admin.get(b"smuggled")

    asyncio.run(absent())


async def _digest(client: object) -> kv.StatusResponse:
    from raftkv import Client
    from raftkv.errors import rpc_error

    assert isinstance(client, Client)
    stub = kv_grpc.ClusterStub(client._channel(client.endpoints[0]))
    try:
        resp: kv.StatusResponse = await stub.Status(
            kv.StatusRequest(digest=True), timeout=10, metadata=client._md
        )
    except grpc.aio.AioRpcError as e:
        raise rpc_error(e) from None
    return resp


def test_the_raft_port_demands_a_peer_certificate(secure3: LocalCluster) -> None:
    c = secure3
    # Plaintext bytes at a TLS Raft port: the TLS handshake fails and the node hangs up.
    with socket.create_connection(raft_address(c, "n1"), timeout=5) as s:
        own = hs.hello_body("n2", "x", os.urandom(32), True)
        s.sendall(struct.pack(">I", len(own) + 1) + b"H" + own)
        read_until_closed(s, 10)
    # A TLS client without a certificate is refused by the handshake too.
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(raft_address(c, "n1"), timeout=5) as raw,
        pytest.raises((ssl.SSLError, ConnectionResetError, OSError)),
        ctx.wrap_socket(raw) as tls_sock,
    ):
        tls_sock.sendall(b"hello?")
        tls_sock.settimeout(10)
        if not tls_sock.recv(100):
            raise ConnectionResetError("closed")
    log = c.nodes["n1"].log_dir / "n1" / "raftkv.log"
    wait_for(lambda: "TLS handshake failed" in log.read_text(), 10, "the refusal in the log")
    assert {n.raft_link for n in c.status("n1").nodes if n.id != "n1"} == {"up"}
