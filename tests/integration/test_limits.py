"""Limits under pressure, from outside: a node refuses clearly and keeps serving others.

Findings 7-10 and 12 of the security review (issue #7): a tiny GetMany that asked for
gigabytes, overload by concurrent requests and by digest callers, a request id reused for
another write, malformed protobuf and out-of-range enums, and the things that already held up
(requests with 1 ms deadlines, a thousand channels) checked so they keep holding.
"""

import asyncio
import json
import os
import statistics
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv._pb.raftkv.v1 import kv_pb2_grpc as kv_grpc
from raftkv.admission import RETRY_AFTER_METADATA
from raftkv.ring import Ring
from raftkv.testing.cluster import LocalCluster, rss_mb, wait_for


class Probe:
    """Put+Get round trips through one node, from another process, while something else
    hammers the cluster: it measures the node, not the test's own busy event loop."""

    SCRIPT = """
import json, sys, time, grpc
from raftkv._pb.raftkv.v1 import kv_pb2 as kv, kv_pb2_grpc as kv_grpc
endpoint, seconds = sys.argv[1], float(sys.argv[2])
latencies, errors = [], []
with grpc.insecure_channel(endpoint) as ch:
    stub = kv_grpc.KVStub(ch)
    stub.Put(kv.PutRequest(key=b"probe-warm", value=b"p"), timeout=10)
    print("ready", flush=True)
    end, i = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        i += 1
        key = f"probe-{i}".encode()
        started = time.monotonic()
        try:
            stub.Put(kv.PutRequest(key=key, value=b"p"), timeout=10)
            stub.Get(kv.GetRequest(key=key), timeout=10)
        except grpc.RpcError as e:
            errors.append(e.code().name)
        latencies.append(time.monotonic() - started)
        time.sleep(0.02)
print(json.dumps({"latencies": latencies, "errors": errors}), flush=True)
"""

    def __init__(self, c: LocalCluster, node: str, seconds: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT, c.endpoint(node), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def finish(self) -> None:
        out, _ = self.proc.communicate(timeout=120)
        result = json.loads(out.strip().splitlines()[-1])
        self.latencies, self.errors = result["latencies"], result["errors"]

    def quantile(self, q: float) -> float:
        assert len(self.latencies) >= 20, self.latencies
        return statistics.quantiles(self.latencies, n=100)[int(q * 100) - 1]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A cluster whose nodes handle at most 16 client RPCs at once."""
    base = tmp_path_factory.mktemp("limited")
    with LocalCluster.create(
        base, nodes=3, shards=4, replicas=3, extra_args=("--max-concurrent-rpcs", "16")
    ) as c:
        c.start()
        yield c


def test_a_small_get_many_can_never_build_a_huge_reply(limited: LocalCluster) -> None:
    c = limited
    pid = c.pid("n1")
    big = os.urandom(1024 * 1024)
    with c.channel("n1") as ch:
        stub = kv_grpc.KVStub(ch)
        stub.Put(kv.PutRequest(key=b"big", value=big), timeout=10)
        before = rss_mb(pid)
        request = kv.GetManyRequest(keys=[b"big"] * 2000)
        assert request.ByteSize() < 20_000  # a small request...
        reply = stub.GetMany(request, timeout=30)
    found = [r for r in reply.results if r.found]
    capped = [r for r in reply.results if r.error.code]
    # ...gets at most the reply cap (4 MiB) of values, and the rest a clear, retryable error
    assert sum(len(r.value) for r in found) <= 4 * 1024 * 1024
    assert len(found) + len(capped) == 2000 and found and capped
    assert all(r.value == big for r in found)
    assert {r.error.code for r in capped} == {"RESOURCE_EXHAUSTED"}
    assert "size limit" in capped[0].error.message
    assert rss_mb(pid) < before + 150, (before, rss_mb(pid))

    async def page_through() -> None:  # the client library asks again for what was capped
        async with c.client(timeout=20) as cl:
            got = await cl.get_many([b"big"] * 9)
            assert [g.value if g else None for g in got] == [big] * 9

    asyncio.run(page_through())


def test_overload_is_refused_at_once_with_a_hint_and_others_stay_fast(
    limited: LocalCluster,
) -> None:
    c = limited
    log = c.nodes["n1"].log_dir / "n1" / "raftkv.log"
    codes: Counter[str] = Counter()
    hints: set[str] = set()

    async def storm() -> None:
        channels = [c.dialer.channel(c.endpoint("n1")) for _ in range(20)]

        async def one(stub: kv_grpc.KVStub, i: int) -> None:
            call = stub.Put(kv.PutRequest(key=f"storm-{i}".encode(), value=b"x" * 100), timeout=30)
            try:
                await call
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1
                for k, v in e.trailing_metadata() or ():
                    if k == RETRY_AFTER_METADATA:
                        hints.add(str(v))

        try:
            stubs = [kv_grpc.KVStub(ch) for ch in channels]
            for wave in range(3):
                await asyncio.gather(
                    *(one(stubs[i % 20], i) for i in range(wave * 3000, wave * 3000 + 3000))
                )
        finally:
            for ch in channels:
                await ch.close()

    probe = Probe(c, "n2", seconds=8)
    asyncio.run(storm())
    probe.finish()
    assert not probe.errors, probe.errors
    # Another node's clients keep being served while n1 refuses. On this 2-core machine the
    # storm's own client and n1 take both cores, so the bound is loose; what it rules out is
    # the old behaviour (p50 2.4 s, timeouts) and any unbounded queueing.
    print(f"probe during the storm: p50 {probe.quantile(0.5):.3f}s p99 {probe.quantile(0.99):.3f}s")
    assert probe.quantile(0.5) < 0.25 and probe.quantile(0.99) < 5.0, sorted(probe.latencies)
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes  # never CANCELLED or timeouts
    assert codes["RESOURCE_EXHAUSTED"] > 0 and codes["OK"] > 0, codes
    assert hints == {"50"}
    wait_for(lambda: "overloaded:" in log.read_text(), 10, "the overload log line")
    assert "client requests in flight (limit 16)" in log.read_text()


def test_digest_callers_queue_or_are_refused_and_raft_keeps_ticking(
    limited: LocalCluster,
) -> None:
    c = limited

    async def load_and_storm() -> None:
        async with c.client(timeout=30) as cl:
            for start in range(0, 40_000, 2000):
                await cl.put_many(
                    [(f"d-{i}".encode(), b"v" * 50) for i in range(start, start + 2000)]
                )
        terms_before = {s.shard_id: s.term for s in c.status().shards}
        channel = c.dialer.channel(c.endpoint("n3"))
        probe = Probe(c, "n2", seconds=6)
        codes: Counter[str] = Counter()

        async def digest() -> None:
            try:
                await kv_grpc.ClusterStub(channel).Status(kv.StatusRequest(digest=True), timeout=30)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1
                assert "data digest" in (e.details() or "")

        try:
            for _ in range(3):
                await asyncio.gather(*(digest() for _ in range(20)))
        finally:
            await channel.close()
        probe.finish()
        assert not probe.errors, probe.errors
        assert codes["OK"] >= 1 and codes["RESOURCE_EXHAUSTED"] >= 10, codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        # No election storm (the leader balancer may still move a leadership or two).
        terms_after = {s.shard_id: s.term for s in c.status().shards}
        assert sum(terms_after[s] - terms_before[s] for s in terms_before) <= 2, terms_after
        assert probe.quantile(0.9) < 0.5, sorted(probe.latencies)[-5:]

    asyncio.run(load_and_storm())


def test_a_request_id_reused_for_another_write_is_refused(limited: LocalCluster) -> None:
    c = limited
    status = c.status()
    ring = Ring(status.shard_count, status.vnodes)
    rid = kv.RequestId(client_id=os.urandom(16), seq=1)
    for via in ("n1", "n2", "n3"):  # the leader, or a node that forwards to it
        rid.seq += 1
        a = f"reuse-a-{via}".encode()
        # another key of the same shard: request ids are deduplicated per shard
        b = next(
            k
            for i in range(1000)
            if ring.shard_for(k := f"reuse-b-{via}-{i}".encode()) == ring.shard_for(a)
        )
        with c.channel(via) as ch:
            stub = kv_grpc.KVStub(ch)
            first = stub.Put(kv.PutRequest(key=a, value=b"1", request_id=rid), timeout=10)
            again = stub.Put(kv.PutRequest(key=a, value=b"1", request_id=rid), timeout=10)
            assert again.version == first.version  # a retry: same answer, applied once
            with pytest.raises(grpc.RpcError) as e:
                stub.Put(kv.PutRequest(key=b, value=b"2", request_id=rid), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "request id was already used" in (e.value.details() or "")
            with pytest.raises(grpc.RpcError) as e:
                stub.Get(kv.GetRequest(key=b), timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert stub.Get(kv.GetRequest(key=a), timeout=10).value == b"1"


METHODS = [
    "/raftkv.v1.KV/Put",
    "/raftkv.v1.KV/Get",
    "/raftkv.v1.KV/Delete",
    "/raftkv.v1.KV/CompareAndSwap",
    "/raftkv.v1.KV/PutMany",
    "/raftkv.v1.KV/GetMany",
    "/raftkv.v1.Cluster/Status",
]


def test_malformed_protobuf_and_unknown_enums_are_invalid_argument(limited: LocalCluster) -> None:
    c = limited
    log = c.nodes["n1"].log_dir / "n1" / "raftkv.log"
    with c.channel("n1") as ch:
        for method in METHODS:
            call = ch.unary_unary(method)  # raw bytes in and out
            for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\x0f", b"\x12"):
                with pytest.raises(grpc.RpcError) as e:
                    call(garbage, timeout=5)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
                assert "malformed request" in (e.value.details() or ""), method
        stub = kv_grpc.KVStub(ch)
        for request, rpc in (
            (kv.GetRequest(key=b"k", consistency=99), stub.Get),  # type: ignore[arg-type]
            (kv.GetManyRequest(keys=[b"k"], consistency=99), stub.GetMany),  # type: ignore[arg-type]
        ):
            with pytest.raises(grpc.RpcError) as e:
                rpc(request, timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "consistency 99" in (e.value.details() or "")
        stub.Put(kv.PutRequest(key=b"still", value=b"here"), timeout=10)
    text = log.read_text()
    assert "Traceback" not in text and "internal error" not in text


def test_a_flood_of_1ms_deadlines_and_a_thousand_channels_leak_nothing(
    limited: LocalCluster,
) -> None:
    c = limited
    pid = c.pid("n1")
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = rss_mb(pid)

    async def deadlines() -> Counter[str]:
        codes: Counter[str] = Counter()
        channel = c.dialer.channel(c.endpoint("n1"))
        stub = kv_grpc.KVStub(channel)

        async def one(i: int) -> None:
            try:
                await stub.Put(kv.PutRequest(key=f"dl-{i}".encode(), value=b"v"), timeout=0.001)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1

        for start in range(0, 5000, 500):
            await asyncio.gather(*(one(i) for i in range(start, start + 500)))
        await channel.close()
        return codes

    codes = asyncio.run(deadlines())
    assert codes["DEADLINE_EXCEEDED"] > 0 and sum(codes.values()) == 5000, codes

    channels = [c.dialer.sync_channel(c.endpoint("n1")) for _ in range(1000)]
    try:
        for ch in channels[::50]:
            kv_grpc.KVStub(ch).Put(kv.PutRequest(key=b"chan", value=b"v"), timeout=10)
        for ch in channels:
            kv_grpc.ClusterStub(ch).Status(kv.StatusRequest(local_only=True), timeout=10)
    finally:
        for ch in channels:
            ch.close()
    wait_for(
        lambda: len(os.listdir(f"/proc/{pid}/fd")) < fds + 50,
        30,
        "the node to close the channels' sockets",
    )
    assert rss_mb(pid) < rss + 120, (rss, rss_mb(pid))
    with c.channel("n1") as ch:
        assert kv_grpc.KVStub(ch).Get(kv.GetRequest(key=b"chan"), timeout=10).value == b"v"


def test_a_client_posing_as_a_forwarding_node_gets_the_client_limit(tmp_path: Path) -> None:
    """The forwarding header only counts when a node vouches for it (a MAC with the secret)."""
    env = {"RAFTKV_RAFT_SECRET": "only-the-nodes-know-this"}
    with LocalCluster.create(
        tmp_path,
        nodes=3,
        shards=2,
        replicas=3,
        env=env,
        extra_args=("--max-concurrent-rpcs", "4"),
    ) as c:
        c.start()
        messages: Counter[str] = Counter()

        # A node that leads a shard: its requests wait for commits, so they pile up.
        leader = c.wait_leaders(30)[0]

        async def posing() -> None:
            channel = c.dialer.channel(c.endpoint(leader))
            stub = kv_grpc.KVStub(channel)
            spoof = (("raftkv-forwarded", "n2"),)

            async def one(i: int) -> None:
                try:
                    await stub.Put(
                        kv.PutRequest(key=f"pose-{i}".encode(), value=b"v"),
                        timeout=20,
                        metadata=spoof,
                    )
                    messages["OK"] += 1
                except grpc.aio.AioRpcError as e:
                    messages[(e.details() or "").split(" in flight")[0]] += 1

            await asyncio.gather(*(one(i) for i in range(400)))
            await channel.close()

        asyncio.run(posing())
        # Refused from the client pool, never the nodes' pool. (The header still stops the
        # request from being forwarded again: a poser just gets NotLeader with the hint.)
        overloaded = {m for m in messages if m.startswith("node overloaded")}
        assert overloaded == {"node overloaded: 4 client requests"}, messages
