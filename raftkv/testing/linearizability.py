"""Decide whether a recorded history of key-value operations is linearizable.

A history is *linearizable* (Herlihy & Wing 1990) if every operation can be given one instant
between its invocation and its completion such that, executed one at a time in the order of
those instants, the operations produce exactly the results the clients saw. That is the
promise raftkv makes (writes acknowledged after commit, reads through a Raft barrier), and it
is what a fault test must check: a stale read from a deposed leader, a lost acknowledged write
or a write applied twice each make the history non-linearizable.

How (the algorithm is a port of porcupine's, specialised to one register per key):

- **Per-key partitioning.** Linearizability is compositional (Herlihy & Wing's locality
  theorem; Horn & Kroening, "Faster linearizability checking via P-compositionality",
  FORTE 2015): the history is linearizable iff each key's sub-history is. Each key is checked
  alone, smallest first, and the search is exponential only in what overlaps on one key.
- **Wing & Gong's backtracking search** (Wing & Gong, "Testing and verifying concurrent
  objects", JPDC 17, 1993): build a sequential order one operation at a time; any operation
  whose call precedes the earliest pending return may come next if the model accepts its
  result; when stuck, undo the last choice.
- **Lowe's just-in-time linearizability** (Lowe, "Testing for linearizability", Concurrency
  and Computation: Practice and Experience 29(4), 2017), as implemented in porcupine
  (A. Athalye, https://github.com/anishathalye/porcupine, ``checker.go``): the calls and
  returns sit in one time-ordered doubly linked list; linearizing an operation unlinks its
  call and return in O(1) and backtracking relinks them. Every configuration reached is
  cached as (bitset of linearized operations, model state) with a Python ``int`` as the
  bitset, and a configuration seen before is not explored again. This cache is what makes
  the search practical: two orders of the same operations that reach the same value are
  explored once.

Semantics of outcomes (see ``raftkv.testing.history``): FAILED operations are dropped. A get
whose outcome is UNKNOWN constrains nothing and is dropped. An UNKNOWN write (put, delete or
cas) may have taken effect at any instant after its invocation, even after the client gave up,
or never: its return is at +infinity and it is *optional*. An optional cas that took effect
swapped (a cas that did not swap changes nothing, which is the same as leaving it out). Every
key starts absent. The model per key: put sets the value; delete makes it absent; get must
return the current value (``None`` for absent); a cas that returned True needs current ==
expected and sets the new value; a cas that returned False needs current != expected and
changes nothing.

Refinements over porcupine. The first two keep a 300-operation key with 16 concurrent clients
well under a second in pure Python; the rest are for histories with many UNKNOWN writes (a
timeout under a partition leaves dozens, each concurrent with everything after it). Each was
proven safe for this register model and is cross-checked against a brute-force checker in
``tests/unit/test_linearizability.py``.

- *Reads commit.* If the current state allows a get (or a cas that reported a mismatch) whose
  call is in the window, it is the only operation tried next: it changes no state, and moving
  it earlier in any valid order keeps the order valid. Only writes branch the search.
- *Required before optional.* From each configuration, required writes are tried before
  optional ones, so the search delays UNKNOWN writes until something needs them, and meets
  configurations that used fewer of them first (see dominance below).
- *Unobserved values are one value.* A value that no get returned and no cas expected can be
  told apart from another such value by no operation, so they all map to one model state.
- *Useless optional writes are dropped*: an UNKNOWN cas(a -> a); and an UNKNOWN write of an
  unobserved value when no cas on the key reported a mismatch, since after it only another
  write can be linearized (nothing reads its value). A mismatching cas could be explained by
  it, so then it is kept.
- *Equal optional operations are used in invocation order.* Two optional operations with the
  same effect are interchangeable, and the earlier one is available whenever the later one
  is, so the search only tries the later one once the earlier one is linearized.
- *Dominance in the cache.* The cache key is (linearized required operations, state) and it
  remembers which optional operations had been used. A configuration that used a superset of
  the optional operations of a cached one with the same key is pruned: it can do nothing the
  cached one cannot, since an unused optional operation can still be used later or never.

The search is exponential in the worst case (the problem is NP-complete; Gibbons & Korach
1997). ``check`` therefore takes an overall time budget. A key whose search runs past it is
reported in ``CheckResult.timed_out_keys`` and makes ``CheckResult.ok`` False: a check that
did not finish never passes silently. For a history that is not linearizable, the
``Violation`` explains the deepest point the search reached (like porcupine's longest partial
linearization) and lists the operations around it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from raftkv.testing.history import Operation, Outcome

__all__ = ["CheckResult", "Violation", "check"]

# How many operations a Violation lists at most, and how many of the best partial order's
# last operations it includes for context.
_MAX_LISTED = 40
_CONTEXT = 5
# A key whose search caches more configurations than this is given up like a timeout. Each
# costs about 120 bytes; a pure-Python search this large takes ~15 s anyway.
_MAX_CONFIGURATIONS = 2_000_000


@dataclass(frozen=True)
class Violation:
    """Why one key's history is not linearizable."""

    key: bytes
    message: str
    """A short explanation of where every possible order gets stuck."""
    operations: tuple[Operation, ...]
    """The operations of this key involved, in invocation order (at most 40)."""

    def __str__(self) -> str:
        lines = [f"key {self.key!r}: {self.message}"]
        lines.extend(f"    {op.describe()}" for op in self.operations)
        return "\n".join(lines)


