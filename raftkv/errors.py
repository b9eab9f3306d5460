"""The one error hierarchy of raftkv, and the one table that maps it to gRPC status codes.

Every layer raises these; only ``server.py`` (and the client, in reverse) translates them,
through :data:`GRPC_STATUS`. Keeping the mapping in one place means a new error cannot
reach a user as an anonymous INTERNAL.

::

    RaftKVError
    ├── InvalidArgument        bad key/value/shard id            INVALID_ARGUMENT   no retry
    ├── KeyNotFound            Get on an absent key              NOT_FOUND          no retry
    ├── PreconditionFailed     compare-and-swap mismatch         FAILED_PRECONDITION no retry
    ├── Unavailable            no leader / quorum / starting     UNAVAILABLE        retry w/ backoff
    │   └── NotLeader          this replica is not the leader    UNAVAILABLE        retry at hint
    ├── ProposalTimeout        outcome unknown at the deadline   DEADLINE_EXCEEDED  retry, same id
    ├── Overloaded             queue full, too many in flight    RESOURCE_EXHAUSTED retry later
    │   └── NoSpace            the data disk is full             RESOURCE_EXHAUSTED retry later
    ├── ClusterMismatch        cluster file / data dir disagree  FAILED_PRECONDITION no retry
    ├── Unauthenticated        no token, or a bad one            UNAUTHENTICATED    no retry
    ├── PermissionDenied       the token's role is too weak      PERMISSION_DENIED  no retry
    └── StorageError           a file of the data dir is corrupt, FAILED_PRECONDITION no retry
                               missing or cannot be written      (refuses to start)

``Unavailable`` carries the leader hint (node id and gRPC endpoint) when one is known; the
server sends it as trailing metadata ``raftkv-leader`` / ``raftkv-leader-endpoint``.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import grpc

LEADER_METADATA = "raftkv-leader"
LEADER_ENDPOINT_METADATA = "raftkv-leader-endpoint"
SHARD_METADATA = "raftkv-shard"
# The cluster view epoch of the node that answered: a node (or client) with an older view
# refreshes it before it tries again (TiKV's EpochNotMatch).
EPOCH_METADATA = "raftkv-epoch"


class RaftKVError(Exception):
    """Base of every error raftkv raises on purpose."""

    retryable = False


class InvalidArgument(RaftKVError):
    """The request can never succeed as sent (empty or oversized key, oversized value...)."""


class KeyNotFound(RaftKVError):
    """Get found no value for the key."""


class PreconditionFailed(RaftKVError):
    """A compare-and-swap did not match the current value or version."""

    def __init__(self, message: str, current_version: int = 0) -> None:
        super().__init__(message)
        self.current_version = current_version


class Unavailable(RaftKVError):
    """This node cannot serve the shard right now; another node or a later try may."""

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        shard_id: int | None = None,
        leader: str = "",
        leader_endpoint: str = "",
        epoch: int = 0,
    ) -> None:
        super().__init__(message)
        self.shard_id = shard_id
        self.leader = leader
        self.leader_endpoint = leader_endpoint
        self.epoch = epoch


class NotLeader(Unavailable):
    """The replica asked is not the shard's leader; ``leader`` names the one that is."""


class ProposalTimeout(RaftKVError):
    """The deadline passed before the outcome was known: the command may still commit.

    Retry with the same request id; the state machine applies it at most once.
    """

    retryable = True


class Overloaded(RaftKVError):
    """Too much in flight: the proposal queue is full."""

    retryable = True


class NoSpace(Overloaded):
    """The data disk is full: writes are refused until space is freed."""


class ClusterMismatch(RaftKVError):
    """Two parties disagree on the cluster (different cluster file, or a data dir of another)."""


class Unauthenticated(RaftKVError):
    """The request carries no credentials this node accepts (missing, malformed or expired)."""


class PermissionDenied(RaftKVError):
    """The caller is known, but its role does not allow this request."""


class StorageError(RaftKVError):
    """A data-dir file is corrupt, incomplete or cannot be written; the message names it.

    At start-up the node refuses to run with it; at run time the affected replica stops.
    """


GRPC_STATUS: dict[type[RaftKVError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    KeyNotFound: grpc.StatusCode.NOT_FOUND,
    PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    NotLeader: grpc.StatusCode.UNAVAILABLE,
    ProposalTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NoSpace: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ClusterMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    StorageError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_for(error: RaftKVError) -> grpc.StatusCode:
    """The gRPC status for an error, walking up the hierarchy for subclasses."""
    for cls in type(error).__mro__:
        if cls in GRPC_STATUS:
            return GRPC_STATUS[cls]
    return grpc.StatusCode.INTERNAL


def error_from_status(
    code: grpc.StatusCode, message: str, metadata: dict[str, str] | None = None
) -> RaftKVError:
    """The client's half of the table: turn a gRPC status back into a raftkv error."""
    md = metadata or {}
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(message)
    if code == grpc.StatusCode.NOT_FOUND:
        return KeyNotFound(message)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return PreconditionFailed(message)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ProposalTimeout(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(message)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(message)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(message)
    shard = md.get(SHARD_METADATA, "")
    epoch = md.get(EPOCH_METADATA, "")
    return Unavailable(
        message or code.name,
        shard_id=int(shard) if shard.isdigit() else None,
        leader=md.get(LEADER_METADATA, ""),
        leader_endpoint=md.get(LEADER_ENDPOINT_METADATA, ""),
        epoch=parse_epoch(epoch),
    )


def parse_epoch(text: str) -> int:
    """A view epoch from metadata; anything that is not a plausible epoch counts as none."""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 20 else 0


def rpc_error(e: grpc.aio.AioRpcError) -> RaftKVError:
    """Translate a failed gRPC call (from a peer or a server) into our error hierarchy."""
    pairs: Any = e.trailing_metadata() or ()
    metadata = {str(k): v for k, v in pairs if isinstance(v, str)}
    return error_from_status(e.code(), e.details() or e.code().name, metadata)


T = TypeVar("T")


def resolve(future: asyncio.Future[T], value: T | RaftKVError) -> None:
    """Settle ``future`` with a value or one of our errors, unless its waiter gave up."""
    if future.done():
        return
    if isinstance(value, RaftKVError):
        future.set_exception(value)
    else:
        future.set_result(value)
