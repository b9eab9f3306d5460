"""An in-memory :class:`~raftkv.replica.Replica`, for testing server and node logic without Raft.

hashicorp/raft tests its users against an in-memory transport; raftkv's server handlers, router,
leader balancer and membership code are tested against this instead of a pysyncobj group. A
:class:`FakeReplica` commits every proposal at once, in order, through the real (pure)
:class:`~raftkv.statemachine.StateMachine`, so results, versions, deduplication and
compare-and-swap behave as on a real replica. What Raft would decide is set by the test:

* leadership: :meth:`~FakeReplica.lead`, :meth:`~FakeReplica.follow` (a follower naming a
  leader) and :meth:`~FakeReplica.lose_leader` (no leader known);
* failures: :meth:`~FakeReplica.fail` makes proposals, barriers and membership changes raise
  an error (a lost quorum is ``ProposalTimeout``, a full disk ``NoSpace``) until
  :meth:`~FakeReplica.heal`, or only the next few times.

Like a real replica, a follower refuses proposals and barriers with
:meth:`~FakeReplica.not_leader`, and a barrier is a proposal of ``command.BARRIER``.

:func:`fake_node` builds a :class:`~raftkv.node.Node` whose replicas are fakes, through the
node's ``replica_factory``: the real router, handlers and membership code on top of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from raftkv import command
from raftkv._pb.raftkv.v1 import command_pb2 as pb
from raftkv.config import ClusterConfig, NodeSettings
from raftkv.errors import NotLeader, RaftKVError, Unavailable
from raftkv.node import Node
from raftkv.raft.storage import ReplicaStorage
from raftkv.replica import ReplicaInfo
from raftkv.statemachine import Entry, StateMachine
from raftkv.view import ClusterView

if TYPE_CHECKING:
    from raftkv.replica import Replica


class FakeReplica:
    """One shard's replica on node ``node_id``; it starts as the leader of ``members``."""

    def __init__(
        self, shard_id: int, node_id: str = "n1", members: Sequence[str] = ("n1", "n2", "n3")
    ) -> None:
        self.node_id = node_id
        self._shard_id = shard_id
        self._members = sorted({node_id, *members})
        self.machine = StateMachine()
        self.leader = node_id  # "" while no leader is known
        self.term = 1
        self.index = 0  # the last log index: every proposal (barriers too) commits at once
        self.joining = False
        self.closed = False
        # What the replica was asked to do, for tests to check.
        self.proposed: list[bytes] = []
        self.transfers: list[str] = []
        self._failure: RaftKVError | None = None
        self._failures_left: int | None = None

    # -- what the test decides ------------------------------------------------------------

    def lead(self) -> None:
        """This replica is the leader (in a new term if it was not)."""
        if self.leader != self.node_id:
            self.term += 1
        self.leader = self.node_id

    def follow(self, leader: str) -> None:
        """This replica is a follower of ``leader``."""
        if self.leader != leader:
            self.term += 1
        self.leader = leader

    def lose_leader(self) -> None:
        """No leader is known (an election is under way, or the group lost its quorum)."""
        self.leader = ""

    def fail(self, error: RaftKVError, times: int | None = None) -> None:
        """Make proposals, barriers and membership changes raise ``error``: the next ``times``
        of them, or every one until :meth:`heal`. Leadership is checked first, as a real
        replica does."""
        self._failure = error
        self._failures_left = times

    def heal(self) -> None:
        self._failure = None
        self._failures_left = None

    def _check_failure(self) -> None:
        error = self._failure
        if error is None:
            return
        if self._failures_left is not None:
            self._failures_left -= 1
            if self._failures_left <= 0:
                self.heal()
        raise error

    # -- Replica ----------------------------------------------------------------------------

    @property
    def shard_id(self) -> int:
        return self._shard_id

    @property
    def info(self) -> ReplicaInfo:
        return ReplicaInfo(
            shard_id=self._shard_id,
            role="leader" if self.is_leader else "follower",
            leader=self.leader,
            term=self.term,
            commit_index=self.index,
            last_applied=self.index,
            keys=len(self.machine),
            members=list(self._members),
        )

    @property
    def is_leader(self) -> bool:
        return self.leader == self.node_id

    @property
    def via_leader(self) -> bool:
        # Fakes do not share a log: a follower fake always sends callers on to the leader.
        return False

    @property
    def members(self) -> list[str]:
        return list(self._members)

    def not_leader(self) -> NotLeader:
        leader = self.leader
        return NotLeader(
            f"node {self.node_id} is not the leader of shard {self._shard_id}"
            + (f"; the leader is {leader}" if leader else "; no leader is known yet"),
            shard_id=self._shard_id,
            leader=leader,
        )

    def commit(self, data: bytes) -> tuple[pb.CommandResult, int]:
        """Apply ``data`` as the group's next entry, whoever proposed it (a test writing
        behind the replica's back: another leader's entry, say)."""
        self.index += 1
        return self.machine.apply(data, self.index), self.index

    async def propose(self, data: bytes, timeout: float) -> tuple[pb.CommandResult, int]:
        if not self.is_leader:
            raise self.not_leader()
        self._check_failure()
        self.proposed.append(data)
        return self.commit(data)

    async def read_index(self, timeout: float) -> int:
        _, index = await self.propose(command.BARRIER, timeout)
        return index

    def read_local(self, key: bytes) -> Entry | None:
        return self.machine.get(key)

    async def snapshot_items(self) -> tuple[int, dict[bytes, Entry]]:
        return self.index, self.machine.items()

    def transfer_leadership(self, target: str) -> None:
        """Recorded in :attr:`transfers`; a leader hands over at once (a real one may not)."""
        self.transfers.append(target)
        if self.is_leader and target in self._members:
            self.follow(target)

    async def change_member(self, remove: bool, node_id: str, timeout: float) -> list[str]:
        if not self.is_leader:
            raise self.not_leader()
        self._check_failure()
        if (node_id in self._members) == remove:
            if remove and node_id == self.node_id:
                # As a real leader does: hand leadership away and have the caller retry there.
                successor = next((n for n in self._members if n != node_id), "")
                if successor:
                    self.transfer_leadership(successor)
                raise Unavailable(
                    f"shard {self._shard_id}: handing leadership to {successor or 'another'}"
                    f" replica before removing {node_id}; retry there",
                    shard_id=self._shard_id,
                    leader=successor,
                )
            self.index += 1
            members = set(self._members)
            (members.discard if remove else members.add)(node_id)
            self._members = sorted(members)
        return list(self._members)

    def close(self) -> None:
        self.closed = True


