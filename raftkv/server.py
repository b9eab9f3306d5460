"""gRPC servicers: validate → node → one error→status table.

Each handler is thin, as etcd's v3rpc handlers are: check sizes and fields, turn the request
into a command, let :meth:`Node.route` run it at the shard's leader (here or one hop away), and
translate any :class:`~raftkv.errors.RaftKVError` through :data:`~raftkv.errors.GRPC_STATUS`.
An unexpected exception is logged and answered INTERNAL; it never takes the node down.

:func:`serve` runs a node: grpc.aio on uvloop, the standard health service (SERVING once the
Raft thread runs) and server reflection, until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from raftkv import command
from raftkv._pb.raftkv.v1 import command_pb2 as cpb
from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv._pb.raftkv.v1 import kv_pb2_grpc as kv_grpc
from raftkv.errors import (
    InvalidArgument,
    KeyNotFound,
    PreconditionFailed,
    RaftKVError,
    Unavailable,
    status_for,
)
from raftkv.node import FORWARDED_METADATA, GRPC_OPTIONS, Node, Peer, leader_trailers
from raftkv.shard import ShardReplica

log = logging.getLogger("raftkv.server")

MAX_BULK_ITEMS = 10_000

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]


def translated(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Map raftkv errors to gRPC statuses (with leader hints); never let a request crash us."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        try:
            return await fn(self, request, context)
        except RaftKVError as e:
            if isinstance(e, Unavailable):
                if e.leader and not e.leader_endpoint:
                    e.leader_endpoint = self.node.endpoints.get(e.leader, "")
                context.set_trailing_metadata(leader_trailers(e))
            await context.abort(status_for(e), str(e))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            log.exception("internal error in %s", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {e!r}")
        raise AssertionError("unreachable")  # abort() always raises

    return wrapper


def _headers(resp: Any) -> list[kv.ResponseHeader]:
    if hasattr(resp, "headers"):
        return list(resp.headers)
    return [resp.header]


def _key_error(e: RaftKVError) -> kv.KeyError:
    err = kv.KeyError(code=status_for(e).name, message=str(e))
    if isinstance(e, Unavailable):
        err.leader, err.leader_endpoint = e.leader, e.leader_endpoint
    return err


async def _fan_out(
    groups: dict[int, list[int]],
    size: int,
    one_shard: Callable[[int, list[int]], Awaitable[Any]],
    result: Callable[..., Any],
) -> tuple[list[Any], list[kv.ResponseHeader]]:
    """Run a bulk request's shards concurrently; a failing shard fails only its own keys."""
    results: list[Any] = [None] * size
    headers: list[kv.ResponseHeader] = []

    async def run(shard: int, positions: list[int]) -> None:
        try:
            resp = await one_shard(shard, positions)
        except RaftKVError as e:
            for i in positions:
                results[i] = result(shard_id=shard, error=_key_error(e))
            return
        headers.extend(resp.headers)
        for i, r in zip(positions, resp.results, strict=True):
            results[i] = r

    await asyncio.gather(*(run(s, pos) for s, pos in groups.items()))
    return results, headers


def _with_id(request: Req, client_id: bytes, seq: int) -> Req:
    """A copy of ``request`` carrying the request id the write was proposed with, so a
    forwarded write is deduplicated with its retries. Built only when forwarding."""
    fwd = type(request)()
    fwd.CopyFrom(request)  # type: ignore[attr-defined]
    fwd.request_id.client_id, fwd.request_id.seq = client_id, seq  # type: ignore[attr-defined]
    return fwd


def _is_forwarded(context: Context) -> bool:
    return any(k == FORWARDED_METADATA for k, _ in (context.invocation_metadata() or ()))


