"""``raftkv demo``: the failover story, told with local processes.

It starts a 3-node cluster of real ``raftkv serve`` processes, writes keys, kills the node that
leads the most shards with SIGKILL, shows the new leaders, reads every key back and writes more,
restarts the killed node and shows it catch up. Each step is narrated, and each claim is checked:
the command exits non-zero if any key is lost or a write cannot be served in time, so scripts and
CI can rely on it.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import typer

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


def run(keys: int, base_port: int, directory: Path | None) -> None:
    work = directory or Path(tempfile.mkdtemp(prefix="raftkv-demo-"))
    config = ClusterConfig.local(3, 8, 3, base_port)
    ok = True
    with LocalCluster(config, work) as cluster:
        say(f"Starting 3 nodes (8 shards, 3 replicas each) in {work}")
        cluster.start(timeout=60)
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
        took = asyncio.run(_first_write_per_shard(survivors, config.shards, 10))
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
                len(sh.replica_status) == 3
                and len({r.commit_index for r in sh.replica_status}) == 1
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
        intact = sum(
            got[i] == (f"v1-{i}" if i < keys else f"v2-{i}").encode() for i in range(2 * keys)
        )
        typer.echo(f"    {intact}/{2 * keys} keys intact across the whole story")
        ok &= intact == 2 * keys
        say("Stopping every node")
    if directory is None:
        shutil.rmtree(work, ignore_errors=True)
    if not ok:
        typer.secho("demo FAILED: see the lines above", fg="red", err=True)
        raise typer.Exit(1)
    typer.secho("\ndemo OK: no acknowledged write was lost", fg="green")
