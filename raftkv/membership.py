"""Membership: changing the cluster view in the meta group, and moving replicas to match it.

Two pieces, both running at the meta group's leader:

* :class:`ViewStore` reads the view linearizably and changes it with a compare-and-swap on
  the meta group's ``view`` key, so two changes can never both apply to the same epoch (an
  operator's ``member add`` and the mover's progress, or two leaders in turn).
* :class:`Mover` closes the gap between each group's ``replicas`` and its ``target``, one
  Raft membership change at a time, as PD's operators do in TiKV:

  1. the node a replica moves onto opens an empty replica, which does not campaign until
     the leader has added it (``PrepareReplica``);
  2. the shard's leader adds it as a voter, and answers once the change has committed and the
     new replica holds the log up to the commit index (snapshot, then log);
  3. only then is a replica removed; a leader that is to be removed first hands its
     leadership to another voter;
  4. each completed step is recorded in the view (epoch + 1); a node whose replica is no
     longer in the view stops it and deletes its data, which is after the removal committed.

  Adds come before removes, so a planned move never takes a group below its replication
  factor. Every step is idempotent and derived from the group's actual voters, so a move that
  a crash interrupted simply resumes; pysyncobj refuses a second change while one is
  uncommitted, so a group never has two configurations in use. A group that has lost its
  quorum has no leader to change it: the mover reports it and never guesses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from raftkv import command
from raftkv._pb.raftkv.v1 import admin_pb2 as admin
from raftkv._pb.raftkv.v1 import command_pb2 as cmd_pb
from raftkv.config import ConfigError
from raftkv.errors import InvalidArgument, RaftKVError, Unavailable
from raftkv.throttle import Throttle
from raftkv.view import DEAD, META_SHARD, VIEW_KEY, ClusterView, Group, group_name

if TYPE_CHECKING:
    from raftkv.node import Node, Peer
    from raftkv.replica import Replica

log = logging.getLogger("raftkv.membership")

# How often the meta leader looks for work; each round takes one step per moving group.
MOVE_INTERVAL_S = 0.5
# A membership step (including the new replica's catch-up) must finish within this.
STEP_TIMEOUT_S = 20.0
# Groups moved at once: each move copies a shard over the network.
PARALLEL_MOVES = 4


class ViewStore:
    """The cluster view as the meta group holds it; used at the meta leader only."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._lock = asyncio.Lock()

    async def read(self, replica: Replica, timeout: float) -> tuple[ClusterView, int]:
        """The committed view (linearizable) and its version in the meta group (0: none yet)."""
        await replica.read_index(timeout)
        entry = replica.read_local(VIEW_KEY)
        if entry is None:
            return self.node.bootstrap_view(), 0
        return ClusterView.decode(entry.value), entry.version

    async def update(
        self, replica: Replica, change: Callable[[ClusterView], ClusterView], timeout: float
    ) -> tuple[ClusterView, ClusterView]:
        """Apply ``change`` to the committed view; return (before, after)."""
        async with self._lock:
            for _ in range(5):
                view, version = await self.read(replica, timeout)
                try:
                    new = change(view)
                except ConfigError as e:
                    raise InvalidArgument(str(e)) from None
                if new is view:
                    return view, view
                result, _ = await replica.propose(
                    command.cas(VIEW_KEY, new.encode(), expected_version=version), timeout
                )
                if result.code == cmd_pb.CommandResult.OK:
                    log.info(
                        "cluster view epoch %d -> %d%s",
                        view.epoch,
                        new.epoch,
                        "; moves: " + "; ".join(new.moves()) if new.moves() else "",
                    )
                    await self.node.apply_view(new)
                    return view, new
            raise Unavailable("the cluster view kept changing under this update; retry")