class KVServicer(kv_grpc.KVServicer):  # type: ignore[misc]
    def __init__(self, node: Node) -> None:
        self.node = node
        self.limits = node.settings.limits
        # Requests that arrive without a request id get one here, so the node's own retries
        # (forwarding after a failover) are idempotent too.
        self._client_id = os.urandom(16)
        self._seq = itertools.count(1)

    def _deadline(self, context: Context) -> float:
        budget = self.node.settings.leader_wait_s + self.node.settings.proposal_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining)
        return time.monotonic() + budget

    def _shard(self, key: bytes, claimed: int | None) -> int:
        shard = self.node.shard_for(key)
        if claimed is not None and claimed != shard:
            raise InvalidArgument(
                f"key belongs to shard {shard}, not {claimed} (is the client's ring stale?)"
            )
        return shard

    def _request_id(self, rid: kv.RequestId) -> tuple[bytes, int]:
        if rid.client_id:
            return rid.client_id, rid.seq
        return self._client_id, next(self._seq)

    def _header(self, replica: ShardReplica, index: int) -> kv.ResponseHeader:
        info = replica.info
        return kv.ResponseHeader(
            shard_id=replica.shard_id,
            leader=info.leader,
            term=info.term,
            index=index,
            leader_endpoint=self.node.endpoints.get(info.leader, ""),
        )

    async def _write(
        self,
        shard: int,
        data: bytes,
        context: Context,
        forward: Callable[[Peer, float], Awaitable[Resp]],
        reply: Callable[[cpb.CommandResult, kv.ResponseHeader], Resp],
    ) -> Resp:
        timeout = self.node.settings.proposal_timeout_s

        async def local(replica: ShardReplica) -> Resp:
            result, index = await replica.propose(data, timeout)
            return reply(result, self._header(replica, index))

        resp = await self.node.route(
            shard,
            local,
            forward,
            forwarded=_is_forwarded(context),
            deadline=self._deadline(context),
        )
        for header in _headers(resp):
            self.node.learn_leader(header.shard_id, header.leader)
        return resp

    @translated
    async def Put(self, request: kv.PutRequest, context: Context) -> kv.PutResponse:
        self.limits.check(request.key, request.value)
        shard = self._shard(request.key, request.shard_id if request.HasField("shard_id") else None)
        client_id, seq = self._request_id(request.request_id)
        data = command.put(request.key, request.value, client_id, seq)
        md = self.node.forward_metadata()
        return await self._write(
            shard,
            data,
            context,
            lambda peer, t: peer.kv.Put(_with_id(request, client_id, seq), timeout=t, metadata=md),
            lambda r, h: kv.PutResponse(header=h, version=r.version),
        )

    @translated
    async def Delete(self, request: kv.DeleteRequest, context: Context) -> kv.DeleteResponse:
        self.limits.check(request.key)
        shard = self._shard(request.key, request.shard_id if request.HasField("shard_id") else None)
        client_id, seq = self._request_id(request.request_id)
        data = command.delete(request.key, client_id, seq)
        md = self.node.forward_metadata()
        return await self._write(
            shard,
            data,
            context,
            lambda peer, t: peer.kv.Delete(
                _with_id(request, client_id, seq), timeout=t, metadata=md
            ),
            lambda r, h: kv.DeleteResponse(header=h, existed=r.existed),
        )

    @translated
    async def CompareAndSwap(
        self, request: kv.CompareAndSwapRequest, context: Context
    ) -> kv.CompareAndSwapResponse:
        self.limits.check(request.key, request.value)
        which = request.WhichOneof("expected")
        if which is None:
            raise InvalidArgument("compare-and-swap needs expected_value or expected_version")
        if which == "expected_value":
            self.limits.check(request.key, request.expected_value)
        shard = self._shard(request.key, request.shard_id if request.HasField("shard_id") else None)
        client_id, seq = self._request_id(request.request_id)
        data = command.cas(
            request.key,
            request.value,
            expected_value=request.expected_value if which == "expected_value" else None,
            expected_version=request.expected_version if which == "expected_version" else None,
            client_id=client_id,
            seq=seq,
        )
        md = self.node.forward_metadata()

        def reply(r: cpb.CommandResult, h: kv.ResponseHeader) -> kv.CompareAndSwapResponse:
            if r.code == cpb.CommandResult.PRECONDITION_FAILED:
                raise PreconditionFailed(
                    f"compare-and-swap failed: the current version is {r.current_version}"
                    + (" (key absent)" if r.current_version == 0 else ""),
                    r.current_version,
                )
            return kv.CompareAndSwapResponse(header=h, version=r.version)

        return await self._write(
            shard,
            data,
            context,
            lambda peer, t: peer.kv.CompareAndSwap(
                _with_id(request, client_id, seq), timeout=t, metadata=md
            ),
            reply,
        )

    @translated
    async def Get(self, request: kv.GetRequest, context: Context) -> kv.GetResponse:
        self.limits.check(request.key)
        shard = self._shard(request.key, request.shard_id if request.HasField("shard_id") else None)
        key = request.key
        stale = request.consistency == kv.STALE
        md = self.node.forward_metadata()

        def found(replica: ShardReplica, index: int) -> kv.GetResponse:
            entry = replica.read_local(key)
            if entry is None:
                raise KeyNotFound(f"key not found (shard {shard})")
            return kv.GetResponse(
                value=entry.value, version=entry.version, header=self._header(replica, index)
            )

        replica = self.node.replicas.get(shard)
        if stale and replica is not None:
            return found(replica, replica.info.last_applied)

        async def local(replica: ShardReplica) -> kv.GetResponse:
            index = await replica.read_index(self.node.settings.proposal_timeout_s)
            return found(replica, index)

        # route() turns a peer's NOT_FOUND (or any other non-retryable status) into our error.
        return await self.node.route(
            shard,
            local,
            lambda peer, t: peer.kv.Get(request, timeout=t, metadata=md),
            forwarded=_is_forwarded(context),
            deadline=self._deadline(context),
        )

    def _group(self, keys: list[bytes]) -> dict[int, list[int]]:
        """shard → positions in the request, validating every key."""
        if len(keys) > MAX_BULK_ITEMS:
            raise InvalidArgument(
                f"{len(keys)} items; a bulk request takes at most {MAX_BULK_ITEMS}"
            )
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            try:
                self.limits.check(key)
            except InvalidArgument as e:
                raise InvalidArgument(f"item {i}: {e}") from None
            groups.setdefault(self.node.shard_for(key), []).append(i)
        return groups

    @translated
    async def PutMany(self, request: kv.PutManyRequest, context: Context) -> kv.PutManyResponse:
        items = list(request.items)
        for i, item in enumerate(items):
            if len(item.value) > self.limits.max_value_bytes:
                raise InvalidArgument(
                    f"item {i}: value is {len(item.value)} bytes; the limit is "
                    f"{self.limits.max_value_bytes} bytes"
                )
        groups = self._group([item.key for item in items])
        client_id, seq = self._request_id(request.request_id)
        rid = kv.RequestId(client_id=client_id, seq=seq)
        md = self.node.forward_metadata()

        async def one_shard(shard: int, positions: list[int]) -> kv.PutManyResponse:
            part = [items[i] for i in positions]
            data = command.put_batch([(it.key, it.value) for it in part], client_id, seq)
            sub = kv.PutManyRequest(items=part, request_id=rid)

            def reply(r: cpb.CommandResult, h: kv.ResponseHeader) -> kv.PutManyResponse:
                return kv.PutManyResponse(
                    results=[kv.PutResult(shard_id=shard, version=r.version) for _ in part],
                    headers=[h],
                )

            return await self._write(
                shard,
                data,
                context,
                lambda peer, t: peer.kv.PutMany(sub, timeout=t, metadata=md),
                reply,
            )

        results, headers = await _fan_out(groups, len(items), one_shard, kv.PutResult)
        return kv.PutManyResponse(results=results, headers=headers)

    @translated
    async def GetMany(self, request: kv.GetManyRequest, context: Context) -> kv.GetManyResponse:
        keys = list(request.keys)
        groups = self._group(keys)
        stale = request.consistency == kv.STALE
        md = self.node.forward_metadata()

        def read(replica: ShardReplica, index: int, part: list[bytes]) -> kv.GetManyResponse:
            out = []
            for key in part:
                entry = replica.read_local(key)
                out.append(
                    kv.GetResult(shard_id=replica.shard_id)
                    if entry is None
                    else kv.GetResult(
                        shard_id=replica.shard_id,
                        found=True,
                        value=entry.value,
                        version=entry.version,
                    )
                )
            return kv.GetManyResponse(results=out, headers=[self._header(replica, index)])

        async def one_shard(shard: int, positions: list[int]) -> kv.GetManyResponse:
            part = [keys[i] for i in positions]
            replica = self.node.replicas.get(shard)
            if stale and replica is not None:
                return read(replica, replica.info.last_applied, part)

            async def local(replica: ShardReplica) -> kv.GetManyResponse:
                index = await replica.read_index(self.node.settings.proposal_timeout_s)
                return read(replica, index, part)

            sub = kv.GetManyRequest(keys=part, consistency=request.consistency)
            return await self.node.route(
                shard,
                local,
                lambda peer, t: peer.kv.GetMany(sub, timeout=t, metadata=md),
                forwarded=_is_forwarded(context),
                deadline=self._deadline(context),
            )

        results, headers = await _fan_out(groups, len(keys), one_shard, kv.GetResult)
        return kv.GetManyResponse(results=results, headers=headers)


