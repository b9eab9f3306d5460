"""The raftkv client: async :class:`Client` and blocking :class:`SyncClient`.

The client learns the ring and each shard's leader from ``Cluster.Status`` and from the hints
every reply and every UNAVAILABLE carries, and sends each request straight to the leader's node
(one hop). If that fails it falls back to any endpoint (which forwards), refreshes its view,
and retries with exponential backoff and jitter, within one overall deadline.

Every write carries a request id ``(client_id, seq)``; a retry reuses it, so a write whose
first attempt timed out but did commit is not applied twice.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from raftkv._pb.raftkv.v1 import admin_pb2 as admin
from raftkv._pb.raftkv.v1 import admin_pb2_grpc as admin_grpc
from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv._pb.raftkv.v1 import kv_pb2_grpc as kv_grpc
from raftkv.batcher import Batcher
from raftkv.errors import (
    EPOCH_METADATA,
    LEADER_ENDPOINT_METADATA,
    LEADER_METADATA,
    KeyNotFound,
    RaftKVError,
    Unavailable,
    error_from_status,
    rpc_error,
)
from raftkv.network import ClientTLS, Dialer
from raftkv.ring import Ring

T = TypeVar("T")
DEFAULT_ENDPOINT = "127.0.0.1:7001"


@dataclass(frozen=True)
class GetResult:
    value: bytes
    version: int
    shard_id: int
    leader: str


def show_key(key: bytes, limit: int = 64) -> str:
    """A key for a message: its text if it is UTF-8, escapes for the rest; never a repr."""
    text = key[:limit].decode("utf-8", "backslashreplace")
    return text + ("…" if len(key) > limit else "")


_HOST = re.compile(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]")


def parse_endpoints(text: str | Sequence[str]) -> list[str]:
    """HOST:PORT endpoints, comma-separated; checked here, so a typo is one clear error
    instead of a dial that waits out its deadline."""
    items = text.split(",") if isinstance(text, str) else list(text)
    endpoints = [e.strip() for e in items if e.strip()]
    if not endpoints:
        raise ValueError("no endpoints given")
    for endpoint in endpoints:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not _HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f'endpoint "{endpoint}" is not HOST:PORT (for example 127.0.0.1:7001); '
                "separate several with commas"
            )
    return endpoints


class _Backoff:
    """Retry pacing within one deadline: jittered exponential backoff, 20 ms doubling to 250 ms."""

    def __init__(self, timeout: float) -> None:
        self._deadline = time.monotonic() + timeout
        self._delay = 0.02

    async def wait(self, last_error: RaftKVError) -> None:
        """Sleep before the next attempt, or raise ``last_error`` if the deadline would pass."""
        if time.monotonic() + self._delay > self._deadline:
            raise last_error
        await asyncio.sleep(self._delay * (0.5 + random.random()))
        self._delay = min(self._delay * 2, 0.25)


class Client:
    """Async client. Use ``async with Client([...]) as c:``."""

    def __init__(
        self,
        endpoints: str | Sequence[str] = DEFAULT_ENDPOINT,
        *,
        timeout: float = 10.0,
        attempt_timeout: float = 5.0,
        leader_aware: bool = True,
        batching: bool = True,
        tls: ClientTLS | None = None,
        token: str | None = None,
    ) -> None:
        """``tls``: verify the nodes (and present a client certificate) over TLS.
        ``token``: a bearer token, sent with every request, for nodes that require one."""
        self.endpoints = parse_endpoints(endpoints)
        self._dialer = Dialer(tls, token)
        self._md = self._dialer.metadata
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.leader_aware = leader_aware
        self.client_id = os.urandom(16)
        self._seq = itertools.count(1)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._kv_stubs: dict[str, kv_grpc.KVStub] = {}
        self._ring: Ring | None = None
        self._leaders: dict[int, str] = {}  # shard → leader gRPC endpoint
        # The newest cluster view epoch seen in a reply; a newer one makes us refresh.
        self.epoch = 0
        # The newest retryable failure: what a caller whose own deadline passed first can
        # report instead of a bare timeout (a TLS node closing a plaintext connection, say).
        self.last_error: RaftKVError | None = None
        self._view_stale = False
        self._next = random.randrange(len(self.endpoints))
        # Concurrent puts and gets share bulk RPCs (see raftkv.batcher); off: one RPC each.
        self._batcher = Batcher(self) if batching else None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close(None)
        self._channels.clear()
        self._kv_stubs.clear()

    def channel(self, endpoint: str) -> grpc.aio.Channel:
        """This client's channel to one endpoint (TLS and all), for calls made to exactly
        that node (``raftkv client endpoint ...``); the client closes it."""
        return self._channel(endpoint)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call carries: the bearer token, if any."""
        return self._md

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        ch = self._channels.get(endpoint)
        if ch is None:
            ch = self._channels[endpoint] = self._dialer.channel(endpoint)
        return ch

    def _kv(self, endpoint: str) -> kv_grpc.KVStub:
        stub = self._kv_stubs.get(endpoint)
        if stub is None:
            stub = self._kv_stubs[endpoint] = kv_grpc.KVStub(self._channel(endpoint))
        return stub

    def _any_endpoint(self) -> str:
        self._next = (self._next + 1) % len(self.endpoints)
        return self.endpoints[self._next]

    async def refresh(self) -> kv.StatusResponse:
        """Fetch cluster status (ring parameters and leaders) from any endpoint."""
        status: kv.StatusResponse = await self._call(
            None,
            lambda ep: kv_grpc.ClusterStub(self._channel(ep)).Status(
                kv.StatusRequest(), timeout=self.attempt_timeout, metadata=self._meta()
            ),
        )
        self._learn(status)
        return status

    def _learn(self, status: kv.StatusResponse) -> None:
        self._ring = Ring(status.shard_count, status.vnodes)
        self.epoch = max(self.epoch, status.epoch)
        self._view_stale = False
        grpc_of = {n.id: n.grpc for n in status.nodes}
        # Nodes that joined since we were given our endpoints serve requests too.
        for n in status.nodes:
            if n.grpc and n.grpc not in self.endpoints and n.state in ("", "active"):
                self.endpoints.append(n.grpc)
        for shard in status.shards:
            if shard.leader in grpc_of:
                self._leaders[shard.shard_id] = grpc_of[shard.leader]

    async def _route(self, key: bytes) -> int | None:
        if not self.leader_aware:
            return None
        if self._ring is None or self._view_stale:
            try:
                await self.refresh()
            except RaftKVError:
                return None
        return self._ring.shard_for(key) if self._ring is not None else None

    def _endpoint_for(self, shard: int | None) -> str:
        """The cached leader of ``shard``, else any endpoint (which forwards)."""
        cached = self._leaders.get(shard, "") if shard is not None else ""
        return cached or self._any_endpoint()

    def _follow_hint(self, shard: int | None, hint: str, tried: str) -> None:
        """Cache the leader a failure named, or forget the one that just failed."""
        if shard is None:
            return
        if hint and hint != tried:
            self._leaders[shard] = hint
        else:
            self._leaders.pop(shard, None)

    async def _call(self, shard: int | None, attempt: Callable[[str], Awaitable[T]]) -> T:
        backoff = _Backoff(self.timeout)
        while True:
            endpoint = self._endpoint_for(shard)
            try:
                return await attempt(endpoint)
            except grpc.aio.AioRpcError as e:
                err = rpc_error(e)
                if not err.retryable:
                    raise err from None
                hint = err.leader_endpoint if isinstance(err, Unavailable) else ""
                if isinstance(err, Unavailable) and err.epoch > self.epoch:
                    self.epoch, self._view_stale = err.epoch, True
                self._follow_hint(shard, hint, endpoint)
                self.last_error = err
            await backoff.wait(err)

    def _remember(self, header: kv.ResponseHeader) -> None:
        if header.epoch > self.epoch:
            # The cluster changed since we last looked: refresh before the next request.
            self.epoch = header.epoch
            self._view_stale = True
        if header.leader_endpoint:
            self._leaders[header.shard_id] = header.leader_endpoint

    def _meta(self) -> tuple[tuple[str, str], ...]:
        """Credentials, and the newest view epoch we saw: a node behind it refreshes."""
        if not self.epoch:
            return self._md
        return (*self._md, (EPOCH_METADATA, str(self.epoch)))

    def _rid(self) -> kv.RequestId:
        return kv.RequestId(client_id=self.client_id, seq=next(self._seq))

    async def put(self, key: bytes, value: bytes) -> int:
        """Store ``value`` under ``key``; returns the key's new version."""
        if self._batcher is not None:
            return await self._batcher.put(key, value)
        return await self.put_one(key, value)

    async def put_one(self, key: bytes, value: bytes) -> int:
        """``put`` as its own RPC, never batched."""
        shard = await self._route(key)
        req = kv.PutRequest(key=key, value=value, request_id=self._rid())
        resp: kv.PutResponse = await self._call(
            shard,
            lambda ep: self._kv(ep).Put(req, timeout=self.attempt_timeout, metadata=self._meta()),
        )
        self._remember(resp.header)
        return resp.version

    async def get(self, key: bytes, *, stale: bool = False) -> GetResult:
        """Read ``key`` (linearizable unless ``stale``). Raises KeyNotFound if absent."""
        if self._batcher is not None:
            found = await self._batcher.get(key, stale)
        else:
            found = await self.get_one(key, stale=stale)
        if found is None:
            raise KeyNotFound(f"key not found: {show_key(key)}")
        return found

    async def get_one(self, key: bytes, *, stale: bool = False) -> GetResult | None:
        """``get`` as its own RPC, never batched; None if the key is absent."""
        shard = await self._route(key)
        req = kv.GetRequest(key=key, consistency=kv.STALE if stale else kv.LINEARIZABLE)
        try:
            resp: kv.GetResponse = await self._call(
                shard,
                lambda ep: self._kv(ep).Get(
                    req, timeout=self.attempt_timeout, metadata=self._meta()
                ),
            )
        except KeyNotFound:
            return None
        self._remember(resp.header)
        return GetResult(resp.value, resp.version, resp.header.shard_id, resp.header.leader)

    async def delete(self, key: bytes) -> bool:
        """Delete ``key``; returns whether it existed."""
        shard = await self._route(key)
        req = kv.DeleteRequest(key=key, request_id=self._rid())
        resp: kv.DeleteResponse = await self._call(
            shard,
            lambda ep: self._kv(ep).Delete(
                req, timeout=self.attempt_timeout, metadata=self._meta()
            ),
        )
        self._remember(resp.header)
        return resp.existed

    async def compare_and_swap(
        self,
        key: bytes,
        value: bytes,
        *,
        expected_value: bytes | None = None,
        expected_version: int | None = None,
    ) -> int:
        """Set ``value`` if the current value/version matches; raises PreconditionFailed if not."""
        shard = await self._route(key)
        req = kv.CompareAndSwapRequest(key=key, value=value, request_id=self._rid())
        if expected_value is not None:
            req.expected_value = expected_value
        elif expected_version is not None:
            req.expected_version = expected_version
        else:
            raise ValueError("give expected_value or expected_version")
        resp: kv.CompareAndSwapResponse = await self._call(
            shard,
            lambda ep: self._kv(ep).CompareAndSwap(
                req, timeout=self.attempt_timeout, metadata=self._meta()
            ),
        )
        self._remember(resp.header)
        return resp.version

    async def status(self) -> kv.StatusResponse:
        return await self.refresh()

    # -- membership (the admin role when authentication is on) --------------------------------

    def _admin(self, endpoint: str) -> admin_grpc.AdminStub:
        return admin_grpc.AdminStub(self._channel(endpoint))

    async def snapshot_shard(self, shard_id: int) -> list[admin.SnapshotShardChunk]:
        """One shard's copy at a linearizable read index, as the chunks a node streamed
        (the admin role when authentication is on). Tried at the shard's leader first; an
        attempt that fails is retried whole, at another replica if need be."""
        request = admin.SnapshotShardRequest(shard_id=shard_id)

        async def attempt(endpoint: str) -> list[admin.SnapshotShardChunk]:
            call = self._admin(endpoint).SnapshotShard(
                request, timeout=self.timeout, metadata=self._meta()
            )
            return [chunk async for chunk in call]

        return await self._call(shard_id, attempt)

    async def view(self) -> admin.ClusterView:
        """The cluster view (nodes, placement, epoch), read linearizably from the meta group:
        it reflects every membership change acknowledged before the call."""
        request = admin.GetViewRequest(linearizable=True)
        reply: admin.ClusterView = await self._call(
            None,
            lambda ep: self._admin(ep).GetView(
                request, timeout=self.attempt_timeout, metadata=self._meta()
            ),
        )
        # Later requests carry this epoch, so a node behind it refreshes before it answers.
        self.epoch = max(self.epoch, reply.epoch)
        return reply

    async def member_add(
        self, node_id: str, grpc_addr: str, raft_addr: str
    ) -> admin.MemberChangeResponse:
        """Add a node; replica moves onto it start as soon as it runs. Idempotent."""
        request = admin.MemberAddRequest(id=node_id, grpc=grpc_addr, raft=raft_addr)
        reply: admin.MemberChangeResponse = await self._call(
            None,
            lambda ep: self._admin(ep).MemberAdd(
                request, timeout=self.attempt_timeout, metadata=self._meta()
            ),
        )
        return reply

    async def member_remove(
        self, node_id: str, *, dead: bool = False
    ) -> admin.MemberChangeResponse:
        """Drain a node's replicas to the others, then remove it (``dead``: it is gone)."""
        request = admin.MemberRemoveRequest(id=node_id, dead=dead)
        reply: admin.MemberChangeResponse = await self._call(
            None,
            lambda ep: self._admin(ep).MemberRemove(
                request, timeout=self.attempt_timeout, metadata=self._meta()
            ),
        )
        return reply

    async def rebalance(self, *, dry_run: bool = False) -> admin.RebalanceResponse:
        """Recompute the placement for the current nodes (``dry_run``: only show it)."""
        request = admin.RebalanceRequest(dry_run=dry_run)
        reply: admin.RebalanceResponse = await self._call(
            None,
            lambda ep: self._admin(ep).Rebalance(
                request, timeout=self.attempt_timeout, metadata=self._meta()
            ),
        )
        return reply

    async def _groups(self, keys: Sequence[bytes]) -> dict[int | None, list[int]]:
        """shard → positions of ``keys`` (one None group while the ring is unknown)."""
        groups: dict[int | None, list[int]] = {}
        known = bool(keys) and await self._route(keys[0]) is not None
        ring = self._ring if known else None
        for i, key in enumerate(keys):
            groups.setdefault(ring.shard_for(key) if ring is not None else None, []).append(i)
        return groups

    async def _bulk(
        self,
        keys: Sequence[bytes],
        send: Callable[[str, list[int]], Awaitable[Any]],
        accept: Callable[[int, Any], None],
    ) -> None:
        """Run a bulk request: one RPC per leader node, retrying the keys that failed.

        ``send(endpoint, positions)`` sends those positions of the request; ``accept(i, r)``
        takes the result for position ``i``. A shard's writes commit as one entry, so they
        succeed or fail together and a retried part is resent identically (same keys, same
        order, same request id), which the server's per-shard dedup makes safe. Reads may
        succeed in part (a reply is capped in bytes): only the keys still missing are sent
        again.
        """
        pending = await self._groups(keys)
        backoff = _Backoff(self.timeout)
        while True:
            by_endpoint: dict[str, list[int | None]] = {}
            for shard in pending:
                by_endpoint.setdefault(self._endpoint_for(shard), []).append(shard)

            async def one(ep: str, shards: list[int | None]) -> RaftKVError | None:
                positions = sorted(i for sh in shards for i in pending[sh])
                try:
                    resp = await send(ep, positions)
                except grpc.aio.AioRpcError as e:
                    err = rpc_error(e)
                    if not err.retryable:
                        raise err from None
                    for sh in shards:
                        self._follow_hint(sh, "", ep)
                    return err
                for h in resp.headers:
                    self._remember(h)
                failed: RaftKVError | None = None
                answered: set[int] = set()
                for i, r in zip(positions, resp.results, strict=True):
                    if not r.error.code:
                        accept(i, r)
                        answered.add(i)
                        continue
                    err = error_from_status(
                        grpc.StatusCode[r.error.code],
                        r.error.message,
                        {
                            LEADER_METADATA: r.error.leader,
                            LEADER_ENDPOINT_METADATA: r.error.leader_endpoint,
                        },
                    )
                    if not err.retryable:
                        raise err
                    failed = err
                    if self._ring is not None:
                        self._follow_hint(r.shard_id, r.error.leader_endpoint, ep)
                for sh in shards:
                    left = [i for i in pending[sh] if i not in answered]
                    if left:
                        pending[sh] = left
                    else:
                        del pending[sh]
                return failed

            outcomes = await asyncio.gather(*(one(ep, shs) for ep, shs in by_endpoint.items()))
            if not pending:
                return
            last = next((o for o in outcomes if o is not None), None)
            self.last_error = last or self.last_error
            await backoff.wait(last or Unavailable("bulk request did not complete in time"))

    async def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> list[int]:
        """Write many keys; each shard's keys commit as one Raft entry. Returns versions.

        Keys are grouped by their shard's leader: one RPC per node, not per key or shard.
        """
        rid = self._rid()
        versions = [0] * len(items)

        def send(ep: str, positions: list[int]) -> Awaitable[kv.PutManyResponse]:
            req = kv.PutManyRequest(
                items=[kv.KeyValue(key=items[i][0], value=items[i][1]) for i in positions],
                request_id=rid,
            )
            return self._kv(ep).PutMany(  # type: ignore[no-any-return]
                req, timeout=self.attempt_timeout, metadata=self._meta()
            )

        def accept(i: int, r: kv.PutResult) -> None:
            versions[i] = r.version

        await self._bulk([k for k, _ in items], send, accept)
        return versions

    async def get_many(
        self, keys: Sequence[bytes], *, stale: bool = False
    ) -> list[GetResult | None]:
        """Read many keys (one read barrier per shard). Missing keys come back as None."""
        out: list[GetResult | None] = [None] * len(keys)
        consistency = kv.STALE if stale else kv.LINEARIZABLE

        def send(ep: str, positions: list[int]) -> Awaitable[kv.GetManyResponse]:
            req = kv.GetManyRequest(keys=[keys[i] for i in positions], consistency=consistency)
            return self._kv(ep).GetMany(  # type: ignore[no-any-return]
                req, timeout=self.attempt_timeout, metadata=self._meta()
            )

        def accept(i: int, r: kv.GetResult) -> None:
            if r.found:
                out[i] = GetResult(r.value, r.version, r.shard_id, "")

        await self._bulk(keys, send, accept)
        return out


class SyncClient:
    """A blocking facade over :class:`Client`, driving it on a private event-loop thread."""

    def __init__(self, endpoints: str | Sequence[str] = DEFAULT_ENDPOINT, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._client = self._run(self._make(endpoints, kwargs))

    @staticmethod
    async def _make(endpoints: str | Sequence[str], kwargs: dict[str, Any]) -> Client:
        return Client(endpoints, **kwargs)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def put(self, key: bytes, value: bytes) -> int:
        return self._run(self._client.put(key, value))

    def get(self, key: bytes, *, stale: bool = False) -> GetResult:
        return self._run(self._client.get(key, stale=stale))

    def delete(self, key: bytes) -> bool:
        return self._run(self._client.delete(key))

    def compare_and_swap(self, key: bytes, value: bytes, **kwargs: Any) -> int:
        return self._run(self._client.compare_and_swap(key, value, **kwargs))

    def status(self) -> kv.StatusResponse:
        return self._run(self._client.status())

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> list[int]:
        return self._run(self._client.put_many(items))

    def get_many(self, keys: Sequence[bytes], *, stale: bool = False) -> list[GetResult | None]:
        return self._run(self._client.get_many(keys, stale=stale))

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
