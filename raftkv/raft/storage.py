"""Opening a replica's directory: every file checked, and checked against the others.

A shard directory holds ``journal.bin`` (:mod:`~raftkv.raft.journal`), ``meta.json`` (term,
vote, commit index) and, once the log has been compacted, ``snapshot.bin``
(:mod:`~raftkv.raft.snapshot`). Each file checks itself; :func:`open_storage` also checks
that together they describe a whole replica: a journal that starts past index 1 needs a
snapshot reaching at least the entry before it, or the replica would lead or vote with state it
no longer has. Any problem raises :class:`~raftkv.errors.StorageError` naming the shard, the
file and what to do, and the node refuses to start.

:func:`set_aside` and :func:`create_recovering` implement ``serve --recover-from-peers``: the
broken directory is kept (renamed, never deleted) for the operator, and an empty replica
marked *recovering* takes its place (see ``shard.ShardReplica`` for what that means).
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

from raftkv._pb.raftkv.v1 import command_pb2 as pb
from raftkv.errors import StorageError
from raftkv.raft.journal import PREALLOCATE_BYTES, Journal, MetaStore
from raftkv.raft.snapshot import read_snapshot

JOURNAL = "journal.bin"
META = "meta.json"
SNAPSHOT = "snapshot.bin"


@dataclass
class ReplicaStorage:
    directory: Path
    meta: MetaStore
    journal: Journal
    snapshot: pb.Snapshot | None  # parsed and verified at start-up; released once loaded

    @property
    def snapshot_path(self) -> Path:
        return self.directory / SNAPSHOT


# The meta group's shard id (raftkv.view.META_SHARD): it holds one small key, so its journal
# grows in small steps.
_META_SHARD = 0xFFFF_FFFF
_META_CHUNK_BYTES = 256 * 1024


def open_storage(directory: Path, shard_id: int, *, durable: bool = False) -> ReplicaStorage:
    meta_group = shard_id == _META_SHARD
    what = "the meta group" if meta_group else f"shard {shard_id}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        meta = MetaStore(directory / META, what=what)
        journal = Journal(
            directory / JOURNAL,
            meta,
            what=what,
            durable=durable,
            chunk_bytes=_META_CHUNK_BYTES if meta_group else PREALLOCATE_BYTES,
        )
    except OSError as e:
        raise StorageError(f"{what}: cannot open {directory}: {_reason(e)}") from e
    try:
        snapshot_path = directory / SNAPSHOT
        snapshot = read_snapshot(snapshot_path, what) if snapshot_path.exists() else None
        _check_whole(directory, what, meta, journal, snapshot)
        if not meta.existed:
            # A new replica: meta.json exists from now on, so its absence next to a journal
            # or a snapshot always means a term and vote were lost.
            meta.save()
    except StorageError:
        journal._destroy()
        raise
    return ReplicaStorage(directory, meta, journal, snapshot)


def _check_whole(
    directory: Path, what: str, meta: MetaStore, journal: Journal, snapshot: pb.Snapshot | None
) -> None:
    """Do the files, together, hold everything this replica has acknowledged?"""
    lost = (
        "this replica has lost part of its state and must not vote or lead. Rebuild it from "
        "its peers: raftkv serve --recover-from-peers"
    )
    first = journal.first_index
    covered = snapshot.last_applied.index if snapshot is not None else 0
    if not meta.existed and (journal.existed or snapshot is not None):
        raise StorageError(
            f"{what}: {directory / META} is missing: this replica's term and vote are lost, "
            f"so it could vote twice in one term; {lost}"
        )
    # A journal always holds at least one entry once its replica has run (pysyncobj adds one
    # at once, and a compacted journal keeps the two around the snapshot): a journal with no
    # entries next to a meta.json has lost whatever followed the snapshot (or everything).
    # Unless the replica never took part: term 0 and no vote mean it never voted or accepted
    # a leader's entry (both record a term first); it died between creating meta.json and
    # its first entry.
    took_part = meta.term > 0 or meta.voted_for is not None or meta.commit_index > 1
    if meta.existed and not journal.existed and not meta.recovering and took_part:
        raise StorageError(
            f"{what}: {directory / META} records term {meta.term} but {directory / JOURNAL} "
            f"is missing or empty: {lost}"
        )
    # (Index 1 is the no-op every log starts with: a commit index of 1 claims nothing.)
    reaches = max(journal.last_index, covered, 1)
    if meta.existed and not meta.recovering and meta.commit_index > reaches:
        raise StorageError(
            f"{what}: this replica had recorded commit index {meta.commit_index} but its "
            f"journal and snapshot only reach index {reaches}: {lost}"
        )
    # pysyncobj keeps the entry before the snapshot's last one in the log, so a compacted
    # journal starts at (snapshot index - 1); it may start earlier (compaction interrupted).
    # Any later start leaves a gap of entries this replica acknowledged and no longer has.
    if first > covered + 1:
        missing = (
            "there is no snapshot.bin"
            if snapshot is None
            else f"snapshot.bin only reaches index {covered}"
        )
        raise StorageError(
            f"{what}: {directory / JOURNAL} starts at index {first} but {missing}: {lost}"
        )


def set_aside(directory: Path) -> Path:
    """Rename a broken replica directory out of the way; its files stay for the operator."""
    aside = directory.with_name(f"{directory.name}.broken-{time.strftime('%Y%m%dT%H%M%S')}")
    n = 1
    while aside.exists():
        aside = aside.with_name(f"{aside.name}-{n}")
        n += 1
    try:
        os.replace(directory, aside)
    except OSError as e:
        raise StorageError(f"cannot move {directory} aside: {_reason(e)}") from e
    return aside


def create_recovering(directory: Path, shard_id: int, *, durable: bool = False) -> ReplicaStorage:
    """An empty replica that may not vote or campaign until it has caught up with a leader."""
    storage = open_storage(directory, shard_id, durable=durable)
    storage.meta.recovering = True
    storage.meta.save()
    return storage


def _reason(e: OSError) -> str:
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{e.strerror} (is the data dir read-only?)"
    return e.strerror or str(e)
