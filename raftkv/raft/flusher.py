"""The node's fsync thread: group commit for every shard's journal, off the Raft thread.

An ``fdatasync`` on the Raft thread stalls every shard of the node for as long as the disk
takes, and eight busy shards paid eight of them in a row per loop turn. Instead the Raft
thread only writes entries into the page cache and asks the :class:`Flusher` to make them
durable; it goes on ticking (a leader sends its AppendEntries at once, in parallel with its
own fsync, as etcd does). The flusher thread syncs every journal that asked since its last
round, one ``fdatasync`` each, covering everything appended to it until the sync began, then
marks those replicas dirty and wakes the Raft thread once.

The Raft thread then acts on :attr:`Journal.stored_index` (see ``shard.py``): a follower
acknowledges entries only up to it, and a leader counts its own log toward a commit only up to
it, so an entry commits only once a quorum holds it on stable storage.

A failed fsync is fatal to the replica (Linux may have dropped the pages it could not write):
the error is handed back to the Raft thread, which stops that replica.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from raftkv.errors import StorageError

log = logging.getLogger("raftkv.shard")


class Syncable(Protocol):
    def sync(self) -> bool: ...


class Flusher:
    """One thread that fsyncs journals on request, in rounds."""

    def __init__(self, wake: Callable[[], None]) -> None:
        """``wake``: tells the Raft thread that some replicas have news (RaftDriver.wake)."""
        self._wake = wake
        self._cond = threading.Condition()
        # Journal -> what to run on the Raft side once it synced (or failed): insertion
        # ordered, one entry per journal however often it asked since the last round.
        self._pending: dict[Syncable, Callable[[StorageError | None], None]] = {}
        # Other disk work that must not stall the Raft thread (commit-index saves).
        self._jobs: list[Callable[[], None]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fsync", daemon=True)
        self.rounds = 0  # completed rounds, for tests and the log

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the round in progress and stop (pending requests are synced first)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def request(self, journal: Syncable, done: Callable[[StorageError | None], None]) -> None:
        """Make ``journal``'s appends so far durable soon, then call ``done`` (from the fsync
        thread: it must only set flags; the Raft thread is woken after it)."""
        with self._cond:
            if journal not in self._pending:
                self._pending[journal] = done
                self._cond.notify()

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the fsync thread after the next round of syncs (it must not raise
        for anything but a bug, and must do its own locking)."""
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._pending and not self._jobs:
                    return
                batch, self._pending = self._pending, {}
                jobs, self._jobs = self._jobs, []
            for journal, done in batch.items():
                try:
                    journal.sync()
                except StorageError as e:
                    done(e)
                except Exception as e:  # never let one journal stop every shard's fsyncs
                    log.exception("fsync round failed")
                    done(StorageError(f"fsync failed: {e!r}"))
                else:
                    done(None)
            for job in jobs:
                try:
                    job()
                except Exception:
                    log.exception("background disk job failed")
            if batch:
                self.rounds += 1
                self._wake()
