"""Placement: shard id → the nodes that hold its replicas (our small placement driver).

Every node derives the same answer from the cluster file alone: the replicas of shard ``s``
are the first ``replicas`` distinct nodes clockwise from ``mmh3("shard-<s>")`` on a ring of node
points. Callers go through :class:`Placement` only, so moving to a metadata Raft group later
(join/leave at runtime) changes the source of the table, not its users.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import mmh3

NODE_VNODES = 64


def _hash(data: bytes) -> int:
    return int(mmh3.hash(data, seed=1, signed=False))


@dataclass(frozen=True)
class Placement:
    """Deterministic replica sets for ``shards`` shards over ``node_ids``."""

    node_ids: tuple[str, ...]
    shards: int
    replicas: int
    _table: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.node_ids:
            raise ValueError("placement needs at least one node")
        if len(set(self.node_ids)) != len(self.node_ids):
            raise ValueError("node ids must be distinct")
        if not 1 <= self.replicas <= len(self.node_ids):
            raise ValueError(
                f"replicas must be between 1 and the number of nodes ({len(self.node_ids)}), "
                f"got {self.replicas}"
            )
        points = sorted(
            (_hash(f"{n}#{v}".encode()), n)
            for n in sorted(self.node_ids)
            for v in range(NODE_VNODES)
        )
        keys = [p for p, _ in points]
        table = []
        for s in range(self.shards):
            start = bisect.bisect_right(keys, _hash(f"shard-{s}".encode()))
            chosen: list[str] = []
            for i in range(len(points)):
                node = points[(start + i) % len(points)][1]
                if node not in chosen:
                    chosen.append(node)
                    if len(chosen) == self.replicas:
                        break
            table.append(tuple(chosen))
        object.__setattr__(self, "_table", tuple(table))

    def replicas_of(self, shard_id: int) -> tuple[str, ...]:
        """The nodes holding ``shard_id``, in placement order."""
        return self._table[shard_id]

    def shards_on(self, node_id: str) -> list[int]:
        """The shards that have a replica on ``node_id``."""
        return [s for s, nodes in enumerate(self._table) if node_id in nodes]

    @classmethod
    def of(cls, node_ids: Sequence[str], shards: int, replicas: int) -> Placement:
        return cls(tuple(node_ids), shards, replicas)
