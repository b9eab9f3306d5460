"""The replica's files: journal records, term/vote, snapshots and how they fit together."""

import json
import logging
import os
from pathlib import Path

import pytest

from raftkv._pb.raftkv.v1 import command_pb2 as pb
from raftkv.errors import StorageError
from raftkv.raft import snapshot as snapfile
from raftkv.raft.journal import HEADER_BYTES, Journal, MetaStore
from raftkv.raft.storage import open_storage
from raftkv.testing.files import record_offsets


def journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "journal.bin", MetaStore(tmp_path / "meta.json", what="t"), what="t")


def filled(tmp_path: Path, n: int = 5, first: int = 1) -> Journal:
    j = journal(tmp_path)
    for i in range(first, first + n):
        j.add(b"\x00cmd-%d" % i, i, 1 + i // 3)
    return j


def test_entries_survive_reopening(tmp_path: Path) -> None:
    j = filled(tmp_path)
    j.sync()
    j._destroy()
    again = journal(tmp_path)
    assert [e[1] for e in again] == [1, 2, 3, 4, 5]
    assert again[2] == (b"\x00cmd-3", 3, 2)
    assert again[-1][1] == 5 and len(again) == 5


def test_a_flipped_bit_refuses_to_open_naming_file_and_record(tmp_path: Path) -> None:
    filled(tmp_path)._destroy()
    path = tmp_path / "journal.bin"
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 40] ^= 0x10  # inside the second record
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError) as e:
        journal(tmp_path)
    message = str(e.value)
    assert str(path) in message and "record 2" in message and "checksum" in message
    assert "--recover-from-peers" in message


def test_a_torn_last_record_is_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    filled(tmp_path)._destroy()
    path = tmp_path / "journal.bin"
    offset, size = record_offsets(path)[-1]
    data = bytearray(path.read_bytes())
    end = offset + 8 + size
    data[end - 12 : end] = bytes(12)  # the rest of record 5's write never reached the disk
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        j = journal(tmp_path)
    assert [e[1] for e in j] == [1, 2, 3, 4]
    assert "record 5" in j.repaired and str(path) in caplog.text
    j.add(b"\x00again", 5, 2)  # appends continue at the right place
    j._destroy()
    assert [e[0] for e in journal(tmp_path)][-1] == b"\x00again"


def test_a_cut_journal_is_refused_not_repaired(tmp_path: Path) -> None:
    filled(tmp_path)._destroy()
    path = tmp_path / "journal.bin"
    offset, _ = record_offsets(path)[2]
    os.truncate(path, offset + 11)  # cut inside record 3 (and the allocated space after)
    with pytest.raises(StorageError, match="ends inside record 3"):
        journal(tmp_path)
    assert path.stat().st_size == offset + 11


def test_zeros_after_the_last_record_end_the_log_quietly(tmp_path: Path) -> None:
    filled(tmp_path)._destroy()
    path = tmp_path / "journal.bin"
    path.write_bytes(path.read_bytes() + b"\0" * 4096)  # preallocated, or never written
    j = journal(tmp_path)
    assert [e[1] for e in j] == [1, 2, 3, 4, 5] and not j.repaired
    j.add(b"\x00six", 6, 2)  # written into the zeros
    j._destroy()
    assert [e[1] for e in journal(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_a_flipped_bit_in_the_last_record_is_corruption_not_a_torn_write(tmp_path: Path) -> None:
    filled(tmp_path)._destroy()
    path = tmp_path / "journal.bin"
    offset, _ = record_offsets(path)[-1]
    data = bytearray(path.read_bytes())
    data[offset + 25] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=r"record 5 at offset .* fails its checksum"):
        journal(tmp_path)


def test_room_is_preallocated_ahead_of_appends(tmp_path: Path) -> None:
    j = filled(tmp_path, 2)
    size = (tmp_path / "journal.bin").stat().st_size
    assert size >= 4 * 1024 * 1024  # the appends reserved a chunk ahead
    assert j.room() > 2 * 1024 * 1024 and not j.low_on_space
    j.keep_room()  # enough room: no new allocation
    assert (tmp_path / "journal.bin").stat().st_size == size


def test_a_length_running_past_the_end_is_refused_not_repaired(tmp_path: Path) -> None:
    filled(tmp_path, 100)._destroy()
    path = tmp_path / "journal.bin"
    offset, _ = record_offsets(path)[49]
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x80  # a flipped high bit in record 50's length field
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="record 50"):
        journal(tmp_path)
    assert path.stat().st_size == len(data)  # nothing was cut off


