"""Membership log entries: our protobuf behind pysyncobj's MEMBERSHIP byte, replayed at start."""

import pickle
from pathlib import Path

import pytest

from raftkv import command
from raftkv.raft import wire
from raftkv.raft.conf_change import conf_change, initial_members, members_at, parse_conf_change
from raftkv.raft.journal import Journal, MetaStore

REG = b"\x00" + command.put(b"k", b"v")


def test_a_conf_change_round_trips_and_nothing_else_parses_as_one() -> None:
    assert parse_conf_change(conf_change(False, "n4")) == ("add", "n4")
    assert parse_conf_change(conf_change(True, "n2")) == ("rem", "n2")
    assert parse_conf_change(REG) is None
    assert parse_conf_change(b"\x02" + pickle.dumps(["add", "x"])) is None


def _journal(tmp_path: Path, entries: list[bytes]) -> Journal:
    journal = Journal(
        tmp_path / "journal.bin", MetaStore(tmp_path / "meta.json", what="t"), what="t"
    )
    for i, e in enumerate(entries, start=1):
        journal.add(e, i, 1)
    return journal


def test_the_configuration_at_start_replays_the_log_over_the_base(tmp_path: Path) -> None:
    journal = _journal(tmp_path, [REG, conf_change(False, "n4"), REG, conf_change(True, "n3"), REG])
    assert initial_members({"n1", "n2", "n3"}, None, journal) == {"n1", "n2", "n4"}
    # a base that is already later than the log's start gives the same answer
    assert initial_members({"n1", "n2", "n4"}, None, journal) == {"n1", "n2", "n4"}
    # the configuration as of an index undoes what was appended after it
    assert members_at({"n1", "n2", "n4"}, journal, 3) == {"n1", "n2", "n3", "n4"}
    assert members_at({"n1", "n2", "n4"}, journal, 1) == {"n1", "n2", "n3"}
    journal._destroy()


def test_membership_entries_travel_in_append_entries_but_are_never_forwarded() -> None:
    entries = [(REG, 5, 2), (conf_change(False, "n4"), 6, 2)]
    msg = {
        "type": "append_entries",
        "term": 2,
        "commit_index": 4,
        "entries": entries,
        "prevLogIdx": 4,
        "prevLogTerm": 2,
    }
    _, _, decoded = wire.decode(wire.encode(1, msg))
    assert decoded["entries"] == entries
    with pytest.raises(wire.UnencodableMessage):
        wire.encode(1, {"type": "apply_command", "command": conf_change(False, "n4")})
    # a peer's frame with a membership entry that is not a ConfChange is refused whole
    bad = dict(msg, entries=[(b"\x02not a conf change \xff\xff", 5, 2)])
    with pytest.raises(wire.MalformedFrame):
        wire.decode(wire.encode(1, bad))
