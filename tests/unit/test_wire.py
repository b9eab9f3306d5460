"""The Raft wire codec: every pysyncobj message kind round-trips; nothing else gets through."""

import pickle

import pytest

from raftkv.raft import wire

REG = b"\x00"
NOOP = b"\x01"

MESSAGES = [
    {"type": "request_vote", "term": 7, "last_log_index": 40, "last_log_term": 6},
    {"type": "response_vote", "term": 7},
    {
        "type": "append_entries",
        "term": 3,
        "commit_index": 10,
        "entries": [(REG + b"cmd", 11, 3), (NOOP, 12, 3)],
        "prevLogIdx": 10,
        "prevLogTerm": 2,
        "read_round": 17,
    },
    {
        "type": "append_entries",
        "term": 3,
        "commit_index": 10,
        "entries": [],
        "prevLogIdx": None,
        "prevLogTerm": None,
        "read_round": 0,
    },
    {
        "type": "append_entries",
        "term": 4,
        "commit_index": 9,
        "serialized": (b"x" * 10, True, False),
        "read_round": 3,
    },
    {"type": "append_entries", "term": 4, "commit_index": 9, "serialized": None, "read_round": 0},
    {
        "type": "next_node_idx",
        "next_node_idx": 13,
        "reset": False,
        "success": True,
        "read_round": 17,
    },
    {"type": "apply_command", "command": REG + b"put"},
    {"type": "apply_command", "command": REG + b"put", "request_id": 5},
    {"type": "apply_command_response", "request_id": 5, "error": 4},
    {"type": "apply_command_response", "request_id": 5, "log_idx": 20, "log_term": 3},
    {"type": "timeout_now", "term": 8},
    {"type": "read_index", "request_id": 9},
    {"type": "read_index_response", "request_id": 9, "outcome": 0, "index": 41},
    {"type": "read_index_response", "request_id": 9, "outcome": 1, "index": 0},
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: str(m["type"]))
def test_every_message_kind_round_trips_with_the_keys_pysyncobj_reads(message: dict) -> None:
    kind, shard, decoded = wire.decode(wire.encode(5, message))
    assert (kind, shard) == ("raft", 5)
    assert decoded == message
    assert set(decoded) == set(message)  # presence matters: 'prevLogIdx' in message, etc.


def test_a_failed_snapshot_read_travels_as_no_chunk() -> None:
    msg = {"type": "append_entries", "term": 4, "commit_index": 9, "serialized": False}
    _, _, decoded = wire.decode(wire.encode(1, msg))
    assert decoded["serialized"] is None


def test_pickled_transmissions_and_foreign_command_types_are_refused() -> None:
    chunked = {
        "type": "append_entries",
        "transmission": "start",
        "data": pickle.dumps(("x", 1, 1)),
        "term": 1,
        "commit_index": 1,
        "prevLogIdx": 1,
        "prevLogTerm": 1,
    }
    with pytest.raises(wire.UnencodableMessage):
        wire.encode(0, chunked)
    membership = {"type": "apply_command", "command": b"\x02" + pickle.dumps(["add", "x"])}
    with pytest.raises(wire.UnencodableMessage):
        wire.encode(0, membership)
    with pytest.raises(wire.UnencodableMessage):
        wire.encode(0, {"type": "status"})


def test_a_forged_frame_with_a_pickled_membership_entry_does_not_decode() -> None:
    from raftkv._pb.raftkv.v1 import raft_pb2 as pb

    frame = pb.RaftFrame(shard_id=0)
    frame.append_entries.term = 1
    frame.append_entries.first_index = 2
    frame.append_entries.terms.extend([1, 1])
    frame.append_entries.commands.extend([b"\x00ok", b"\x02" + pickle.dumps(["add", "evil"])])
    with pytest.raises(wire.MalformedFrame):
        wire.decode(frame.SerializeToString())
    del frame.append_entries.commands[1]  # now one term too many
    with pytest.raises(wire.MalformedFrame):
        wire.decode(frame.SerializeToString())


def test_non_consecutive_entries_are_never_encoded() -> None:
    gap = {
        "type": "append_entries",
        "term": 1,
        "commit_index": 1,
        "entries": [(REG, 2, 1), (REG, 4, 1)],
        "prevLogIdx": 1,
        "prevLogTerm": 1,
    }
    with pytest.raises(wire.UnencodableMessage):
        wire.encode(0, gap)


@pytest.mark.parametrize(
    "garbage", [b"\xff" * 16, pickle.dumps({"type": "request_vote", "term": 10**9}), b"\x0a"]
)
def test_garbage_is_malformed_or_empty_never_a_message(garbage: bytes) -> None:
    try:
        kind, _, _ = wire.decode(garbage)
    except wire.MalformedFrame:
        return
    assert kind in ("ping", "peer_state")  # cannot be a Raft message without its body


def test_ping_and_peer_state() -> None:
    assert wire.decode(wire.encode_ping())[0] == "ping"
    kind, _, terms = wire.decode(wire.encode_peer_state({0: 5, 3: 9}))
    assert kind == "peer_state" and terms == {0: 5, 3: 9}
    # a node whose replicas are all recovering reports nothing, and that is still valid
    assert wire.decode(wire.encode_peer_state({})) == ("peer_state", 0, {})
