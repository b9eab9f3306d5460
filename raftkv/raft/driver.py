"""The node's one Raft thread: it owns the poller, the mux transport and every shard group.

:class:`RaftDriver` ticks every group itself (``doTick`` with pysyncobj's ``autoTick`` off).
One thread instead of pysyncobj's thread-per-group keeps a node at two ports and a handful of
threads, and lets the transport run without locks. Everything that touches pysyncobj state
runs here: the asyncio side hands work over with :meth:`RaftDriver.call_soon` or
:meth:`RaftDriver.call` and is woken through ``loop.call_soon_threadsafe``.

Group commit: after a tick queues new entries, the driver ticks that group again at once, and
the replica forces an AppendEntries (see ``ShardReplica.tick``), so every proposal that
arrived during one tick shares one message per peer; everything a turn queued for a peer
leaves in one send per link.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pysyncobj.poller import POLL_EVENT_TYPE, createPoller

from raftkv.config import RaftTuning
from raftkv.errors import Overloaded
from raftkv.raft.flusher import Flusher
from raftkv.raft.link import LinkLimits, LinkSecurity
from raftkv.raft.transport import MuxTransport
from raftkv.throttle import Throttle
from raftkv.view import ClusterView

if TYPE_CHECKING:
    from raftkv.replica import Replica
    from raftkv.shard import ShardReplica

log = logging.getLogger("raftkv.shard")
T = TypeVar("T")

# Full tick period of every group (pysyncobj's timers run at this granularity).
TICK_INTERVAL_S = 0.02
# Calls queued for the Raft thread (leadership transfers, digests).
MAX_QUEUED_CALLS = 1024


class _NoPoll:
    """Stands in for a group's poller: the driver owns polling (see RaftDriver._run)."""

    def poll(self, _timeout: float) -> None:
        return None


NO_POLL = _NoPoll()


class RaftDriver:
    """The node's single Raft thread: one poller, one transport, every shard group."""

    def __init__(
        self,
        view: ClusterView,
        node_id: str,
        tuning: RaftTuning,
        security: LinkSecurity,
        *,
        incarnation: str = "",
        check_incarnation: Callable[[str, str], str] = lambda _p, _i: "",
    ) -> None:
        self.poller = createPoller("auto")
        self.transport = MuxTransport(
            {n.id: n.raft for n in view.nodes},
            node_id,
            self.poller,
            security=security,
            limits=LinkLimits(idle_timeout_s=tuning.connection_timeout_s),
            shard_terms=self._shard_terms,
            on_peer_state=self._peer_state,
            incarnation=incarnation,
            check_incarnation=check_incarnation,
        )
        self.tuning = tuning
        self._replicas: list[ShardReplica] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raft", daemon=True)
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.poller.subscribe(self._wake_r, self._drain_wake, POLL_EVENT_TYPE.READ)
        self._calls: queue.Queue[Callable[[], None]] = queue.Queue(MAX_QUEUED_CALLS)
        self._woken = False
        self._throttle = Throttle(interval_s=10.0)
        # Group commit for every journal of this node, off this thread (fsync mode).
        self.flusher = Flusher(self.wake)

    def add(self, replica: ShardReplica) -> None:
        self._replicas.append(replica)

    def start(self) -> None:
        self.transport.bind()
        self.flusher.start()
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.wake()
        self._thread.join(timeout)
        self.flusher.stop(timeout)

    def wake(self) -> None:
        """Make the Raft thread poll return now. Callers set their dirty flag first."""
        if self._woken:
            return  # a wake-up is pending; the thread drains it before ticking
        self._woken = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the Raft thread (where pysyncobj state may be touched safely)."""
        try:
            self._calls.put_nowait(fn)
        except queue.Full:
            raise Overloaded("too many calls queued for the Raft thread") from None
        self.wake()

    async def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the Raft thread and await its result (or its exception)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if future.done():
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        def run() -> None:
            try:
                result = fn()
            except Exception as e:
                loop.call_soon_threadsafe(settle, False, e)
            else:
                loop.call_soon_threadsafe(settle, True, result)

        self.call_soon(run)
        return await asyncio.wait_for(future, timeout)

    def remove(self, replica: Replica) -> None:
        """Stop and drop one replica (on the Raft thread): it was removed from its group."""
        self._replicas = [r for r in self._replicas if r is not replica]
        replica.close()

    def _drain_wake(self, _fd: int, _event: int) -> None:
        # Drain first, then clear: a wake() that skipped its write because the flag was still
        # set has already set its dirty flag, and the tick loop runs after this. Clearing
        # first could swallow that wake-up's byte and leave the flag set with no byte pending.
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        self._woken = False

    def _shard_terms(self) -> dict[int, int]:
        return {r.shard_id: r.current_term for r in self._replicas if r.can_report_term}

    def _peer_state(self, peer_id: str, terms: dict[int, int]) -> None:
        for r in self._replicas:
            r.peer_reported(peer_id, terms)

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
                # Everything this turn queued for a peer (from every group, and replies to
                # what the poll delivered) leaves in one send per link.
                self.transport.flush()
                if not logged:
                    logged = True
                    log.info("raft thread ticking %d shard groups", len(self._replicas))
            except Exception:  # keep the node alive; a tick bug must not stop Raft
                if self._throttle.allow("tick"):
                    log.exception("raft tick failed")
                time.sleep(0.05)
        for r in self._replicas:
            r.close()
        self.transport.close()
