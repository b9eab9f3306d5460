"""The cluster view: which nodes exist and where each shard's replicas live, with an epoch.

One immutable object, swapped whole. Every part of a node (router, Raft transport, leader
balancer, the replica mover) and every client reads only the current view; nothing else
decides placement. The cluster file only *bootstraps* the view (epoch 1, computed the same
way on every node); after that the view lives in the meta group, a Raft group of its own, and
every change to it is a new view with the epoch one higher.

Each group (every shard, and the meta group itself) has ``replicas``, its voters as of the
last completed step, and ``target``, where it is going. They differ while a move is in
progress; the mover (:mod:`raftkv.mover`) closes the gap one Raft membership change at a time
and records each completed step here.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from raftkv._pb.raftkv.v1 import admin_pb2 as pb
from raftkv.config import ClusterConfig, ConfigError, NodeAddress, split_hostport
from raftkv.placement import Placement, meta_members, rebalanced

# The meta group's shard id on the Raft wire and in the admin API.
META_SHARD = 0xFFFF_FFFF
# The key under which the meta group's state machine holds the encoded view.
VIEW_KEY = b"view"

ACTIVE = "active"
LEAVING = "leaving"
DEAD = "dead"
_STATES = {pb.NodeEntry.ACTIVE: ACTIVE, pb.NodeEntry.LEAVING: LEAVING, pb.NodeEntry.DEAD: DEAD}
_STATE_CODES = {v: k for k, v in _STATES.items()}


def group_name(shard_id: int) -> str:
    return "meta" if shard_id == META_SHARD else f"shard {shard_id}"


@dataclass(frozen=True)
class ViewNode:
    id: str
    grpc: str
    raft: str
    state: str = ACTIVE

    @property
    def address(self) -> NodeAddress:
        return NodeAddress(self.id, self.grpc, self.raft)


@dataclass(frozen=True)
class Group:
    """One Raft group's placement: voters now, and where it is going."""

    replicas: tuple[str, ...]
    target: tuple[str, ...]

    @property
    def moving(self) -> bool:
        return set(self.replicas) != set(self.target)

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every node that holds (or is about to hold) a replica, in a stable order."""
        return self.replicas + tuple(n for n in self.target if n not in self.replicas)


@dataclass(frozen=True)
class ClusterView:
    cluster_id: str
    epoch: int
    shards: int
    replicas: int
    vnodes: int
    nodes: tuple[ViewNode, ...]
    placement: tuple[Group, ...]
    meta: Group

    # -- reading ---------------------------------------------------------------------------

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(n.id for n in self.nodes)

    def node(self, node_id: str) -> ViewNode | None:
        for n in self.nodes:
            if n.id == node_id:
                return n
        return None

    def group(self, shard_id: int) -> Group:
        return self.meta if shard_id == META_SHARD else self.placement[shard_id]

    def groups(self) -> Iterable[tuple[int, Group]]:
        yield from enumerate(self.placement)
        yield META_SHARD, self.meta

    def hosted_by(self, node_id: str) -> list[int]:
        """Every group (shards, then the meta group) with a replica on ``node_id``."""
        return [s for s, g in self.groups() if node_id in g.hosts]

    def as_config(self, secret: str | None = None) -> ClusterConfig:
        """The node table as a cluster config (for a node that joined without a file)."""
        return ClusterConfig(
            shards=self.shards,
            replicas=min(self.replicas, len(self.nodes)),
            nodes=tuple(n.address for n in self.nodes),
            vnodes=self.vnodes,
            secret=secret,
        )

    def endpoints(self) -> dict[str, str]:
        return {n.id: n.grpc for n in self.nodes}

    def moves(self) -> list[str]:
        """The moves in progress, one line each: ``shard 3: n1,n2,n3 -> n1,n2,n4``."""
        return [
            f"{group_name(s)}: {','.join(g.replicas)} -> {','.join(g.target)}"
            for s, g in self.groups()
            if g.moving
        ]

    # -- changing (each returns a new view, epoch + 1) -------------------------------------

    def _next(self, **changes: object) -> ClusterView:
        return replace(self, epoch=self.epoch + 1, **changes)  # type: ignore[arg-type]

    def with_member(self, node_id: str, grpc: str, raft: str) -> ClusterView:
        """Add a node (replicas move onto it once the plan is applied)."""
        for addr, what in ((grpc, "grpc"), (raft, "raft")):
            split_hostport(addr, f"{node_id}.{what}")
        existing = self.node(node_id)
        if existing is not None:
            if (existing.grpc, existing.raft) == (grpc, raft) and existing.state == ACTIVE:
                return self
            raise ConfigError(
                f"node {node_id} is already a member ({existing.state}, grpc {existing.grpc}, "
                f"raft {existing.raft}); remove it first or pick another id"
            )
        for n in self.nodes:
            if grpc in (n.grpc, n.raft) or raft in (n.grpc, n.raft):
                raise ConfigError(
                    f"address {grpc if grpc in (n.grpc, n.raft) else raft} "
                    f"is already used by node {n.id}"
                )
        return self._next(nodes=(*self.nodes, ViewNode(node_id, grpc, raft)))

    def with_member_leaving(self, node_id: str, dead: bool) -> ClusterView:
        node = self.node(node_id)
        if node is None:
            raise ConfigError(
                f"node {node_id} is not a member (members: {', '.join(self.node_ids)})"
            )
        state = DEAD if dead else LEAVING
        if node.state == state:
            return self
        remaining = [n for n in self.nodes if n.state == ACTIVE and n.id != node_id]
        # A planned drain must never leave a group below the replication factor. A dead node
        # is gone whatever we decide: its groups run with fewer replicas until a node joins
        # (and the planner fills them up again).
        if not remaining or (not dead and len(remaining) < self.replicas):
            raise ConfigError(
                f"cannot remove {node_id}: {len(remaining)} active nodes would remain, fewer "
                f"than the replication factor {self.replicas}; add a node first"
            )
        nodes = tuple(replace(n, state=state) if n.id == node_id else n for n in self.nodes)
        return self._next(nodes=nodes)

    def planned(self) -> ClusterView:
        """Targets for the active nodes: minimal movement, balanced (see placement.rebalanced)."""
        active = [n.id for n in self.nodes if n.state == ACTIVE]
        targets = rebalanced([g.target for g in self.placement], active, self.replicas)
        placement = tuple(
            Group(g.replicas, t) for g, t in zip(self.placement, targets, strict=True)
        )
        meta = Group(self.meta.replicas, meta_members(self.meta.target, active))
        if placement == self.placement and meta == self.meta:
            return self
        return self._next(placement=placement, meta=meta)

    def with_group(self, shard_id: int, replicas: Sequence[str]) -> ClusterView:
        """Record a completed membership step of one group."""
        g = self.group(shard_id)
        done = set(replicas) == set(g.target)
        new = Group(g.target if done else tuple(replicas), g.target)
        if shard_id == META_SHARD:
            return self._next(meta=new)
        placement = list(self.placement)
        placement[shard_id] = new
        return self._next(placement=tuple(placement))

    def without_drained(self) -> ClusterView:
        """Drop leaving or dead nodes that no group holds any more."""
        held = {n for _, g in self.groups() for n in g.hosts}
        keep = tuple(n for n in self.nodes if n.state == ACTIVE or n.id in held)
        return self if keep == self.nodes else self._next(nodes=keep)

    # -- codec -----------------------------------------------------------------------------

    def to_proto(self) -> pb.ClusterView:
        return pb.ClusterView(
            cluster_id=self.cluster_id,
            epoch=self.epoch,
            shards=self.shards,
            replicas=self.replicas,
            vnodes=self.vnodes,
            nodes=[
                pb.NodeEntry(id=n.id, grpc=n.grpc, raft=n.raft, state=_STATE_CODES[n.state])
                for n in self.nodes
            ],
            placement=[
                pb.ShardPlacement(replicas=g.replicas, target=g.target) for g in self.placement
            ],
            meta=pb.ShardPlacement(replicas=self.meta.replicas, target=self.meta.target),
        )

    def encode(self) -> bytes:
        return self.to_proto().SerializeToString(deterministic=True)

    @classmethod
    def from_proto(cls, p: pb.ClusterView) -> ClusterView:
        if len(p.placement) != p.shards or not p.nodes or not p.cluster_id:
            raise ValueError("a cluster view needs a cluster id, nodes and one group per shard")
        return cls(
            cluster_id=p.cluster_id,
            epoch=p.epoch,
            shards=p.shards,
            replicas=p.replicas,
            vnodes=p.vnodes,
            nodes=tuple(ViewNode(n.id, n.grpc, n.raft, _STATES[n.state]) for n in p.nodes),
            placement=tuple(Group(tuple(g.replicas), tuple(g.target)) for g in p.placement),
            meta=Group(tuple(p.meta.replicas), tuple(p.meta.target)),
        )

    @classmethod
    def decode(cls, data: bytes) -> ClusterView:
        p = pb.ClusterView()
        p.ParseFromString(data)
        return cls.from_proto(p)

    @classmethod
    def bootstrap(cls, cluster: ClusterConfig) -> ClusterView:
        """Epoch 1, from the cluster file: the same on every node that reads the same file."""
        placement = Placement.of(cluster.node_ids, cluster.shards, cluster.replicas)
        groups = tuple(
            Group(placement.replicas_of(s), placement.replicas_of(s)) for s in range(cluster.shards)
        )
        meta = meta_members((), sorted(cluster.node_ids))
        return cls(
            cluster_id=cluster.fingerprint,
            epoch=1,
            shards=cluster.shards,
            replicas=cluster.replicas,
            vnodes=cluster.vnodes,
            nodes=tuple(ViewNode(n.id, n.grpc, n.raft) for n in cluster.nodes),
            placement=groups,
            meta=Group(meta, meta),
        )
