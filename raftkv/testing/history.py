"""A record of what clients asked the store to do and what they were told, for checking later.

Why this exists: a fault test (kill, pause or partition nodes under load) can only claim "no
acknowledged write was lost and every read was fresh" if it keeps an exact log of every
request: when the client sent it, when the client learned the outcome, and what that outcome
was. ``raftkv.testing.linearizability.check`` takes such a log and decides whether some
single order of the operations, consistent with real time, explains every result.

The outcome of a request is one of three things, and mixing them up makes the check either
useless or wrong:

- ``OK``: the store answered. For a get that includes "not found" (result ``None``); for a
  compare-and-swap it includes "precondition failed" (result ``False``).
- ``FAILED``: the request definitely did not take effect, for example INVALID_ARGUMENT or a
  NOT_LEADER reply from a node that never proposed it. The checker drops it.
- ``UNKNOWN``: it may or may not have taken effect, and may still take effect later: a deadline
  expired, the connection broke, the leader changed while the proposal was in flight. Record
  these honestly as UNKNOWN, never as FAILED. The checker lets an UNKNOWN write take effect
  at any moment after it was invoked, or never.

An operation that was invoked but never completed (the test stopped first) is reported as
UNKNOWN with ``complete = math.inf``.

``History`` is safe to share between threads and between asyncio tasks: every method is
non-blocking and holds a lock only for a few dictionary operations, so it can be called
straight from a coroutine. Record ``invoke`` just before sending the request and
``complete`` just after the reply (or the error) arrives; the interval between them must
contain the moment the store acted.

Histories can be saved to and loaded from JSON Lines (one operation per line, bytes as
base64), so that a failing run can be attached to a bug report and re-checked.
"""

from __future__ import annotations

import base64
import enum
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, cast

__all__ = [
    "History",
    "Kind",
    "Operation",
    "Outcome",
    "read_jsonl",
    "write_jsonl",
]

Kind: TypeAlias = Literal["put", "get", "delete", "cas"]
_KINDS: frozenset[str] = frozenset(("put", "get", "delete", "cas"))


class Outcome(enum.Enum):
    """How a request ended, as far as the client can tell."""

    OK = "ok"
    """The store answered (including "not found" and "compare-and-swap precondition failed")."""
    FAILED = "failed"
    """The request definitely did not take effect."""
    UNKNOWN = "unknown"
    """The request may or may not have taken effect (timeout, connection loss, ...)."""


@dataclass(frozen=True)
class Operation:
    """One client request on one key, with the times around it and what the client was told.

    ``value`` is the value written by a put, or the new value of a cas. ``expected`` is a cas's
    expected current value (``None``: the key must be absent). ``result`` is the value a get
    read (``None``: not found), or whether a cas swapped; it is ``None`` for put and delete, and
    for every operation whose outcome is not OK. ``invoke`` and ``complete`` are
    ``time.monotonic()`` seconds; ``complete`` is ``math.inf`` for an operation that never
    completed.

    The constructor rejects inconsistent combinations (a get with a bool result, a FAILED
    operation with a result, ``complete < invoke``, ...), so a checker never has to guess.
    """

    client: int
    kind: Kind
    key: bytes
    value: bytes | None
    expected: bytes | None
    result: bytes | bool | None
    invoke: float
    complete: float
    outcome: Outcome

    def __post_init__(self) -> None:
        problem = _validate(self)
        if problem is not None:
            raise ValueError(f"invalid operation ({problem}): {self!r}")

    def describe(self) -> str:
        """A one-line human-readable form, e.g. ``client 3 cas(b'a' -> b'b') = True ...``."""
        if self.kind == "put":
            call = f"put({self.value!r})"
        elif self.kind == "delete":
            call = "delete()"
        elif self.kind == "get":
            call = "get()"
        else:
            call = f"cas({self.expected!r} -> {self.value!r})"
        if self.outcome is Outcome.OK:
            if self.kind == "get":
                call += " = not found" if self.result is None else f" = {self.result!r}"
            elif self.kind == "cas":
                call += " = swapped" if self.result else " = not swapped"
        else:
            call += f" [{self.outcome.value}]"
        end = "never" if math.isinf(self.complete) else f"{self.complete:.6f}"
        return f"client {self.client} {call} during {self.invoke:.6f}..{end}"


def _validate(op: Operation) -> str | None:
    """Why ``op`` is malformed, or None."""
    if op.kind not in _KINDS:
        return f"unknown kind {op.kind!r}"
    if not isinstance(op.key, bytes):
        return "key must be bytes"
    if not isinstance(op.outcome, Outcome):
        return "outcome must be an Outcome"
    if op.kind == "put" and not isinstance(op.value, bytes):
        return "put needs a bytes value"
    if op.kind in ("get", "delete") and op.value is not None:
        return f"{op.kind} takes no value"
    if op.kind == "cas" and not isinstance(op.value, bytes | None):
        return "cas value must be bytes or None"
    if op.kind != "cas" and op.expected is not None:
        return "only cas takes an expected value"
    if op.kind == "cas" and not isinstance(op.expected, bytes | None):
        return "cas expected must be bytes or None"
    if math.isnan(op.invoke) or math.isinf(op.invoke):
        return "invoke must be a finite time"
    if math.isnan(op.complete) or op.complete < op.invoke:
        return "complete must not be before invoke"
    if op.outcome is not Outcome.OK:
        if op.result is not None:
            return f"a {op.outcome.value} operation has no result"
        return None
    if math.isinf(op.complete):
        return "an OK operation must have completed"
    if op.kind == "get":
        if not isinstance(op.result, bytes | None):
            return "get result must be bytes or None"
    elif op.kind == "cas":
        if not isinstance(op.result, bool):
            return "cas result must be a bool"
    elif op.result is not None:
        return f"{op.kind} has no result"
    return None


