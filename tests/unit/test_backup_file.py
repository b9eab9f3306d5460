"""The backup file, written one shard at a time: round trip, and nothing left on failure."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from raftkv._pb.raftkv.v1 import admin_pb2 as admin
from raftkv._pb.raftkv.v1 import backup_pb2 as bpb
from raftkv._pb.raftkv.v1 import command_pb2 as pb
from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv.backup import BackupError, BackupWriter, ShardCopy, read_backup, save
from raftkv.statemachine import Entry, digest_of


def shard_data(shard: int, n: int) -> dict[bytes, Entry]:
    return {f"s{shard}-{i:05d}".encode(): Entry(f"v{i}".encode(), 10 + i) for i in range(n)}


def test_a_file_written_shard_by_shard_reads_back_whole(tmp_path: Path) -> None:
    path = tmp_path / "b.raftkv"
    writer = BackupWriter(path)
    # 5000 keys: more than one record per shard; an empty shard still gets its part
    copies = [ShardCopy(0, 7, 8, shard_data(0, 5000)), ShardCopy(1, 3, 3, {})]
    for copy in copies:
        writer.add(copy)
    writer.finish(bpb.BackupManifest(shard_count=2, vnodes=64))
    assert not (tmp_path / "b.raftkv.partial").exists()
    backup = read_backup(path)
    assert backup.shards == {0: copies[0].data, 1: {}}
    listed = {s.shard_id: s for s in backup.manifest.shards}
    assert (listed[0].read_index, listed[0].applied_index, listed[0].keys) == (7, 8, 5000)
    assert listed[0].digest == digest_of(copies[0].data)


def test_an_aborted_writer_leaves_nothing(tmp_path: Path) -> None:
    writer = BackupWriter(tmp_path / "b.raftkv")
    writer.add(ShardCopy(0, 1, 1, shard_data(0, 10)))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


class TwoShards:
    """Answers like a cluster of two shards whose second copy arrives damaged."""

    async def status(self) -> kv.StatusResponse:
        return kv.StatusResponse(shard_count=2, vnodes=64, epoch=1)

    async def snapshot_shard(self, shard: int) -> list[Any]:
        data = shard_data(shard, 3)
        entries = [pb.SnapshotEntry(key=k, value=e.value, version=e.version)
                   for k, e in data.items()]  # fmt: skip
        digest = digest_of(data) if shard == 0 else "damaged"
        return [admin.SnapshotShardChunk(entries=entries, done=True, keys=3, digest=digest)]


def test_a_save_that_fails_on_a_later_shard_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "b.raftkv"
    with pytest.raises(BackupError, match="shard 1"):
        asyncio.run(save(TwoShards(), path))  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
