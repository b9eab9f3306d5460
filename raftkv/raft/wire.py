"""The Raft wire codec: pysyncobj's message dicts ⇄ ``RaftFrame`` protobuf bytes.

pysyncobj speaks in Python dicts and pickles them onto its sockets, so anyone who could reach
a Raft port could run code on the node. raftkv sends data only: every message kind pysyncobj
produces has a protobuf type in ``proto/raftkv/v1/raft.proto``, and this module maps between
the two. Decoding builds only dicts of ints, bools and bytes, with exactly the keys pysyncobj
reads (``'prevLogIdx' in message`` and ``message.get('error')`` are meaningful, so presence is
preserved).

Two things pysyncobj could send are deliberately unrepresentable:

* ``transmission`` chunks (an entry larger than ``appendEntriesBatchSizeBytes`` is pickled
  and split): raftkv sets that size above the largest command it accepts, so they never
  occur, and the receiving side has no way to turn bytes back into a pickle;
* commands whose pysyncobj type byte is not REGULAR, NO_OP or MEMBERSHIP (VERSION entries are
  pickles that pysyncobj would load when applying them). raftkv's MEMBERSHIP entries carry a
  ``ConfChange`` protobuf, never pysyncobj's pickle, and are checked here before they are
  accepted.

:func:`encode` raises :class:`UnencodableMessage` for anything else; :func:`decode` raises
:class:`MalformedFrame` for bytes that are not a valid frame. Both are programming or peer
errors: the transport logs them and drops the message (or the link).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import DecodeError

from raftkv._pb.raftkv.v1 import command_pb2 as cmd_pb
from raftkv._pb.raftkv.v1 import raft_pb2 as pb

# pysyncobj's command type bytes that may appear in a log entry on the wire.
_REGULAR = 0
_NO_OP = 1
_MEMBERSHIP = 2
_ALLOWED_PREFIXES = frozenset({bytes([_REGULAR]), bytes([_NO_OP]), bytes([_MEMBERSHIP])})


# Follower reads (not pysyncobj's: raftkv's replica handles them, see ShardReplica).
READ_INDEX = "read_index"
READ_INDEX_RESPONSE = "read_index_response"
READ_OK = pb.ReadIndexResponse.OK
READ_NOT_LEADER = pb.ReadIndexResponse.NOT_LEADER
READ_FORWARD = pb.ReadIndexResponse.FORWARD


class UnencodableMessage(ValueError):
    """pysyncobj produced a message raftkv will not put on the wire."""


class MalformedFrame(ValueError):
    """Bytes from an authenticated peer that are not a valid Raft frame."""


def encode_ping() -> bytes:
    return _PING


def encode_incarnation(incarnation: str) -> bytes:
    return pb.RaftFrame(incarnation=pb.Incarnation(id=incarnation)).SerializeToString()


def encode_peer_state(shard_terms: dict[int, int]) -> bytes:
    frame = pb.RaftFrame()
    frame.peer_state.SetInParent()  # an empty map must still say "peer state"
    frame.peer_state.shard_terms.update(shard_terms)
    return frame.SerializeToString()


def _valid_conf_change(command: bytes) -> bool:
    change = cmd_pb.ConfChange()
    try:
        change.ParseFromString(command[1:])
    except DecodeError:
        return False
    return bool(change.node_id) and change.type in (cmd_pb.ConfChange.ADD, cmd_pb.ConfChange.REMOVE)


def encode(shard_id: int, message: dict[str, Any]) -> bytes:
    """One pysyncobj message for ``shard_id`` → frame bytes."""
    frame = pb.RaftFrame(shard_id=shard_id)
    kind = message.get("type")
    if kind == "append_entries":
        if "transmission" in message:
            raise UnencodableMessage("chunked (pickled) entry transmission is disabled")
        if "prevLogIdx" in message:
            ae = frame.append_entries
            ae.term = message["term"]
            ae.commit_index = message["commit_index"]
            entries = message.get("entries", ())
            if entries:
                first = entries[0][1]
                if entries[-1][1] - first != len(entries) - 1:
                    raise UnencodableMessage("entries at non-consecutive indexes")
                ae.first_index = first
                ae.terms.extend([e[2] for e in entries])
                ae.commands.extend([e[0] for e in entries])
            if message["prevLogIdx"] is not None:
                ae.prev_log_index = message["prevLogIdx"]
            if message["prevLogTerm"] is not None:
                ae.prev_log_term = message["prevLogTerm"]
            ae.read_round = message.get("read_round", 0)
        else:
            snap = frame.install_snapshot
            snap.term = message["term"]
            snap.commit_index = message["commit_index"]
            snap.read_round = message.get("read_round", 0)
            chunk = message.get("serialized")
            if chunk:  # None: nothing ready yet; False: the leader failed to read its file
                data, first, last = chunk
                snap.chunk.data, snap.chunk.first, snap.chunk.last = data, first, last
    elif kind == "next_node_idx":
        ni = frame.next_index
        ni.next_index = message["next_node_idx"]
        ni.reset = message["reset"]
        ni.success = message["success"]
        ni.read_round = message.get("read_round", 0)
    elif kind == "request_vote":
        rv = frame.request_vote
        rv.term = message["term"]
        rv.last_log_index = message["last_log_index"]
        rv.last_log_term = message["last_log_term"]
    elif kind == "response_vote":
        frame.response_vote.term = message["term"]
    elif kind == "apply_command":
        ac = frame.apply_command
        ac.command = message["command"]
        if ac.command[:1] not in (bytes([_REGULAR]), bytes([_NO_OP])):
            raise UnencodableMessage("only regular commands are forwarded to a leader")
        if "request_id" in message:
            ac.request_id = message["request_id"]
    elif kind == "apply_command_response":
        acr = frame.apply_command_response
        acr.request_id = message["request_id"]
        if message.get("error") is not None:
            acr.error = message["error"]
        else:
            acr.log_index = message["log_idx"]
            acr.log_term = message["log_term"]
    elif kind == "timeout_now":
        frame.timeout_now.term = message["term"]
    elif kind == READ_INDEX:
        frame.read_index_request.request_id = message["request_id"]
    elif kind == READ_INDEX_RESPONSE:
        rir = frame.read_index_response
        rir.request_id = message["request_id"]
        rir.outcome = message["outcome"]
        rir.index = message["index"]
    else:
        raise UnencodableMessage(f"unknown pysyncobj message type {kind!r}")
    return frame.SerializeToString()


Decoded = tuple[str, int, Any]
"""``(kind, shard_id, payload)``: kind is ``"raft"`` (payload: a pysyncobj message dict),
``"ping"`` (payload None), ``"peer_state"`` (payload: ``{shard_id: term}``) or
``"incarnation"`` (payload: the sender's incarnation id)."""


def decode(data: bytes) -> Decoded:
    frame = pb.RaftFrame()
    try:
        frame.ParseFromString(data)
    except DecodeError as e:
        raise MalformedFrame(f"not a Raft frame ({e})") from None
    which = frame.WhichOneof("body")
    shard = frame.shard_id
    message: dict[str, Any]
    if which == "append_entries":
        ae = frame.append_entries
        commands = list(ae.commands)
        if len(commands) != len(ae.terms):
            raise MalformedFrame("AppendEntries with as many terms as commands expected")
        if not all(c[:1] in _ALLOWED_PREFIXES for c in commands):
            raise MalformedFrame("log entry with a command type raftkv never writes")
        if not all(c[:1] != b"\x02" or _valid_conf_change(c) for c in commands):
            raise MalformedFrame("membership entry that is not a ConfChange")
        first = ae.first_index
        message = {
            "type": "append_entries",
            "term": ae.term,
            "commit_index": ae.commit_index,
            "entries": list(
                zip(commands, range(first, first + len(commands)), ae.terms, strict=True)
            ),
            "prevLogIdx": ae.prev_log_index if ae.HasField("prev_log_index") else None,
            "prevLogTerm": ae.prev_log_term if ae.HasField("prev_log_term") else None,
            "read_round": ae.read_round,
        }
    elif which == "install_snapshot":
        snap = frame.install_snapshot
        message = {
            "type": "append_entries",
            "term": snap.term,
            "commit_index": snap.commit_index,
            "serialized": (
                (snap.chunk.data, snap.chunk.first, snap.chunk.last)
                if snap.HasField("chunk")
                else None
            ),
            "read_round": snap.read_round,
        }
    elif which == "next_index":
        ni = frame.next_index
        message = {
            "type": "next_node_idx",
            "next_node_idx": ni.next_index,
            "reset": ni.reset,
            "success": ni.success,
            "read_round": ni.read_round,
        }
    elif which == "request_vote":
        rv = frame.request_vote
        message = {
            "type": "request_vote",
            "term": rv.term,
            "last_log_index": rv.last_log_index,
            "last_log_term": rv.last_log_term,
        }
    elif which == "response_vote":
        message = {"type": "response_vote", "term": frame.response_vote.term}
    elif which == "apply_command":
        ac = frame.apply_command
        message = {"type": "apply_command", "command": _entry_command(ac)}
        if ac.HasField("request_id"):
            message["request_id"] = ac.request_id
    elif which == "apply_command_response":
        acr = frame.apply_command_response
        message = {"type": "apply_command_response", "request_id": acr.request_id}
        if acr.HasField("error"):
            message["error"] = acr.error
        else:
            message["log_idx"] = acr.log_index
            message["log_term"] = acr.log_term
    elif which == "timeout_now":
        message = {"type": "timeout_now", "term": frame.timeout_now.term}
    elif which == "read_index_request":
        message = {"type": READ_INDEX, "request_id": frame.read_index_request.request_id}
    elif which == "read_index_response":
        rir = frame.read_index_response
        message = {
            "type": READ_INDEX_RESPONSE,
            "request_id": rir.request_id,
            "outcome": rir.outcome,
            "index": rir.index,
        }
    elif which == "ping":
        return ("ping", 0, None)
    elif which == "peer_state":
        return ("peer_state", 0, dict(frame.peer_state.shard_terms))
    elif which == "incarnation":
        return ("incarnation", 0, frame.incarnation.id)
    else:
        raise MalformedFrame("Raft frame with no known body")
    return ("raft", shard, message)


def _entry_command(holder: pb.ApplyCommand) -> bytes:
    command: bytes = holder.command
    # Membership changes are proposed at the leader only, never forwarded by a follower.
    if not command or command[0] not in (_REGULAR, _NO_OP):
        raise MalformedFrame("forwarded command of a type raftkv never forwards")
    return command


_PING = pb.RaftFrame(ping=pb.Ping()).SerializeToString()
