"""A pysyncobj group on our storage, whose log holds our protobuf commands.

pysyncobj is a whole Raft implementation, but it pickles commands, membership entries and
snapshots, and some of its choices cost us correctness or speed. :class:`RaftGroup` keeps its
Raft and replaces what we own, through pysyncobj's name-mangled methods:

* applying entries: REGULAR entries go to our pure :class:`~raftkv.statemachine.StateMachine`
  as raw bytes with their log index; nothing is ever unpickled;
* membership entries are our ``ConfChange`` protobuf (:mod:`raftkv.raft.conf_change`);
* snapshots are installed from our checksummed files (:mod:`raftkv.raft.snapshot`), keeping
  the log after the snapshot when Raft's InstallSnapshot rule allows it;
* in fsync mode a leader's commit index counts its own log only as far as it is synced;
* a leader's nextIndex is never moved back by a late reply to a pipelined AppendEntries, and
  one AppendEntries carries at most :data:`APPEND_BATCH_BYTES` of entries.

Storage is ours (:mod:`raftkv.raft.journal`, :mod:`raftkv.raft.snapshot`): checksummed,
checked at start-up, never mmapped and never pickled. pysyncobj only sees it through its
``Journal`` interface (handed over as ``conf.journalFile``, see the ``createJournal`` patch
at the end of this module) and these overrides.

Everything here runs on the node's Raft thread (:mod:`raftkv.raft.driver`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pysyncobj.syncobj as pysyncobj_core
from pysyncobj import FAIL_REASON, SyncObj
from pysyncobj.monotonic import monotonic as pysyncobj_clock
from pysyncobj.node import Node

from raftkv.raft.conf_change import MEMBERSHIP, parse_conf_change
from raftkv.raft.journal import Journal
from raftkv.raft.snapshot import read_snapshot
from raftkv.raft.storage import ReplicaStorage
from raftkv.statemachine import StateMachine

log = logging.getLogger("raftkv.shard")

# pysyncobj's command type bytes; we own everything after REGULAR's (MEMBERSHIP's is in
# conf_change).
REGULAR = b"\x00"
NO_OP = b"\x01"
# Bytes of entries per AppendEntries (plus the entry that crosses it).
APPEND_BATCH_BYTES = 1024 * 1024


class RaftGroup(SyncObj):  # type: ignore[misc]
    """One shard's pysyncobj group, with the overrides the module docstring lists."""

    _SyncObj__raftCommitIndex: int
    _SyncObj__raftLastApplied: int

    def __init__(
        self, shard_id: int, machine: StateMachine, storage: ReplicaStorage, *a: Any, **kw: Any
    ) -> None:
        self._shard_id = shard_id
        self._machine = machine
        self._storage = storage
        # fsync mode: how far this replica's own log is on stable storage (the journal's
        # stored_index). None: the leader's whole log counts, as in pysyncobj.
        self.stable_index: Callable[[], int] | None = None
        self._commit_before_tick = 0
        super().__init__(*a, **kw)

    def _onTick(self, timeToWait: float = 0.0) -> None:
        self._commit_before_tick = int(self._SyncObj__raftCommitIndex)
        SyncObj._onTick(self, timeToWait)

    # pysyncobj's leader advances its commit index counting its own log as stored (``count =
    # 1``), but with the fsync on its own thread the leader's newest entries may still be in
    # the page cache. Its tick applies entries right after that count: first pull the commit
    # index back to what a quorum holds on stable storage, the leader counting only its synced
    # entries, and only to an entry of the current term (Raft §5.4.2), else to where it was.
    def _SyncObj__applyLogEntries(self) -> Any:
        if self.stable_index is not None and self._isLeader():
            self._count_only_stable_entries(self.stable_index())
        return SyncObj._SyncObj__applyLogEntries(self)

    def _count_only_stable_entries(self, stable: int) -> None:
        commit = int(self._SyncObj__raftCommitIndex)
        if commit <= stable:
            return
        match = self._SyncObj__raftMatchIndex
        allowed = stable_commit(
            commit,
            self._commit_before_tick,
            [stable, *(int(match.get(n, 0)) for n in self._SyncObj__otherNodes)],
            self.entry_term,
            int(self.raftCurrentTerm),
        )
        self._SyncObj__raftCommitIndex = allowed
        self._SyncObj__leaderCommitIndex = allowed
        self._SyncObj__raftLog.setRaftCommitIndex(allowed)

    # pysyncobj applies entries through this name-mangled method. REGULAR entries go to our
    # state machine (raw bytes, never unpickled) with their log index; NO_OP does nothing.
    # Nothing is ever handed to pysyncobj's own version, which would unpickle MEMBERSHIP and
    # VERSION entries (the wire codec refuses those too).
    def _SyncObj__doApplyCommand(self, data: bytes) -> Any:
        if data[:1] == REGULAR:
            index = self._SyncObj__raftLastApplied + 1
            return self._machine.apply(data[1:], index)
        return None

    # Membership entries are our ConfChange protobuf behind pysyncobj's MEMBERSHIP byte, never
    # a pickle. pysyncobj applies them when they are appended (and undoes them when a new
    # leader truncates them), one at a time, which is Raft's single-server change; at start-up
    # the configuration is rebuilt from the snapshot and the log (see initial_members), so
    # applying them again on commit is not needed.
    def _SyncObj__parseChangeClusterRequest(self, command: bytes) -> tuple[str, str] | None:
        return parse_conf_change(command)

    def members(self) -> list[str]:
        """Every voter, this replica included, as of the last appended entry."""
        others = self._SyncObj__otherNodes
        return sorted([self._SyncObj__selfNode.id, *(n.id for n in others)])

    def set_members(self, members: set[str]) -> None:
        """Take a configuration from an installed snapshot."""
        me = self._SyncObj__selfNode.id
        for n in self.members():
            if n not in members and n != me:
                self._SyncObj__doChangeCluster(("rem", n))
        for n in sorted(members - set(self.members())):
            self._SyncObj__doChangeCluster(("add", n))

    def change_pending(self) -> bool:
        """Is a membership change appended but not applied yet? (pysyncobj never tracks it:
        its ``__changeClusterIDx`` is never set, so it would take a second change at once.)"""
        journal = self._SyncObj__raftLog
        applied = self._SyncObj__raftLastApplied
        for i in range(len(journal) - 1, -1, -1):
            entry = journal[i]
            if entry[1] <= applied:
                return False
            if entry[0][:1] == MEMBERSHIP:
                return True
        return False

    def match_index(self, node_id: str) -> int:
        return int(self._SyncObj__raftMatchIndex.get(Node(node_id), 0))

    # pysyncobj sets nextIndex[peer] from every successful AppendEntries reply, even a reply
    # to an older request: with entries pipelined (we send as soon as proposals arrive), a
    # late reply moved nextIndex back and the leader re-sent entries the follower already
    # had, which the follower then truncated and re-appended ("truncating already-applied
    # log entries", harmless but costly). Keep the optimistic nextIndex; a failed append
    # still resets it through the reply's reset flag.
    def _SyncObj__onMessageReceived(self, node: Node, message: Any) -> None:
        next_index = self._SyncObj__raftNextIndex
        before = next_index.get(node)
        SyncObj._SyncObj__onMessageReceived(self, node, message)
        if (
            before is not None
            and message.get("type") == "next_node_idx"
            and message.get("success")
            and not message.get("reset")
            and self._isLeader()
            and next_index.get(node, before) < before
        ):
            next_index[node] = before

    def _SyncObj__getEntries(
        self, fromIDx: int | None, count: int | None = None, maxSizeBytes: int | None = None
    ) -> list[Any]:
        # pysyncobj passes its (huge, see shard.MAX_COMMAND_BYTES) batch size only when
        # building an AppendEntries: cap that message at APPEND_BATCH_BYTES of entries instead.
        if maxSizeBytes is not None:
            maxSizeBytes = min(maxSizeBytes, APPEND_BATCH_BYTES)
        entries: list[Any] = SyncObj._SyncObj__getEntries(self, fromIDx, count, maxSizeBytes)
        return entries

    def _SyncObj__loadDumpFile(self, clearJournal: bool) -> None:
        """Install the snapshot file (at start-up, or once the leader has sent one)."""
        storage = self._storage
        snap = storage.snapshot
        storage.snapshot = None  # the parsed start-up copy is only needed once
        if snap is None:
            snap = read_snapshot(storage.snapshot_path, f"shard {self._shard_id}")
        last = (snap.last_applied.command, snap.last_applied.index, snap.last_applied.term)
        before = (
            snap.before_last_applied.command,
            snap.before_last_applied.index,
            snap.before_last_applied.term,
        )
        journal: Journal = self._SyncObj__raftLog
        position = last[1] - journal.first_index if len(journal) else -1
        # The journal first: if rewriting it fails (a full disk), nothing has changed yet and
        # the replica still holds its old, consistent state.
        if not clearJournal and 1 <= position < len(journal) and journal[position][2] == last[2]:
            # Raft's InstallSnapshot rule: the log holds the snapshot's last entry with the same
            # term, so keep what follows it (a compaction interrupted by a crash left the older
            # entries in place: drop just those).
            if position > 1:
                journal.deleteEntriesTo(position - 1)
        else:
            journal.replace([before, last])
        self._machine.restore(snap)
        if clearJournal and snap.members:
            # The leader's snapshot replaced our log: its configuration is the group's as of
            # its last entry (at start-up, initial_members already replayed the log after it).
            self.set_members(set(snap.members))
        self._SyncObj__raftLastApplied = last[1]
        # Everything up to the snapshot is committed; nothing past our log end can be.
        commit = min(max(int(self._SyncObj__raftCommitIndex), last[1]), journal.last_index)
        self._SyncObj__raftCommitIndex = commit
        journal.setRaftCommitIndex(commit)
        log.info(
            "shard %d: %s snapshot at index %d (%d keys)",
            self._shard_id,
            "installed the leader's" if clearJournal else "restored",
            last[1],
            len(self._machine),
        )

    def send_append_entries(self) -> None:
        self._SyncObj__sendAppendEntries()

    def log_index(self) -> int:
        return int(self._SyncObj__raftLog[-1][1])

    def last_applied(self) -> int:
        return int(self._SyncObj__raftLastApplied)

    def entry_term(self, index: int) -> int | None:
        entries = self._SyncObj__getEntries(index, 1)
        return int(entries[0][2]) if entries else None

    def set_term(self, term: int, voted_for: str | None) -> None:
        self._SyncObj__setCurrentTerm(term, voted_for)

    # A follower's proposals travel to the leader as pysyncobj ``apply_command`` messages;
    # pysyncobj keeps each caller's callback until the leader's reply (by request id), then
    # until this replica applies the entry (by index). It forgets neither if the reply is lost
    # with a link, or if a snapshot moves this replica past the index: these two settle them.
    def fail_unanswered_forwards(self) -> None:
        """The link to the leader went down: replies to what we sent may never come."""
        waiting: dict[int, Callable[[Any, int], None]] = self._SyncObj__commandsWaitingReply
        self._SyncObj__commandsWaitingReply: dict[int, Callable[[Any, int], None]] = {}
        for request_id in sorted(waiting):
            waiting[request_id](None, FAIL_REASON.LEADER_CHANGED)

    def fail_passed_waits(self) -> None:
        """Commands waiting for an index this replica has already applied past."""
        waiting = self._SyncObj__commandsWaitingCommit
        applied = self._SyncObj__raftLastApplied
        for index in [i for i in waiting if i <= applied]:
            for _term, callback in waiting.pop(index):
                callback(None, FAIL_REASON.UNKNOWN_OUTCOME)

    def hold_elections(self) -> None:
        """Keep this replica from campaigning (it is recovering): push its timer out."""
        self._SyncObj__raftElectionDeadline = pysyncobj_clock() + 3600.0


def stable_commit(
    counted: int,
    before: int,
    stored: list[int],
    entry_term: Callable[[int], int | None],
    term: int,
) -> int:
    """The commit index a leader may use, given what each voter holds on stable storage.

    ``counted``: what pysyncobj counted (the leader's whole log as stored); ``before``: the
    commit index before this tick; ``stored``: every voter's synced index, the leader's own
    included. The answer is the highest index a quorum has stored, if it is an entry of the
    current term (Raft §5.4.2) and not past ``counted``; otherwise ``before``.
    """
    quorum = sorted(stored, reverse=True)[len(stored) // 2]
    allowed = min(quorum, counted)
    if allowed <= before or entry_term(allowed) != term:
        return before
    return allowed


# pysyncobj builds its journal from conf.journalFile; ours is handed over as that object.
_pysyncobj_create_journal = pysyncobj_core.createJournal


def _create_journal(journal_file: Any) -> Any:
    if isinstance(journal_file, Journal):
        return journal_file
    return _pysyncobj_create_journal(journal_file)


pysyncobj_core.createJournal = _create_journal
