"""Snapshot files of a shard replica: checksummed, written aside and renamed into place.

A snapshot is the state machine's ``Snapshot`` protobuf (the map, the dedup table and the two
log entries pysyncobj keeps around it). On disk::

    MAGIC (8) | format version (u32) | payload length (u64) | CRC-32 of payload (u32) | payload

:func:`write_snapshot` writes a temporary file and fsyncs it; pysyncobj renames it into place.
:func:`read_snapshot` checks the header, the length and the CRC, and raises
:class:`~raftkv.errors.StorageError` naming the file otherwise.

A follower that is too far behind receives the leader's snapshot file in chunks;
:class:`SnapshotReceiver` checks the received file the same way *before* it replaces the
follower's own snapshot, so a bad transfer can never destroy a good snapshot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from google.protobuf.message import DecodeError
from pysyncobj.serializer import Serializer

from raftkv._pb.raftkv.v1 import command_pb2 as pb
from raftkv.durable import fsync_dir
from raftkv.errors import StorageError

log = logging.getLogger("raftkv.snapshot")

MAGIC = b"RKVSNAP1"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">8sIQI")


def encode(snap: pb.Snapshot) -> bytes:
    payload = snap.SerializeToString()
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), zlib.crc32(payload)) + payload


def decode(data: bytes, where: str) -> pb.Snapshot:
    if len(data) < _HEADER.size:
        raise StorageError(f"{where}: the snapshot is cut short ({len(data)} bytes)")
    magic, version, size, crc = _HEADER.unpack_from(data, 0)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise StorageError(f"{where}: not a raftkv snapshot (bad header)")
    payload = data[_HEADER.size :]
    if len(payload) != size:
        raise StorageError(
            f"{where}: the snapshot should hold {size} bytes after its header, it holds "
            f"{len(payload)} (truncated or extended)"
        )
    if zlib.crc32(payload) != crc:
        raise StorageError(f"{where}: the snapshot fails its checksum (corrupt)")
    snap = pb.Snapshot()
    try:
        snap.ParseFromString(payload)
    except DecodeError as e:
        raise StorageError(f"{where}: the snapshot does not parse ({e})") from None
    return snap


def write_snapshot(path: str | Path, snap: pb.Snapshot) -> None:
    """Write ``snap`` to ``path`` and fsync it (the caller renames it into place)."""
    data = encode(snap)
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def read_snapshot(path: Path, where: str) -> pb.Snapshot:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StorageError(f"{where}: cannot read the snapshot {path}: {e}") from e
    return decode(data, f"{where}: {path}")


class SnapshotReceiver(Serializer):  # type: ignore[misc]
    """pysyncobj's Serializer with a checked install: verify, then rename into place."""

    def __init__(self, path: Path, what: str, **kwargs: Any) -> None:
        super().__init__(str(path), **kwargs)
        self._path = path
        self._what = what
        self._incoming: BinaryIO | None = None
        self._tmp = path.with_name(path.name + ".incoming")

    def setTransmissionData(self, data: Any) -> bool:
        """One chunk from the leader; True once a complete, valid snapshot is in place."""
        if not data:
            return False
        chunk, first, last = data
        try:
            if first:
                self._discard()
                self._incoming = open(self._tmp, "wb")  # noqa: SIM115 - spans many calls
            if self._incoming is None:
                return False  # a chunk from the middle of a transfer we did not see start
            self._incoming.write(chunk)
            if not last:
                return False
            self._incoming.flush()
            os.fsync(self._incoming.fileno())
            self._incoming.close()
            self._incoming = None
            read_snapshot(self._tmp, f"{self._what}: snapshot received from the leader")
            os.replace(self._tmp, self._path)
            fsync_dir(self._path.parent)
            return True
        except (OSError, StorageError) as e:
            log.error("%s: dropping a snapshot received from the leader: %s", self._what, e)
            self._discard()
            return False

    def _discard(self) -> None:
        if self._incoming is not None:
            with contextlib.suppress(OSError):
                self._incoming.close()
            self._incoming = None
        with contextlib.suppress(OSError):
            self._tmp.unlink()
