"""Shard replicas: the only place that touches pysyncobj, and the bridge to asyncio.

Two pieces live here:

* :class:`RaftDriver`, one thread per node. It owns the shared poller, the mux transport
  and every shard group, and ticks them all (``doTick`` with ``autoTick`` off). One thread
  instead of pysyncobj's thread-per-group keeps a node at two ports and a handful of threads,
  and lets the transport run without locks.
* :class:`ShardReplica`, one per shard hosted on the node. ``propose`` hands our own encoded
  command bytes to pysyncobj and awaits the result: the callback fires on the Raft thread and
  resolves an asyncio future through ``loop.call_soon_threadsafe``. Every proposal has a
  deadline and its waiter is cleaned up on every path.

Linearizable reads use a *barrier*: a no-op command committed in the leader's current term
proves that nobody else was leader when it committed, so the local map reflects every write
acknowledged before the read began. Reads that arrive while a barrier is in flight wait for
the next one, which serves all of them at once (ReadIndex-style batching). We never read the
leader's local state and call it linearizable: pysyncobj's ``_isLeader`` stays true for a
while on a partitioned leader.

Group commit: after a tick queues new entries, the driver ticks again immediately and forces
an AppendEntries, so every proposal that arrived during one tick shares one message per peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pickle
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf
from pysyncobj.node import Node
from pysyncobj.poller import POLL_EVENT_TYPE, createPoller

from raftkv import command
from raftkv._pb.raftkv.v1 import command_pb2 as pb
from raftkv.config import ClusterConfig, RaftTuning
from raftkv.errors import NotLeader, Overloaded, ProposalTimeout, RaftKVError, Unavailable
from raftkv.statemachine import Entry, StateMachine
from raftkv.transport import MuxTransport, ShardTransport

log = logging.getLogger("raftkv.shard")

# pysyncobj's command type byte for a regular command; we own everything after it.
_REGULAR = b"\x00"
_ROLES = {0: "follower", 1: "candidate", 2: "leader"}
SLOW_PROPOSAL_S = 1.0
# Full tick period of every group (pysyncobj's timers run at this granularity).
TICK_INTERVAL_S = 0.02
# Longest time new entries wait for the previous AppendEntries to be acknowledged.
MAX_APPEND_WAIT_S = 0.005


@dataclass(frozen=True)
class ReplicaInfo:
    shard_id: int
    role: str
    leader: str
    term: int
    commit_index: int
    last_applied: int
    keys: int


class _Group(SyncObj):  # type: ignore[misc]
    """A pysyncobj group whose log holds our protobuf commands instead of pickles."""

    def __init__(self, machine: StateMachine, *args: Any, **kwargs: Any) -> None:
        self._machine = machine
        super().__init__(*args, **kwargs)

    # pysyncobj applies entries through this name-mangled method; override it so REGULAR
    # entries go to our state machine (raw bytes, never unpickled) with their log index.
    def _SyncObj__doApplyCommand(self, data: bytes) -> Any:
        if data[:1] == _REGULAR:
            index = self._SyncObj__raftLastApplied + 1
            return self._machine.apply(data[1:], index)
        return SyncObj._SyncObj__doApplyCommand(self, data)

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
            and isinstance(message, dict)
            and message.get("type") == "next_node_idx"
            and message.get("success")
            and not message.get("reset")
            and self._isLeader()
            and next_index.get(node, before) < before
        ):
            next_index[node] = before

    # Compaction truncates the journal right after the snapshot file was renamed into place;
    # in fsync mode the rename must be durable first, or a power loss could leave neither.
    def _SyncObj__deleteEntriesTo(self, to_index: int) -> None:
        if self.before_truncate is not None:
            self.before_truncate()
        SyncObj._SyncObj__deleteEntriesTo(self, to_index)

    before_truncate: Callable[[], None] | None = None

    def sync_journal(self) -> None:
        """Make every appended entry durable: one fsync covers the whole batch."""
        journal = self._SyncObj__raftLog
        resizable = journal._FileJournal__journalFile
        resizable.flush()  # msync of the mapped journal
        os.fsync(resizable._ResizableFile__f.fileno())

    def send_append_entries(self) -> None:
        self._SyncObj__sendAppendEntries()

    def log_index(self) -> int:
        return int(self._SyncObj__raftLog[-1][1])

    def last_applied(self) -> int:
        return int(self._SyncObj__raftLastApplied)


class _NoPoll:
    """Stands in for a group's poller: the driver owns polling (see RaftDriver._run)."""

    def poll(self, _timeout: float) -> None:
        return None


