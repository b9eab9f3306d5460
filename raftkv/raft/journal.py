"""A shard replica's Raft log and term/vote on disk: checksummed, append-only, never mmapped.

pysyncobj's ``FileJournal`` memory-maps its file (a full disk then kills the process with
SIGBUS), has no checksums (a flipped bit is served as truth), rewrites itself in place on
compaction (a crash in the middle cuts the log) and pickles its term/vote file. This journal
implements the same pysyncobj ``Journal`` interface with:

* **Records that prove they are intact.** File layout::

      header   MAGIC (8) | format version (u32) | reserved (u32)
      record   payload length (u32) | CRC-32 of payload (u32) | payload
      payload  index (u64) | term (u64) | command bytes

  Opening the file checks every record: its CRC, that indexes are consecutive and terms never
  decrease. A bad record raises :class:`~raftkv.errors.StorageError` naming the file, the record
  number, its offset and index, and the node refuses to start. Only a record cut short at the
  very end of the file (a write torn by a crash, never acknowledged under fsync) is dropped, with
  a warning that says what was dropped.
* **Plain ``write()`` appends into preallocated space**: :meth:`Journal.ensure_room` keeps a
  few MiB allocated ahead (``posix_fallocate``), so a full disk shows up there, *before* a
  proposal enters the log, and the proposal is refused cleanly (RESOURCE_EXHAUSTED). An
  append that still hits a full disk (a follower, or a race) fails as
  :class:`JournalWriteError` with the partial record cut off again. Zeros after the last
  record are that preallocated space (or data a crash never wrote), not corruption.
* **Compaction writes a new file and renames it** over the old one (fsyncing the new file and
  the directory), so a crash at any point leaves one complete journal.
* **Group commit**: :meth:`Journal.sync` is one ``fdatasync`` for everything appended since the
  last one. The node's flusher thread (:mod:`raftkv.raft.flusher`) calls it, so the Raft thread
  never waits for the disk; :attr:`Journal.stored_index` says how far the log is durable, and
  the shard counts and acknowledges entries only up to there (see ``shard.py``).

The term/vote/commit-index state lives in ``meta.json`` (:class:`MetaStore`): JSON with a
CRC, replaced atomically and fsynced on every term or vote change. A failure to save it raises
:class:`MetaWriteError`, which is fatal to the replica: Raft must not act on a vote it could not
make durable.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pysyncobj.journal import Journal as PysyncobjJournal

from raftkv.durable import fsync_dir, write_file
from raftkv.errors import StorageError
from raftkv.metrics import COMPACTION_DURATION, WAL_FSYNC_DURATION

log = logging.getLogger("raftkv.journal")

MAGIC = b"RKVJRNL1"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">8sII")
_RECORD = struct.Struct(">II")
_ENTRY = struct.Struct(">QQ")
HEADER_BYTES = _HEADER.size
RECORD_OVERHEAD = _RECORD.size + _ENTRY.size
# A record claiming more than this is corrupt, whatever its checksum says (a command is
# capped far below it).
MAX_RECORD_BYTES = 256 * 1024 * 1024
# Space allocated ahead of the appends, in one go.
PREALLOCATE_BYTES = 4 * 1024 * 1024
_OLD_PYSYNCOBJ_MAGIC = b"PYSYNCOBJ"
# A write torn by a crash leaves the unwritten rest of its record as preallocated zeros.
_TORN_SUFFIX = bytes(8)

Entry = tuple[bytes, int, int]  # (command, index, term): pysyncobj's log entry shape


class JournalWriteError(StorageError):
    """An append or truncation of the journal failed (full disk, I/O error, read-only fs)."""

    def __init__(self, message: str, *, no_space: bool) -> None:
        super().__init__(message)
        self.no_space = no_space


class MetaWriteError(StorageError):
    """The term/vote could not be made durable: the replica must stop."""


class SyncFailed(StorageError):
    """An fsync of the journal failed: what is on disk is unknown, the replica must stop."""


def _zeros_from(data: bytes, offset: int) -> bool:
    return data.count(0, offset) == len(data) - offset


def _record(command: bytes, index: int, term: int) -> bytes:
    payload = _ENTRY.pack(index, term) + command
    return _RECORD.pack(len(payload), zlib.crc32(payload)) + payload


def _describe_os_error(e: OSError) -> str:
    return f"{e.strerror or e} (errno {errno.errorcode.get(e.errno or 0, e.errno)})"


class Journal(PysyncobjJournal):  # type: ignore[misc]
    """The log of one replica. All methods run on the Raft thread, except :meth:`sync`, which
    the flusher thread runs; ``_lock`` keeps it off a file descriptor being replaced, closed or
    truncated under it."""

    def __init__(
        self,
        path: Path,
        meta: MetaStore,
        *,
        what: str,
        durable: bool = False,
        chunk_bytes: int = PREALLOCATE_BYTES,
    ) -> None:
        """``durable``: appends count as stored only once :meth:`sync` ran (fsync mode);
        otherwise the page cache is the durability boundary (process crashes only).
        ``chunk_bytes``: how much space is allocated ahead at a time (small for a group that
        writes little, such as the meta group)."""
        self.path = path
        self._chunk = chunk_bytes  # below half of it left, another chunk is allocated
        self.meta = meta
        self._what = what  # "shard 3", for messages
        self._durable = durable
        self._entries: list[Entry] = []
        self._offsets = array.array("Q")  # file offset of each entry's record
        self.repaired = ""  # what opening dropped, if anything (for the log)
        self._torn_span: tuple[int, int] | None = None
        # Set on the Raft thread when the disk could not give the journal more room; read by
        # proposers (any thread) to refuse writes before they enter the log.
        self.low_on_space = False
        self._fd = -1
        self._size = HEADER_BYTES
        self._allocated = HEADER_BYTES  # file size, preallocated space included
        self._unsynced = False
        self._lock = threading.Lock()
        # Runs slow, non-urgent disk work off the Raft thread (the node's fsync thread).
        self.in_background: Callable[[Callable[[], None]], None] | None = None
        self._open()
        self.existed = bool(self._entries)
        self._synced_index = self.last_index

    # -- opening and checking ------------------------------------------------------------------

    def _open(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._create(self.path)
            self._fd = os.open(self.path, os.O_RDWR)
            return
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise StorageError(f"{self._what}: cannot read {self.path}: {e}") from e
        self._parse(data)
        self._fd = os.open(self.path, os.O_RDWR)
        # What a killed process left may still be only in the page cache: make it as durable
        # as it is about to be taken for (stored_index starts at the last entry).
        os.fsync(self._fd)
        self._allocated = len(data)
        if self._torn_span is not None:
            # Zero the torn record: appends start on clean, still allocated space.
            start, length = self._torn_span
            os.pwrite(self._fd, bytes(length), start)
            os.fsync(self._fd)

    def _create(self, path: Path) -> None:
        with open(path, "wb") as f:
            f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, 0))
            f.flush()
            os.fsync(f.fileno())

    def _parse(self, data: bytes) -> None:
        where = f"{self._what}: journal {self.path}"
        if data.startswith(_OLD_PYSYNCOBJ_MAGIC):
            raise StorageError(
                f"{where} was written by raftkv 0.1 (pysyncobj's unchecksummed format); "
                "this version cannot read it: move the data dir aside and let the node "
                "rebuild from its peers (raftkv serve --recover-from-peers)"
            )
        if len(data) < HEADER_BYTES:
            raise StorageError(f"{where}: the file header is cut short ({len(data)} bytes)")
        magic, version, _ = _HEADER.unpack_from(data, 0)
        if magic != MAGIC or version != FORMAT_VERSION:
            raise StorageError(f"{where}: not a raftkv journal (bad header)")
        off = HEADER_BYTES
        previous: Entry | None = None
        n = 0
        while off < len(data):
            n += 1
            remaining = len(data) - off
            if remaining < _RECORD.size:
                if _zeros_from(data, off):
                    break
                raise StorageError(self._cut_short(where, n, off))
            size, crc = _RECORD.unpack_from(data, off)
            if size == 0 and crc == 0 and _zeros_from(data, off):
                break  # preallocated space, or appends a crash never wrote: the log ends here
            if size < _ENTRY.size or size > MAX_RECORD_BYTES:
                raise StorageError(
                    f"{where}: record {n} at offset {off} has an impossible length {size}; "
                    "the file is corrupt (run raftkv serve --recover-from-peers)"
                )
            if remaining < _RECORD.size + size:
                # Appends go into preallocated space, so a crash cannot leave a record running
                # past the end of the file: it was cut (or its length field damaged).
                raise StorageError(self._cut_short(where, n, off))
            start = off + _RECORD.size
            payload = data[start : start + size]
            if zlib.crc32(payload) != crc:
                if _zeros_from(data, start + size) and payload.endswith(_TORN_SUFFIX):
                    # The last record, ending in zeros where the rest of the write never
                    # landed in the preallocated space: torn by a crash, so never
                    # acknowledged under fsync. A flipped bit does not leave that shape.
                    self._torn(where, n, off, 8 + size)
                    break
                raise StorageError(
                    f"{where}: record {n} at offset {off} fails its checksum; refusing to "
                    "serve possibly corrupt data. Rebuild this replica from its peers: "
                    "raftkv serve --recover-from-peers"
                )
            index, term = _ENTRY.unpack_from(payload, 0)
            if previous is not None and (index != previous[1] + 1 or term < previous[2]):
                raise StorageError(
                    f"{where}: record {n} at offset {off} holds index {index} term {term} "
                    f"after index {previous[1]} term {previous[2]}; the log is inconsistent "
                    "(run raftkv serve --recover-from-peers)"
                )
            entry = (payload[_ENTRY.size :], index, term)
            self._entries.append(entry)
            self._offsets.append(off)
            previous = entry
            off = start + size
        self._size = off

    def _torn(self, where: str, n: int, off: int, length: int) -> None:
        self.repaired = (
            f"{where}: record {n} at offset {off} was half written when the node stopped "
            "(it ends in zeros and nothing follows it); dropped it and continue from the "
            "record before, which the leader will re-send"
        )
        self._torn_span = (off, length)
        log.warning("%s", self.repaired)

    @staticmethod
    def _cut_short(where: str, n: int, off: int) -> str:
        return (
            f"{where}: the file ends inside record {n} (offset {off}): it was truncated or a "
            "length field is damaged; refusing to guess what is missing. Rebuild this replica "
            "from its peers: raftkv serve --recover-from-peers"
        )

    @property
    def first_index(self) -> int:
        return self._entries[0][1] if self._entries else 0

    @property
    def size_bytes(self) -> int:
        """Bytes of records in the journal file (not counting space allocated ahead)."""
        return self._size

    @property
    def last_index(self) -> int:
        return self._entries[-1][1] if self._entries else 0

    # -- pysyncobj's Journal interface ----------------------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        record = _record(command, idx, term)
        self._reserve(len(record))
        self._append(record)
        self._entries.append((command, idx, term))
        self._offsets.append(self._size)
        self._size += len(record)
        self._allocated = max(self._allocated, self._size)
        self._unsynced = True

    def room(self) -> int:
        """Allocated bytes not used yet (read from any thread: a snapshot, maybe stale)."""
        return self._allocated - self._size

    def _reserve(self, nbytes: int) -> None:
        """Make sure ``nbytes`` fit in allocated space before writing (Raft thread)."""
        if self._allocated - self._size >= nbytes:
            return
        if not self._grow(max(self._chunk, nbytes)):
            raise JournalWriteError(
                f"{self._what}: no space left on the data disk for {self.path}",
                no_space=True,
            )

    def _grow(self, nbytes: int) -> bool:
        """Allocate ``nbytes`` more at the end of the file; False if the disk is full."""
        try:
            os.posix_fallocate(self._fd, self._allocated, nbytes)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._allocated = 1 << 62  # no preallocation here: appends find out themselves
                return True
            self.low_on_space = True
            return False
        self._allocated += nbytes
        self.low_on_space = False
        return True

    def keep_room(self) -> None:
        """Keep a chunk allocated ahead of the appends (Raft thread; after appends, and once
        a second so a freed disk is noticed)."""
        if self._allocated - self._size < self._chunk // 2:
            self._grow(self._chunk)

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        written = 0
        try:
            while written < len(view):
                written += os.pwrite(self._fd, view[written:], self._size + written)
        except OSError as e:
            # Cut the partial record off again (zeros: the end of the log, see _parse).
            with contextlib.suppress(OSError):
                os.pwrite(self._fd, bytes(written), self._size)
            raise JournalWriteError(
                f"{self._what}: cannot append to {self.path}: {_describe_os_error(e)}",
                no_space=e.errno in (errno.ENOSPC, errno.EDQUOT),
            ) from e

    def clear(self) -> None:
        self.replace([])

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        """Drop the entries from position ``entryFrom`` on (a follower's conflicting tail)."""
        if entryFrom >= len(self._entries):
            return
        new_size = self._offsets[entryFrom]
        with self._lock:
            try:
                os.ftruncate(self._fd, new_size)
            except OSError as e:
                raise JournalWriteError(
                    f"{self._what}: cannot truncate {self.path}: {_describe_os_error(e)}",
                    no_space=False,
                ) from e
            del self._entries[entryFrom:]
            del self._offsets[entryFrom:]
            self._size = self._allocated = new_size
            self._unsynced = True
            # Entries past the cut are gone; the same indexes appended again are new entries
            # that must be synced in their turn.
            self._synced_index = min(self._synced_index, self.last_index)

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Compaction: keep the entries from position ``entryTo`` on, in a new file."""
        self.replace(self._entries[entryTo:])

    def replace(self, entries: list[Entry]) -> None:
        """Atomically make ``entries`` the whole journal: new file, fsync, rename, fsync dir."""
        started = time.monotonic()
        tmp = self.path.with_name(self.path.name + ".tmp")
        offsets = array.array("Q")
        size = HEADER_BYTES
        try:
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, 0))
                for command, idx, term in entries:
                    record = _record(command, idx, term)
                    offsets.append(size)
                    f.write(record)
                    size += len(record)
                f.flush()
                os.fsync(f.fileno())
            # The snapshot this compaction relies on was renamed into place before: make that
            # rename durable before the old journal can disappear.
            fsync_dir(self.path.parent)
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
            fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise JournalWriteError(
                f"{self._what}: cannot rewrite {self.path}: {_describe_os_error(e)}",
                no_space=e.errno in (errno.ENOSPC, errno.EDQUOT),
            ) from e
        with self._lock:
            os.close(self._fd)
            self._fd = fd
            self._entries = list(entries)
            self._offsets = offsets
            self._size = self._allocated = size
            self._unsynced = False
            self._synced_index = self.last_index
        COMPACTION_DURATION.observe(time.monotonic() - started)

    def sync(self) -> bool:
        """Group commit: one fdatasync makes every append since the last one durable. True if
        it synced anything. Runs on the flusher thread (or the Raft thread at start-up).

        Ordering with :meth:`add` on the Raft thread: the flag is cleared *before* the last
        index is read, and ``add`` writes the record before the index appears and sets the flag
        after, so a record either counts toward this sync (it was written before the
        fdatasync started) or leaves the flag set for the next one."""
        with self._lock:
            if not self._unsynced or self._fd < 0:
                return False
            self._unsynced = False
            target = self.last_index
            started = time.monotonic()
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                # Linux may drop the failed pages and report success to the next fsync: the
                # caller must stop this replica, not retry (PostgreSQL's "fsyncgate").
                raise SyncFailed(
                    f"{self._what}: fsync of {self.path} failed: {_describe_os_error(e)}"
                ) from e
            WAL_FSYNC_DURATION.observe(time.monotonic() - started)
            self._synced_index = max(self._synced_index, target)
            return True

    @property
    def stored_index(self) -> int:
        """The last index that survives the failures this journal is configured for."""
        return self._synced_index if self._durable else self.last_index

    def flush(self) -> None:
        self.sync()

    def _destroy(self) -> None:
        self.meta.close()
        with self._lock:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1

    # Term, vote and commit index: pysyncobj keeps them with the journal.

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        self.meta.commit_index = raftCommitIndex

    def getRaftCommitIndex(self) -> int:
        return self.meta.commit_index

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:
        # Raft: currentTerm and votedFor must be durable before any message reflecting them
        # leaves; MetaWriteError stops the replica before it can send one.
        self.meta.term, self.meta.voted_for = term, votedForNodeId
        self.meta.save()

    def getCurrentTerm(self) -> int:
        return self.meta.term

    def getVotedForNodeId(self) -> str | None:
        return self.meta.voted_for

    def onOneSecondTimer(self) -> None:
        self.keep_room()
        # Never record a commit index past what this journal has stored: on restart a commit
        # index beyond the log means entries were lost (see storage.open_storage).
        commit = min(self.meta.commit_index, self.stored_index)
        if commit == self.meta.saved_commit_index:
            return
        if self.in_background is None:
            self.meta.save_commit_index(commit)
        else:
            # Two fsyncs (file and directory): not on the Raft thread, where they stalled
            # every shard of the node once a second.
            self.in_background(lambda: self.meta.save_commit_index(commit))


class MetaStore:
    """``meta.json``: term, vote, commit index and replica-recovery state, with a CRC."""

    def __init__(self, path: Path, *, what: str) -> None:
        self.path = path
        self._what = what
        self.term = 0
        self.voted_for: str | None = None
        self.commit_index = 1
        # Set while a replica rebuilt by --recover-from-peers has not caught up yet.
        self.recovering = False
        self._saved_commit_index = 1
        self._commit_save_failed = False
        self._lock = threading.Lock()
        self._closed = False
        self.existed = path.exists()
        if self.existed:
            self._load()

    def _load(self) -> None:
        where = f"{self._what}: {self.path}"
        try:
            doc = json.loads(self.path.read_text())
            state = doc["state"]
            if zlib.crc32(_canonical(state)) != doc["crc32"]:
                raise StorageError(
                    f"{where} fails its checksum: the term and vote of this replica are "
                    "unknown, so it must not vote (run raftkv serve --recover-from-peers)"
                )
            self.term = int(state["term"])
            voted = state["voted_for"]
            self.voted_for = None if voted is None else str(voted)
            self.commit_index = self._saved_commit_index = int(state["commit_index"])
            self.recovering = bool(state.get("recovering", False))
        except StorageError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StorageError(
                f"{where} is unreadable ({e}): the term and vote of this replica are unknown "
                "(run raftkv serve --recover-from-peers)"
            ) from None

    def _state(self) -> dict[str, Any]:
        return {
            "term": self.term,
            "voted_for": self.voted_for,
            "commit_index": self.commit_index,
            "recovering": self.recovering,
        }

    def save(self, commit_index: int | None = None) -> None:
        # The Raft thread saves term/vote; the fsync thread saves the commit index. Under the
        # lock each writes the state as it is then, so neither can put back an older term or
        # vote over a newer one.
        with self._lock:
            if self._closed:
                return  # its replica is gone (its directory may hold a new replica by now)
            state = self._state()
            if commit_index is not None:
                state["commit_index"] = commit_index
            doc = {"crc32": zlib.crc32(_canonical(state)), "state": state}
            text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
            try:
                write_file(self.path, text.encode(), overwrite=True)
            except OSError as e:
                raise MetaWriteError(
                    f"{self._what}: cannot save term/vote to {self.path}: {_describe_os_error(e)}"
                ) from e
            self._saved_commit_index = state["commit_index"]

    def close(self) -> None:
        """No more writes: a commit-index save still queued on the fsync thread when the
        replica stops must not land in a directory that is deleted and reused after it."""
        with self._lock:
            self._closed = True

    @property
    def saved_commit_index(self) -> int:
        return self._saved_commit_index

    def save_commit_index(self, commit_index: int) -> None:
        """Lazily persist the commit index (a restart then re-applies without waiting)."""
        if commit_index == self._saved_commit_index:
            return
        try:
            self.save(commit_index)
        except MetaWriteError as e:
            # Not a safety problem (the leader re-sends the commit index); say it once.
            if not self._commit_save_failed:
                log.warning("%s (the commit index is re-learnt from the leader)", e)
                self._commit_save_failed = True
            return
        self._commit_save_failed = False


def _canonical(state: dict[str, Any]) -> bytes:
    return json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
