"""Admission control: a node refuses work it cannot do in time, at once and out loud.

Without a bound, an overloaded node accepts everything and every request slows down together
until clients time out (CANCELLED, with nothing in the log). With one, the excess is refused
immediately with RESOURCE_EXHAUSTED and a retry hint, the admitted requests keep their latency,
and the node logs that it is shedding load (throttled, with counts).

* :class:`Admission` bounds the RPCs a node handles at once.
* :class:`Gate` bounds an expensive operation (a data digest) to a few holders and a short
  queue; callers beyond the queue are refused.
"""

from __future__ import annotations

import asyncio
import logging
import time

from raftkv.errors import Overloaded

log = logging.getLogger("raftkv.admission")

RETRY_AFTER_METADATA = "raftkv-retry-after-ms"
_LOG_INTERVAL_S = 10.0


class Admission:
    """Counts RPCs in flight; :meth:`try_enter` is False once ``limit`` are running."""

    def __init__(self, limit: int, *, what: str = "requests", retry_after_ms: int = 50) -> None:
        if limit < 1:
            raise ValueError("the concurrent RPC limit must be at least 1")
        self.limit = limit
        self.what = what
        self.retry_after_ms = retry_after_ms
        self.inflight = 0
        self.refused_total = 0
        self._refused_since_log = 0
        self._last_log = 0.0

    def try_enter(self) -> bool:
        if self.inflight >= self.limit:
            self.refused_total += 1
            self._refused_since_log += 1
            now = time.monotonic()
            if now - self._last_log >= _LOG_INTERVAL_S:
                log.warning(
                    "overloaded: %d %s in flight (limit %d); refused %d with "
                    "RESOURCE_EXHAUSTED since the last report",
                    self.inflight,
                    self.what,
                    self.limit,
                    self._refused_since_log,
                )
                self._last_log = now
                self._refused_since_log = 0
            return False
        self.inflight += 1
        return True

    def leave(self) -> None:
        self.inflight -= 1

    def refusal(self) -> Overloaded:
        return Overloaded(
            f"node overloaded: {self.inflight} {self.what} in flight (limit {self.limit}); "
            f"retry after {self.retry_after_ms} ms"
        )


class Gate:
    """At most ``limit`` holders and ``max_waiting`` waiters; beyond that, Overloaded."""

    def __init__(self, limit: int, *, max_waiting: int, what: str) -> None:
        self._semaphore = asyncio.Semaphore(limit)
        self._max_waiting = max_waiting
        self._waiting = 0
        self._what = what

    async def acquire(self) -> None:
        if self._semaphore.locked() and self._waiting >= self._max_waiting:
            raise Overloaded(f"too many callers are waiting for {self._what}; retry later")
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1

    def release(self) -> None:
        self._semaphore.release()