@dataclass
class _Pending:
    client: int
    kind: Kind
    key: bytes
    value: bytes | None
    expected: bytes | None
    invoke: float


class History:
    """A thread-safe, asyncio-friendly recorder of client operations.

    Usage::

        h = History()
        handle = h.invoke(client=1, kind="put", key=b"k", value=b"v")
        try:
            await client.put(b"k", b"v")
        except DefinitelyNotApplied:
            h.complete(handle, Outcome.FAILED)
        except Exception:
            h.complete(handle, Outcome.UNKNOWN)
        else:
            h.complete(handle, Outcome.OK)

    ``clock`` defaults to ``time.monotonic``; tests may pass a fake one.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # Indexed by handle. A slot holds a _Pending until complete() replaces it.
        self._slots: list[Operation | _Pending] = []

    def invoke(
        self,
        client: int,
        kind: Kind,
        key: bytes,
        value: bytes | None = None,
        expected: bytes | None = None,
    ) -> int:
        """Record that ``client`` is about to send a request; returns a handle for ``complete``."""
        if kind not in _KINDS:
            raise ValueError(f"unknown operation kind {kind!r}")
        with self._lock:
            pending = _Pending(client, kind, key, value, expected, self._clock())
            self._slots.append(pending)
            return len(self._slots) - 1

    def complete(
        self, handle: int, outcome: Outcome, result: bytes | bool | None = None
    ) -> Operation:
        """Record how the request ``handle`` ended; returns the finished operation.

        Raises ``KeyError`` for a handle this history never issued and ``ValueError`` if the
        handle was already completed or the result does not fit the operation.
        """
        with self._lock:
            if not 0 <= handle < len(self._slots):
                raise KeyError(handle)
            pending = self._slots[handle]
            if not isinstance(pending, _Pending):
                raise ValueError(f"operation {handle} was already completed")
            op = Operation(
                client=pending.client,
                kind=pending.kind,
                key=pending.key,
                value=pending.value,
                expected=pending.expected,
                result=result,
                invoke=pending.invoke,
                complete=self._clock(),
                outcome=outcome,
            )
            self._slots[handle] = op
            return op

    def operations(self) -> list[Operation]:
        """Every operation so far, in invoke order; unfinished ones as UNKNOWN, never completed."""
        with self._lock:
            slots = list(self._slots)
        return [slot if isinstance(slot, Operation) else _unfinished(slot) for slot in slots]

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def to_jsonl(self, path: str | os.PathLike[str]) -> None:
        """Save ``operations()`` to ``path`` as JSON Lines (see ``write_jsonl``)."""
        write_jsonl(self.operations(), path)

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike[str]) -> History:
        """Load a history saved by ``to_jsonl``; every operation in it is already complete."""
        history = cls()
        history._slots.extend(read_jsonl(path))
        return history


def _unfinished(pending: _Pending) -> Operation:
    return Operation(
        client=pending.client,
        kind=pending.kind,
        key=pending.key,
        value=pending.value,
        expected=pending.expected,
        result=None,
        invoke=pending.invoke,
        complete=math.inf,
        outcome=Outcome.UNKNOWN,
    )


# --- JSON Lines -------------------------------------------------------------------------------
# One object per line: {"client": 1, "kind": "cas", "key": "<b64>", "value": "<b64>"|null,
# "expected": "<b64>"|null, "result": "<b64>"|true|false|null, "invoke": 12.5,
# "complete": 12.75|null, "outcome": "ok"|"failed"|"unknown"}. null "complete" means never.


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"expected base64 text or null, got {text!r}")
    return base64.b64decode(text, validate=True)


def _to_json(op: Operation) -> dict[str, Any]:
    result: str | bool | None
    result = op.result if isinstance(op.result, bool) else _b64(op.result)
    return {
        "client": op.client,
        "kind": op.kind,
        "key": _b64(op.key),
        "value": _b64(op.value),
        "expected": _b64(op.expected),
        "result": result,
        "invoke": op.invoke,
        "complete": None if math.isinf(op.complete) else op.complete,
        "outcome": op.outcome.value,
    }


def _from_json(obj: dict[str, Any]) -> Operation:
    kind = obj["kind"]
    if kind not in _KINDS:
        raise ValueError(f"unknown operation kind {kind!r}")
    key = _unb64(obj["key"])
    if key is None:
        raise ValueError("key must not be null")
    raw_result = obj["result"]
    result = raw_result if isinstance(raw_result, bool) else _unb64(raw_result)
    complete = obj["complete"]
    return Operation(
        client=int(obj["client"]),
        kind=cast(Kind, kind),
        key=key,
        value=_unb64(obj["value"]),
        expected=_unb64(obj["expected"]),
        result=result,
        invoke=float(obj["invoke"]),
        complete=math.inf if complete is None else float(complete),
        outcome=Outcome(obj["outcome"]),
    )


def write_jsonl(operations: Iterable[Operation], path: str | os.PathLike[str]) -> None:
    """Write ``operations`` to ``path``, one JSON object per line, bytes as base64."""
    with open(path, "w", encoding="utf-8") as f:
        for op in operations:
            f.write(json.dumps(_to_json(op), allow_nan=False, separators=(",", ":")))
            f.write("\n")


def read_jsonl(path: str | os.PathLike[str]) -> list[Operation]:
    """Read operations written by ``write_jsonl``; raises ``ValueError`` on a malformed line."""
    operations: list[Operation] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
                operations.append(_from_json(obj))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{os.fspath(path)}:{lineno}: bad operation: {exc}") from exc
    return operations
