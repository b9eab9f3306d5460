"""Node failures on a real cluster: kill -9 one node, kill -9 every node, restart."""

import asyncio
from pathlib import Path

from raftkv import Client
from raftkv.testing.cluster import LocalCluster, wait_for


async def _put_all(endpoints: list[str], items: dict[bytes, bytes]) -> None:
    sem = asyncio.Semaphore(32)
    async with Client(endpoints) as c:

        async def put(k: bytes, v: bytes) -> None:
            async with sem:
                await c.put(k, v)

        await asyncio.gather(*(put(k, v) for k, v in items.items()))


async def _get_all(endpoints: list[str], keys: list[bytes]) -> dict[bytes, bytes]:
    sem = asyncio.Semaphore(32)
    async with Client(endpoints) as c:

        async def get(k: bytes) -> tuple[bytes, bytes]:
            async with sem:
                return k, (await c.get(k)).value

        return dict(await asyncio.gather(*(get(k) for k in keys)))


def _crash_and_restart_all(c: LocalCluster) -> None:
    c.kill_all()
    for node_id in c.nodes:
        c.start_node(node_id, wait=False)
    c.wait_healthy(30)
    c.wait_leaders(30)


def test_after_kill_9_of_one_node_every_key_is_readable_and_writable_within_5s(
    fresh_cluster: LocalCluster,
) -> None:
    c = fresh_cluster
    items = {f"k{i}".encode(): f"v{i}".encode() for i in range(200)}
    asyncio.run(_put_all(c.endpoints, items))
    victim = c.busiest_leader()
    c.kill(victim)
    survivors = c.running_endpoints()

    async def probe() -> None:
        # Every shard must take a write and serve every key, all within 5 s of the kill.
        async with Client(survivors, timeout=5.0) as cl:
            for k in list(items)[:50]:
                await cl.put(k, items[k] + b"-after")
            got = await _get_all(survivors, list(items))
            for k in list(items)[:50]:
                assert got[k] == items[k] + b"-after"
            for k in list(items)[50:]:
                assert got[k] == items[k]

    # The client deadline is 5 s per operation, counted from right after the kill: any write
    # or read that could not be served within 5 s fails the test.
    asyncio.run(probe())
    status = c.status()
    assert all(s.leader and s.leader != victim for s in status.shards)
    # the killed node comes back and catches up
    c.start_node(victim)

    def caught_up() -> bool:
        s = c.status()
        return all(
            len({r.commit_index for r in sh.replica_status}) == 1 and len(sh.replica_status) == 3
            for sh in s.shards
        )

    wait_for(caught_up, 20, "the restarted node to catch up")


def test_kill_9_every_node_then_restart_keeps_every_acknowledged_write(
    fresh_cluster: LocalCluster,
) -> None:
    c = fresh_cluster
    items = {f"durable-{i}".encode(): f"value-{i}".encode() * 3 for i in range(500)}
    asyncio.run(_put_all(c.endpoints, items))
    _crash_and_restart_all(c)
    got = asyncio.run(_get_all(c.endpoints, list(items)))
    assert got == items


def test_unsafe_no_fsync_still_keeps_writes_across_kill_9_of_every_node(tmp_path: Path) -> None:
    # Without fsync the page cache holds acknowledged writes: a process crash keeps them.
    extra = ("--unsafe-no-fsync",)
    with LocalCluster.create(tmp_path, nodes=3, shards=2, replicas=3, extra_args=extra) as c:
        c.start()
        items = {f"fs-{i}".encode(): f"v{i}".encode() for i in range(100)}
        asyncio.run(_put_all(c.endpoints, items))
        _crash_and_restart_all(c)
        assert asyncio.run(_get_all(c.endpoints, list(items))) == items
        # term and vote are saved (and fsynced) whatever the journal does
        for node in c.nodes.values():
            assert list(node.data_dir.glob("shard-*/meta.json"))
