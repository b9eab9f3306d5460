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


def rebalanced(
    table: Sequence[Sequence[str]], nodes: Sequence[str], replicas: int
) -> tuple[tuple[str, ...], ...]:
    """The placement ``table`` should move to for ``nodes``, moving as few replicas as possible.

    Minimal movement: a replica stays where it is unless its node is gone (not in ``nodes``)
    or its node holds more than its share. Balance: afterwards every node holds
    ``floor(mean)`` or ``ceil(mean)`` replicas (mean = shards * replicas / nodes), so within
    ±1 of the mean. Going from N to N+1 nodes therefore moves about R·S/(N+1) replicas, the
    new node's share, and nothing else.

    Deterministic (ties break by node id, then shard id), so every node computes the same plan.
    """
    if not nodes:
        raise ValueError("a placement needs at least one node")
    live = sorted(set(nodes))
    want = min(replicas, len(live))
    new: list[list[str]] = [[n for n in shard if n in live] for shard in table]
    load = {n: 0 for n in live}
    for shard in new:
        for n in shard:
            load[n] += 1

    def least_loaded(excluding: Sequence[str]) -> str:
        return min((n for n in live if n not in excluding), key=lambda n: (load[n], n))

    # Replicas lost with their nodes, and groups short of the replication factor: fill up
    # on the least loaded nodes.
    for shard in new:
        while len(shard) < want:
            n = least_loaded(shard)
            shard.append(n)
            load[n] += 1
        while len(shard) > want:
            n = max(shard, key=lambda m: (load[m], m))
            shard.remove(n)
            load[n] -= 1
    # Then even out: move one replica at a time from the busiest node to the idlest one.
    # The busiest holds more shards than the idlest, so one of them is not on the idlest.
    while True:
        busiest = max(live, key=lambda n: (load[n], n))
        idlest = min(live, key=lambda n: (load[n], n))
        if load[busiest] - load[idlest] <= 1:
            break
        for shard in new:
            if busiest in shard and idlest not in shard:
                shard[shard.index(busiest)] = idlest
                load[busiest] -= 1
                load[idlest] += 1
                break
    return tuple(tuple(shard) for shard in new)


def meta_members(current: Sequence[str], nodes: Sequence[str]) -> tuple[str, ...]:
    """The meta group's voters: 3 (5 once there are 5 nodes or more), keeping current ones."""
    live = sorted(set(nodes))
    size = 5 if len(live) >= 5 else min(3, len(live))
    keep = [n for n in current if n in live][:size]
    for n in live:
        if len(keep) == size:
            break
        if n not in keep:
            keep.append(n)
    return tuple(keep)