def test_out_of_order_indexes_are_corruption(tmp_path: Path) -> None:
    j = journal(tmp_path)
    j.add(b"\x00a", 1, 1)
    j.add(b"\x00b", 3, 1)  # a gap: only a bug or tampering writes this
    j._destroy()
    with pytest.raises(StorageError, match="index 3 term 1 after index 1"):
        journal(tmp_path)


def test_truncating_the_tail_and_compacting(tmp_path: Path) -> None:
    j = filled(tmp_path, 10)
    j.deleteEntriesFrom(7)  # drop indexes 8..10 (a follower's conflicting tail)
    j.add(b"\x00new-8", 8, 9)
    j.deleteEntriesTo(3)  # compaction: keep indexes 4.. in a new file
    assert not (tmp_path / "journal.bin.tmp").exists()
    j._destroy()
    again = journal(tmp_path)
    assert [e[1] for e in again] == [4, 5, 6, 7, 8]
    assert again[-1] == (b"\x00new-8", 8, 9)


def test_term_and_vote_are_durable_and_checked(tmp_path: Path) -> None:
    j = journal(tmp_path)
    j.setCurrentTerm(7, "n2")
    j._destroy()
    again = journal(tmp_path)
    assert (again.getCurrentTerm(), again.getVotedForNodeId()) == (7, "n2")
    meta = tmp_path / "meta.json"
    doc = json.loads(meta.read_text())
    doc["state"]["term"] = 6  # rolled back by hand: the checksum no longer matches
    meta.write_text(json.dumps(doc))
    with pytest.raises(StorageError, match="checksum"):
        journal(tmp_path)
    meta.write_text("{not json")
    with pytest.raises(StorageError, match="unreadable"):
        journal(tmp_path)


def test_pysyncobj_journals_are_refused_with_a_way_out(tmp_path: Path) -> None:
    (tmp_path / "journal.bin").write_bytes(b"PYSYNCOBJ" + b"\x00" * 40)
    with pytest.raises(StorageError, match=r"raftkv 0\.1"):
        journal(tmp_path)


def snapshot_at(index: int) -> pb.Snapshot:
    snap = pb.Snapshot(entries=[pb.SnapshotEntry(key=b"k", value=b"v", version=index)])
    snap.last_applied.CopyFrom(pb.LogEntry(command=b"\x00x", index=index, term=2))
    snap.before_last_applied.CopyFrom(pb.LogEntry(command=b"\x00w", index=index - 1, term=2))
    return snap


def test_a_compacted_journal_without_its_snapshot_refuses_to_start(tmp_path: Path) -> None:
    shard = tmp_path / "shard-3"
    shard.mkdir()
    meta = MetaStore(shard / "meta.json", what="s")
    meta.save()
    j = Journal(shard / "journal.bin", meta, what="s")
    for i in range(899, 905):
        j.add(b"\x00c", i, 2)
    j._destroy()
    with pytest.raises(StorageError) as e:
        open_storage(shard, 3)
    assert "shard 3" in str(e.value) and "starts at index 899" in str(e.value)
    assert "no snapshot.bin" in str(e.value) and "must not vote or lead" in str(e.value)
    snapfile.write_snapshot(shard / "snapshot.bin", snapshot_at(900))
    storage = open_storage(shard, 3)
    assert storage.snapshot is not None and storage.snapshot.last_applied.index == 900
    storage.journal._destroy()
    snapfile.write_snapshot(shard / "snapshot.bin", snapshot_at(500))  # too old: a gap
    with pytest.raises(StorageError, match="only reaches index 500"):
        open_storage(shard, 3)