@dataclass(frozen=True)
class CheckResult:
    """The verdict on a whole history.

    ``ok`` is True only if every key was checked and found linearizable. ``keys_checked``
    counts the keys whose check finished (either way); keys that ran out of time are in
    ``timed_out_keys`` instead.
    """

    ok: bool
    keys_checked: int
    violations: list[Violation]
    timed_out_keys: list[bytes]

    def describe(self) -> str:
        """A multi-line report, for assertion messages: ``assert r.ok, r.describe()``."""
        if self.ok:
            return f"linearizable ({self.keys_checked} keys checked)"
        lines = [
            f"NOT linearizable: {len(self.violations)} violation(s), "
            f"{len(self.timed_out_keys)} key(s) timed out, {self.keys_checked} key(s) checked"
        ]
        lines.extend(str(v) for v in self.violations)
        if self.timed_out_keys:
            lines.append(f"timed out (undecided): {', '.join(map(repr, self.timed_out_keys))}")
        return "\n".join(lines)


def check(operations: Iterable[Operation], *, timeout_s: float = 30.0) -> CheckResult:
    """Check that ``operations`` (on any number of keys) form a linearizable history.

    ``timeout_s`` bounds the whole check; keys still undecided when it runs out are reported
    in ``timed_out_keys``, and the result is then not ok. So is a key whose search outgrows
    two million configurations (about 250 MB), whatever the time left.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    deadline = time.monotonic() + timeout_s
    by_key: dict[bytes, list[Operation]] = {}
    for op in operations:
        by_key.setdefault(op.key, []).append(op)

    violations: list[Violation] = []
    timed_out: list[bytes] = []
    checked = 0
    # Small keys first, so that one pathological key cannot starve the others of the budget.
    for key in sorted(by_key, key=lambda k: (len(by_key[k]), k)):
        problem = _prepare(key, by_key[key])
        if isinstance(problem, Violation):
            violations.append(problem)
            checked += 1
            continue
        outcome = _search(problem, deadline)
        if outcome is None:
            timed_out.append(key)
            continue
        checked += 1
        if outcome is not True:
            violations.append(_explain(key, problem, outcome))
    violations.sort(key=lambda v: v.key)
    timed_out.sort()
    return CheckResult(
        ok=not violations and not timed_out,
        keys_checked=checked,
        violations=violations,
        timed_out_keys=timed_out,
    )


# --- one key: the model ----------------------------------------------------------------------
# The register's value is interned to a small int: one id per *observed* value (a value some
# get returned or some cas expected, including None), and _UNOBSERVED for every other value.
# An operation becomes (code, arg, new):
#   _WRITE: always allowed; the state becomes ``new``                     (put, delete)
#   _EQ:    allowed if state == arg; the state becomes ``new`` unless _KEEP (get, swapping cas)
#   _NE:    allowed if state != arg; the state is unchanged              (mismatching cas)
_WRITE, _EQ, _NE = 0, 1, 2
_KEEP = -2
_UNOBSERVED = -1


@dataclass
class _KeyProblem:
    ops: list[Operation]  # the operations that take part, in invocation order
    optional: list[bool]  # UNKNOWN writes: may be linearized or left out
    code: list[int]
    arg: list[int]
    new: list[int]
    twin: list[int]  # previous optional op with the same effect, or -1
    initial: int  # the id of "absent"


def _prepare(key: bytes, history: Sequence[Operation]) -> _KeyProblem | Violation:
    """Drop what constrains nothing, intern values, and catch reads of never-written values."""
    ops = [
        op
        for op in history
        if op.outcome is not Outcome.FAILED
        and not (op.kind == "get" and op.outcome is Outcome.UNKNOWN)
    ]
    written: set[bytes | None] = {None}
    for op in ops:
        if op.kind in ("put", "cas"):
            written.add(op.value)
    for op in ops:
        if op.outcome is not Outcome.OK:
            continue
        if op.kind == "get" and op.result not in written:
            return Violation(
                key,
                f"{op.describe()} read a value that no put or cas on this key ever wrote",
                (op,),
            )
        if op.kind == "cas" and op.result is True and op.expected not in written:
            return Violation(
                key,
                f"{op.describe()} swapped, but no put or cas on this key ever wrote the "
                f"expected value {op.expected!r}",
                (op,),
            )

    observed: set[bytes | None] = set()
    for op in ops:
        if op.kind == "get":
            assert not isinstance(op.result, bool)
            observed.add(op.result)
        elif op.kind == "cas":
            observed.add(op.expected)
    ids: dict[bytes | None, int] = {}

    def intern(value: bytes | None) -> int:
        if value not in observed:
            return _UNOBSERVED
        return ids.setdefault(value, len(ids))

    mismatching_cas = any(
        op.kind == "cas" and op.outcome is Outcome.OK and op.result is False for op in ops
    )
    problem = _KeyProblem([], [], [], [], [], [], intern(None))
    for op in sorted(ops, key=lambda o: (o.invoke, o.complete)):
        optional = op.outcome is Outcome.UNKNOWN
        arg = _KEEP
        if op.kind in ("put", "delete"):
            code, new = _WRITE, intern(op.value)
        elif op.kind == "get":
            assert not isinstance(op.result, bool)
            code, arg, new = _EQ, intern(op.result), _KEEP
        elif optional or op.result is True:
            code, arg, new = _EQ, intern(op.expected), intern(op.value)
        else:
            code, arg, new = _NE, intern(op.expected), _KEEP
        if code == _EQ and new == arg:
            new = _KEEP  # cas(a -> a) changes nothing
        if optional and (new == _KEEP or (new == _UNOBSERVED and not mismatching_cas)):
            continue  # leaving it out is never worse (see the module docstring)
        problem.ops.append(op)
        problem.optional.append(optional)
        problem.code.append(code)
        problem.arg.append(arg)
        problem.new.append(new)

    last_with_effect: dict[tuple[int, int, int], int] = {}
    for i, optional in enumerate(problem.optional):
        twin = -1
        if optional:
            effect = (problem.code[i], problem.arg[i], problem.new[i])
            twin = last_with_effect.get(effect, -1)
            last_with_effect[effect] = i
        problem.twin.append(twin)
    return problem


# --- one key: the search ---------------------------------------------------------------------


class _Entry:
    """A call or return in the time-ordered doubly linked list (porcupine's ``node``)."""

    __slots__ = ("is_call", "match", "next", "op", "prev")

    def __init__(self, op: int, is_call: bool) -> None:
        self.op = op
        self.is_call = is_call
        self.match: _Entry | None = None  # a call's return entry; None for optional ops
        self.prev: _Entry = self
        self.next: _Entry = self


class _Frame:
    """A configuration on the search path: how it was reached and what to try from it."""

    __slots__ = ("candidates", "next", "op", "state_before")

    def __init__(self, op: int, state_before: int) -> None:
        self.op = op  # the operation linearized to get here (-1 at the root)
        self.state_before = state_before
        self.candidates: list[int] = []
        self.next = 0  # index of the next candidate to try


@dataclass
class _Stuck:
    """The deepest point a failed search reached."""

    prefix: list[int]  # the operations linearized there, in order
    blocked: int  # the required operation that could not be linearized before its return


def _search(p: _KeyProblem, deadline: float) -> Literal[True] | _Stuck | None:
    """True if linearizable, _Stuck if not, None if the deadline passed first."""
    n = len(p.ops)
    head, tail = _Entry(-1, False), _Entry(-1, False)
    calls = [_Entry(i, True) for i in range(n)]
    events: list[tuple[float, int, int]] = []
    for i, op in enumerate(p.ops):
        events.append((op.invoke, 0, i))
        if not p.optional[i]:
            # At equal times calls sort before returns: touching intervals count as concurrent.
            calls[i].match = _Entry(i, False)
            events.append((op.complete, 1, i))
    events.sort()
    last = head
    for _, is_return, i in events:
        e = calls[i].match if is_return else calls[i]
        assert e is not None
        last.next, e.prev = e, last
        last = e
    last.next, tail.prev = tail, last

    code, arg, new_state, optional, twin = p.code, p.arg, p.new, p.optional, p.twin
    n_required = optional.count(False)
    required_left = n_required
    state = p.initial
    lin_req = 0  # bitset of linearized required ops
    lin_opt = 0  # bitset of linearized optional ops

    def candidates() -> list[int]:
        """The operations that may be linearized next, best first.

        The window is every call before the first pending return. A get or mismatching cas
        that the state allows is the only candidate: linearizing it now, rather than later,
        changes no state and only frees what must follow it. Otherwise required writes come
        before optional ones.
        """
        writes: list[int] = []
        extra: list[int] = []
        e = head.next
        while e.is_call:
            i = e.op
            c = code[i]
            if optional[i]:
                t = twin[i]
                if (t < 0 or (lin_opt >> t) & 1) and (c == _WRITE or state == arg[i]):
                    extra.append(i)
            elif c == _WRITE:
                writes.append(i)
            elif c == _EQ:
                if state == arg[i]:
                    if new_state[i] == _KEEP:
                        return [i]
                    writes.append(i)
            elif state != arg[i]:
                return [i]
            e = e.next
        writes.extend(extra)
        return writes

    if not required_left:
        return True
    root = _Frame(-1, state)
    root.candidates = candidates()
    stack = [root]
    # The cache maps (linearized required ops, state), packed into one int, to the optional
    # ops used: one bitset, or a list of them once incomparable sets have been seen.
    state_bits = (max(p.initial, *p.arg, *p.new) + 2).bit_length()
    cache: dict[int, int | list[int]] = {state + 1: 0}
    best = _Stuck([], -1)
    best_depth = -1
    steps = 0
    while True:
        steps += 1
        if not steps & 0x3FF and time.monotonic() > deadline:
            return None
        frame = stack[-1]
        kids = frame.candidates
        k = frame.next
        if k == len(kids):
            depth = n_required - required_left
            if depth > best_depth:
                best_depth = depth
                e = head.next
                while e.is_call:
                    e = e.next
                best = _Stuck([f.op for f in stack[1:]], e.op)
            stack.pop()
            if not stack:
                return best
            i = frame.op
            state = frame.state_before
            if optional[i]:
                lin_opt ^= 1 << i
            else:
                lin_req ^= 1 << i
                required_left += 1
            # unlift: relink the return, then the call
            entry = calls[i]
            ret = entry.match
            if ret is not None:
                ret.prev.next = ret.next.prev = ret
            entry.prev.next = entry.next.prev = entry
            continue
        frame.next = k + 1
        i = kids[k]
        after = new_state[i]
        if after == _KEEP:
            after = state
        bit = 1 << i
        if optional[i]:
            next_req, next_opt = lin_req, lin_opt | bit
        else:
            next_req, next_opt = lin_req | bit, lin_opt
        cache_key = next_req << state_bits | (after + 1)
        seen = cache.get(cache_key)
        if seen is None:
            if len(cache) >= _MAX_CONFIGURATIONS:
                return None
            cache[cache_key] = next_opt
        else:
            seen_sets = [seen] if isinstance(seen, int) else seen
            if any(used | next_opt == next_opt for used in seen_sets):
                continue  # no better than a configuration already explored
            seen_sets.append(next_opt)
            cache[cache_key] = seen_sets
        # lift: unlink the call and its return
        entry = calls[i]
        entry.prev.next, entry.next.prev = entry.next, entry.prev
        ret = entry.match
        if ret is not None:
            ret.prev.next, ret.next.prev = ret.next, ret.prev
        frame = _Frame(i, state)
        stack.append(frame)
        state, lin_req, lin_opt = after, next_req, next_opt
        if not optional[i]:
            required_left -= 1
            if not required_left:
                return True
        frame.candidates = candidates()


# --- explaining a failure --------------------------------------------------------------------


def _show(value: bytes | None) -> str:
    return "absent" if value is None else repr(value)


def _explain(key: bytes, p: _KeyProblem, stuck: _Stuck) -> Violation:
    blocked = p.ops[stuck.blocked]
    value: bytes | None = None
    for i in stuck.prefix:
        op = p.ops[i]
        if op.kind in ("put", "delete") or (op.kind == "cas" and op.result is not False):
            value = op.value
    why = "no order of the operations still pending leads to a state that explains it"
    if blocked.kind == "get" and blocked.result != value:
        assert not isinstance(blocked.result, bool)
        why = f"it read {_show(blocked.result)} but the key was {_show(value)}"
    elif blocked.kind == "cas" and blocked.result is True and blocked.expected != value:
        why = f"it swapped, which needs the key to be {_show(blocked.expected)}, not {_show(value)}"
    elif blocked.kind == "cas" and blocked.result is False and blocked.expected == value:
        why = f"it reported a mismatch, but the key was exactly the expected {_show(value)}"
    n, k = len(p.ops), len(stuck.prefix)
    message = (
        f"not linearizable: no order of the {n} relevant operation{'s' * (n != 1)} on this key "
        f"explains every result. The longest linearizable prefix found has {k} "
        f"operation{'s' * (k != 1)} and leaves the key {_show(value)}; then "
        f"{blocked.describe()} cannot take effect: {why}."
    )
    in_prefix = set(stuck.prefix)
    # Unordered operations that could have come before the blocked one, latest first.
    pending = [
        i
        for i in reversed(range(len(p.ops)))
        if i not in in_prefix and i != stuck.blocked and p.ops[i].invoke <= blocked.complete
    ]
    # The last writes of the value the blocked operation wanted to see, wherever they are.
    wanted = blocked.result if blocked.kind == "get" else blocked.expected
    writers = [
        i
        for i, op in enumerate(p.ops)
        if blocked.kind in ("get", "cas")
        and op.kind != "get"
        and not (op.kind == "cas" and op.result is False)
        and op.value == wanted
        and op.invoke <= blocked.complete
    ][-3:]
    context = [*stuck.prefix[-_CONTEXT:], *writers]
    chosen = sorted({stuck.blocked, *context, *pending[: _MAX_LISTED - 1 - len(context)]})
    return Violation(key, message, tuple(p.ops[i] for i in chosen))
