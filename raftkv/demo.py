"""``raftkv demo``: the failover and membership stories, told with local processes.

The failover story (the default) starts a 3-node cluster of real ``raftkv serve`` processes,
writes keys, kills the node that leads the most shards with SIGKILL, shows the new leaders,
reads every key back and writes more, restarts the killed node and shows it catch up. Each
step is narrated, and each claim is checked: the command exits non-zero if any key is lost or a
write cannot be served in time, so scripts and CI can rely on it.

The membership story (``--story membership``) shows a cluster changing at runtime: start 3
nodes, write 100,000 keys, add a 4th and a 5th node (watching the replicas move in status),
remove a node, replace a node killed for good, and find every key intact.
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import typer

from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv.client import Client
from raftkv.config import ClusterConfig
from raftkv.testing.cluster import LocalCluster, wait_for


def say(step: str) -> None:
    typer.secho(f"\n==> {step}", bold=True)


def _status_table(cluster: LocalCluster) -> str:
    from raftkv.cli import render_status

    return render_status(cluster.status())


async def _write(endpoints: list[str], keys: range, tag: str, timeout: float) -> None:
    async with Client(endpoints, timeout=timeout) as c:
        await asyncio.gather(*(c.put(f"demo-{i}".encode(), f"{tag}-{i}".encode()) for i in keys))


async def _read(endpoints: list[str], keys: range) -> dict[int, bytes]:
    async with Client(endpoints) as c:
        values = await asyncio.gather(*(c.get(f"demo-{i}".encode()) for i in keys))
    return {i: v.value for i, v in zip(keys, values, strict=True)}


async def _first_write_per_shard(endpoints: list[str], shards: int, deadline_s: float) -> float:
    """Seconds until a write has succeeded on every shard (keys chosen to cover them all)."""
    from raftkv.ring import Ring

    ring = Ring(shards)
    keys: dict[int, bytes] = {}
    i = 0
    while len(keys) < shards:
        k = f"probe-{i}".encode()
        keys.setdefault(ring.shard_for(k), k)
        i += 1
    start = time.monotonic()
    async with Client(endpoints, timeout=deadline_s) as c:
        await asyncio.gather(*(c.put(k, b"after-failover") for k in keys.values()))
    return time.monotonic() - start


def _tell(
    story: Callable[[LocalCluster], bool], base_port: int, directory: Path | None, done: str
) -> None:
    """Start 3 nodes, tell ``story`` on them, stop them, clean up, and say how it ended
    (exit 1 if the story's checks failed)."""
    work = directory or Path(tempfile.mkdtemp(prefix="raftkv-demo-"))
    config = ClusterConfig.local(3, 8, 3, base_port)
    with LocalCluster(config, work) as cluster:
        say(f"Starting 3 nodes (8 shards, 3 replicas each) in {work}")
        cluster.start(timeout=60)
        ok = story(cluster)
        say("Stopping every node")
    if directory is None:
        shutil.rmtree(work, ignore_errors=True)
    if not ok:
        typer.secho("demo FAILED: see the lines above", fg="red", err=True)
        raise typer.Exit(1)
    typer.secho(f"\ndemo OK: {done}", fg="green")


def run(keys: int, base_port: int, directory: Path | None) -> None:
    _tell(
        lambda cluster: _failover(cluster, keys),
        base_port,
        directory,
        "no acknowledged write was lost",
    )


def _failover(cluster: LocalCluster, keys: int) -> bool:
    ok = True
    for n in cluster.nodes.values():
        typer.echo(f"    {n.id}: pid {n.pid}, gRPC {n.address.grpc}, Raft {n.address.raft}")
    endpoints = cluster.endpoints

    say(f"Writing {keys} keys through all three nodes")
    asyncio.run(_write(endpoints, range(keys), "v1", 30))
    typer.echo(f"    wrote demo-0 .. demo-{keys - 1}")

    say("Cluster status: every shard has a leader; commit indexes agree")
    typer.echo(_status_table(cluster))

    victim = cluster.busiest_leader()
    led = sorted(s for s, n in cluster.leaders().items() if n == victim)
    say(f"Killing {victim} with SIGKILL: it leads shards {led}")
    cluster.kill(victim)
    survivors = cluster.running_endpoints()
    took = asyncio.run(_first_write_per_shard(survivors, cluster.config.shards, 10))
    typer.echo(f"    every shard accepted a write {took:.2f}s after the kill")
    if took > 10:
        ok = False
    cluster.wait_leaders(30, exclude={victim})

    say("New leaders (the killed node shows as unreachable)")
    typer.echo(_status_table(cluster))

    say(f"Reading back all {keys} keys, then writing {keys} more, with {victim} down")
    got = asyncio.run(_read(survivors, range(keys)))
    lost = [i for i in range(keys) if got.get(i) != f"v1-{i}".encode()]
    typer.echo(f"    {keys - len(lost)}/{keys} keys read back intact")
    ok &= not lost
    asyncio.run(_write(survivors, range(keys, 2 * keys), "v2", 30))
    typer.echo(f"    wrote demo-{keys} .. demo-{2 * keys - 1}")

    say(f"Restarting {victim}; it replays its journal and catches up from the leaders")
    cluster.start_node(victim)

    def caught_up() -> bool:
        s = cluster.status()
        return all(
            len(sh.replica_status) == 3 and len({r.commit_index for r in sh.replica_status}) == 1
            for sh in s.shards
        )

    try:
        wait_for(caught_up, 30, f"{victim} to catch up")
        typer.echo(f"    {victim} caught up: every replica has the same commit index")
    except TimeoutError as e:
        typer.echo(f"    {e}")
        ok = False
    typer.echo(_status_table(cluster))

    got = asyncio.run(_read(cluster.endpoints, range(2 * keys)))
    intact = sum(got[i] == (f"v1-{i}" if i < keys else f"v2-{i}").encode() for i in range(2 * keys))
    typer.echo(f"    {intact}/{2 * keys} keys intact across the whole story")
    ok &= intact == 2 * keys
    return ok


# -- the membership story ---------------------------------------------------------------------

_BULK = 2000  # keys per PutMany/GetMany while filling and checking


def _value(i: int) -> bytes:
    return f"value-{i}".encode()


async def _fill(endpoints: list[str], keys: int) -> None:
    async with Client(endpoints, timeout=60) as c:
        for start in range(0, keys, _BULK):
            batch = range(start, min(keys, start + _BULK))
            await c.put_many([(f"demo-{i}".encode(), _value(i)) for i in batch])


async def _count_intact(endpoints: list[str], keys: int) -> int:
    intact = 0
    async with Client(endpoints, timeout=60) as c:
        for start in range(0, keys, _BULK):
            batch = range(start, min(keys, start + _BULK))
            found = await c.get_many([f"demo-{i}".encode() for i in batch])
            intact += sum(
                r is not None and r.value == _value(i) for i, r in zip(batch, found, strict=True)
            )
    return intact


def _watch_moves(
    cluster: LocalCluster, until: Callable[[kv.StatusResponse], bool], what: str
) -> bool:
    """Print the epoch and the moves whenever they change, until ``until(status)`` (3 min)."""
    last = ""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            s = cluster.status()
        except Exception:  # a node between restarts: ask again
            time.sleep(0.2)
            continue
        line = f"    epoch {s.epoch}: " + ("; ".join(s.moves) if s.moves else "no moves")
        if s.stuck_moves:
            # Usually transient (a new node still starting); the mover retries every round.
            line += f" ({len(s.stuck_moves)} waiting: {s.stuck_moves[0][:70]}...)"
        if line != last:
            typer.echo(line)
            last = line
        if until(s):
            return True
        time.sleep(0.25)
    typer.echo(f"    timed out waiting for {what}")
    return False


def _settled_with(node_id: str) -> Callable[[kv.StatusResponse], bool]:
    return lambda s: not s.moves and node_id in _members(s)


def _serve_line(cluster: LocalCluster, node_id: str) -> str:
    """The ``raftkv serve --join ...`` command line the node was started with."""
    return shlex.join(["raftkv", *cluster.command(node_id)[3:]])


def _members(s: kv.StatusResponse) -> list[str]:
    return [n.id for n in s.nodes]


def _replica_counts(s: kv.StatusResponse) -> str:
    counts: dict[str, int] = {}
    for sh in s.shards:
        for n in sh.replicas:
            counts[n] = counts.get(n, 0) + 1
    return ", ".join(f"{n}: {counts[n]}" for n in sorted(counts))


def run_membership(keys: int, base_port: int, directory: Path | None) -> None:
    _tell(
        lambda cluster: _membership(cluster, keys),
        base_port,
        directory,
        "the cluster grew, shrank and healed; no key was lost",
    )


def _membership(cluster: LocalCluster, keys: int) -> bool:
    ok = True
    say(f"Writing {keys} keys")
    started = time.monotonic()
    asyncio.run(_fill(cluster.endpoints, keys))
    typer.echo(f"    wrote demo-0 .. demo-{keys - 1} in {time.monotonic() - started:.1f}s")

    for new in ("n4", "n5"):
        say(f"Adding {new}: one command on the new machine")
        cluster.add_node(new)
        typer.echo(f"    $ {_serve_line(cluster, new)}")
        ok &= _watch_moves(cluster, _settled_with(new), f"{new}'s moves")
        typer.echo(f"    replicas per node: {_replica_counts(cluster.status())}")

    say("Removing n2: its replicas drain to the others, then it leaves and stops")
    typer.echo("    $ raftkv admin member remove n2")
    asyncio.run(_admin(cluster, lambda c: c.member_remove("n2")))
    ok &= _watch_moves(cluster, lambda s: "n2" not in _members(s) and not s.moves, "n2")
    cluster.forget_node("n2")

    say("Killing n3 for good (SIGKILL, data dir deleted), then replacing it")
    lost_disk = cluster.nodes["n3"].data_dir
    cluster.forget_node("n3")
    shutil.rmtree(lost_disk, ignore_errors=True)
    typer.echo("    $ raftkv admin member remove n3 --dead")
    asyncio.run(_admin(cluster, lambda c: c.member_remove("n3", dead=True)))
    ok &= _watch_moves(cluster, lambda s: "n3" not in _members(s) and not s.moves, "n3")
    cluster.add_node("n6")
    typer.echo(f"    $ {_serve_line(cluster, 'n6')}")
    ok &= _watch_moves(cluster, lambda s: not s.moves and "n6" in _members(s), "n6's moves")
    status = cluster.status()
    full = all(len(sh.replicas) == 3 for sh in status.shards)
    typer.echo(f"    every shard at 3 replicas: {'yes' if full else 'NO'}")
    typer.echo(f"    replicas per node: {_replica_counts(status)}")
    ok &= full
    typer.echo(_status_table(cluster))

    say(f"Reading all {keys} keys back")
    intact = asyncio.run(_count_intact(cluster.running_endpoints(), keys))
    typer.echo(f"    {intact}/{keys} keys intact")
    ok &= intact == keys
    return ok


async def _admin(cluster: LocalCluster, call: Callable[[Client], Awaitable[object]]) -> None:
    async with Client(cluster.running_endpoints(), timeout=30) as c:
        await call(c)
