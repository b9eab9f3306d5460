"""Throttles for log lines that the outside world can trigger at will.

A stranger who opens connections, sends garbage or floods a node with requests decides how
often those events happen; logging each one would let them fill the disk and bury what an
operator needs to see. Each kind of event is logged at most once per interval, and the line
that gets through says how many were suppressed since the last one.
"""

from __future__ import annotations

import time


class Throttle:
    """``allow(key)`` is True at most once per ``interval_s`` for each key."""

    def __init__(self, interval_s: float = 10.0, max_keys: int = 1024) -> None:
        self._interval = interval_s
        self._max_keys = max_keys
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if last is None and len(self._last) >= self._max_keys:
            # Keys can come from peers (addresses, reasons): forget old ones, stay bounded.
            self._last.clear()
            self._suppressed.clear()
        self._last[key] = now
        return True

    def suppressed(self, key: str) -> int:
        """How many events of ``key`` were dropped since the last allowed one (and reset)."""
        return self._suppressed.pop(key, 0)
