"""Shard replicas: the asyncio side of a pysyncobj group, and the real :class:`Replica`.

:class:`ShardReplica` is this node's replica of one shard (or of the meta group). It builds
the group (:mod:`raftkv.raft.group`) on the replica's storage and hands it to the node's Raft
thread (:mod:`raftkv.raft.driver`). ``propose`` hands our own encoded command bytes to
pysyncobj and awaits the result: the callback fires on the Raft thread and resolves an asyncio
future through ``loop.call_soon_threadsafe``. Every proposal has a deadline and its waiter is
cleaned up on every path.

Linearizable reads use a *barrier*: a no-op command committed in the leader's current term
proves that nobody else was leader when it committed, so the local map reflects every write
acknowledged before the read began. Reads that arrive while a barrier is in flight wait for
the next one, which serves all of them at once (ReadIndex-style batching). We never read the
leader's local state and call it linearizable: pysyncobj's ``_isLeader`` stays true for a
while on a partitioned leader.

Group commit: the entries one tick appended leave in one AppendEntries, at once if
everything sent before has committed, else with the next ones once the acknowledgements
arrive (or ``MAX_APPEND_WAIT_S`` has passed); see :meth:`ShardReplica.tick`. With fsync on, a
tick's appends share one fsync, and a follower acknowledges entries only once they are on
disk.

When the disk fails a replica: a failed *append* (full disk) makes it refuse writes for a
moment and hand its leadership away, and it recovers by itself once appends succeed again; a
failed *term/vote save* stops the replica for good (Raft must not act on a vote it could not
persist) until the node is restarted. A replica rebuilt by ``--recover-from-peers`` starts
*recovering*: it neither votes nor campaigns until a majority of its peers told it their terms
(its term fence) and it holds a leader's log up to that leader's commit index in the leader's
own term, so it can never undo a vote or an acknowledgement it gave before it lost its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pysyncobj import FAIL_REASON, SyncObjConf
from pysyncobj.node import Node

from raftkv import command
from raftkv._pb.raftkv.v1 import command_pb2 as pb
from raftkv.errors import (
    InvalidArgument,
    NoSpace,
    NotLeader,
    Overloaded,
    ProposalTimeout,
    RaftKVError,
    StorageError,
    Unavailable,
    resolve,
)
from raftkv.metrics import SNAPSHOT_SAVE_DURATION, ShardMetrics, shard_label
from raftkv.raft import wire
from raftkv.raft.conf_change import conf_change, initial_members, members_at
from raftkv.raft.driver import NO_POLL, RaftDriver
from raftkv.raft.group import APPEND_BATCH_BYTES, REGULAR, RaftGroup
from raftkv.raft.journal import RECORD_OVERHEAD, JournalWriteError, MetaWriteError
from raftkv.raft.snapshot import SnapshotReceiver, write_snapshot
from raftkv.raft.storage import ReplicaStorage
from raftkv.raft.transport import ShardTransport
from raftkv.replica import ReplicaInfo
from raftkv.statemachine import Entry, StateMachine
from raftkv.throttle import Throttle
from raftkv.view import group_name

log = logging.getLogger("raftkv.shard")
T = TypeVar("T")

_ROLES = {0: "follower", 1: "candidate", 2: "leader"}
SLOW_PROPOSAL_S = 1.0
# Longest time new entries wait for the previous AppendEntries to be acknowledged.
MAX_APPEND_WAIT_S = 0.005
# The largest command a proposal may carry (a PutMany shard part is bounded by the gRPC
# message limit, far below). pysyncobj pickles and chunks any entry at least as large as its
# appendEntriesBatchSizeBytes; that is set above this, so it never happens.
MAX_COMMAND_BYTES = 16 * 1024 * 1024
# Proposals waiting in pysyncobj's queue per shard; more are refused (RESOURCE_EXHAUSTED).
COMMAND_QUEUE_SIZE = 20_000
# Journal space a write must leave free: followers' appends and read barriers use it.
WRITE_HEADROOM_BYTES = 256 * 1024
# After a failed append, writes are refused this long before the next one is tried.
WRITE_ERROR_HOLD_S = 1.0
# ReadIndex rounds waiting for a quorum per shard; the oldest is failed to make room.
MAX_READ_ROUNDS = 64
# How often requests left waiting for an index this replica has passed are failed.
SWEEP_INTERVAL_S = 1.0
# A read round not confirmed within this long lets the next one start anyway.
ROUND_PATIENCE_S = 0.05


class ShardReplica:
    """This node's replica of one shard: propose, read, status; asyncio-facing."""

    def __init__(
        self,
        shard_id: int,
        node_id: str,
        peer_ids: list[str],
        storage: ReplicaStorage,
        driver: RaftDriver,
        *,
        joining: bool = False,
    ) -> None:
        self.shard_id = shard_id
        self._name = group_name(shard_id)  # "shard 3" or "meta", for the log
        self.node_id = node_id
        self._driver = driver
        self._storage = storage
        self.machine = StateMachine()
        tuning = driver.tuning
        self._journal = journal = storage.journal
        if journal.existed or storage.snapshot is not None:
            # A restart: say what it starts from, so the log shows the replay and catch-up.
            snap = storage.snapshot
            log.info(
                "%s: reopening: snapshot at index %d, journal holds %d entries (%d-%d), term "
                "%d, commit index %d; replaying, then catching up with the leader",
                self._name,
                snap.last_applied.index if snap is not None else 0,
                len(journal),
                journal.first_index if len(journal) else 0,
                journal.last_index,
                storage.meta.term,
                storage.meta.commit_index,
            )
            self._catching_up = True
        else:
            self._catching_up = False
        conf = SyncObjConf(
            autoTick=False,
            appendEntriesUseBatch=True,
            appendEntriesPeriod=tuning.heartbeat_s,
            appendEntriesBatchSizeBytes=MAX_COMMAND_BYTES + 1,
            raftMinTimeout=tuning.election_min_s,
            raftMaxTimeout=tuning.election_max_s,
            leaderFallbackTimeout=tuning.leader_fallback_s,
            connectionTimeout=tuning.connection_timeout_s,
            journalFile=storage.journal,
            fullDumpFile=str(storage.snapshot_path),
            logCompactionMinEntries=tuning.log_compaction_entries,
            logCompactionMinTime=tuning.log_compaction_s,
            logCompactionBatchSize=APPEND_BATCH_BYTES,
            serializer=self._write_snapshot,
            deserializer=self._never_called,
            useFork=False,
            commandsQueueSize=COMMAND_QUEUE_SIZE,
            onStateChanged=self._on_state_changed,
            dynamicMembershipChange=True,
        )
        members = initial_members({node_id, *peer_ids}, storage.snapshot, storage.journal)
        members.add(node_id)
        peer_ids = sorted(members - {node_id})
        peers = {p: Node(p) for p in peer_ids}
        self._transport = ShardTransport(driver.transport, shard_id, peers, self._mark_dirty)
        self._transport.on_error = self._delivery_failed
        driver.transport.attach(self._transport)
        self._group = RaftGroup(
            shard_id,
            self.machine,
            storage,
            Node(node_id),
            list(peers.values()),
            conf,
            transport=self._transport,
            nodeClass=Node,
        )
        g = self._group
        self._transport.announce_links()
        # Our receiver checks a snapshot from the leader before it replaces ours.
        g._SyncObj__serializer = SnapshotReceiver(
            storage.snapshot_path,
            f"shard {shard_id}",
            transmissionBatchSize=APPEND_BATCH_BYTES,
            tryUseFork=False,
            serializer=self._write_snapshot,
            deserializer=self._never_called,
            serializeChecker=None,
        )
        # Load the snapshot now, on this thread, so a bad one stops the node at start-up
        # (pysyncobj would do it in its first tick and only log a failure).
        if storage.snapshot is not None:
            g._SyncObj__loadDumpFile(clearJournal=False)
        g._SyncObj__needLoadDumpFile = False
        # fsync mode (see raftkv.raft.flusher): appends are synced on the node's fsync thread;
        # a follower holds back replies acknowledging entries not synced yet, and the leader
        # counts its own log toward a commit only as far as it is synced.
        self._fsync = tuning.fsync
        self._flusher = driver.flusher
        self._journal.in_background = self._flusher.submit
        self._held_acks: list[tuple[Node, dict[str, Any], int, int | None, int]] = []
        self._sync_error: StorageError | None = None
        if self._fsync:
            g.stable_index = lambda: self._journal.stored_index
            self._transport.hold = self._hold_unstable_ack
        # The driver polls the shared sockets once per loop; pysyncobj's own poll at the end of
        # every group's tick would only repeat that syscall eight times over.
        g._poller = NO_POLL
        self._last_leader = ""
        self._leader_changes = 0
        self._metrics = ShardMetrics.for_shard(shard_label(shard_id))
        self._last_log_index = 0
        self._sent_index = 0
        self._sent_at = 0.0
        self._info = ReplicaInfo(shard_id, "follower", "", int(g.raftCurrentTerm), 0, 0, 0)
        # Set when the group has work for the Raft thread (see RaftDriver._run).
        self.dirty = True
        # Disk trouble (see the module docstring), written on the Raft thread.
        self._failed = ""
        self._write_error: tuple[float, JournalWriteError] | None = None
        # --recover-from-peers: peers' terms until the fence is set, then the fence.
        self._recovering = storage.meta.recovering
        self._fence: int | None = None
        self._reported: dict[str, int] = {}
        if self._recovering:
            self._transport.accept = self._accept_while_recovering
            self._transport.delivered = self._check_recovered
        # A replica created for a move: it must not campaign (and disturb the group with a
        # higher term) before the leader has added it, which it learns from the first entries
        # the leader sends it.
        self._joining = joining
        if joining:
            self._transport.delivered = self._check_joined
        # asyncio side: the loop (set by the first proposal) and every proposal in flight.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: set[asyncio.Future[tuple[pb.CommandResult, int]]] = set()
        self._barrier_waiters: list[asyncio.Future[int]] = []
        self._barrier_task: asyncio.Task[None] | None = None
        # ReadIndex (Raft thread): rounds started and not yet answered, oldest first, as
        # (round, term, read index, answer). Off (--read-path log-barrier): every linearizable
        # read batch commits a barrier entry instead.
        self._read_index = tuning.read_index
        self._read_rounds: list[tuple[int, int, int, Callable[[int | RaftKVError | None], None]]]
        self._read_rounds = []
        self._last_round = 0
        self._round_started = 0.0
        # Reads that asked for a round since the last tick: one round serves them all.
        self._round_requests: list[Callable[[int | RaftKVError | None], None]] = []
        # Through the leader (Raft thread): a follower whose leader's link is up forwards
        # proposals (pysyncobj's apply_command) and asks for read indexes over the Raft link,
        # as etcd's followers do with MsgProp and MsgReadIndex. Read index requests in flight
        # by id, and reads waiting for this replica to apply up to their index.
        self._via_leader = False
        self._remote_reads: dict[int, Callable[[int | RaftKVError | None], None]] = {}
        self._last_remote_read = 0
        self._apply_waits: list[tuple[int, Callable[[int | RaftKVError | None], None]]] = []
        self._swept_at = 0.0
        self._transport.intercept = self._intercept
        self._throttle = Throttle(interval_s=10.0)
        driver.add(self)

    # -- Raft thread ---------------------------------------------------------------------

    def tick(self) -> bool:
        """One tick on the Raft thread. True if new entries were queued (tick again soon)."""
        if self._failed:
            return False
        g = self._group
        if self._recovering or self._joining:
            g.hold_elections()
        if self._sync_error is not None:
            self.storage_failed(self._sync_error)
            return False
        try:
            g.doTick(0.0)
            index = g.log_index()
            busy = index != self._last_log_index
            self._last_log_index = index
            if busy:
                self._journal.keep_room()
                if self._fsync:
                    # Every append since the last request (this tick's proposals, or what a
                    # leader sent us) shares the fsync thread's next round.
                    self._flusher.request(self._journal, self._synced)
            if self._held_acks:
                self._release_acks()
            if g._isLeader() and index > self._sent_index:
                # Group commit with one append in flight: send new entries now if everything
                # sent before has committed; otherwise they wait for the acks (which mark this
                # group dirty) and then go out together. Idle: one round trip per write.
                # Loaded: as many entries per AppendEntries as arrived during a round trip.
                waited = time.monotonic() - self._sent_at
                if g.raftCommitIndex >= self._sent_index or waited >= MAX_APPEND_WAIT_S:
                    # Send now, in this tick, rather than on the next one: saves a loop turn
                    # (two group ticks) on every write's path.
                    g.send_append_entries()
                    self._sent_index = index
                    self._sent_at = time.monotonic()
                else:
                    busy = False
        except StorageError as e:
            self.storage_failed(e)
            return False
        failure = self._write_error
        if failure is not None and time.monotonic() - failure[0] > WRITE_ERROR_HOLD_S:
            self._write_error = None  # the next append tries again (and fails again, if so)
        if self._read_rounds:
            self._answer_reads()
        if self._round_requests and self._may_start_round():
            self._start_read_round()
        if self._apply_waits:
            self._answer_applied()
        now = time.monotonic()
        if now - self._swept_at > SWEEP_INTERVAL_S:
            self._swept_at = now
            g.fail_passed_waits()
        self._refresh_info()
        return busy

    # -- ReadIndex (Raft dissertation §6.4, etcd's ReadIndex) ------------------------------
    #
    # A linearizable read needs the state as of some moment after it arrived, at which this
    # replica was still the leader. Recording the commit index R, then hearing from a quorum
    # that still accepts our term in replies to messages sent after R was recorded, proves
    # nobody else could have committed anything past R by then; the read is served once R is
    # applied. R is valid only if an entry of our own term has committed (the no-op a new
    # leader appends), else the leader may not know everything committed before it: until then
    # the read commits a barrier entry instead. No clocks are involved (no leases).

    def _request_read_round(self, answer: Callable[[int | RaftKVError | None], None]) -> None:
        """Join the round the next tick starts (Raft thread): local and followers' reads that
        arrive within one tick share one heartbeat round."""
        self._round_requests.append(answer)
        self.dirty = True

    def _may_start_round(self) -> bool:
        # One heartbeat round in flight per shard: reads that arrive meanwhile wait for it to
        # be confirmed and share the next one. Every round costs an AppendEntries to each
        # follower and a reply from each, all on the Raft threads. A round unconfirmed for
        # long (no quorum) does not hold the next one back.
        if not self._read_rounds:
            return True
        return time.monotonic() - self._round_started > ROUND_PATIENCE_S

    def _start_read_round(self) -> None:
        answers, self._round_requests = self._round_requests, []

        def answer(value: int | RaftKVError | None) -> None:
            for each in answers:
                each(value)

        g = self._group
        if not g._isLeader() or self._failed:
            answer(self.not_leader())
            return
        term = int(g.raftCurrentTerm)
        commit = int(g.raftCommitIndex)
        if g.entry_term(commit) != term:
            answer(None)  # nothing of our term has committed yet: use a barrier
            return
        self._last_round += 1
        self._round_started = time.monotonic()
        self._transport.read_round = self._last_round
        if len(self._read_rounds) >= MAX_READ_ROUNDS:
            # Rounds nobody confirms (no quorum): the oldest reader timed out long ago.
            self._read_rounds.pop(0)[3](self._no_quorum())
        self._read_rounds.append((self._last_round, term, commit, answer))
        g.send_append_entries()  # the heartbeat round that confirms it, now
        self._answer_reads()

    def _answer_reads(self) -> None:
        g = self._group
        term = int(g.raftCurrentTerm)
        if not g._isLeader() or self._failed:
            error = self.not_leader()
            for _, _, _, answer in self._read_rounds:
                answer(error)
            self._read_rounds = []
            return
        members = g.members()
        needed = len(members) // 2 + 1
        acks = self._transport.read_acks
        applied = g.last_applied()
        while self._read_rounds:
            read_round, round_term, index, answer = self._read_rounds[0]
            if round_term != term:
                answer(self.not_leader())
            else:
                confirmed = 1 + sum(
                    1 for m in members if m != self.node_id and acks.get(m, 0) >= read_round
                )
                if confirmed < needed or applied < index:
                    return  # later rounds need at least as much
                answer(index)
            self._read_rounds.pop(0)

    def _no_quorum(self) -> ProposalTimeout:
        return ProposalTimeout(
            f"shard {self.shard_id}: leadership was not confirmed by a quorum in time "
            "(is a quorum reachable?)"
        )

    async def _read_round(self, timeout: float) -> int | None:
        """The read index of a confirmed round; None if a barrier must be used instead."""
        return await self._raft_answer(self._request_read_round, timeout)

    async def _raft_answer(
        self, start: Callable[[Callable[[int | RaftKVError | None], None]], None], timeout: float
    ) -> int | None:
        """Run ``start(answer)`` on the Raft thread and await what it answers: a read index,
        None, or an error (raised here)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int | None] = loop.create_future()
        future.add_done_callback(_consume_outcome)

        def answer(value: int | RaftKVError | None) -> None:  # Raft thread
            loop.call_soon_threadsafe(resolve, future, value)

        self._driver.call_soon(lambda: start(answer))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise self._no_quorum() from None

    def _refresh_info(self) -> None:
        g = self._group
        leader = g._getLeader()
        leader_id = leader.id if leader is not None else ""
        was_via_leader = self._via_leader
        self._via_leader = (
            bool(leader_id)
            and leader_id != self.node_id
            and not (self._failed or self._recovering or self._joining)
            and self._driver.transport.is_connected(leader_id)
        )
        if was_via_leader and (not self._via_leader or leader_id != self._last_leader):
            self._leader_lost()
        self._info = ReplicaInfo(
            shard_id=self.shard_id,
            role=self._role(),
            leader=leader_id,
            term=int(g.raftCurrentTerm),
            commit_index=int(g.raftCommitIndex),
            last_applied=g.last_applied(),
            keys=len(self.machine),
            problem=self._problem(),
            members=g.members(),
            journal_bytes=self._journal.size_bytes,
            leader_changes=self._leader_changes,
        )
        if (
            self._catching_up
            and leader_id
            and self._info.last_applied >= self._info.commit_index > 0
            and (leader_id == self.node_id or self._driver.transport.is_connected(leader_id))
        ):
            self._catching_up = False
            log.info(
                "%s: caught up: applied up to index %d, leader %s (term %d)",
                self._name,
                self._info.last_applied,
                leader_id,
                self._info.term,
            )
        if leader_id != self._last_leader:
            self._last_leader = leader_id
            if leader_id:  # as etcd counts: a new leader seen, not the moments without one
                self._leader_changes += 1
            log.info(
                "%s: leader is now %s (term %d)",
                self._name,
                leader_id or "unknown",
                self._info.term,
            )

    def _problem(self) -> str:
        if self._failed:
            return self._failed
        if self._write_error is not None:
            return str(self._write_error[1])
        if self._joining:
            return "joining: waiting for the leader to add this replica"
        if self._recovering:
            if self._fence is None:
                return (
                    f"recovering: waiting for the terms of {self._needed_reports()} of "
                    f"{len(self._other_members())} peers"
                )
            return f"recovering: catching up (term fence {self._fence})"
        return ""

    def storage_failed(self, error: StorageError) -> None:
        """The disk failed this replica (on the Raft thread)."""
        if isinstance(error, JournalWriteError) and not isinstance(error, MetaWriteError):
            self._write_error = (time.monotonic(), error)
            if self._throttle.allow("write-error"):
                log.error("%s; refusing writes until appends succeed again", error)
            if self._group._isLeader():
                # Let a replica with a working disk lead; best effort.
                self._group.transferLeadership(None, None)
            self._settle_inflight(
                ProposalTimeout(
                    f"shard {self.shard_id}: the journal write failed; the outcome is unknown "
                    "(retry with the same request id)"
                )
            )
            return
        if self._failed:
            return
        self._failed = f"replica stopped: {error}; fix the disk and restart the node"
        log.critical("%s", self._failed)
        self._transport.destroy()  # peers now see this replica as gone; they elect without it
        self._refresh_info_failed()
        self._settle_inflight(Unavailable(f"shard {self.shard_id}: {self._failed}"))

    def _refresh_info_failed(self) -> None:
        self._info = dataclasses.replace(self._info, role="failed", leader="", problem=self._failed)

    def _delivery_failed(self, error: Exception) -> None:
        if isinstance(error, StorageError):
            self.storage_failed(error)
        elif self._throttle.allow(f"deliver:{type(error).__name__}"):
            log.error("%s: handling a Raft message failed: %r", self._name, error)

    def _settle_inflight(self, error: RaftKVError) -> None:
        loop = self._loop
        if loop is None:
            return

        def fail_all() -> None:
            for f in list(self._inflight):
                if not f.done():
                    f.set_exception(error)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(fail_all)

    # -- through the leader (a follower's proposals and reads) ---------------------------

    def _intercept(self, peer_id: str, message: dict[str, Any]) -> bool:
        """Messages for this replica rather than pysyncobj (Raft thread). True: handled."""
        kind = message["type"]
        if kind == "apply_command":
            return self._screen_forwarded(peer_id, message)
        if kind == wire.READ_INDEX:
            self._serve_remote_read(peer_id, int(message["request_id"]))
        else:
            self._remote_read_answered(int(message["request_id"]), message)
        return True

    def _screen_forwarded(self, peer_id: str, message: dict[str, Any]) -> bool:
        """A follower forwarded a command: refuse it here, as ``propose`` would, when this
        leader cannot take writes; the follower then forwards the request over gRPC and its
        client hears why. Not leader: pysyncobj answers NOT_LEADER itself."""
        if not self._group._isLeader():
            return False
        if self._write_refusal(len(message["command"]), WRITE_HEADROOM_BYTES) is None:
            return False
        node = self._transport.peers.get(peer_id)
        if node is not None and "request_id" in message:
            self._transport.send(
                node,
                {
                    "type": "apply_command_response",
                    "request_id": message["request_id"],
                    "error": FAIL_REASON.REQUEST_DENIED,
                },
            )
        return True

    def _serve_remote_read(self, peer_id: str, request_id: int) -> None:
        node = self._transport.peers.get(peer_id)
        if node is None:
            return

        def answer(value: int | RaftKVError | None) -> None:
            if isinstance(value, int):
                outcome, index = wire.READ_OK, value
            elif isinstance(value, NotLeader):
                outcome, index = wire.READ_NOT_LEADER, 0
            else:  # a barrier is needed, or no quorum: the leader's own path says which
                outcome, index = wire.READ_FORWARD, 0
            reply = {"type": wire.READ_INDEX_RESPONSE, "request_id": request_id}
            self._transport.send(node, {**reply, "outcome": outcome, "index": index})

        if self._read_index:
            self._request_read_round(answer)
        else:
            answer(None)

    def _ask_leader(self, answer: Callable[[int | RaftKVError | None], None]) -> None:
        """Ask the leader for a read index (Raft thread)."""
        leader = self._transport.peers.get(self._info.leader)
        if not self._via_leader or leader is None:
            answer(self.not_leader())
            return
        if len(self._remote_reads) >= MAX_READ_ROUNDS:
            oldest = next(iter(self._remote_reads))
            self._remote_reads.pop(oldest)(self._no_quorum())
        self._last_remote_read += 1
        self._remote_reads[self._last_remote_read] = answer
        self._transport.send(
            leader, {"type": wire.READ_INDEX, "request_id": self._last_remote_read}
        )

    def _remote_read_answered(self, request_id: int, message: dict[str, Any]) -> None:
        answer = self._remote_reads.pop(request_id, None)
        if answer is None:
            return  # failed meanwhile (the leader changed or its link went down)
        if message["outcome"] != wire.READ_OK:
            answer(self.not_leader())  # the caller forwards the read instead
            return
        index = int(message["index"])
        if self._group.last_applied() >= index:
            answer(index)
            return
        if len(self._apply_waits) >= MAX_READ_ROUNDS:
            self._apply_waits.pop(0)[1](self._no_quorum())
        self._apply_waits.append((index, answer))

    def _answer_applied(self) -> None:
        applied = self._group.last_applied()
        waiting = []
        for index, answer in self._apply_waits:
            if index <= applied:
                answer(index)
            else:
                waiting.append((index, answer))
        self._apply_waits = waiting

    def _leader_lost(self) -> None:
        """The leader changed or its link went down: replies may never come (Raft thread)."""
        self._group.fail_unanswered_forwards()
        if self._remote_reads:
            error = self.not_leader()
            reads, self._remote_reads = self._remote_reads, {}
            for answer in reads.values():
                answer(error)

    async def _remote_round(self, timeout: float) -> int:
        """A read index from the leader, applied here."""
        index = await self._raft_answer(self._ask_leader, timeout)
        if index is None:  # _ask_leader answers an index or an error, never None
            raise self.not_leader()
        return index

    # -- recovery (--recover-from-peers) -----------------------------------------------------

    @property
    def current_term(self) -> int:
        return int(self._group.raftCurrentTerm)

    @property
    def can_report_term(self) -> bool:
        """Only a replica with intact state may serve as another replica's term fence."""
        return not self._recovering and not self._failed

    def _needed_reports(self) -> int:
        replicas = len(self._other_members()) + 1
        return replicas - replicas // 2

    def _other_members(self) -> list[str]:
        return [n for n in self._group.members() if n != self.node_id]

    def peer_reported(self, peer_id: str, terms: dict[int, int]) -> None:
        if not self._recovering or self._fence is not None or peer_id not in self._other_members():
            return
        if self.shard_id not in terms:
            return  # that peer's replica is recovering or failed too: it cannot vouch
        self._reported[peer_id] = terms[self.shard_id]
        if len(self._reported) < self._needed_reports():
            return
        # Every term this replica may have voted or acknowledged in before it lost its state
        # is known to at least one of these peers: take the highest as our current term
        # (never lower it: a restart in the middle of recovering may have moved it on).
        self._fence = max(self._reported.values())
        if self._fence > self._group.raftCurrentTerm:
            self._group.set_term(self._fence, None)
        log.warning(
            "%s: recovering from peers: term fence %d from %s; catching up, not voting",
            self._name,
            self._fence,
            ", ".join(f"{p}={t}" for p, t in sorted(self._reported.items())),
        )

    def _accept_while_recovering(self, _peer: str, message: dict[str, Any]) -> bool:
        if not self._recovering:
            return True
        if self._fence is None:
            return False  # nothing counts before we know the term fence
        return message.get("type") not in ("request_vote", "timeout_now")

    def _check_recovered(self, peer: str, message: dict[str, Any]) -> None:
        if not self._recovering or self._fence is None or message.get("type") != "append_entries":
            return
        g = self._group
        term, commit = int(message["term"]), int(message["commit_index"])
        if term < self._fence or g.raftCurrentTerm != term or commit < 1:
            return
        if g.log_index() < commit or g.entry_term(commit) != term:
            return  # the leader has not committed in its own term yet, or we lag
        self._recovering = False
        meta = self._storage.meta
        meta.recovering = False
        # We may have voted in this term before we lost our state: never vote in it again.
        g.set_term(term, peer)
        self._transport.accept = None
        self._transport.delivered = None
        log.warning(
            "%s: rebuilt from peers: holds leader %s's log up to its commit index %d "
            "(term %d); voting again",
            self._name,
            peer,
            commit,
            term,
        )

    def _check_joined(self, peer: str, message: dict[str, Any]) -> None:
        if message.get("type") != "append_entries" or not self._joining:
            return
        self._joining = False
        self._transport.delivered = None
        log.info("%s: joined the group (first entries from leader %s)", self._name, peer)

    # -- membership (leader side) ------------------------------------------------------------

    @property
    def members(self) -> list[str]:
        return self._info.members

    @property
    def joining(self) -> bool:
        """Created for a move and not yet added by the group's leader."""
        return self._joining

    async def change_member(self, remove: bool, node_id: str, timeout: float) -> list[str]:
        """Add or remove one voter; return the voters once the change has committed.

        Idempotent: a node that is already a voter (or already gone) is answered at once.
        One change at a time: while one is uncommitted, another is refused (UNAVAILABLE).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[str]] = loop.create_future()
        deadline = time.monotonic() + timeout

        def propose() -> None:  # Raft thread
            g = self._group
            if not g._isLeader() or self._failed:
                loop.call_soon_threadsafe(resolve, future, self.not_leader())
                return
            members = g.members()
            if (node_id in members) != remove:
                loop.call_soon_threadsafe(resolve, future, members)
                return
            if remove and node_id == self.node_id:
                # A leader cannot remove itself: hand leadership to the voter that is most
                # up to date, and have the caller retry there.
                others = [n for n in members if n != node_id]
                successor = max(others, key=g.match_index, default="")
                if successor:
                    g.transferLeadership(Node(successor), None)
                loop.call_soon_threadsafe(
                    resolve,
                    future,
                    Unavailable(
                        f"shard {self.shard_id}: handing leadership to {successor or 'another'}"
                        f" replica before removing {node_id}; retry there",
                        shard_id=self.shard_id,
                        leader=successor,
                    ),
                )
                return
            if g.change_pending():
                loop.call_soon_threadsafe(
                    resolve,
                    future,
                    Unavailable(
                        f"shard {self.shard_id}: another membership change is still committing",
                        shard_id=self.shard_id,
                    ),
                )
                return

            def done(_result: Any, error: int) -> None:
                if error == FAIL_REASON.SUCCESS:
                    loop.call_soon_threadsafe(resolve, future, g.members())
                else:
                    loop.call_soon_threadsafe(
                        resolve,
                        future,
                        Unavailable(
                            f"shard {self.shard_id}: membership change failed ({error})",
                            shard_id=self.shard_id,
                        ),
                    )

            g._applyCommand(conf_change(remove, node_id), done)
            self.dirty = True

        self._driver.call_soon(propose)
        try:
            members = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ProposalTimeout(
                f"shard {self.shard_id}: the membership change did not commit within "
                f"{timeout:.1f}s; its outcome is unknown (it is safe to retry)"
            ) from None
        if not remove and node_id != self.node_id:
            # (The new replica may already lead: added, then elected when the old leader died
            # before the move was recorded. A leader holds its own log; it has nothing to wait
            # for, and pysyncobj keeps no match index for it.)
            await self._wait_caught_up(node_id, deadline)
        return members

    async def _wait_caught_up(self, node_id: str, deadline: float) -> None:
        """Wait until the new voter holds the log up to the current commit index."""
        target = self._info.commit_index
        delay = 0.02
        while True:
            if self._group.match_index(node_id) >= target:
                return
            if not self.is_leader:
                raise self.not_leader()
            if time.monotonic() + delay > deadline:
                raise ProposalTimeout(
                    f"shard {self.shard_id}: {node_id} was added but has not caught up to index "
                    f"{target} yet (it is receiving a snapshot or the log); try again"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    # -- durability ------------------------------------------------------------------------

    def _hold_unstable_ack(self, node: Node, message: dict[str, Any]) -> bool:
        """Keep back a reply that acknowledges entries not on disk yet (Raft thread)."""
        if not message.get("success"):
            return False
        acked = int(message["next_node_idx"]) - 1
        if acked <= self._journal.stored_index:
            return False
        g = self._group
        self._held_acks.append((node, message, acked, g.entry_term(acked), g.raftCurrentTerm))
        self._flusher.request(self._journal, self._synced)
        return True

    def _release_acks(self) -> None:
        """Send the held replies whose entries are now synced. One whose term has moved on or
        whose entry was replaced meanwhile is dropped: it would acknowledge a log we no
        longer hold (the leader's next AppendEntries finds out the truth)."""
        stored = self._journal.stored_index
        g = self._group
        term = g.raftCurrentTerm
        waiting = []
        for held in self._held_acks:
            node, message, acked, entry_term, at_term = held
            if acked > stored:
                waiting.append(held)
            elif at_term == term and g.entry_term(acked) == entry_term:
                self._transport.send_held(node, message)
        self._held_acks = waiting

    def _synced(self, error: StorageError | None) -> None:
        """The fsync thread synced our journal (or failed to): tick soon."""
        if error is not None:
            self._sync_error = error
        self.dirty = True

    def _mark_dirty(self) -> None:
        self.dirty = True

    def _role(self) -> str:
        if self._failed:
            return "failed"
        if self._recovering:
            return "recovering"
        return _ROLES.get(self._group._SyncObj__raftState, "follower")

    def _on_state_changed(self, old: int, new: int) -> None:
        log.info("%s: %s -> %s", self._name, _ROLES.get(old, old), _ROLES.get(new, new))

    def close(self) -> None:
        self._group.destroy()
        self._transport.destroy()
        self._journal._destroy()

    def _write_snapshot(self, path: str, meta: tuple[Any, ...]) -> None:
        last, before = meta[0], meta[1]
        snap = self.machine.snapshot()
        snap.last_applied.CopyFrom(pb.LogEntry(command=last[0], index=last[1], term=last[2]))
        snap.before_last_applied.CopyFrom(
            pb.LogEntry(command=before[0], index=before[1], term=before[2])
        )
        cluster = {n.id for n in meta[2]} if len(meta) > 2 else set(self._group.members())
        snap.members.extend(sorted(members_at(cluster, self._journal, last[1])))
        try:
            with SNAPSHOT_SAVE_DURATION.time():
                write_snapshot(path, snap)
        except OSError as e:
            if self._throttle.allow("snapshot"):
                log.error("%s: cannot write a snapshot to %s: %s", self._name, path, e)
            raise
        log.info("%s: snapshot at index %d (%d keys)", self._name, last[1], len(snap.entries))

    @staticmethod
    def _never_called(path: str) -> tuple[Any, ...]:
        raise AssertionError(f"pysyncobj's snapshot loader is replaced ({path})")

    # -- asyncio side ----------------------------------------------------------------------

    @property
    def info(self) -> ReplicaInfo:
        return self._info

    @property
    def is_leader(self) -> bool:
        return self._info.role == "leader"

    @property
    def via_leader(self) -> bool:
        return self._via_leader

    def not_leader(self) -> NotLeader:
        leader = self._info.leader
        return NotLeader(
            f"node {self.node_id} is not the leader of shard {self.shard_id}"
            + (f"; the leader is {leader}" if leader else "; no leader is known yet"),
            shard_id=self.shard_id,
            leader=leader,
        )

    def _write_refusal(self, size: int, headroom: int | None) -> RaftKVError | None:
        """Why this replica cannot take a command of ``size`` bytes now, or None. With a
        ``headroom`` (at the leader, where the command enters the log) the journal must also
        have room for it and that much more."""
        if size > MAX_COMMAND_BYTES:
            return InvalidArgument(
                f"command of {size} bytes; the limit is {MAX_COMMAND_BYTES} bytes"
            )
        if self._failed:
            return Unavailable(f"shard {self.shard_id} on {self.node_id}: {self._failed}")
        failure = self._write_error
        if failure is not None and time.monotonic() - failure[0] < WRITE_ERROR_HOLD_S:
            error = failure[1]
            cls = NoSpace if error.no_space else Unavailable
            return cls(f"{error}; writes are refused until it succeeds again")
        journal = self._journal
        if (
            headroom is not None
            and journal.low_on_space
            and journal.room() < size + RECORD_OVERHEAD + headroom
        ):
            # The disk gave the journal no more room: refused before it entered the log, so
            # certainly not applied and nothing left in doubt.
            return NoSpace(
                f"shard {self.shard_id}: no space left on the data disk for "
                f"{journal.path}; writes are refused until space is freed"
            )
        return None

    async def propose(
        self, data: bytes, timeout: float, *, headroom: int = WRITE_HEADROOM_BYTES
    ) -> tuple[pb.CommandResult, int]:
        """Replicate one command; return its result and the log index it applied at.

        On a follower whose leader is reachable (:attr:`via_leader`) the command goes to the
        leader over the Raft link, and the result is this replica's own, once it has applied
        the entry. A leader that refuses it, or a leader change, raises NotLeader.
        """
        leading = self.is_leader
        if not leading and not self._via_leader:
            raise self.not_leader()
        refusal = self._write_refusal(len(data), headroom if leading else None)
        if refusal is not None:
            raise refusal
        loop = asyncio.get_running_loop()
        self._loop = loop
        future: asyncio.Future[tuple[pb.CommandResult, int]] = loop.create_future()
        started = time.monotonic()

        def done(result: Any, error: int) -> None:  # Raft thread
            # pysyncobj calls back before it bumps lastApplied past this entry.
            applied = self._group.last_applied() + 1 if error == FAIL_REASON.SUCCESS else 0
            if not leading and error in (FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME):
                # Sent to the leader and lost track of (the leader changed or its link went
                # down). Every command carries a request id the state machine deduplicates,
                # so the caller may send it again over gRPC: it applies at most once.
                error = FAIL_REASON.NOT_LEADER
            loop.call_soon_threadsafe(_settle, future, result, error, applied, self)

        self._inflight.add(future)
        metrics = self._metrics
        metrics.pending.inc()
        try:
            self._group._applyCommand(REGULAR + data, done)
            self.dirty = True
            self._driver.wake()
            outcome = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            metrics.failed.inc()
            raise ProposalTimeout(
                f"shard {self.shard_id}: no commit within {timeout:.1f}s; the outcome is "
                "unknown (retry with the same request id)"
            ) from None
        except BaseException:
            metrics.failed.inc()
            raise
        finally:
            metrics.pending.dec()
            self._inflight.discard(future)
            elapsed = time.monotonic() - started
            if elapsed > SLOW_PROPOSAL_S and self._throttle.allow("slow"):
                log.warning("%s: slow proposal took %.2fs", self._name, elapsed)
        metrics.committed.inc()
        metrics.proposal_duration.observe(elapsed)
        return outcome

    async def read_index(self, timeout: float) -> int:
        """Wait until a read started after this call may be served: a ReadIndex round (or a
        barrier entry) that began after it has confirmed leadership and been applied here.
        Returns the log index the local state now reflects at least. Reads arriving while a
        round is in flight share the next one. A follower whose leader is reachable asks the
        leader for the index (:attr:`via_leader`)."""
        if not self.is_leader and not (self._via_leader and self._read_index):
            raise self.not_leader()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # A reader that timed out no longer awaits it: its failure is nobody's to log.
        future.add_done_callback(_consume_outcome)
        self._barrier_waiters.append(future)
        if self._barrier_task is None or self._barrier_task.done():
            self._barrier_task = asyncio.create_task(self._run_barriers(timeout))
        started = time.monotonic()
        try:
            index = await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            self._metrics.read_failed.inc()
            raise ProposalTimeout(
                f"shard {self.shard_id}: a linearizable read was not confirmed within "
                f"{timeout:.1f}s (is a quorum reachable?)"
            ) from None
        except BaseException:
            self._metrics.read_failed.inc()
            raise
        self._metrics.read_duration.observe(time.monotonic() - started)
        return index

    async def _run_barriers(self, timeout: float) -> None:
        while self._barrier_waiters:
            batch, self._barrier_waiters = self._barrier_waiters, []
            try:
                if not self.is_leader:
                    index: int | None = await self._remote_round(timeout)
                else:
                    index = await self._read_round(timeout) if self._read_index else None
                if index is None:
                    _, index = await self.propose(command.BARRIER, timeout, headroom=0)
            except RaftKVError as e:
                for f in batch:
                    if not f.done():
                        f.set_exception(e)
            else:
                for f in batch:
                    if not f.done():
                        f.set_result(index)
        self._barrier_task = None

    def transfer_leadership(self, target: str) -> None:
        """Ask pysyncobj to hand leadership to ``target`` (TimeoutNow); best effort."""

        def transfer() -> None:
            def done(_result: Any, error: int) -> None:
                if error != FAIL_REASON.SUCCESS:
                    log.info(
                        "%s: leadership transfer to %s did not happen: %s; it is tried again "
                        "later, less often",
                        self._name,
                        target,
                        _TRANSFER_FAILURES.get(error, f"pysyncobj reason {error}"),
                    )

            if self._group._isLeader() and not self._failed:
                self._group.transferLeadership(Node(target), done)

        self._driver.call_soon(transfer)

    async def snapshot_items(self) -> tuple[int, dict[bytes, Entry]]:
        """(last applied index, a copy of the map), taken on the Raft thread so nothing moves.

        The copy is shallow (entries are immutable) and cheap; whatever the caller does with
        it (hashing for a digest) happens off the Raft thread.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, dict[bytes, Entry]]] = loop.create_future()

        def take() -> None:
            loop.call_soon_threadsafe(
                resolve, future, (self._group.last_applied(), self.machine.items())
            )

        self.dirty = True
        self._driver.call_soon(take)
        return await asyncio.wait_for(future, 10.0)

    def read_local(self, key: bytes) -> Entry | None:
        return self.machine.get(key)


# Why pysyncobj did not hand leadership over (FAIL_REASON), in words.
_TRANSFER_FAILURES = {
    FAIL_REASON.REQUEST_DENIED: "the target is not reachable or has not caught up yet",
    FAIL_REASON.NOT_LEADER: "this replica no longer leads",
    FAIL_REASON.LEADER_CHANGED: "the leader changed meanwhile",
    FAIL_REASON.MISSING_LEADER: "no leader",
    FAIL_REASON.DISCARDED: "the request was dropped",
    FAIL_REASON.QUEUE_FULL: "too many requests queued",
}


def _consume_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(
    future: asyncio.Future[tuple[pb.CommandResult, int]],
    result: Any,
    error: int,
    applied: int,
    replica: ShardReplica,
) -> None:
    if future.done():  # the caller gave up (deadline); nothing waits any more
        return
    if error == FAIL_REASON.SUCCESS:
        future.set_result((result if result is not None else pb.CommandResult(), applied))
        return
    exc: RaftKVError
    if error == FAIL_REASON.QUEUE_FULL:
        exc = Overloaded(f"shard {replica.shard_id}: too many proposals in flight")
    elif error in (
        FAIL_REASON.NOT_LEADER,
        FAIL_REASON.MISSING_LEADER,
        FAIL_REASON.DISCARDED,
        # A leader refused a follower's forwarded command (see _screen_forwarded); the
        # request goes to the leader over gRPC instead, which says why.
        FAIL_REASON.REQUEST_DENIED,
    ):
        exc = replica.not_leader()
    elif error in (FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME):
        exc = ProposalTimeout(
            f"shard {replica.shard_id}: leader changed; the outcome is unknown "
            "(retry with the same request id)"
        )
    else:
        exc = Unavailable(f"shard {replica.shard_id}: proposal failed ({error})")
    future.set_exception(exc)
