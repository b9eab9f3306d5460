"""Membership log entries: encoding and parsing them, and the configuration at an index.

A membership change is one log entry: pysyncobj's MEMBERSHIP type byte, then our
``ConfChange`` protobuf (never pysyncobj's pickle). pysyncobj applies such an entry when it is
appended and undoes it when a new leader truncates it, one change at a time (Raft's
single-server change). A replica's configuration at start-up is rebuilt here from its snapshot
and log (:func:`initial_members`), and a snapshot records the configuration as of its last
entry (:func:`members_at`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raftkv._pb.raftkv.v1 import command_pb2 as pb

if TYPE_CHECKING:
    from raftkv.raft.journal import Journal

# pysyncobj's MEMBERSHIP command type byte (the others are in raftkv.raft.group).
MEMBERSHIP = b"\x02"


def conf_change(remove: bool, node_id: str) -> bytes:
    """A membership log entry: pysyncobj's MEMBERSHIP type byte, then our protobuf."""
    change = pb.ConfChange(type=pb.ConfChange.REMOVE if remove else pb.ConfChange.ADD)
    change.node_id = node_id
    return MEMBERSHIP + change.SerializeToString()


def parse_conf_change(entry: bytes) -> tuple[str, str] | None:
    """A membership entry → pysyncobj's ``("add"|"rem", node_id)``; None for anything else."""
    if entry[:1] != MEMBERSHIP:
        return None
    change = pb.ConfChange()
    try:
        change.ParseFromString(entry[1:])
    except Exception:
        return None
    if not change.node_id:
        return None
    return ("rem" if change.type == pb.ConfChange.REMOVE else "add", change.node_id)


def initial_members(base: set[str], snapshot: pb.Snapshot | None, journal: Journal) -> set[str]:
    """The group's voters when a replica starts: the snapshot's (else ``base``), then every
    membership change in the log after it, in order.

    Replaying changes over a configuration that is older than the log's start is still right:
    a node's final presence is set by its last change, and nodes with no change in the log
    were in every configuration.
    """
    members = set(snapshot.members) if snapshot is not None and snapshot.members else set(base)
    after = snapshot.last_applied.index if snapshot is not None else 0
    for i in range(len(journal)):
        entry = journal[i]
        if entry[1] <= after:
            continue
        change = parse_conf_change(entry[0])
        if change is not None:
            (members.add if change[0] == "add" else members.discard)(change[1])
    return members


def members_at(current: set[str], journal: Journal, index: int) -> set[str]:
    """The voters as of log ``index``: undo the changes appended after it."""
    members = set(current)
    for i in range(len(journal) - 1, -1, -1):
        entry = journal[i]
        if entry[1] <= index:
            break
        change = parse_conf_change(entry[0])
        if change is not None:
            (members.discard if change[0] == "add" else members.add)(change[1])
    return members
