"""Client-side request batching: concurrent single puts and gets ride one bulk RPC.

Like TiKV's client (``BatchCommands``), the client does not send one gRPC call per request
when many are in flight. Every ``put``/``get`` issued in the same event-loop turn is queued, and
one callback at the end of the turn sends them all through ``put_many``/``get_many``: one RPC
per leader node, one Raft entry (or one read barrier) per shard. A lone request is sent in the
very same turn, so an idle client pays no extra latency; a busy one pays a fraction of the
per-call gRPC cost, which dominates on the CPU.

Semantics are unchanged: each operation is invoked before the batch is sent and completes
after it commits, so it stays linearizable, and a batch is retried with its request id, so a
retried write still applies once. A batch that the server rejects as a whole (one invalid key)
falls back to sending its operations one by one, so one bad request never fails its
neighbours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from raftkv.errors import InvalidArgument

if TYPE_CHECKING:
    from raftkv.client import Client, GetResult

Item = TypeVar("Item")
Result = TypeVar("Result")

# Keep one bulk RPC well under the gRPC message limit (8 MiB).
MAX_BATCH_ITEMS = 512
MAX_BATCH_BYTES = 2 * 1024 * 1024


class _Queue(Generic[Item, Result]):
    """Operations waiting for the end of this event-loop turn."""

    def __init__(
        self,
        send_many: Callable[[list[Item]], Awaitable[Sequence[Result]]],
        send_one: Callable[[Item], Awaitable[Result]],
        size: Callable[[Item], int],
    ) -> None:
        self._send_many = send_many
        self._send_one = send_one
        self._size = size
        self._items: list[Item] = []
        self._futures: list[asyncio.Future[Result]] = []
        self._bytes = 0
        self._scheduled = False

    def submit(self, item: Item) -> asyncio.Future[Result]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._items.append(item)
        self._futures.append(future)
        self._bytes += self._size(item)
        if len(self._items) >= MAX_BATCH_ITEMS or self._bytes >= MAX_BATCH_BYTES:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        if not self._items:
            return
        items, futures = self._items, self._futures
        self._items, self._futures, self._bytes = [], [], 0
        task = asyncio.ensure_future(self._run(items, futures))
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _run(self, items: list[Item], futures: list[asyncio.Future[Result]]) -> None:
        try:
            if len(items) == 1:
                results: Sequence[Result] = [await self._send_one(items[0])]
            else:
                results = await self._send_many(items)
        except InvalidArgument:
            await asyncio.gather(
                *(self._one_by_one(i, f) for i, f in zip(items, futures, strict=True))
            )
            return
        except BaseException as e:
            for f in futures:
                if not f.done():
                    f.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        for f, r in zip(futures, results, strict=True):
            if not f.done():
                f.set_result(r)

    async def _one_by_one(self, item: Item, future: asyncio.Future[Result]) -> None:
        try:
            result = await self._send_one(item)
        except Exception as e:
            if not future.done():
                future.set_exception(e)
        else:
            if not future.done():
                future.set_result(result)


_background: set[asyncio.Task[None]] = set()


class Batcher:
    """Coalesces a client's concurrent puts and gets into bulk RPCs."""

    def __init__(self, client: Client) -> None:
        self._puts: _Queue[tuple[bytes, bytes], int] = _Queue(
            client.put_many,
            lambda item: client.put_one(*item),
            lambda item: len(item[0]) + len(item[1]),
        )
        self._gets: dict[bool, _Queue[bytes, GetResult | None]] = {
            stale: _Queue(
                lambda keys, stale=stale: client.get_many(keys, stale=stale),  # type: ignore[misc]
                lambda key, stale=stale: client.get_one(key, stale=stale),  # type: ignore[misc]
                len,
            )
            for stale in (False, True)
        }

    def put(self, key: bytes, value: bytes) -> asyncio.Future[int]:
        return self._puts.submit((key, value))

    def get(self, key: bytes, stale: bool) -> asyncio.Future[GetResult | None]:
        return self._gets[stale].submit(key)