def fake_node(
    data_dir: Path, *, node_id: str = "n1", nodes: int = 3, shards: int = 2
) -> tuple[Node, dict[int, FakeReplica]]:
    """A :class:`~raftkv.node.Node` of a local ``nodes``-node cluster whose replicas are fakes.

    The node routes as a started node does, but has no Raft thread and binds no port: each
    of its replicas is a :class:`FakeReplica` that leads its group as the cluster file places
    it. Its data dir (node.json, the view, empty replica directories) is real. Returns
    the node and its fakes by group id (``raftkv.view.META_SHARD`` for the meta group).
    """
    cluster = ClusterConfig.local(nodes, shards, min(3, nodes), 7001)
    view = ClusterView.bootstrap(cluster)
    fakes: dict[int, FakeReplica] = {}

    def make(shard_id: int, storage: ReplicaStorage) -> FakeReplica:
        storage.journal._destroy()  # the fake keeps its log in memory
        fake = FakeReplica(shard_id, node_id, view.group(shard_id).replicas)
        fakes[shard_id] = fake
        return fake

    settings = NodeSettings(node_id, data_dir, data_dir / "logs")
    node = Node(cluster, settings, replica_factory=make)
    node.started = True  # without node.start(): no Raft thread, no Raft port
    return node, fakes


if TYPE_CHECKING:
    # mypy --strict checks that the fake offers everything the seam asks of a replica.
    _IS_A_REPLICA: type[Replica] = FakeReplica
