"""The replicated state machine: applies commands to the key-value map; snapshot and restore.

Pure and deterministic by design: no I/O, no clock, no randomness, no pysyncobj. Every replica
applies the same commands in the same order and so holds the same map. Given the log index of
the entry being applied, it also gives each key a *version*: the index of the write that last
set it (like etcd's mod_revision), which compare-and-swap can test.

Retried writes are deduplicated here: a command with a ``(client_id, seq)`` that was applied
before returns the first result again and changes nothing. The table keeps the most recent
``dedup_capacity`` request ids, evicted in apply order, so it is deterministic too. It also
keeps a hash of each command: an id that comes back with a *different* command (another key or
value) is answered ``REQUEST_ID_REUSED`` and applies nothing, so a client that reuses ids can
never have a write acknowledged that was not applied.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import NamedTuple

from raftkv._pb.raftkv.v1 import command_pb2 as pb
from raftkv.command import decode

DEFAULT_DEDUP_CAPACITY = 100_000


class Entry(NamedTuple):
    # A tuple, not a frozen dataclass: a bulk put builds one per key on every replica, and a
    # frozen dataclass's __init__ cost three times as much.
    value: bytes
    version: int


class StateMachine:
    """The key-value map of one shard."""

    def __init__(self, dedup_capacity: int = DEFAULT_DEDUP_CAPACITY) -> None:
        self._data: dict[bytes, Entry] = {}
        self._dedup: OrderedDict[tuple[bytes, int], tuple[pb.CommandResult, bytes]] = OrderedDict()
        self._dedup_capacity = dedup_capacity
        self.applied_index = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes) -> Entry | None:
        return self._data.get(key)

    def items(self) -> dict[bytes, Entry]:
        """A shallow copy of the map (entries are immutable), for digests off the Raft thread."""
        return dict(self._data)

    def apply(self, data: bytes, index: int) -> pb.CommandResult:
        """Apply one encoded command found at log ``index``."""
        self.applied_index = index
        cmd = decode(data)
        if not cmd.client_id:
            return self._execute(cmd, index)
        request = (cmd.client_id, cmd.seq)
        digest = command_hash(cmd)
        previous = self._dedup.get(request)
        if previous is not None:
            result, first_digest = previous
            # An empty hash comes from a snapshot written before hashes were kept.
            if first_digest and first_digest != digest:
                return pb.CommandResult(code=pb.CommandResult.REQUEST_ID_REUSED)
            return result
        result = self._execute(cmd, index)
        self._dedup[request] = (result, digest)
        if len(self._dedup) > self._dedup_capacity:
            self._dedup.popitem(last=False)
        return result

    def _execute(self, cmd: pb.Command, index: int) -> pb.CommandResult:
        op = cmd.WhichOneof("op")
        if op == "put":
            self._data[cmd.put.key] = Entry(cmd.put.value, index)
            return pb.CommandResult(version=index)
        if op == "batch":
            for put in cmd.batch.puts:
                self._data[put.key] = Entry(put.value, index)
            return pb.CommandResult(version=index)
        if op == "delete":
            existed = self._data.pop(cmd.delete.key, None) is not None
            return pb.CommandResult(existed=existed)
        if op == "cas":
            current = self._data.get(cmd.cas.key)
            if cmd.cas.WhichOneof("expected") == "expected_version":
                matches = (current.version if current else 0) == cmd.cas.expected_version
            else:
                matches = current is not None and current.value == cmd.cas.expected_value
            if not matches:
                return pb.CommandResult(
                    code=pb.CommandResult.PRECONDITION_FAILED,
                    current_version=current.version if current else 0,
                )
            self._data[cmd.cas.key] = Entry(cmd.cas.value, index)
            return pb.CommandResult(version=index, existed=current is not None)
        # A barrier (or an op from a newer version we do not know) changes nothing.
        return pb.CommandResult()

    def digest(self) -> str:
        """A hash of the whole map (keys, values, versions), equal on replicas that agree."""
        return digest_of(self._data)

    def snapshot(self) -> pb.Snapshot:
        return pb.Snapshot(
            entries=[
                pb.SnapshotEntry(key=k, value=e.value, version=e.version)
                for k, e in self._data.items()
            ],
            dedup=[
                pb.DedupEntry(client_id=c, seq=s, result=r, command_hash=h)
                for (c, s), (r, h) in self._dedup.items()
            ],
            applied_index=self.applied_index,
        )

    def restore(self, snap: pb.Snapshot) -> None:
        self._data = {e.key: Entry(e.value, e.version) for e in snap.entries}
        self._dedup = OrderedDict(
            ((d.client_id, d.seq), (d.result, d.command_hash)) for d in snap.dedup
        )
        self.applied_index = snap.applied_index


def command_hash(cmd: pb.Command) -> bytes:
    """What a request id stands for: the operation, without the id itself."""
    op = cmd.WhichOneof("op") or ""
    body = getattr(cmd, op).SerializeToString(deterministic=True) if op else b""
    return hashlib.blake2b(op.encode() + b"\0" + body, digest_size=16).digest()


def digest_of(data: dict[bytes, Entry]) -> str:
    """A hash of a whole map (keys, values, versions), equal on replicas that agree."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(data):
        entry = data[key]
        h.update(len(key).to_bytes(4, "big") + key)
        h.update(len(entry.value).to_bytes(4, "big") + entry.value)
        h.update(entry.version.to_bytes(8, "big"))
    return h.hexdigest()