class Mover:
    """Moves replicas until every group's voters are its target (at the meta leader)."""

    def __init__(self, node: Node, store: ViewStore) -> None:
        self.node = node
        self.store = store
        # Why a group is not moving, for status and logs (shard id → reason).
        self.stuck = node.stuck_moves
        self._throttle = Throttle(interval_s=10.0)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(MOVE_INTERVAL_S)
            meta = self.node.replicas.get(META_SHARD)
            if meta is None or not meta.is_leader:
                self.stuck.clear()  # the meta leader reports them, whoever that is now
                continue
            try:
                await self.round(meta)
            except RaftKVError as e:
                if self._throttle.allow(f"round:{type(e).__name__}"):
                    log.warning("replica mover: %s", e)
            except Exception:
                if self._throttle.allow("round:bug"):
                    log.exception("replica mover failed")

    async def round(self, meta: Replica) -> None:
        view, _ = await self.store.read(meta, STEP_TIMEOUT_S)
        moving = [(s, g) for s, g in view.groups() if g.moving]
        if not moving:
            self.stuck.clear()
            await self.store.update(meta, lambda v: v.without_drained(), 5.0)
            return
        gate = asyncio.Semaphore(PARALLEL_MOVES)

        async def one(shard_id: int, group: Group) -> None:
            async with gate:
                try:
                    members = await self.step(view, shard_id, group)
                except RaftKVError as e:
                    self.stuck[shard_id] = _why_stuck(view, group, e)
                    if self._throttle.allow(f"step:{shard_id}:{type(e).__name__}"):
                        log.warning("moving %s: %s", group_name(shard_id), e)
                    return
                self.stuck.pop(shard_id, None)
                await self.store.update(
                    meta, lambda v: _record(v, shard_id, group, members), STEP_TIMEOUT_S
                )

        await asyncio.gather(*(one(s, g) for s, g in moving))

    async def step(self, view: ClusterView, shard_id: int, group: Group) -> list[str]:
        """One membership change towards the target; returns the group's voters after it."""
        adds = [n for n in group.target if n not in group.replicas]
        if adds:
            node_id = adds[0]
            await self._prepare(node_id, shard_id, view.epoch)
            log.info("%s: adding a replica on %s", group_name(shard_id), node_id)
            return await self.change(shard_id, remove=False, node_id=node_id, epoch=view.epoch)
        node_id = next(n for n in group.replicas if n not in group.target)
        log.info("%s: removing the replica on %s", group_name(shard_id), node_id)
        return await self.change(shard_id, remove=True, node_id=node_id, epoch=view.epoch)

    async def _prepare(self, node_id: str, shard_id: int, epoch: int) -> None:
        if node_id == self.node.id:
            await self.node.open_replica(shard_id)
            return
        peer = self.node.peers.get(node_id)
        if peer is None:
            raise Unavailable(f"{node_id} is not in this node's view yet")
        try:
            await peer.admin.PrepareReplica(
                admin.PrepareReplicaRequest(shard_id=shard_id, epoch=epoch),
                timeout=10.0,
                metadata=self.node.node_metadata(),
            )
        except grpc.aio.AioRpcError as e:
            raise Unavailable(
                f"{node_id} cannot open its new replica of {group_name(shard_id)} yet: "
                f"{e.details() or e.code().name} (is it running?)"
            ) from None

    async def change(self, shard_id: int, *, remove: bool, node_id: str, epoch: int) -> list[str]:
        """Run one membership change at the group's leader, wherever it is."""
        return await change_replicas(self.node, shard_id, remove, node_id, epoch, forwarded=False)


def _why_stuck(view: ClusterView, group: Group, error: RaftKVError) -> str:
    """What to tell an operator about a step that failed."""
    dead = [n for n in group.replicas if (node := view.node(n)) is not None and node.state == DEAD]
    if (
        isinstance(error, Unavailable)
        and len(dead) >= len(group.replicas) - len(group.replicas) // 2
    ):
        return (
            f"no leader: it has lost its quorum ({len(dead)} of its {len(group.replicas)} "
            f"voters {','.join(group.replicas)} are dead: {','.join(dead)}); raftkv will not "
            "guess at its data: bring a dead voter back with its data dir, or restore a backup"
        )
    return str(error)


def _record(view: ClusterView, shard_id: int, was: Group, members: list[str]) -> ClusterView:
    """The view with one group's completed step, unless the group changed meanwhile."""
    group = view.group(shard_id)
    if group.target != was.target or set(group.replicas) == set(members):
        return view
    order: dict[str, int] = {}
    for n in (*group.target, *group.replicas):
        order.setdefault(n, len(order))
    return view.with_group(shard_id, sorted(members, key=lambda n: order.get(n, len(order))))


async def change_replicas(
    node: Node, shard_id: int, remove: bool, node_id: str, epoch: int, *, forwarded: bool
) -> list[str]:
    """Add or remove one voter of a group at its leader (here, or one hop away)."""
    deadline = time.monotonic() + STEP_TIMEOUT_S
    request = admin.ChangeReplicasRequest(
        shard_id=shard_id, remove=remove, node_id=node_id, epoch=epoch
    )

    async def local(replica: Replica) -> list[str]:
        return await replica.change_member(remove, node_id, max(0.1, deadline - time.monotonic()))

    async def remote(peer: Peer, timeout: float) -> list[str]:
        reply = await peer.admin.ChangeReplicas(
            request, timeout=timeout, metadata=node.node_metadata()
        )
        return list(reply.members)

    if shard_id != META_SHARD and shard_id >= node.view.shards:
        raise InvalidArgument(f"shard {shard_id} does not exist")
    return await node.route(shard_id, local, remote, forwarded=forwarded, deadline=deadline)