def test_a_journal_without_its_meta_file_has_lost_its_vote(tmp_path: Path) -> None:
    shard = tmp_path / "shard-1"
    storage = open_storage(shard, 1)  # a new replica writes meta.json at once
    assert (shard / "meta.json").exists()
    storage.journal.add(b"\x00c", 1, 0)
    storage.journal.setCurrentTerm(7, "n2")
    storage.journal._destroy()
    (shard / "meta.json").unlink()
    with pytest.raises(StorageError, match=r"meta\.json is missing"):
        open_storage(shard, 1)


def test_a_replica_that_died_before_its_first_entry_opens_but_one_that_voted_does_not(
    tmp_path: Path,
) -> None:
    """Killed between creating meta.json and its first entry (a replica moving onto a node):
    term 0 and no vote, so it never took part; one that recorded a term did."""
    shard = tmp_path / "shard-1"
    open_storage(shard, 1).journal._destroy()
    reopened = open_storage(shard, 1)  # no entry, never voted: a new replica again
    assert len(reopened.journal) == 0
    reopened.journal.setCurrentTerm(3, "n2")
    reopened.journal._destroy()
    with pytest.raises(
        StorageError, match=r"records term 3 but .*journal\.bin is missing or empty"
    ):
        open_storage(shard, 1)


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "header"])
def test_damaged_snapshots_are_named_and_refused(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "snapshot.bin"
    snapfile.write_snapshot(path, snapshot_at(10))
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
    elif damage == "truncate":
        data = data[:-4]
    elif damage == "extend":
        data += b"\x00"
    else:
        data[0:8] = b"NOTSNAP!"
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError) as e:
        snapfile.read_snapshot(path, "shard 1")
    assert "shard 1" in str(e.value) and str(path) in str(e.value)


def test_a_received_snapshot_that_fails_its_check_never_replaces_ours(tmp_path: Path) -> None:
    ours = tmp_path / "snapshot.bin"
    snapfile.write_snapshot(ours, snapshot_at(10))
    before = ours.read_bytes()
    receiver = snapfile.SnapshotReceiver(
        ours,
        "shard 1",
        transmissionBatchSize=1024,
        tryUseFork=False,
        serializer=lambda *_: None,
        deserializer=lambda *_: None,
        serializeChecker=None,
    )
    good = snapfile.encode(snapshot_at(20))
    bad = bytearray(good)
    bad[-1] ^= 1
    assert receiver.setTransmissionData((bytes(bad[:10]), True, False)) is False
    assert receiver.setTransmissionData((bytes(bad[10:]), False, True)) is False
    assert ours.read_bytes() == before
    assert receiver.setTransmissionData((good, True, True)) is True
    assert snapfile.read_snapshot(ours, "x").last_applied.index == 20


def test_sync_makes_appends_stored_and_a_truncation_takes_them_back(tmp_path: Path) -> None:
    j = Journal(
        tmp_path / "journal.bin",
        MetaStore(tmp_path / "meta.json", what="t"),
        what="t",
        durable=True,
    )
    for i in range(1, 6):
        j.add(b"\x00cmd-%d" % i, i, 1)
    assert j.stored_index == 0  # in the page cache only
    assert j.sync() is True
    assert j.stored_index == 5
    assert j.sync() is False  # nothing new: no fsync at all
    j.deleteEntriesFrom(3)  # a new leader cut entries 4 and 5
    assert j.stored_index == 3
    j.add(b"\x00other-4", 4, 2)
    assert j.stored_index == 3  # the new entry 4 is not the synced one
    j.sync()
    assert j.stored_index == 4
    j._destroy()
    assert j.sync() is False  # a closed journal is never fsynced (its fd may be reused)


def test_a_closed_replica_s_queued_commit_index_save_never_lands(tmp_path: Path) -> None:
    # The fsync thread may run a commit-index save after the replica stopped and its
    # directory was deleted and handed to a new replica: it must not write the old state there.
    j = journal(tmp_path)
    j.meta.term, j.meta.voted_for = 34, "n1"
    j.meta.save()
    j._destroy()
    (tmp_path / "meta.json").unlink()
    j.meta.save_commit_index(4115)  # the queued job, running late
    assert not (tmp_path / "meta.json").exists()