_NO_POLL = _NoPoll()


class RaftDriver:
    """The node's single Raft thread: one poller, one transport, every shard group."""

    def __init__(self, cluster: ClusterConfig, node_id: str, tuning: RaftTuning) -> None:
        self.poller = createPoller("auto")
        self.transport = MuxTransport(
            cluster, node_id, self.poller, connection_timeout_s=tuning.connection_timeout_s
        )
        self.tuning = tuning
        self._replicas: list[ShardReplica] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raft", daemon=True)
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.poller.subscribe(self._wake_r, self._drain_wake, POLL_EVENT_TYPE.READ)
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._woken = False

    def add(self, replica: ShardReplica) -> None:
        self._replicas.append(replica)

    def start(self) -> None:
        self.transport.bind()
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.wake()
        self._thread.join(timeout)

    def wake(self) -> None:
        """Make the Raft thread poll return now. Callers set their dirty flag first."""
        if self._woken:
            return  # a wake-up is pending; the thread drains it before ticking
        self._woken = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the Raft thread (where pysyncobj state may be touched safely)."""
        self._calls.put(fn)
        self.wake()

    def _drain_wake(self, _fd: int, _event: int) -> None:
        # Drain first, then clear: a wake() that skipped its write because the flag was still
        # set has already set its dirty flag, and the tick loop runs after this. Clearing
        # first could swallow that wake-up's byte and leave the flag set with no byte pending.
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        self._woken = False

    def _run(self) -> None:
        # Every group gets a full tick (timers: heartbeats, elections, compaction) every
        # TICK_INTERVAL_S; in between only groups with work are ticked: a proposal arrived,
        # a message was delivered, or their last tick queued entries that must go out now.
        # Ticking all eight groups on every wake-up cost more CPU than the requests did.
        next_full = 0.0
        logged = False
        while not self._stop.is_set():
            try:
                dirty = any(r.dirty for r in self._replicas)
                wait = 0.0 if dirty else max(0.0, next_full - time.monotonic())
                self.poller.poll(wait)
                while True:
                    try:
                        self._calls.get_nowait()()
                    except queue.Empty:
                        break
                now = time.monotonic()
                full = now >= next_full
                if full:
                    next_full = now + TICK_INTERVAL_S
                    self.transport.tick()
                for r in self._replicas:
                    if full or r.dirty:
                        r.dirty = False
                        if r.tick():
                            r.dirty = True
                if not logged:
                    logged = True
                    log.info("raft thread ticking %d shard groups", len(self._replicas))
            except Exception:  # keep the node alive; a tick bug must not stop Raft
                log.exception("raft tick failed")
                time.sleep(0.05)
        for r in self._replicas:
            r.close()
        self.transport.close()


class ShardReplica:
    """This node's replica of one shard: propose, read, status; asyncio-facing."""

    def __init__(
        self,
        shard_id: int,
        node_id: str,
        peer_ids: list[str],
        data_dir: Path,
        driver: RaftDriver,
    ) -> None:
        self.shard_id = shard_id
        self.node_id = node_id
        self._driver = driver
        self.machine = StateMachine()
        data_dir.mkdir(parents=True, exist_ok=True)
        tuning = driver.tuning
        self._snapshot_path = data_dir / "snapshot.bin"
        conf = SyncObjConf(
            autoTick=False,
            appendEntriesUseBatch=True,
            appendEntriesPeriod=tuning.heartbeat_s,
            raftMinTimeout=tuning.election_min_s,
            raftMaxTimeout=tuning.election_max_s,
            leaderFallbackTimeout=tuning.leader_fallback_s,
            connectionTimeout=tuning.connection_timeout_s,
            journalFile=str(data_dir / "journal.bin"),
            # Without fullDumpFile pysyncobj loses all state on restart (measured): always set.
            fullDumpFile=str(self._snapshot_path),
            logCompactionMinEntries=tuning.log_compaction_entries,
            logCompactionMinTime=tuning.log_compaction_s,
            serializer=self._write_snapshot,
            deserializer=self._read_snapshot,
            useFork=False,
            commandsQueueSize=100_000,
            onStateChanged=self._on_state_changed,
        )
        peers = {p: Node(p) for p in peer_ids}
        self._transport = ShardTransport(driver.transport, shard_id, peers, self._mark_dirty)
        driver.transport.attach(self._transport)
        self._group = _Group(
            self.machine,
            Node(node_id),
            list(peers.values()),
            conf,
            transport=self._transport,
        )
        self._fsync = tuning.fsync
        self._synced_index = 0
        if self._fsync:
            self._make_durable(data_dir)
        # The driver polls the shared sockets once per loop; pysyncobj's own poll at the end of
        # every group's tick would only repeat that syscall eight times over.
        self._group._poller = _NO_POLL
        self._last_leader = ""
        self._last_log_index = 0
        self._sent_index = 0
        self._sent_at = 0.0
        self._info = ReplicaInfo(shard_id, "follower", "", 0, 0, 0, 0)
        # Set when the group has work for the Raft thread (see RaftDriver._run).
        self.dirty = True
        # Barrier batching state (asyncio side only).
        self._barrier_waiters: list[asyncio.Future[int]] = []
        self._barrier_task: asyncio.Task[None] | None = None
        driver.add(self)

    # -- Raft thread ---------------------------------------------------------------------

    def tick(self) -> bool:
        """One tick on the Raft thread. True if new entries were queued (tick again soon)."""
        g = self._group
        g.doTick(0.0)
        index = g.log_index()
        busy = index != self._last_log_index
        self._last_log_index = index
        if self._fsync and busy:
            # The leader counts its own log toward every commit: sync this tick's appends
            # (all proposals that arrived since the last tick, one fsync) before any
            # AppendEntries or commit can use them.
            self._sync_if_needed()
        if g._isLeader() and index > self._sent_index:
            # Group commit with one append in flight: send new entries now if everything
            # sent before has committed; otherwise they wait for the acks (which mark this
            # group dirty) and then go out together. Idle: one round trip per write. Loaded:
            # as many entries per AppendEntries as arrived during the last round trip.
            waited = time.monotonic() - self._sent_at
            if g.raftCommitIndex >= self._sent_index or waited >= MAX_APPEND_WAIT_S:
                # Send now, in this tick, rather than on the next one: saves a loop turn
                # (two group ticks) on every write's path.
                g.send_append_entries()
                self._sent_index = index
                self._sent_at = time.monotonic()
            else:
                busy = False
        leader = g._getLeader()
        leader_id = leader.id if leader is not None else ""
        self._info = ReplicaInfo(
            shard_id=self.shard_id,
            role=self._role(),
            leader=leader_id,
            term=int(g.raftCurrentTerm),
            commit_index=int(g.raftCommitIndex),
            last_applied=g.last_applied(),
            keys=len(self.machine),
        )
        if leader_id != self._last_leader:
            self._last_leader = leader_id
            log.info(
                "shard %d: leader is now %s (term %d)",
                self.shard_id,
                leader_id or "unknown",
                self._info.term,
            )
        return busy

    def _make_durable(self, data_dir: Path) -> None:
        """--fsync: journal appends, term/vote and snapshot renames reach the disk first."""
        group = self._group
        storer = group._SyncObj__raftLog._FileJournal__metaStorer

        def store_meta(meta: dict[str, Any]) -> None:
            path = storer.getPath()
            with open(path + ".tmp", "wb") as f:
                f.write(pickle.dumps(meta))
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".tmp", path)
            _fsync_dir(data_dir)

        storer.storeMeta = store_meta
        group.before_truncate = lambda: _fsync_dir(data_dir)
        # A follower acknowledges appended entries only once they are on disk.
        self._transport.before_send = self._sync_before_ack

    def _sync_before_ack(self, message: Any) -> None:
        if isinstance(message, dict) and message.get("type") == "next_node_idx":
            self._sync_if_needed()

    def _sync_if_needed(self) -> None:
        index = self._group.log_index()
        if index != self._synced_index:
            self._group.sync_journal()
            self._synced_index = index

    def _mark_dirty(self) -> None:
        self.dirty = True

    def _role(self) -> str:
        return _ROLES.get(self._group._SyncObj__raftState, "follower")

    def _on_state_changed(self, old: int, new: int) -> None:
        log.info("shard %d: %s -> %s", self.shard_id, _ROLES.get(old, old), _ROLES.get(new, new))

    def close(self) -> None:
        self._group.destroy()

    def _write_snapshot(self, path: str, meta: tuple[Any, ...]) -> None:
        last, before = meta[0], meta[1]
        snap = self.machine.snapshot()
        snap.last_applied.CopyFrom(pb.LogEntry(command=last[0], index=last[1], term=last[2]))
        snap.before_last_applied.CopyFrom(
            pb.LogEntry(command=before[0], index=before[1], term=before[2])
        )
        with open(path, "wb") as f:
            f.write(snap.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        log.info(
            "shard %d: snapshot at index %d (%d keys)", self.shard_id, last[1], len(snap.entries)
        )

    def _read_snapshot(self, path: str) -> tuple[Any, ...]:
        snap = pb.Snapshot()
        with open(path, "rb") as f:
            snap.ParseFromString(f.read())
        self.machine.restore(snap)
        last, before = snap.last_applied, snap.before_last_applied
        log.info("shard %d: restored snapshot at index %d", self.shard_id, last.index)
        return (
            (last.command, last.index, last.term),
            (before.command, before.index, before.term),
            frozenset(),
        )

    # -- asyncio side ----------------------------------------------------------------------

    @property
    def info(self) -> ReplicaInfo:
        return self._info

    @property
    def is_leader(self) -> bool:
        return self._info.role == "leader"

    def not_leader(self) -> NotLeader:
        leader = self._info.leader
        return NotLeader(
            f"node {self.node_id} is not the leader of shard {self.shard_id}"
            + (f"; the leader is {leader}" if leader else "; no leader is known yet"),
            shard_id=self.shard_id,
            leader=leader,
        )

    async def propose(self, data: bytes, timeout: float) -> tuple[pb.CommandResult, int]:
        """Replicate one command; return its result and the log index it applied at."""
        if not self.is_leader:
            raise self.not_leader()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[pb.CommandResult, int]] = loop.create_future()
        started = time.monotonic()

        def done(result: Any, error: int) -> None:  # Raft thread
            # pysyncobj calls back before it bumps lastApplied past this entry.
            applied = self._group.last_applied() + 1 if error == FAIL_REASON.SUCCESS else 0
            loop.call_soon_threadsafe(_settle, future, result, error, applied, self)

        self._group._applyCommand(_REGULAR + data, done)
        self.dirty = True
        self._driver.wake()
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ProposalTimeout(
                f"shard {self.shard_id}: no commit within {timeout:.1f}s; the outcome is "
                "unknown (retry with the same request id)"
            ) from None
        finally:
            elapsed = time.monotonic() - started
            if elapsed > SLOW_PROPOSAL_S:
                log.warning("shard %d: slow proposal took %.2fs", self.shard_id, elapsed)

    async def read_index(self, timeout: float) -> int:
        """Wait for a barrier that started after this call; return its log index."""
        if not self.is_leader:
            raise self.not_leader()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._barrier_waiters.append(future)
        if self._barrier_task is None or self._barrier_task.done():
            self._barrier_task = asyncio.create_task(self._run_barriers(timeout))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise ProposalTimeout(
                f"shard {self.shard_id}: read barrier did not commit within {timeout:.1f}s "
                "(is a quorum reachable?)"
            ) from None

    async def _run_barriers(self, timeout: float) -> None:
        while self._barrier_waiters:
            batch, self._barrier_waiters = self._barrier_waiters, []
            try:
                _, index = await self.propose(command.BARRIER, timeout)
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
                        "shard %d: leadership transfer to %s declined (%s)",
                        self.shard_id,
                        target,
                        error,
                    )

            if self._group._isLeader():
                self._group.transferLeadership(Node(target), done)

        self._driver.call_soon(transfer)

    async def digest(self) -> tuple[int, str]:
        """(last applied index, hash of the map), taken on the Raft thread so nothing moves."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, str]] = loop.create_future()

        def settle(value: tuple[int, str]) -> None:
            if not future.done():
                future.set_result(value)

        def take() -> None:
            loop.call_soon_threadsafe(settle, (self._group.last_applied(), self.machine.digest()))

        self.dirty = True
        self._driver.call_soon(take)
        return await asyncio.wait_for(future, 10.0)

    def read_local(self, key: bytes) -> Entry | None:
        return self.machine.get(key)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    elif error in (FAIL_REASON.NOT_LEADER, FAIL_REASON.MISSING_LEADER, FAIL_REASON.DISCARDED):
        exc = replica.not_leader()
    elif error in (FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME):
        exc = ProposalTimeout(
            f"shard {replica.shard_id}: leader changed; the outcome is unknown "
            "(retry with the same request id)"
        )
    else:
        exc = Unavailable(f"shard {replica.shard_id}: proposal failed ({error})")
    future.set_exception(exc)
