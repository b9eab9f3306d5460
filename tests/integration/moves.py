"""Helpers for the tests that move replicas between real node processes.

Shared by ``test_reconfiguration.py`` (nodes join, leave, are replaced) and
``test_move_crashes.py`` (nodes are killed in the middle of a move): a background writer that
records which writes were acknowledged, waits for the view to settle or a membership change to
finish, a read-back of every acknowledged key, and the ``raftkv admin`` command line.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv.errors import RaftKVError
from raftkv.testing.cluster import LocalCluster, wait_for
from raftkv.testing.nemesis import converged


class Writer:
    """Writes keys in the background (bounded in count and time) and records the acked ones."""

    def __init__(self, cluster: LocalCluster, prefix: str, limit: int = 5000) -> None:
        self.cluster = cluster
        self.prefix = prefix
        self.limit = limit
        self.acked: dict[bytes, bytes] = {}
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        deadline = time.monotonic() + 240
        async with self.cluster.client(timeout=10) as cl:
            for i in range(self.limit):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                key, value = f"{self.prefix}-{i}".encode(), f"v{i}".encode()
                try:
                    await cl.put(key, value)
                except RaftKVError:
                    self.failed += 1
                    continue
                self.acked[key] = value

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def read_all(c: LocalCluster, node: str, keys: list[bytes]) -> dict[bytes, bytes | None]:
    async def run() -> dict[bytes, bytes | None]:
        async with c.client([c.endpoint(node)], timeout=30, leader_aware=False) as cl:
            found = await cl.get_many(keys)
            return dict(zip(keys, [r.value if r else None for r in found], strict=True))

    return asyncio.run(run())


def settled(c: LocalCluster, node: str, min_epoch: int) -> kv.StatusResponse | None:
    """The status once the view is past ``min_epoch`` and no move is in progress."""
    s = c.status(node)
    return s if s.epoch >= min_epoch and not s.moves else None


def replica_load(s: kv.StatusResponse) -> Counter[str]:
    """How many shard replicas each node holds, as the status's view places them."""
    return Counter(n for sh in s.shards for n in sh.replicas)


def wait_converged(c: LocalCluster) -> None:
    """Every replica of every shard: the same applied index and data digest (60 s at most)."""
    ok, detail = wait_for(lambda: (lambda r: r if r[0] else None)(converged(c)), 60, "converge")
    assert ok, detail


def wait_membership(c: LocalCluster, node_id: str, *, member: bool, what: str) -> Any:
    """Wait (120 s at most) until no move is left and ``node_id`` is (not) a member."""

    ask = next(n for n in sorted(c.nodes) if n != node_id and c.nodes[n].running)

    def done() -> Any:
        s = c.status(ask)
        return s if not s.moves and (node_id in [n.id for n in s.nodes]) == member else None

    return wait_for(done, 120, what)


@dataclass(frozen=True)
class Move:
    """One group's move in progress, parsed from a status line ``shard 3: n1,n2,n3 -> n1,n2,n4``.

    ``replicas`` are the group's voters as of the last completed step, ``target`` where it is
    going: a node in the target only is receiving a replica, a node in the replicas only is
    giving one up (it stays a voter until the new replica has been added and caught up).
    """

    group: str
    replicas: frozenset[str]
    target: frozenset[str]

    @classmethod
    def parse(cls, line: str) -> Move:
        group, sep, change = line.partition(": ")
        before, arrow, after = change.partition(" -> ")
        if not sep or not arrow:
            raise ValueError(f"not a move: {line!r}")
        return cls(group, frozenset(before.split(",")), frozenset(after.split(",")))

    @property
    def receivers(self) -> frozenset[str]:
        return self.target - self.replicas

    @property
    def givers(self) -> frozenset[str]:
        return self.replicas - self.target


def moves(s: kv.StatusResponse) -> list[Move]:
    return [Move.parse(line) for line in s.moves]


def admin(c: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    endpoints = ",".join(c.endpoint(n) for n in c.nodes if c.nodes[n].running)
    env = {**os.environ, **(c.credentials.client_env() if c.credentials else {})}
    return subprocess.run(
        [sys.executable, "-m", "raftkv", "admin", "-e", endpoints, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
