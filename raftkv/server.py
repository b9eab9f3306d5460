"""The gRPC front end: a thin service layer behind one guard per method.

Every raftkv RPC takes the same path, as etcd's v3rpc handlers do::

    request bytes ─ safe decode ─▶ Guard: admission → authentication → role ─▶ handler ─▶ node
                    (malformed →    (RESOURCE_EXHAUSTED, UNAUTHENTICATED,       │
                    INVALID_ARGUMENT)  PERMISSION_DENIED)            errors → one status table

* **Safe decode**: the method handlers are registered with our own deserializers, so bytes that
  are not the request message are answered INVALID_ARGUMENT with a short message, never a
  Python traceback (grpc's default is UNKNOWN plus a logged exception).
* **The guard** (:class:`Guard`) wraps each handler once, at registration: it bounds the RPCs in
  flight (:mod:`raftkv.admission`), checks the bearer token and the role the method needs
  (:mod:`raftkv.auth`), and translates every :class:`~raftkv.errors.RaftKVError` through
  :data:`~raftkv.errors.GRPC_STATUS`, with the leader hint on UNAVAILABLE. An unexpected
  exception is logged and answered INTERNAL; it never takes the node down.
* **Handlers** (:class:`KVService`, :class:`ClusterService`) check sizes and fields, turn the
  request into a command, and let :meth:`Node.route` run it at the shard's leader (here or one
  hop away, passing the caller's token along). The client's deadline bounds the whole request,
  the proposal and the read barrier included.

:func:`serve` runs a node: grpc.aio on uvloop, TLS if configured, the standard health service
and server reflection (both open, as in etcd), until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from raftkv import command
from raftkv._pb.raftkv.v1 import admin_pb2 as admin
from raftkv._pb.raftkv.v1 import command_pb2 as cpb
from raftkv._pb.raftkv.v1 import forward_pb2 as fwd
from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv.admission import RETRY_AFTER_METADATA, Admission
from raftkv.auth import Authenticator, Identity, Role, parse_bearer, require, role_for
from raftkv.certs import node_id_from_cert
from raftkv.errors import (
    EPOCH_METADATA,
    InvalidArgument,
    KeyNotFound,
    Overloaded,
    PreconditionFailed,
    RaftKVError,
    Unauthenticated,
    Unavailable,
    parse_epoch,
    status_for,
)
from raftkv.forwarding import (
    FORWARD_METHOD,
    FORWARDING_SERVICE,
    ForwardedContext,
    ForwardingService,
    Runner,
)
from raftkv.membership import Mover, ViewStore, change_replicas
from raftkv.metrics import GRPC_HANDLED, GRPC_HANDLING, NodeState, start_endpoint
from raftkv.network import AUTHORIZATION, GRPC_OPTIONS, server_credentials
from raftkv.node import FORWARDED_METADATA, Node, Peer, leader_trailers
from raftkv.raft.handshake import Secret
from raftkv.replica import Replica
from raftkv.statemachine import digest_of
from raftkv.view import META_SHARD, ClusterView

log = logging.getLogger("raftkv.server")

KV_SERVICE = "raftkv.v1.KV"
CLUSTER_SERVICE = "raftkv.v1.Cluster"
ADMIN_SERVICE = "raftkv.v1.Admin"
# Methods one node calls on another on its own behalf (the replica mover, view refresh): a
# node that vouches for itself (cluster secret or node certificate) needs no token for them.
NODE_METHODS = frozenset(
    {f"/{ADMIN_SERVICE}/{m}" for m in ("GetView", "PrepareReplica", "ChangeReplicas")}
    | {FORWARD_METHOD}
)
_CONSISTENCIES = frozenset(kv.Consistency.values())
# Requests received but not yet handed to a handler (see server_options).
MAX_PENDING_REQUESTS = 25_000
# Entries per SnapshotShard chunk, in bytes: well under the gRPC message limit.
SNAPSHOT_CHUNK_BYTES = 1024 * 1024

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]


class Malformed:
    """What our deserializer returns for bytes that are not the request message."""

    def __init__(self, message_type: str, size: int) -> None:
        self.message_type = message_type
        self.size = size


def _decoder(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def decode(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except DecodeError:
            return Malformed(cls.DESCRIPTOR.name, len(data))

    return decode


class Received(Generic[Req]):
    """A request together with the bytes it came as: forwarded as they are, never re-encoded
    (see raftkv.forwarding)."""

    __slots__ = ("message", "raw")

    def __init__(self, message: Req, raw: bytes) -> None:
        self.message = message
        self.raw = raw


def _keeping_bytes(cls: type[Message]) -> Callable[[bytes], Received[Any] | Malformed]:
    def decode(data: bytes) -> Received[Any] | Malformed:
        try:
            return Received(cls.FromString(data), data)
        except DecodeError:
            return Malformed(cls.DESCRIPTOR.name, len(data))

    return decode


def _serialize(response: Message | bytes) -> bytes:
    """A reply message, or the bytes a leader serialized it to (passed through as they are)."""
    return response if isinstance(response, bytes) else response.SerializeToString()


@dataclass(frozen=True)
class Caller:
    """Who sent this request, and the metadata that carries them along when forwarding."""

    identity: Identity | None  # None when authentication is off
    forward_metadata: tuple[tuple[str, str], ...]
    forwarded: bool
    # Another node of this cluster proved it sent this request (see Guard._vouched).
    vouched: bool = False
    # The caller's `authorization` metadata, passed along when the request is forwarded.
    authorization: str = ""

    def require(self, role: Role, what: str) -> None:
        if self.identity is not None:
            require(self.identity, role, what)


Handler = Callable[[Any, Context, Caller], Awaitable[Any]]
StreamHandler = Callable[[Any, Context, Caller], AsyncIterator[Any]]


class Guard:
    """Admission, authentication and error translation, wrapped around each handler once.

    Requests forwarded by other nodes are admitted from a pool of their own: they were
    admitted once already, at the node the client called, and must not crowd out this node's
    own clients (nor be crowded out by them).
    """

    def __init__(
        self,
        node: Node,
        authenticator: Authenticator | None,
        clients: Admission,
        forwarded: Admission,
    ) -> None:
        self.node = node
        self.authenticator = authenticator if authenticator and authenticator.enabled else None
        self.clients = clients
        self.forwarded = forwarded
        # A client can send the forwarding header too. It only ever stops a request from being
        # forwarded again (harmless); the forwarded pool is for requests a node vouches for:
        # with the cluster secret (a MAC of the node id), or with its node certificate.
        self._secret = Secret(node.cluster.secret) if node.cluster.secret else None
        tls = node.settings.security.grpc_tls
        self._client_certs = tls is not None and tls.client_cert_auth
        self._vouching_possible = self._secret is not None or self._client_certs
        self.vouching_possible = self._vouching_possible
        self._own_forward = ((FORWARDED_METADATA, self._marker(node.id)),)
        self._cert_nodes: dict[bytes, str | None] = {}

    def _marker(self, node_id: str) -> str:
        if self._secret is None:
            return node_id
        return f"{node_id}.{self._secret.tag(b'forward', node_id.encode())}"

    def _vouched(self, marker: str, context: Context, method: str = "") -> bool:
        """Did another node of this cluster really forward this request?"""
        if not self._vouching_possible:
            return True  # a plain loopback cluster: no way to tell, nothing to protect
        node_id = marker.split(".", 1)[0]
        # A node removed from the view may still ask for it: that is how it learns it left.
        if node_id not in self.node.endpoints and method != f"/{ADMIN_SERVICE}/GetView":
            return False
        if self._secret is not None:
            return hmac.compare_digest(marker, self._marker(node_id))
        pem = next(iter((context.auth_context() or {}).get("x509_pem_cert", ())), b"")
        if pem not in self._cert_nodes:
            if len(self._cert_nodes) > 256:
                self._cert_nodes.clear()
            self._cert_nodes[pem] = _node_id_from_pem(pem)
        return self._cert_nodes[pem] == node_id

    def _read_metadata(self, context: Context, method: str = "") -> tuple[str, bool, bool, int]:
        """(bearer token, forwarded, vouched for by a node, the caller's view epoch)."""
        token = ""
        marker = ""
        epoch = 0
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION:
                token = str(value)
            elif key == FORWARDED_METADATA:
                marker = str(value)
            elif key == EPOCH_METADATA:
                epoch = parse_epoch(str(value))
        if not marker:
            return token, False, False, epoch
        return token, True, self._vouched(marker, context, method), epoch

    @property
    def node_metadata(self) -> tuple[tuple[str, str], ...]:
        """What this node sends when it calls another node on its own behalf."""
        return self._own_forward

    def _caller(self, token: str, forwarded: bool, method: str, vouched: bool = False) -> Caller:
        forward = (
            self._own_forward
            + ((EPOCH_METADATA, str(self.node.view.epoch)),)
            + (((AUTHORIZATION, token),) if token else ())
        )
        if self.authenticator is None:
            return Caller(None, forward, forwarded, vouched, token)
        if not token and vouched and self._vouching_possible and method in NODE_METHODS:
            return Caller(None, forward, forwarded, vouched, token)
        if not token:
            raise Unauthenticated(
                f"{method} needs a bearer token (metadata 'authorization: Bearer <token>'; "
                "raftkv clients: --token, --token-file or RAFTKV_TOKEN)"
            )
        identity = self.authenticator.authenticate(parse_bearer(token))
        require(identity, role_for(method), method)
        return Caller(identity, forward, forwarded, vouched, token)

    def forwarded_caller(self, authorization: str, method: str) -> Caller:
        """The caller of one call a node forwarded in a batch (that node vouched for it)."""
        return self._caller(authorization, True, method, vouched=True)

    def failure(
        self, error: Exception, admission: Admission | None = None, method: str = ""
    ) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
        """The status, message and trailers a failed request is answered with (the one place
        that turns our errors into what a client sees). Call it from an ``except`` block."""
        if not isinstance(error, RaftKVError):
            log.exception("internal error in %s", method or "a forwarded call")
            return grpc.StatusCode.INTERNAL, f"internal error: {error!r}", ()
        trailers: tuple[tuple[str, str], ...] = ()
        if isinstance(error, Unavailable):
            if error.leader and not error.leader_endpoint:
                error.leader_endpoint = self.node.endpoints.get(error.leader, "")
            trailers = (*leader_trailers(error), (EPOCH_METADATA, str(self.node.view.epoch)))
        elif isinstance(error, Overloaded):
            pool = admission or self.forwarded
            trailers = ((RETRY_AFTER_METADATA, str(pool.retry_after_ms)),)
        return status_for(error), str(error), trailers

    def wrap(self, method: str, fn: Handler) -> Callable[[Any, Context], Awaitable[Any]]:
        metrics = _RpcMetrics(self.node, "unary", method)
        guarded = self._guarded(method, fn)

        async def handle(request: Any, context: Context) -> Any:
            # Counted here, around everything the guard does, so refusals count too.
            started = time.monotonic()
            code = grpc.StatusCode.UNKNOWN
            try:
                reply = await guarded(request, context)
                code = grpc.StatusCode.OK
                return reply
            except BaseException as e:
                code = _code_of(e, context)
                raise
            finally:
                metrics.record(code, started)

        return handle

    def wrap_stream(
        self, method: str, fn: StreamHandler
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        """:meth:`wrap` for a server-streaming handler: the same checks, errors and metrics."""
        metrics = _RpcMetrics(self.node, "server_stream", method)

        async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.monotonic()
            code = grpc.StatusCode.UNKNOWN
            admission = self.clients
            entered = False
            try:
                if isinstance(request, Malformed):
                    raise InvalidArgument(
                        f"malformed request: {request.size} bytes that do not parse as "
                        f"{request.message_type}"
                    )
                token, forwarded, vouched, _epoch = self._read_metadata(context, method)
                if not admission.try_enter():
                    raise admission.refusal()
                entered = True
                caller = self._caller(token, forwarded, method, vouched)
                async for reply in fn(request, context, caller):
                    yield reply
                code = grpc.StatusCode.OK
            except (asyncio.CancelledError, grpc.aio.AbortError) as e:
                code = _code_of(e, context)
                raise
            except Exception as e:
                code, message, trailers = self.failure(e, admission, method)
                if trailers:
                    context.set_trailing_metadata(trailers)
                await context.abort(code, message)
            finally:
                if entered:
                    admission.leave()
                metrics.record(code, started)

        return handle

    def _guarded(self, method: str, fn: Handler) -> Callable[[Any, Context], Awaitable[Any]]:
        async def handle(request: Any, context: Context) -> Any:
            if isinstance(request, Malformed):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"malformed request: {request.size} bytes that do not parse as "
                    f"{request.message_type}",
                )
            token, forwarded, vouched, epoch = self._read_metadata(context, method)
            admission = self.forwarded if vouched else self.clients
            if not admission.try_enter():
                context.set_trailing_metadata(
                    ((RETRY_AFTER_METADATA, str(admission.retry_after_ms)),)
                )
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(admission.refusal()))
            try:
                caller = self._caller(token, forwarded, method, vouched)
                if epoch > self.node.view.epoch:
                    # The caller has seen a newer view: route with it, not with ours.
                    await self.node.ensure_epoch(epoch, timeout=1.0)
                return await fn(request, context, caller)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:
                code, message, trailers = self.failure(e, admission, method)
                if trailers:
                    context.set_trailing_metadata(trailers)
                await context.abort(code, message)
            finally:
                admission.leave()
            raise AssertionError("unreachable")  # abort() always raises

        return handle


