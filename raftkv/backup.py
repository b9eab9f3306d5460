"""Backups: a point-in-time copy of every shard in one file, and data dirs made from it.

``raftkv admin snapshot save FILE`` takes each shard's copy at a linearizable read index (so
every write acknowledged before the save began is in it) and writes them, with a manifest of
shard indexes, digests and a SHA-256 of the whole body, in the format of ``backup.proto``.
``raftkv admin snapshot restore`` reads it back, checks every byte, and writes the data dirs
of a *new* cluster, as ``etcdctl snapshot restore`` does: keys are placed by the new cluster's
ring (its shard count may differ), each replica starts from a snapshot of its part, and the
new cluster elects and serves as if it had compacted its log.

Restored replicas start at term 0 with no vote: they are new members of a new cluster, so no
vote or acknowledgement of theirs can be lost. Each shard's log starts past the highest
version it holds, so a key's version (the index of its last write) keeps naming one write.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from raftkv import __version__, command
from raftkv._pb.raftkv.v1 import backup_pb2 as bpb
from raftkv._pb.raftkv.v1 import command_pb2 as pb
from raftkv.client import Client
from raftkv.config import ClusterConfig
from raftkv.durable import fsync_dir
from raftkv.errors import InvalidArgument
from raftkv.raft.journal import MetaStore
from raftkv.raft.snapshot import write_snapshot
from raftkv.raft.storage import META, SNAPSHOT
from raftkv.ring import Ring
from raftkv.statemachine import Entry, digest_of
from raftkv.view import META_SHARD, ClusterView

MAGIC = b"RAFTKV-BACKUP-1\n"
FORMAT = 1
# Entries per record when writing; records longer than this are refused when reading (a
# hostile or corrupt length must not make us allocate gigabytes).
ENTRIES_PER_PART = 4096
MAX_RECORD_BYTES = 256 * 1024 * 1024
_LENGTH = struct.Struct(">I")


class BackupError(InvalidArgument):
    """A backup file that cannot be used: unreadable, truncated, corrupt or inconsistent."""


@dataclass(frozen=True)
class ShardCopy:
    shard_id: int
    read_index: int
    applied_index: int
    data: dict[bytes, Entry]


@dataclass(frozen=True)
class Backup:
    manifest: bpb.BackupManifest
    shards: dict[int, dict[bytes, Entry]]


class BackupWriter:
    """Writes a backup file one shard at a time, so a save holds one shard's copy in memory,
    never the whole data set. It writes to ``FILE.partial``; :meth:`finish` fsyncs and renames
    it, :meth:`abort` removes it (a failed or interrupted save leaves nothing behind)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(path.name + ".partial")
        self._body = hashlib.sha256(MAGIC)
        self._listed: list[bpb.BackupShard] = []
        self._f: BinaryIO = open(self._tmp, "wb")  # noqa: SIM115 - closed by finish or abort
        self._f.write(MAGIC)

    def _record(self, rec: bpb.BackupRecord, hashed: bool = True) -> None:
        data = rec.SerializeToString()
        chunk = _LENGTH.pack(len(data)) + data
        if hashed:
            self._body.update(chunk)
        self._f.write(chunk)

    def add(self, copy: ShardCopy) -> None:
        items = sorted(copy.data.items())
        for start in range(0, max(1, len(items)), ENTRIES_PER_PART):
            part = bpb.BackupShardPart(shard_id=copy.shard_id)
            part.entries.extend(
                pb.SnapshotEntry(key=k, value=e.value, version=e.version)
                for k, e in items[start : start + ENTRIES_PER_PART]
            )
            self._record(bpb.BackupRecord(part=part))
        self._listed.append(
            bpb.BackupShard(
                shard_id=copy.shard_id,
                read_index=copy.read_index,
                applied_index=copy.applied_index,
                keys=len(copy.data),
                digest=digest_of(copy.data),
            )
        )

    def finish(self, manifest: bpb.BackupManifest) -> None:
        """Append ``manifest`` (its shards and checksum filled in here), make the file
        durable, and move it into place atomically."""
        del manifest.shards[:]
        manifest.shards.extend(self._listed)
        manifest.format = FORMAT
        manifest.body_sha256 = self._body.digest()
        self._record(bpb.BackupRecord(manifest=manifest), hashed=False)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._tmp.replace(self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


async def save(client: Client, path: Path) -> bpb.BackupManifest:
    """Copy every shard through ``client`` (each at a linearizable read index taken after
    this call began) and write the backup file; returns its manifest. Shards are fetched and
    written one at a time; on any failure no file (and no ``.partial``) is left."""
    started_ms = int(time.time() * 1000)
    status = await client.status()
    writer = await asyncio.to_thread(BackupWriter, path)
    try:
        for shard in range(status.shard_count):
            chunks = await client.snapshot_shard(shard)
            data = {e.key: Entry(e.value, e.version) for c in chunks for e in c.entries}
            last = chunks[-1] if chunks else None
            if (
                last is None
                or not last.done
                or last.keys != len(data)
                or digest_of(data) != last.digest
            ):
                raise BackupError(
                    f"shard {shard}: the copy received does not match the digest its node "
                    "sent; nothing was written (run the save again)"
                )
            del chunks
            copy = ShardCopy(shard, last.read_index, last.applied_index, data)
            await asyncio.to_thread(writer.add, copy)
        manifest = bpb.BackupManifest(
            cluster_fingerprint=status.cluster_fingerprint,
            epoch=status.epoch,
            shard_count=status.shard_count,
            vnodes=status.vnodes,
            started_unix_ms=started_ms,
            raftkv_version=__version__,
        )
        await asyncio.to_thread(writer.finish, manifest)
    except BaseException:
        writer.abort()
        raise
    return manifest


def _records(f: BinaryIO, where: str) -> Iterator[tuple[bytes, bpb.BackupRecord]]:
    while True:
        header = f.read(_LENGTH.size)
        if not header:
            return
        if len(header) < _LENGTH.size:
            raise BackupError(f"{where}: truncated (a record header is cut short)")
        (length,) = _LENGTH.unpack(header)
        if length > MAX_RECORD_BYTES:
            raise BackupError(f"{where}: corrupt (a record claims {length} bytes)")
        data = f.read(length)
        if len(data) < length:
            raise BackupError(f"{where}: truncated (the last record is cut short)")
        rec = bpb.BackupRecord()
        try:
            rec.ParseFromString(data)
        except Exception as e:  # protobuf's DecodeError, or a message it cannot accept
            raise BackupError(f"{where}: corrupt (a record does not parse: {e})") from None
        yield header + data, rec


def read_backup(path: Path) -> Backup:
    """Read and verify a backup: magic, checksum of the body, and every shard's keys and
    digest against the manifest. Raises :class:`BackupError` saying what is wrong."""
    where = str(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the records
    except OSError as e:
        raise BackupError(f"cannot read the backup {path}: {e.strerror or e}") from None
    with f:
        if f.read(len(MAGIC)) != MAGIC:
            raise BackupError(f"{where} is not a raftkv backup (no RAFTKV-BACKUP-1 header)")
        body = hashlib.sha256(MAGIC)
        shards: dict[int, dict[bytes, Entry]] = {}
        manifest: bpb.BackupManifest | None = None
        for raw, rec in _records(f, where):
            if manifest is not None:
                raise BackupError(f"{where}: corrupt (records after the manifest)")
            if rec.HasField("manifest"):
                manifest = rec.manifest
                continue
            if not rec.HasField("part"):
                raise BackupError(f"{where}: corrupt (an empty record)")
            body.update(raw)
            data = shards.setdefault(rec.part.shard_id, {})
            for item in rec.part.entries:
                data[item.key] = Entry(item.value, item.version)
    if manifest is None:
        raise BackupError(f"{where}: truncated (no manifest: was the save interrupted?)")
    if manifest.format != FORMAT:
        raise BackupError(f"{where}: format {manifest.format}; this raftkv reads {FORMAT}")
    if manifest.body_sha256 != body.digest():
        raise BackupError(f"{where}: corrupt (the SHA-256 of its contents does not match)")
    listed = {s.shard_id for s in manifest.shards}
    if set(shards) - listed or len(listed) != manifest.shard_count:
        raise BackupError(
            f"{where}: inconsistent (the manifest lists shards {sorted(listed)} of "
            f"{manifest.shard_count}, the body holds {sorted(shards)})"
        )
    for s in manifest.shards:
        data = shards.setdefault(s.shard_id, {})
        if len(data) != s.keys or digest_of(data) != s.digest:
            raise BackupError(f"{where}: shard {s.shard_id} does not match its digest")
    return Backup(manifest, shards)


def restore(backup: Backup, config: ClusterConfig, data_dirs: dict[str, Path]) -> dict[str, int]:
    """Write the data dir of each node in ``data_dirs`` (node id -> directory) for a new
    cluster started from ``config``: every shard replica placed on the node gets a snapshot
    of its keys. Returns the number of keys restored per node. The directories must be empty
    or absent: a restore never writes over a node's state."""
    view = ClusterView.bootstrap(config)
    unknown = sorted(set(data_dirs) - set(view.node_ids))
    if unknown:
        raise BackupError(f"nodes {unknown} are not in the cluster file")
    for node_id, directory in data_dirs.items():
        if directory.exists() and any(directory.iterdir()):
            raise BackupError(
                f"{directory} (node {node_id}) is not empty: restore writes new data dirs only"
            )
    ring = Ring(view.shards, view.vnodes)
    parts: dict[int, dict[bytes, Entry]] = {s: {} for s in range(view.shards)}
    for data in backup.shards.values():
        for key, entry in data.items():
            parts[ring.shard_for(key)][key] = entry
    restored: dict[str, int] = {}
    for node_id, directory in data_dirs.items():
        restored[node_id] = 0
        for shard in view.hosted_by(node_id):
            if shard == META_SHARD:
                continue  # the new cluster's view is bootstrapped from its cluster file
            group = view.group(shard)
            _write_replica(directory / f"shard-{shard}", parts[shard], sorted(group.replicas))
            restored[node_id] += len(parts[shard])
        fsync_dir(directory)
    return restored


def _write_replica(directory: Path, data: dict[bytes, Entry], members: list[str]) -> None:
    # The log of the restored replica starts with the snapshot's two entries, past every
    # version it holds: new writes get higher versions than any restored key.
    last = max([2, *(e.version for e in data.values())])
    directory.mkdir(parents=True)
    snap = pb.Snapshot(
        entries=[
            pb.SnapshotEntry(key=k, value=e.value, version=e.version) for k, e in data.items()
        ],
        applied_index=last,
        members=members,
    )
    snap.last_applied.CopyFrom(pb.LogEntry(command=command.BARRIER, index=last, term=0))
    snap.before_last_applied.CopyFrom(pb.LogEntry(command=command.BARRIER, index=last - 1, term=0))
    write_snapshot(directory / SNAPSHOT, snap)
    # Term 0, no vote: a new member that has never voted or acknowledged anything.
    MetaStore(directory / META, what=f"restored replica in {directory}").save()
    fsync_dir(directory)