class ClusterServicer(kv_grpc.ClusterServicer):  # type: ignore[misc]
    def __init__(self, node: Node) -> None:
        self.node = node

    @translated
    async def Status(self, request: kv.StatusRequest, context: Context) -> kv.StatusResponse:
        if request.local_only:
            return await self.node.local_status(request.digest)
        remaining = context.time_remaining()
        timeout = min(1.5, remaining * 0.8) if remaining is not None else 1.5
        return await self.node.cluster_status(timeout, request.digest)


async def serve(node: Node, ready: Callable[[], None] | None = None) -> None:
    """Run ``node``'s gRPC front end until SIGTERM or SIGINT."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    kv_grpc.add_KVServicer_to_server(KVServicer(node), server)
    kv_grpc.add_ClusterServicer_to_server(ClusterServicer(node), server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (
        kv.DESCRIPTOR.services_by_name["KV"].full_name,
        kv.DESCRIPTOR.services_by_name["Cluster"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(services, server)
    address = node.cluster.node(node.id).grpc
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:
        raise Unavailable(f"cannot bind the gRPC port {address}: {e}") from e
    node.start()
    await server.start()
    for svc in ("", "raftkv.v1.KV", "raftkv.v1.Cluster"):
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    log.info("node %s serving gRPC on %s", node.id, address)
    balancer = asyncio.create_task(node.balance_leaders())
    if ready is not None:
        ready()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("node %s stopping", node.id)
    balancer.cancel()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=2.0)
    await node.stop()
    log.info("node %s stopped", node.id)
