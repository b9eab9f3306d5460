"""Forwarding: requests for shards another node leads travel coalesced, as the bytes received.

Most gRPC clients send one RPC per operation to whichever node they know, so two thirds of
their requests reach a node that does not lead the key's shard. One Python gRPC call per
forwarded request cost as much CPU as serving it. Instead (proto/raftkv/v1/forward.proto):

* :class:`Forwarder` (the node the client called): every request headed for the same leader
  node within one event-loop turn joins one ``Forward`` call, carried as the request bytes the
  client sent (a request id appended when the client gave none, never decoded and re-encoded).
  The reply bytes the leader serialized go back to the client as they are.
* :class:`ForwardingService` (the leader): runs each call as the request it is, with its own
  deadline and its client's token checked as if that client had called here, and answers each
  with its own status, message and trailers (the leader hint on UNAVAILABLE), in order.

Only nodes may call ``Forward`` when the cluster can tell nodes apart (a cluster secret or
node certificates): a client could otherwise slip many requests past admission in one call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from raftkv._pb.raftkv.v1 import forward_pb2 as fwd
from raftkv.errors import (
    EPOCH_METADATA,
    InvalidArgument,
    PermissionDenied,
    RaftKVError,
    error_from_status,
    resolve,
    rpc_error,
)

if TYPE_CHECKING:
    from raftkv.node import Node, Peer

log = logging.getLogger("raftkv.server")

FORWARDING_SERVICE = "raftkv.v1.Forwarding"
FORWARD_METHOD = f"/{FORWARDING_SERVICE}/Forward"
# Calls per Forward RPC, and their request bytes: a bigger batch is split.
MAX_CALLS_PER_BATCH = 256
MAX_BATCH_BYTES = 4 * 1024 * 1024
# Forward calls out to one peer at a time: more requests wait for it and then go together
# (one or two in flight measured alike; one coalesces more).
MAX_IN_FLIGHT = 1
_OK = grpc.StatusCode.OK.value[0]
_CODES = {c.value[0]: c for c in grpc.StatusCode}


@dataclass
class _Pending:
    call: fwd.ForwardedCall
    future: asyncio.Future[bytes]
    deadline: float


class _Queue:
    """Calls waiting for one peer.

    They leave at the end of the event-loop turn they joined, unless ``MAX_IN_FLIGHT`` batches
    to that peer are out already: then they wait for one to come back and leave together.
    grpc hands a server its requests one per loop turn, so under load the turn alone would
    coalesce nothing; this self-clocking (Nagle's rule, like TiKV's batch-commands stream)
    makes the batches as big as the load, and adds no wait when a node is idle.
    """

    def __init__(self) -> None:
        self.calls: list[_Pending] = []
        self.scheduled = False
        self.in_flight = 0


class Forwarder:
    """The calling side: coalesces forwarded requests per leader node."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._queues: dict[str, _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # Forward RPCs sent (for tests and status)
        self.calls = 0

    async def call(
        self,
        peer: Peer,
        method: int,
        request: bytes,
        timeout: float,
        authorization: str,
    ) -> bytes:
        """Run one request at ``peer``: its reply bytes, or the error it answered with."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        call = fwd.ForwardedCall(
            method=method,  # type: ignore[arg-type]
            request=request,
            timeout_ms=max(1, int(timeout * 1000)),
            authorization=authorization,
        )
        queue = self._queues.get(peer.node_id)
        if queue is None:
            queue = self._queues[peer.node_id] = _Queue()
        queue.calls.append(_Pending(call, future, time.monotonic() + timeout))
        if not queue.scheduled and queue.in_flight < MAX_IN_FLIGHT:
            queue.scheduled = True
            loop.call_soon(self._flush, peer, queue)
        return await future

    def _flush(self, peer: Peer, queue: _Queue) -> None:
        queue.scheduled = False
        if queue.in_flight >= MAX_IN_FLIGHT or not queue.calls:
            return  # the next batch leaves when one in flight comes back
        pending, queue.calls = queue.calls, []
        start = 0
        while start < len(pending):
            end, size = start, 0
            while end < len(pending) and end - start < MAX_CALLS_PER_BATCH:
                size += len(pending[end].call.request)
                end += 1
                if size >= MAX_BATCH_BYTES:
                    break
            batch, start = pending[start:end], end
            queue.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(peer, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda _t: self._returned(peer, queue))

    def _returned(self, peer: Peer, queue: _Queue) -> None:
        queue.in_flight -= 1
        if queue.calls and not queue.scheduled:
            queue.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, peer, queue)

    async def _send(self, peer: Peer, batch: list[_Pending]) -> None:
        self.batches += 1
        self.calls += len(batch)
        timeout = max(0.001, max(p.deadline for p in batch) - time.monotonic())
        metadata = (*self._node.node_metadata(), (EPOCH_METADATA, str(self._node.view.epoch)))
        request = fwd.ForwardRequest(calls=[p.call for p in batch])
        try:
            response = await peer.forwarding.Forward(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            error = rpc_error(e)
            for p in batch:
                resolve(p.future, error)
            return
        except Exception as e:  # a bug must fail these calls, not leave them hanging
            log.exception("forwarding to %s failed", peer.node_id)
            for p in batch:
                resolve(p.future, RaftKVError(f"forwarding failed: {e!r}"))
            return
        replies = response.replies
        if len(replies) != len(batch):
            error = RaftKVError(
                f"node {peer.node_id} answered {len(replies)} of {len(batch)} forwarded calls"
            )
            for p in batch:
                resolve(p.future, error)
            return
        for p, reply in zip(batch, replies, strict=True):
            if reply.code == _OK:
                resolve(p.future, reply.response)
            else:
                trailers = {t.key: t.value for t in reply.trailers}
                code = _CODES.get(reply.code, grpc.StatusCode.UNKNOWN)
                resolve(p.future, error_from_status(code, reply.message, trailers))


# -- the leader's side ------------------------------------------------------------------------


class ForwardedContext:
    """What a KV handler asks of its gRPC context, for a call that came in a batch."""

    def __init__(self, timeout_s: float) -> None:
        self._deadline = time.monotonic() + timeout_s

    def time_remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())


# (decoded request or None if malformed, run it) per method; see server.KVService.
Runner = Callable[[bytes, ForwardedContext, str], Awaitable[Any]]
Failure = Callable[[Exception], tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]]


class ForwardingService:
    """Runs a batch of forwarded calls, each as its own request, and answers each."""

    def __init__(
        self,
        runners: dict[int, Runner],
        failure: Failure,
        vouching_possible: bool,
    ) -> None:
        self._runners = runners
        self._failure = failure
        self._vouching_possible = vouching_possible

    async def forward(self, request: fwd.ForwardRequest, vouched: bool) -> fwd.ForwardResponse:
        if self._vouching_possible and not vouched:
            raise PermissionDenied(
                f"{FORWARD_METHOD} is for the nodes of this cluster (it needs the cluster "
                "secret or a node certificate)"
            )
        if len(request.calls) > MAX_CALLS_PER_BATCH:
            raise InvalidArgument(
                f"{len(request.calls)} forwarded calls in one batch; at most {MAX_CALLS_PER_BATCH}"
            )
        replies = await asyncio.gather(*(self._one(c) for c in request.calls))
        return fwd.ForwardResponse(replies=replies)

    async def _one(self, call: fwd.ForwardedCall) -> fwd.ForwardedReply:
        runner = self._runners.get(call.method)
        try:
            if runner is None:
                raise InvalidArgument(f"cannot forward method {call.method}")
            response = await runner(
                call.request, ForwardedContext(call.timeout_ms / 1000), call.authorization
            )
        except Exception as e:
            code, message, trailers = self._failure(e)
            return fwd.ForwardedReply(
                code=code.value[0],
                message=message,
                trailers=[fwd.Trailer(key=k, value=v) for k, v in trailers],
            )
        return fwd.ForwardedReply(
            code=_OK,
            response=response if isinstance(response, bytes) else response.SerializeToString(),
        )
