"""End-to-end behaviour of a real 3-node cluster: routing, forwarding, status, errors."""

import asyncio
import random
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from raftkv import Client
from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv._pb.raftkv.v1 import kv_pb2_grpc as kv_grpc
from raftkv.errors import KeyNotFound
from raftkv.testing.cluster import LocalCluster


async def _write_and_read_everywhere(cluster: LocalCluster, n: int) -> None:
    # One non-leader-aware client per node: every request lands on that node, so requests
    # for shards it does not lead must be forwarded.
    clients = [Client(ep, leader_aware=False) for ep in cluster.endpoints]
    rng = random.Random(7)
    expected = {f"key-{i}".encode(): rng.randbytes(rng.randrange(1, 200)) for i in range(n)}
    sem = asyncio.Semaphore(32)

    async def put(k: bytes, v: bytes) -> None:
        async with sem:
            await rng.choice(clients).put(k, v)

    await asyncio.gather(*(put(k, v) for k, v in expected.items()))

    async def check(c: Client, k: bytes) -> tuple[bytes, bytes]:
        async with sem:
            return k, (await c.get(k)).value

    for c in clients:
        got = dict(await asyncio.gather(*(check(c, k) for k in expected)))
        assert got == expected, f"mismatch reading through {c.endpoints[0]}"
    for c in clients:
        await c.close()


def test_1000_keys_written_through_random_nodes_read_back_through_every_node(
    cluster3: LocalCluster,
) -> None:
    asyncio.run(_write_and_read_everywhere(cluster3, 1000))


def test_status_shows_every_shard_with_a_leader_among_its_replicas(cluster3: LocalCluster) -> None:
    status = cluster3.status()
    assert status.shard_count == 8 and len(status.shards) == 8
    assert {n.id for n in status.nodes} == {"n1", "n2", "n3"}
    assert all(n.reachable for n in status.nodes)
    for shard in status.shards:
        assert sorted(shard.replicas) == ["n1", "n2", "n3"]
        assert shard.leader in shard.replicas
        assert shard.term >= 1
        assert {r.node for r in shard.replica_status} == {"n1", "n2", "n3"}


def test_reply_headers_name_the_shard_and_leader(cluster3: LocalCluster) -> None:
    with cluster3.channel("n1") as ch:
        stub = kv_grpc.KVStub(ch)
        resp = stub.Put(kv.PutRequest(key=b"hdr", value=b"v"), timeout=10)
        leaders = cluster3.leaders()
        assert resp.header.leader == leaders[resp.header.shard_id]
        assert resp.header.leader_endpoint == cluster3.endpoint(resp.header.leader)
        assert resp.header.index > 0 and resp.version == resp.header.index
        got = stub.Get(kv.GetRequest(key=b"hdr"), timeout=10)
        assert got.value == b"v" and got.header.shard_id == resp.header.shard_id
        # the read reflects the write: its index is at least the write's (ReadIndex adds no entry)
        assert got.header.index >= resp.header.index


def test_retried_write_with_the_same_request_id_applies_once(cluster3: LocalCluster) -> None:
    rid = kv.RequestId(client_id=b"test-client-0001", seq=1)
    with cluster3.channel("n2") as ch:
        stub = kv_grpc.KVStub(ch)
        first = stub.Put(kv.PutRequest(key=b"dedup", value=b"one", request_id=rid), timeout=10)
        stub.Put(
            kv.PutRequest(
                key=b"dedup", value=b"two", request_id=kv.RequestId(client_id=b"other", seq=1)
            ),
            timeout=10,
        )
        retry = stub.Put(kv.PutRequest(key=b"dedup", value=b"one", request_id=rid), timeout=10)
        assert retry.version == first.version
        assert stub.Get(kv.GetRequest(key=b"dedup"), timeout=10).value == b"two"


def test_compare_and_swap(cluster3: LocalCluster) -> None:
    async def run() -> None:
        async with Client(cluster3.endpoints) as c:
            v1 = await c.compare_and_swap(b"cas", b"a", expected_version=0)
            v2 = await c.compare_and_swap(b"cas", b"b", expected_value=b"a")
            assert v2 > v1
            v3 = await c.compare_and_swap(b"cas", b"c", expected_version=v2)
            assert (await c.get(b"cas")).value == b"c" and (await c.get(b"cas")).version == v3

    asyncio.run(run())


