"""The seam between the node's logic and the Raft engine: what a shard replica offers.

The server's handlers, the node's router and leader balancer, and the membership code ask a
replica for exactly these things and nothing else; :class:`Replica` names them. The one real
implementation is :class:`raftkv.shard.ShardReplica` (pysyncobj behind a Raft thread), and
:class:`raftkv.testing.fake_replica.FakeReplica` stands in for it in tests, the way
hashicorp/raft's in-memory transport does, so that logic is tested without elections, threads
or disks.

What a caller must do, as etcd-io/raft's interface comments say:

* Check :attr:`Replica.is_leader` or :attr:`Replica.via_leader` (or be ready for
  :class:`~raftkv.errors.NotLeader`) before proposing or reading: any other follower refuses
  both, naming the leader it knows.
* A proposal or barrier that raises :class:`~raftkv.errors.ProposalTimeout` may still commit:
  retry with the same request id, and the state machine applies it at most once.
* :meth:`Replica.read_local` alone is a stale read. It is linearizable only after a
  :meth:`Replica.read_index` that started after the read did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from raftkv._pb.raftkv.v1 import command_pb2 as pb
from raftkv.errors import NotLeader
from raftkv.statemachine import Entry


@dataclass(frozen=True)
class ReplicaInfo:
    shard_id: int
    role: str
    leader: str
    term: int
    commit_index: int
    last_applied: int
    keys: int
    problem: str = ""
    members: list[str] = field(default_factory=list)
    journal_bytes: int = 0
    # Changes of leader this replica has seen since it started (a new leader, or none).
    leader_changes: int = 0


class Replica(Protocol):
    """This node's replica of one shard (or of the meta group), as the node's logic sees it."""

    @property
    def shard_id(self) -> int: ...

    @property
    def info(self) -> ReplicaInfo:
        """Role, leader, term, indexes, key count and voters, as of the last Raft tick."""
        ...

    @property
    def is_leader(self) -> bool: ...

    @property
    def via_leader(self) -> bool:
        """A follower that proposes and reads linearizably through its leader, over the Raft
        link: the leader is known and its link is up. ``propose`` and ``read_index`` work on
        it as on the leader, and raise NotLeader when the leader changes or refuses."""
        ...

    @property
    def joining(self) -> bool:
        """Created for a move and not yet added by the group's leader (it hears no leader)."""
        ...

    @property
    def members(self) -> list[str]:
        """The group's voters, this replica included, as this replica last saw them."""
        ...

    def not_leader(self) -> NotLeader:
        """The error a follower answers with: it names the leader this replica knows."""
        ...

    async def propose(self, data: bytes, timeout: float) -> tuple[pb.CommandResult, int]:
        """Replicate one encoded command; return its result and the log index it applied at.

        Raises NotLeader on a follower and ProposalTimeout when the outcome is unknown.
        """
        ...

    async def read_index(self, timeout: float) -> int:
        """Wait for a barrier that started after this call; return its log index."""
        ...

    def read_local(self, key: bytes) -> Entry | None:
        """The key in this replica's map, as applied so far (no barrier: may be stale)."""
        ...

    async def snapshot_items(self) -> tuple[int, dict[bytes, Entry]]:
        """(last applied index, a copy of the map), taken where nothing moves meanwhile."""
        ...

    def transfer_leadership(self, target: str) -> None:
        """Ask the group to hand leadership to ``target``; best effort, no answer."""
        ...

    async def change_member(self, remove: bool, node_id: str, timeout: float) -> list[str]:
        """Add or remove one voter (at the leader); return the voters once it has committed."""
        ...

    def close(self) -> None:
        """Stop the replica for good (it left its group, or the node stops)."""
        ...