class _RpcMetrics:
    """One method's RPC counters: answered by code, latency, and the node's total."""

    def __init__(self, node: Node, kind: str, method: str) -> None:
        service, _, name = method.strip("/").partition("/")
        self._handled = {
            code: GRPC_HANDLED.labels(kind, service, name, code.name) for code in grpc.StatusCode
        }
        self._handling = GRPC_HANDLING.labels(kind, service, name)
        self._node = node

    def record(self, code: grpc.StatusCode, started: float) -> None:
        self._node.requests_handled += 1
        self._handled[code].inc()
        self._handling.observe(time.monotonic() - started)


def _code_of(error: BaseException, context: Context) -> grpc.StatusCode:
    """The status an RPC ended with, from what its handler raised."""
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    if isinstance(error, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.UNKNOWN


@dataclass(frozen=True)
class _Method(Generic[Req, Resp]):
    name: str
    request: type[Message]
    response: type[Message]
    handler: Handler | StreamHandler
    # The handler gets a Received (message and bytes) and may answer with reply bytes.
    keeps_bytes: bool = False
    # The handler is an async generator of responses (a server-streaming RPC).
    streaming: bool = False


def _node_id_from_pem(pem: bytes) -> str | None:
    if not pem:
        return None
    try:
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    except ValueError:
        return None
    return node_id_from_cert(der)


def _headers(resp: Any) -> list[kv.ResponseHeader]:
    if hasattr(resp, "headers"):
        return list(resp.headers)
    return [resp.header]


def _key_error(e: RaftKVError) -> kv.KeyError:
    err = kv.KeyError(code=status_for(e).name, message=str(e))
    if isinstance(e, Unavailable):
        err.leader, err.leader_endpoint = e.leader, e.leader_endpoint
    return err


@dataclass(frozen=True, slots=True)
class _SamePerKey:
    """A bulk part whose keys all got one result (a shard's puts commit as one entry): spares
    building, then reading back, one result message per key."""

    result: Any
    headers: list[kv.ResponseHeader]


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
        if isinstance(resp, _SamePerKey):
            for i in positions:
                results[i] = resp.result
            return
        for i, r in zip(positions, resp.results, strict=True):
            results[i] = r

    await asyncio.gather(*(run(s, pos) for s, pos in groups.items()))
    return results, headers


async def _served(call: Awaitable[Resp]) -> Resp:
    """A forwarded bulk part's reply, or Unavailable if the peer was not the shard's leader.

    The peer answers a part it cannot serve with per-key UNAVAILABLE errors naming the leader
    (it never forwards again); raising lets :meth:`Node.route` follow that hint, so a node that
    holds no replica of the shard learns where its leader is.
    """
    resp = await call
    results = resp.results  # type: ignore[attr-defined]
    first = results[0].error if results else None
    if (
        first is not None
        and first.code == grpc.StatusCode.UNAVAILABLE.name
        and all(r.error.code == first.code for r in results)
    ):
        raise Unavailable(first.message, leader=first.leader, leader_endpoint=first.leader_endpoint)
    return resp


def _check_consistency(value: int) -> bool:
    """True for a stale read; INVALID_ARGUMENT for a value the API does not define."""
    if value not in _CONSISTENCIES:
        raise InvalidArgument(
            f"consistency {value} is not one of LINEARIZABLE (1), STALE (2) or unspecified (0)"
        )
    return value == kv.STALE


class _ReplyBudget:
    """Bytes of values one bulk reply may still carry (see Limits.max_reply_bytes)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def take(self, size: int) -> bool:
        if size > self.left:
            self.left = -1  # once exhausted, stay exhausted: later keys must not slip in
            return False
        self.left -= size
        return True

    def refusal(self, shard: int) -> kv.GetResult:
        return kv.GetResult(
            shard_id=shard,
            error=kv.KeyError(
                code=grpc.StatusCode.RESOURCE_EXHAUSTED.name,
                message=f"the reply reached its size limit of {self.limit} bytes; ask for "
                "this key again in another request",
            ),
        )


class KVService:
    """The KV methods. Each checks its input, builds a command and routes it."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.limits = node.settings.limits
        # Requests that arrive without a request id get one here, so the node's own retries
        # (forwarding after a failover) are idempotent too.
        self._client_id = os.urandom(16)
        self._seq = itertools.count(1)
        self.forwarder = node.forwarder

    def _forward(
        self, method: int, received: Received[Any], caller: Caller, request_id: kv.RequestId | None
    ) -> Callable[[Peer, float], Awaitable[bytes]]:
        """Forwards the request's bytes to a peer (see raftkv.forwarding). A write the client
        sent without a request id carries the one it was given here, appended as a field
        (protobuf merges it), so the leader deduplicates this node's retries of it."""
        raw = received.raw
        if request_id is not None and not received.message.request_id.client_id:
            raw += type(received.message)(request_id=request_id).SerializeToString()
        authorization = caller.authorization
        return lambda peer, t: self.forwarder.call(peer, method, raw, t, authorization)

    def forward_runners(self, guard: Guard) -> dict[int, Runner]:
        """How the leader runs each forwardable method when it arrives in a Forward batch."""

        def runner(name: str, cls: type[Message], handler: Handler) -> Runner:
            method = f"/{KV_SERVICE}/{name}"
            decode = _keeping_bytes(cls)

            async def run(raw: bytes, context: ForwardedContext, authorization: str) -> Any:
                received = decode(raw)
                if isinstance(received, Malformed):
                    raise InvalidArgument(
                        f"malformed request: {received.size} bytes that do not parse as "
                        f"{received.message_type}"
                    )
                caller = guard.forwarded_caller(authorization, method)
                return await handler(received, cast(Context, context), caller)

            return run

        return {
            fwd.FORWARDED_PUT: runner("Put", kv.PutRequest, self.put),
            fwd.FORWARDED_GET: runner("Get", kv.GetRequest, self.get),
            fwd.FORWARDED_DELETE: runner("Delete", kv.DeleteRequest, self.delete),
            fwd.FORWARDED_COMPARE_AND_SWAP: runner(
                "CompareAndSwap", kv.CompareAndSwapRequest, self.compare_and_swap
            ),
        }

    def methods(self) -> list[_Method[Any, Any]]:
        return [
            _Method("Put", kv.PutRequest, kv.PutResponse, self.put, keeps_bytes=True),
            _Method("Get", kv.GetRequest, kv.GetResponse, self.get, keeps_bytes=True),
            _Method("Delete", kv.DeleteRequest, kv.DeleteResponse, self.delete, keeps_bytes=True),
            _Method(
                "CompareAndSwap",
                kv.CompareAndSwapRequest,
                kv.CompareAndSwapResponse,
                self.compare_and_swap,
                keeps_bytes=True,
            ),
            _Method("PutMany", kv.PutManyRequest, kv.PutManyResponse, self.put_many),
            _Method("GetMany", kv.GetManyRequest, kv.GetManyResponse, self.get_many),
        ]

    def _deadline(self, context: Context) -> float:
        budget = self.node.settings.leader_wait_s + self.node.settings.proposal_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining)
        return time.monotonic() + budget

    def _timeout(self, deadline: float) -> float:
        """A proposal's or barrier's share of the request: never past the client's deadline."""
        left = deadline - time.monotonic()
        return max(0.001, min(self.node.settings.proposal_timeout_s, left))

    def _shard(self, key: bytes, claimed: int | None) -> int:
        shard = self.node.shard_for(key)
        if claimed is not None and claimed != shard:
            raise InvalidArgument(
                f"key belongs to shard {shard}, not {claimed} (is the client's ring stale?)"
            )
        return shard

    def _request_id(self, rid: kv.RequestId) -> tuple[bytes, int]:
        if rid.client_id:
            if len(rid.client_id) > 64:
                raise InvalidArgument("request_id.client_id is longer than 64 bytes")
            return rid.client_id, rid.seq
        return self._client_id, next(self._seq)

    def _header(self, replica: Replica, index: int) -> kv.ResponseHeader:
        info = replica.info
        return kv.ResponseHeader(
            shard_id=replica.shard_id,
            leader=info.leader,
            term=info.term,
            index=index,
            leader_endpoint=self.node.endpoints.get(info.leader, ""),
            epoch=self.node.view.epoch,
        )

    async def _write(
        self,
        shard: int,
        data: bytes,
        context: Context,
        caller: Caller,
        forward: Callable[[Peer, float], Awaitable[Resp]],
        reply: Callable[[cpb.CommandResult, kv.ResponseHeader], Resp],
    ) -> Resp:
        deadline = self._deadline(context)

        async def local(replica: Replica) -> Resp:
            result, index = await replica.propose(data, self._timeout(deadline))
            if result.code == cpb.CommandResult.REQUEST_ID_REUSED:
                raise InvalidArgument(
                    "this request id was already used for a different command; nothing was "
                    "applied (use a new request id for every new write)"
                )
            return reply(result, self._header(replica, index))

        resp = await self.node.route(
            shard, local, forward, forwarded=caller.forwarded, deadline=deadline
        )
        if not isinstance(resp, bytes):  # bytes: forwarded to the leader, who answered
            for header in _headers(resp):
                self.node.learn_leader(header.shard_id, header.leader)
        return resp

    async def put(self, received: Received[kv.PutRequest], context: Context, caller: Caller) -> Any:
        request = received.message
        self.limits.check(request.key, request.value)
        shard = self._shard(request.key, request.shard_id if request.HasField("shard_id") else None)
        client_id, seq = self._request_id(request.request_id)
        data = command.put(request.key, request.value, client_id, seq)
        rid = kv.RequestId(client_id=client_id, seq=seq)
        return await self._write(
            shard,
            data,
            context,
            caller,
            self._forward(fwd.FORWARDED_PUT, received, caller, rid),
            lambda r, h: kv.PutResponse(header=h, version=r.version),
        )

    async def delete(
        self, received: Received[kv.DeleteRequest], context: Context, caller: Caller
    ) -> Any:
        request = received.message
        self.limits.check(request.key)
        shard = self._shard(request.key, request.shard_id if request.HasField("shard_id") else None)
        client_id, seq = self._request_id(request.request_id)
        data = command.delete(request.key, client_id, seq)
        rid = kv.RequestId(client_id=client_id, seq=seq)
        return await self._write(
            shard,
            data,
            context,
            caller,
            self._forward(fwd.FORWARDED_DELETE, received, caller, rid),
            lambda r, h: kv.DeleteResponse(header=h, existed=r.existed),
        )

    async def compare_and_swap(
        self, received: Received[kv.CompareAndSwapRequest], context: Context, caller: Caller
    ) -> Any:
        request = received.message
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
        rid = kv.RequestId(client_id=client_id, seq=seq)

        def reply(r: cpb.CommandResult, h: kv.ResponseHeader) -> kv.CompareAndSwapResponse:
            if r.code == cpb.CommandResult.PRECONDITION_FAILED:
                now = (
                    "the key does not exist"
                    if r.current_version == 0
                    else f"its current version is {r.current_version}"
                )
                what = "value" if which == "expected_value" else "version"
                raise PreconditionFailed(
                    f"compare-and-swap not applied: the key's {what} is not the expected one "
                    f"({now})",
                    r.current_version,
                )
            return kv.CompareAndSwapResponse(header=h, version=r.version)

        return await self._write(
            shard,
            data,
            context,
            caller,
            self._forward(fwd.FORWARDED_COMPARE_AND_SWAP, received, caller, rid),
            reply,
        )

    async def get(self, received: Received[kv.GetRequest], context: Context, caller: Caller) -> Any:
        request = received.message
        self.limits.check(request.key)
        stale = _check_consistency(request.consistency)
        shard = self._shard(request.key, request.shard_id if request.HasField("shard_id") else None)
        key = request.key
        deadline = self._deadline(context)

        def found(replica: Replica, index: int) -> kv.GetResponse:
            entry = replica.read_local(key)
            if entry is None:
                raise KeyNotFound(f"key not found (shard {shard})")
            return kv.GetResponse(
                value=entry.value, version=entry.version, header=self._header(replica, index)
            )

        replica = self.node.replicas.get(shard)
        if stale and replica is not None:
            return found(replica, replica.info.last_applied)

        async def local(replica: Replica) -> kv.GetResponse:
            index = await replica.read_index(self._timeout(deadline))
            return found(replica, index)

        # route() turns a peer's NOT_FOUND (or any other non-retryable status) into our error.
        return await self.node.route(
            shard,
            local,
            self._forward(fwd.FORWARDED_GET, received, caller, None),
            forwarded=caller.forwarded,
            deadline=deadline,
        )

    def _group(self, keys: list[bytes]) -> dict[int, list[int]]:
        """shard → positions in the request, validating every key."""
        if len(keys) > self.limits.max_bulk_items:
            raise InvalidArgument(
                f"{len(keys)} items; a bulk request takes at most {self.limits.max_bulk_items}"
            )
        groups: dict[int, list[int]] = {}
        shard_for = self.node.ring.shard_for
        max_key = self.limits.max_key_bytes
        for i, key in enumerate(keys):
            if not key or len(key) > max_key:
                try:
                    self.limits.check(key)  # says what is wrong with it
                except InvalidArgument as e:
                    raise InvalidArgument(f"item {i}: {e}") from None
            shard = shard_for(key)
            group = groups.get(shard)
            if group is None:
                groups[shard] = [i]
            else:
                group.append(i)
        return groups

    async def put_many(self, request: kv.PutManyRequest, context: Context, caller: Caller) -> Any:
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
        md = caller.forward_metadata

        async def one_shard(shard: int, positions: list[int]) -> kv.PutManyResponse | _SamePerKey:
            part = [items[i] for i in positions]
            sub = kv.PutManyRequest(items=part)
            sub.DiscardUnknownFields()  # only keys and values enter the log
            # A PutManyRequest without its id is a BatchOp on the wire (both are a repeated
            # key=1/value=2 message at field 1): encode once in C, not a PutOp per key here.
            data = command.put_batch_encoded(sub.SerializeToString(), client_id, seq)
            sub.request_id.CopyFrom(rid)

            def reply(r: cpb.CommandResult, h: kv.ResponseHeader) -> _SamePerKey:
                return _SamePerKey(kv.PutResult(shard_id=shard, version=r.version), [h])

            return await self._write(
                shard,
                data,
                context,
                caller,
                lambda peer, t: _served(peer.kv.PutMany(sub, timeout=t, metadata=md)),
                reply,
            )

        results, headers = await _fan_out(groups, len(items), one_shard, kv.PutResult)
        return kv.PutManyResponse(results=results, headers=headers)

    async def get_many(self, request: kv.GetManyRequest, context: Context, caller: Caller) -> Any:
        keys = list(request.keys)
        groups = self._group(keys)
        stale = _check_consistency(request.consistency)
        md = caller.forward_metadata
        deadline = self._deadline(context)
        budget = _ReplyBudget(self.limits.max_reply_bytes)

        def read(replica: Replica, index: int, part: list[bytes]) -> kv.GetManyResponse:
            out = []
            for key in part:
                entry = replica.read_local(key)
                if entry is None:
                    out.append(kv.GetResult(shard_id=replica.shard_id))
                elif not budget.take(len(entry.value)):
                    out.append(budget.refusal(replica.shard_id))
                else:
                    out.append(
                        kv.GetResult(
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

            async def local(replica: Replica) -> kv.GetManyResponse:
                index = await replica.read_index(self._timeout(deadline))
                return read(replica, index, part)

            sub = kv.GetManyRequest(keys=part, consistency=request.consistency)
            return await self.node.route(
                shard,
                local,
                lambda peer, t: _served(peer.kv.GetMany(sub, timeout=t, metadata=md)),
                forwarded=caller.forwarded,
                deadline=deadline,
            )

        results, headers = await _fan_out(groups, len(keys), one_shard, kv.GetResult)
        # Parts read on other nodes were capped there; the whole reply is capped here, in
        # request order, so it can never exceed the limit however the keys were spread.
        total = _ReplyBudget(self.limits.max_reply_bytes)
        for i, r in enumerate(results):
            if r.found and not total.take(len(r.value)):
                results[i] = total.refusal(r.shard_id)
        return kv.GetManyResponse(results=results, headers=headers)


class ClusterService:
    def __init__(self, node: Node) -> None:
        self.node = node

    def methods(self) -> list[_Method[Any, Any]]:
        return [_Method("Status", kv.StatusRequest, kv.StatusResponse, self.status)]

    async def status(self, request: kv.StatusRequest, context: Context, caller: Caller) -> Any:
        if request.digest:
            caller.require(Role.ADMIN, "Status with digest")
        if request.local_only:
            return await self.node.local_status(request.digest)
        remaining = context.time_remaining()
        timeout = min(1.5, remaining * 0.8) if remaining is not None else 1.5
        return await self.node.cluster_status(
            timeout, request.digest, metadata=caller.forward_metadata
        )


class AdminService:
    """Membership: the view, member add/remove, rebalancing; and the mover's node-to-node calls.

    Changes run at the meta group's leader (forwarded there, one hop, like any request).
    """

    def __init__(self, node: Node, store: ViewStore) -> None:
        self.node = node
        self.store = store

    def methods(self) -> list[_Method[Any, Any]]:
        return [
            _Method("GetView", admin.GetViewRequest, admin.ClusterView, self.get_view),
            _Method(
                "MemberAdd", admin.MemberAddRequest, admin.MemberChangeResponse, self.member_add
            ),
            _Method(
                "MemberRemove",
                admin.MemberRemoveRequest,
                admin.MemberChangeResponse,
                self.member_remove,
            ),
            _Method("Rebalance", admin.RebalanceRequest, admin.RebalanceResponse, self.rebalance),
            _Method(
                "PrepareReplica",
                admin.PrepareReplicaRequest,
                admin.PrepareReplicaResponse,
                self.prepare_replica,
            ),
            _Method(
                "ChangeReplicas",
                admin.ChangeReplicasRequest,
                admin.ChangeReplicasResponse,
                self.change_replicas,
            ),
            _Method(
                "SnapshotShard",
                admin.SnapshotShardRequest,
                admin.SnapshotShardChunk,
                self.snapshot_shard,
                streaming=True,
            ),
        ]

    async def snapshot_shard(
        self, request: admin.SnapshotShardRequest, context: Context, caller: Caller
    ) -> AsyncIterator[admin.SnapshotShardChunk]:
        """One shard's copy at a linearizable read index, in chunks of at most
        SNAPSHOT_CHUNK_BYTES of entries (a replica on any node: a follower asks its leader
        for the read index)."""
        view = self.node.view
        shard = request.shard_id
        if shard >= view.shards:
            raise InvalidArgument(f"shard {shard} does not exist (shards 0-{view.shards - 1})")
        replica = self.node.replicas.get(shard)
        if replica is None:
            hosts = ", ".join(sorted(view.group(shard).replicas))
            raise Unavailable(
                f"node {self.node.id} holds no replica of shard {shard}; ask one of {hosts}"
            )
        deadline = _deadline(context, self.node.settings.proposal_timeout_s)
        read_index = await replica.read_index(max(0.1, deadline - time.monotonic()))
        applied, items = await replica.snapshot_items()
        digest = await asyncio.to_thread(digest_of, items)
        chunk = admin.SnapshotShardChunk(read_index=read_index, applied_index=applied)
        size = 0
        for key, entry in items.items():
            chunk.entries.add(key=key, value=entry.value, version=entry.version)
            size += len(key) + len(entry.value) + 16
            if size >= SNAPSHOT_CHUNK_BYTES:
                yield chunk
                chunk = admin.SnapshotShardChunk(read_index=read_index, applied_index=applied)
                size = 0
        chunk.done = True
        chunk.keys = len(items)
        chunk.digest = digest
        yield chunk

    async def get_view(
        self, request: admin.GetViewRequest, context: Context, caller: Caller
    ) -> Any:
        if not request.linearizable:
            return self.node.view.to_proto()
        deadline = _deadline(context, self.node.settings.proposal_timeout_s)

        async def local(replica: Replica) -> ClusterView:
            view, _ = await self.store.read(replica, max(0.1, deadline - time.monotonic()))
            return view

        async def remote(peer: Peer, timeout: float) -> ClusterView:
            md = caller.forward_metadata
            return ClusterView.from_proto(
                await peer.admin.GetView(request, timeout=timeout, metadata=md)
            )

        view = await self.node.route(
            META_SHARD, local, remote, forwarded=caller.forwarded, deadline=deadline
        )
        await self.node.apply_view(view)
        return view.to_proto()

    async def _at_meta_leader(
        self,
        change: Callable[[ClusterView], ClusterView],
        forward: Callable[[Peer, float], Awaitable[Any]],
        context: Context,
        caller: Caller,
    ) -> tuple[ClusterView, ClusterView]:
        deadline = _deadline(context, self.node.settings.proposal_timeout_s)

        async def local(replica: Replica) -> tuple[ClusterView, ClusterView]:
            return await self.store.update(replica, change, max(0.1, deadline - time.monotonic()))

        async def remote(peer: Peer, timeout: float) -> tuple[ClusterView, ClusterView]:
            reply = await forward(peer, timeout)
            after = ClusterView.from_proto(reply.view)
            await self.node.apply_view(after)
            return after, after

        return await self.node.route(
            META_SHARD, local, remote, forwarded=caller.forwarded, deadline=deadline
        )

    async def member_add(
        self, request: admin.MemberAddRequest, context: Context, caller: Caller
    ) -> Any:
        if not request.id or not request.grpc or not request.raft:
            raise InvalidArgument("member add needs an id, a gRPC address and a Raft address")
        md = caller.forward_metadata
        _, after = await self._at_meta_leader(
            lambda v: v.with_member(request.id, request.grpc, request.raft).planned(),
            lambda peer, t: peer.admin.MemberAdd(request, timeout=t, metadata=md),
            context,
            caller,
        )
        return admin.MemberChangeResponse(view=after.to_proto(), moves=len(after.moves()))

    async def member_remove(
        self, request: admin.MemberRemoveRequest, context: Context, caller: Caller
    ) -> Any:
        if not request.id:
            raise InvalidArgument("member remove needs a node id")
        md = caller.forward_metadata
        _, after = await self._at_meta_leader(
            lambda v: v.with_member_leaving(request.id, request.dead).planned(),
            lambda peer, t: peer.admin.MemberRemove(request, timeout=t, metadata=md),
            context,
            caller,
        )
        return admin.MemberChangeResponse(view=after.to_proto(), moves=len(after.moves()))

    async def rebalance(
        self, request: admin.RebalanceRequest, context: Context, caller: Caller
    ) -> Any:
        if request.dry_run:
            await self.node.refresh_view()
            view = self.node.view
            planned = view.planned()
            return admin.RebalanceResponse(moves=_moves(planned), view=view.to_proto())
        md = caller.forward_metadata
        _, after = await self._at_meta_leader(
            lambda v: v.planned(),
            lambda peer, t: peer.admin.Rebalance(request, timeout=t, metadata=md),
            context,
            caller,
        )
        return admin.RebalanceResponse(moves=_moves(after), view=after.to_proto())

    async def prepare_replica(
        self, request: admin.PrepareReplicaRequest, _context: Context, _caller: Caller
    ) -> Any:
        await self.node.ensure_epoch(request.epoch)
        shard = request.shard_id
        if shard != META_SHARD and shard >= self.node.view.shards:
            raise InvalidArgument(f"shard {shard} does not exist")
        if self.node.id not in self.node.view.group(shard).hosts:
            raise Unavailable(
                f"node {self.node.id} holds view epoch {self.node.view.epoch}, which places no "
                f"replica of shard {shard} here; retry once the view has spread"
            )
        await self.node.open_replica(shard)
        return admin.PrepareReplicaResponse()

    async def change_replicas(
        self, request: admin.ChangeReplicasRequest, _context: Context, caller: Caller
    ) -> Any:
        if not request.node_id:
            raise InvalidArgument("a replica change needs a node id")
        await self.node.ensure_epoch(request.epoch)
        members = await change_replicas(
            self.node,
            request.shard_id,
            request.remove,
            request.node_id,
            request.epoch,
            forwarded=caller.forwarded,
        )
        return admin.ChangeReplicasResponse(members=members)


def _moves(view: ClusterView) -> list[admin.ReplicaMove]:
    return [
        admin.ReplicaMove(shard_id=s, from_replicas=g.replicas, to_replicas=g.target)
        for s, g in view.groups()
        if g.moving
    ]


def _deadline(context: Context, default: float) -> float:
    remaining = context.time_remaining()
    budget = default if remaining is None else min(remaining, 60.0)
    return time.monotonic() + budget


def register(server: grpc.aio.Server, guard: Guard, service: str, methods: list[Any]) -> None:
    """Register ``methods`` under ``service``, each behind the guard, with safe decoding."""
    handlers = {
        m.name: grpc.unary_stream_rpc_method_handler(
            guard.wrap_stream(f"/{service}/{m.name}", cast(StreamHandler, m.handler)),
            request_deserializer=_decoder(m.request),
            response_serializer=m.response.SerializeToString,
        )
        if m.streaming
        else grpc.unary_unary_rpc_method_handler(
            guard.wrap(f"/{service}/{m.name}", cast(Handler, m.handler)),
            request_deserializer=_keeping_bytes(m.request)
            if m.keeps_bytes
            else _decoder(m.request),
            response_serializer=_serialize if m.keeps_bytes else m.response.SerializeToString,
        )
        for m in methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)  # type: ignore[attr-defined]


def server_options(node: Node) -> list[tuple[str, int | str]]:
    limits = node.settings.limits
    return [
        *GRPC_OPTIONS,
        # New connections beyond this are closed at once: file descriptors stay available
        # for the journals and the Raft port whatever a client does.
        ("grpc.max_allowed_incoming_connections", limits.max_grpc_connections),
        # Requests grpc has received but the application has not picked up yet. grpc's
        # defaults (1,000; 3,000 hard) cancel a burst beyond them before our admission check
        # sees it: clients got CANCELLED, with nothing logged. The admission check is cheap,
        # so let bursts reach it and be answered RESOURCE_EXHAUSTED with a retry hint.
        # (A per-connection stream limit is left unset for the same reason: HTTP/2 refuses
        # the streams of a burst opened before its SETTINGS arrive, and clients see
        # UNAVAILABLE.)
        ("grpc.server.max_pending_requests", MAX_PENDING_REQUESTS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_REQUESTS),
        # A connection must finish its HTTP/2 (and TLS) handshake quickly, and an idle one is
        # closed (clients reconnect transparently).
        ("grpc.server_handshake_timeout_ms", 10_000),
        ("grpc.max_connection_idle_ms", 300_000),
    ]


async def serve(
    node: Node,
    ready: Callable[[], None] | None = None,
    authenticator: Authenticator | None = None,
) -> None:
    """Run ``node``'s gRPC front end until SIGTERM or SIGINT."""
    server = grpc.aio.server(options=server_options(node))
    limit = node.settings.limits.max_concurrent_rpcs
    guard = Guard(
        node,
        authenticator,
        clients=Admission(limit, what="client requests"),
        # Every other node may forward up to its own client limit here.
        forwarded=Admission(
            limit * max(1, len(node.view.nodes) - 1), what="requests forwarded by nodes"
        ),
    )
    node.set_node_metadata(guard.node_metadata)
    store = ViewStore(node)
    mover = Mover(node, store)
    kv_service = KVService(node)
    register(server, guard, KV_SERVICE, kv_service.methods())
    forwarding = ForwardingService(
        kv_service.forward_runners(guard), guard.failure, guard.vouching_possible
    )

    async def forward(request: fwd.ForwardRequest, _context: Context, caller: Caller) -> Any:
        return await forwarding.forward(request, caller.vouched)

    register(
        server,
        guard,
        FORWARDING_SERVICE,
        [_Method("Forward", fwd.ForwardRequest, fwd.ForwardResponse, forward)],
    )
    register(server, guard, CLUSTER_SERVICE, ClusterService(node).methods())
    register(server, guard, ADMIN_SERVICE, AdminService(node, store).methods())
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (
        KV_SERVICE,
        CLUSTER_SERVICE,
        ADMIN_SERVICE,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(services, server)
    me = node.view.node(node.id)
    assert me is not None
    address = me.grpc
    tls = node.settings.security.grpc_tls
    try:
        if tls is not None:
            server.add_secure_port(address, server_credentials(tls))
        else:
            server.add_insecure_port(address)
    except RuntimeError as e:
        raise Unavailable(f"cannot bind the gRPC port {address}: {e}") from e
    node.start()
    metrics_addr = node.settings.metrics_addr
    if metrics_addr:
        start_endpoint(
            metrics_addr,
            NodeState(
                infos=lambda: [r.info for r in list(node.replicas.values())],
                epoch=lambda: node.view.epoch,
                forwarded_requests=lambda: node.forwarder.calls,
                forward_batches=lambda: node.forwarder.batches,
                via_leader_requests=lambda: node.via_leader_requests,
            ),
        )
        log.info("node %s serving Prometheus metrics on http://%s/metrics", node.id, metrics_addr)
    await server.start()
    for svc in ("", KV_SERVICE, CLUSTER_SERVICE):
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "node %s serving gRPC on %s (%s, %s)",
        node.id,
        address,
        "TLS" + (" with client certificates" if tls and tls.client_cert_auth else "")
        if tls
        else "plaintext",
        "bearer tokens required" if guard.authenticator else "no client authentication",
    )
    background = [
        asyncio.create_task(node.balance_leaders()),
        asyncio.create_task(node.watch_view()),
        asyncio.create_task(mover.run()),
    ]
    if ready is not None:
        ready()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if guard.authenticator is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload_tokens, guard.authenticator)
    removed = asyncio.create_task(node.removed.wait())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait((removed, stopped), return_when=asyncio.FIRST_COMPLETED)
    log.info("node %s stopping", node.id)
    for task in (*background, removed, stopped):
        task.cancel()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=2.0)
    await node.stop()
    log.info("node %s stopped", node.id)


def _reload_tokens(authenticator: Authenticator) -> None:
    try:
        authenticator.reload()
    except ValueError as e:
        log.error("SIGHUP: keeping the old tokens; the token file is bad: %s", e)
    else:
        log.info("SIGHUP: reloaded the token file")