def test_stale_reads_serve_from_the_local_replica(cluster3: LocalCluster) -> None:
    async def run() -> None:
        async with Client(cluster3.endpoints) as c:
            await c.put(b"stale-key", b"v")
        for ep in cluster3.endpoints:
            async with Client(ep, leader_aware=False) as c:
                # a follower may lag by a heartbeat: allow a short, bounded catch-up
                for _ in range(50):
                    try:
                        got = await c.get(b"stale-key", stale=True)
                        break
                    except KeyNotFound:
                        await asyncio.sleep(0.05)
                assert got.value == b"v"

    asyncio.run(run())


def _listening(pid: int) -> list[str]:
    """host:port of every TCP socket ``pid`` listens on (IPv4-mapped addresses unmapped)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    addrs = [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]
    return sorted(a.replace("[::ffff:", "").replace("]", "") for a in addrs)


def test_node_listens_only_on_its_grpc_and_raft_addresses(cluster3: LocalCluster) -> None:
    if shutil.which("ss") is None:
        pytest.skip("needs ss from iproute2 (.ci/run installs it when run as root)")
    for node in cluster3.nodes.values():
        assert node.pid is not None
        assert _listening(node.pid) == sorted([node.address.grpc, node.address.raft])


def test_grpc_reflection_lists_the_kv_service(cluster3: LocalCluster) -> None:
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    out = subprocess.run(
        [grpcurl, "-plaintext", cluster3.endpoint("n1"), "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "raftkv.v1.KV" in out.stdout.split()
    assert "grpc.health.v1.Health" in out.stdout.split()


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (kv.PutRequest(key=b"", value=b"v"), grpc.StatusCode.INVALID_ARGUMENT),
        (kv.PutRequest(key=b"k" * 4097, value=b"v"), grpc.StatusCode.INVALID_ARGUMENT),
        (kv.PutRequest(key=b"k", value=b"v" * (1024 * 1024 + 1)), grpc.StatusCode.INVALID_ARGUMENT),
        (kv.PutRequest(key=b"k", value=b"v", shard_id=99), grpc.StatusCode.INVALID_ARGUMENT),
        (kv.GetRequest(key=b""), grpc.StatusCode.INVALID_ARGUMENT),
        (kv.GetRequest(key=b"never-written"), grpc.StatusCode.NOT_FOUND),
        (kv.DeleteRequest(key=b"k" * 5000), grpc.StatusCode.INVALID_ARGUMENT),
        (
            kv.CompareAndSwapRequest(key=b"never-written", value=b"x", expected_value=b"y"),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (kv.CompareAndSwapRequest(key=b"k", value=b"x"), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_input_gets_a_clear_code_and_the_node_keeps_serving(
    cluster3: LocalCluster, request_: object, code: grpc.StatusCode
) -> None:
    method = {
        kv.PutRequest: "Put",
        kv.GetRequest: "Get",
        kv.DeleteRequest: "Delete",
        kv.CompareAndSwapRequest: "CompareAndSwap",
    }[type(request_)]
    with cluster3.channel("n3") as ch:
        stub = kv_grpc.KVStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            getattr(stub, method)(request_, timeout=10)
        assert info.value.code() == code, info.value.details()
        assert info.value.details()  # a message that says why
        stub.Put(kv.PutRequest(key=b"after-bad", value=b"ok"), timeout=10)
        assert stub.Get(kv.GetRequest(key=b"after-bad"), timeout=10).value == b"ok"
    assert all(n.running for n in cluster3.nodes.values())


def test_bulk_put_and_get_many_across_shards(cluster3: LocalCluster) -> None:
    items = [(f"bulk-{i}".encode(), f"value-{i}".encode()) for i in range(1000)]

    async def run() -> None:
        async with Client(cluster3.endpoints) as leader_aware:
            versions = await leader_aware.put_many(items)
            assert all(v > 0 for v in versions)
        # a client that always talks to one node exercises server-side grouping/forwarding
        async with Client(cluster3.endpoint("n2"), leader_aware=False) as plain:
            got = await plain.get_many([k for k, _ in items] + [b"bulk-missing"])
            assert [g.value if g else None for g in got] == [v for _, v in items] + [None]
            await plain.put_many([(b"bulk-0", b"rewritten")])
            assert (await plain.get(b"bulk-0")).value == b"rewritten"

    asyncio.run(run())


def test_bulk_request_with_a_bad_key_is_rejected_whole(cluster3: LocalCluster) -> None:
    with cluster3.channel("n1") as ch:
        stub = kv_grpc.KVStub(ch)
        req = kv.PutManyRequest(
            items=[kv.KeyValue(key=b"ok", value=b"1"), kv.KeyValue(key=b"", value=b"2")]
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.PutMany(req, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "item 1" in (info.value.details() or "")
        with pytest.raises(grpc.RpcError):
            stub.Get(kv.GetRequest(key=b"ok"), timeout=10)  # nothing of it was written


@pytest.mark.parametrize("read_path", ["read-index", "log-barrier"])
def test_linearizable_reads_append_to_the_log_only_on_the_barrier_path(
    tmp_path: Path, read_path: str
) -> None:
    """ReadIndex confirms leadership with a heartbeat round: reads leave the log alone.
    The log barrier (kept behind --read-path to compare) commits an entry per read batch."""
    args = ("--read-path", read_path)
    with LocalCluster.create(tmp_path, nodes=3, shards=1, replicas=3, extra_args=args) as c:
        c.start()

        async def run() -> None:
            async with c.client(timeout=10) as cl:
                await cl.put(b"k", b"v")
                before = c.status().shards[0].commit_index
                for _ in range(20):  # one at a time: each read its own round
                    assert (await cl.get(b"k")).value == b"v"
                after = c.status().shards[0].commit_index
                if read_path == "read-index":
                    assert after == before
                else:
                    assert after >= before + 20

        asyncio.run(run())


async def _plain_requests_to(
    entry: str, keys: list[bytes]
) -> tuple[list[kv.PutResponse], kv.StatusResponse]:
    """One RPC per operation, all to one node, as a grpcurl or Go stub would send them; every
    get must read what its put wrote. Returns the puts' replies and the node's status after."""
    async with grpc.aio.insecure_channel(entry) as channel:
        stub = kv_grpc.KVStub(channel)
        puts = await asyncio.gather(
            *(stub.Put(kv.PutRequest(key=k, value=k[::-1]), timeout=10) for k in keys)
        )
        gets = await asyncio.gather(*(stub.Get(kv.GetRequest(key=k), timeout=10) for k in keys))
        assert [g.value for g in gets] == [k[::-1] for k in keys]
        assert all(p.version >= 1 for p in puts)
        after = await kv_grpc.ClusterStub(channel).Status(
            kv.StatusRequest(local_only=True), timeout=10
        )
        return list(puts), after


def test_a_plain_client_s_requests_for_other_leaders_go_through_the_raft_link(
    cluster3: LocalCluster,
) -> None:
    """A node that follows the key's shard serves the request itself: the write is proposed
    to the leader over the Raft link and the linearizable read asks the leader for a read
    index; no gRPC hop, and every reply is right."""
    status = cluster3.status()
    entry = status.nodes[0]
    led_elsewhere = {s.shard_id for s in status.shards if s.leader != entry.id}
    assert led_elsewhere, "leader balancing gives every node some shards"
    with cluster3.channel(entry.id) as ch:
        local = kv.StatusRequest(local_only=True)
        before = kv_grpc.ClusterStub(ch).Status(local, timeout=5).via_leader_requests
    keys = [f"plain-{i}".encode() for i in range(300)]
    puts, after = asyncio.run(_plain_requests_to(entry.grpc, keys))
    remote = sum(1 for p in puts if p.header.shard_id in led_elsewhere)
    assert remote > 0
    # every put and linearizable get for a shard led elsewhere went through its leader, over
    # the Raft link or (if the leader changed meanwhile) forwarded over gRPC
    served = after.via_leader_requests - before
    assert served + after.forwarded_requests >= 2 * remote
    assert served >= remote

    async def read_back() -> bytes:
        async with Client(cluster3.endpoints) as c:
            return (await c.get(b"plain-7")).value

    assert asyncio.run(read_back()) == b"7-nialp"


def test_requests_for_shards_a_node_does_not_host_travel_in_forward_batches(
    tmp_path: Path,
) -> None:
    """4 nodes, 2 replicas per shard: the entry node holds no replica of some shards, so it
    forwards those requests to their leaders in Forward batches of the bytes it received."""
    with LocalCluster.create(tmp_path, nodes=4, shards=8, replicas=2) as cluster:
        cluster.start()
        status = cluster.status()
        entry = status.nodes[0]
        hosted = {s.shard_id for s in status.shards if entry.id in s.replicas}
        keys = [f"far-{i}".encode() for i in range(300)]
        puts, after = asyncio.run(_plain_requests_to(entry.grpc, keys))
        elsewhere = sum(1 for p in puts if p.header.shard_id not in hosted)
        assert elsewhere > 0, f"node {entry.id} hosts every shard: {sorted(hosted)}"
        assert after.forwarded_requests >= 2 * elsewhere
        # 600 requests in flight at once do not need 600 Forward calls: a request that
        # arrives while a batch to its leader node is out waits and joins the next one (how
        # many join depends on the machine's speed, so only a clear share is asked)
        assert 0 < after.forward_batches < 0.8 * after.forwarded_requests
