"""Tests for raftkv.testing.history and raftkv.testing.linearizability.

Hand-built histories use explicit times; each bad one is bad for one stated reason and has a
good twin nearby, so a checker that accepts everything or rejects everything fails here. A
brute-force reference checker (every subset of unknown writes, every real-time-respecting
order) cross-checks the real one on thousands of small random histories.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from raftkv.testing.history import History, Kind, Operation, Outcome, read_jsonl, write_jsonl
from raftkv.testing.linearizability import CheckResult, check

OK, FAILED, UNKNOWN = Outcome.OK, Outcome.FAILED, Outcome.UNKNOWN
K = b"k"


# --- builders --------------------------------------------------------------------------------


def put(
    value: bytes, start: float, end: float, outcome: Outcome = OK, *, c: int = 0, key: bytes = K
) -> Operation:
    return Operation(c, "put", key, value, None, None, start, end, outcome)


def delete(
    start: float, end: float, outcome: Outcome = OK, *, c: int = 0, key: bytes = K
) -> Operation:
    return Operation(c, "delete", key, None, None, None, start, end, outcome)


def get(
    result: bytes | None,
    start: float,
    end: float,
    outcome: Outcome = OK,
    *,
    c: int = 0,
    key: bytes = K,
) -> Operation:
    return Operation(c, "get", key, None, None, result, start, end, outcome)


def cas(
    expected: bytes | None,
    new: bytes | None,
    result: bool | None,
    start: float,
    end: float,
    outcome: Outcome = OK,
    *,
    c: int = 0,
    key: bytes = K,
) -> Operation:
    return Operation(c, "cas", key, new, expected, result, start, end, outcome)


def assert_ok(ops: Sequence[Operation]) -> CheckResult:
    result = check(ops)
    assert result.ok, result.describe()
    assert not result.violations and not result.timed_out_keys
    return result


def assert_bad(ops: Sequence[Operation], key: bytes = K) -> CheckResult:
    result = check(ops)
    assert not result.ok
    assert not result.timed_out_keys
    assert [v.key for v in result.violations] == [key]
    return result


# --- hand-built histories --------------------------------------------------------------------


def test_empty_history_is_linearizable() -> None:
    result = assert_ok([])
    assert result.keys_checked == 0


def test_sequential_good_history() -> None:
    result = assert_ok(
        [
            get(None, 0, 1),
            put(b"a", 2, 3),
            get(b"a", 4, 5),
            cas(b"a", b"b", True, 6, 7),
            get(b"b", 8, 9),
            cas(b"a", b"c", False, 10, 11),
            delete(12, 13),
            get(None, 14, 15),
            cas(None, b"d", True, 16, 17),
            get(b"d", 18, 19),
        ]
    )
    assert result.keys_checked == 1


def test_concurrent_puts_good_only_in_the_order_opposite_to_invocation() -> None:
    # put(a) starts first, but the later read of a forces put(b) to take effect before it.
    history = [put(b"a", 0, 4, c=1), put(b"b", 1, 3, c=2), get(b"a", 5, 6, c=3)]
    assert_ok(history)
    # Having read a after both puts finished, the key cannot turn into b without a write.
    assert_bad([*history, get(b"b", 7, 8, c=3)])


def test_read_concurrent_with_write_may_see_either_value() -> None:
    assert_ok([put(b"a", 0, 1), put(b"b", 2, 5, c=1), get(b"a", 3, 4, c=2)])
    assert_ok([put(b"a", 0, 1), put(b"b", 2, 5, c=1), get(b"b", 3, 4, c=2)])
    # Two overlapping reads may disagree only in the order the write allows: b, then a is bad
    # if the second read started after the first ended.
    assert_bad([put(b"a", 0, 1), put(b"b", 2, 9, c=1), get(b"b", 3, 4, c=2), get(b"a", 5, 6, c=3)])


def test_touching_intervals_count_as_concurrent() -> None:
    # The put completes at exactly the instant the get is invoked: either order is allowed.
    assert_ok([put(b"a", 0, 1), put(b"b", 2, 3), get(b"a", 3, 4, c=1)])


def test_stale_read_after_completed_write_is_bad() -> None:
    result = assert_bad([put(b"a", 0, 1), put(b"b", 2, 3), get(b"a", 4, 5, c=1)])
    violation = result.violations[0]
    assert get(b"a", 4, 5, c=1) in violation.operations
    assert "b'a'" in violation.message and "b'b'" in violation.message
    assert "get() = b'a'" in str(violation)


def test_read_of_value_never_written_is_bad() -> None:
    result = assert_bad([put(b"a", 0, 1), get(b"zzz", 2, 3, c=1)])
    assert "ever wrote" in result.violations[0].message
    assert result.violations[0].operations == (get(b"zzz", 2, 3, c=1),)


def test_read_of_value_written_only_later_is_bad() -> None:
    assert_bad([get(b"a", 0, 1, c=1), put(b"a", 2, 3)])
    assert_ok([get(b"a", 0, 2, c=1), put(b"a", 1, 3)])


def test_lost_acknowledged_write_is_bad() -> None:
    assert_bad([put(b"a", 0, 1), get(None, 2, 3, c=1)])
    assert_bad([put(b"a", 0, 1), put(b"b", 2, 3), get(b"a", 4, 5, c=1), get(b"b", 6, 7)])
    # ... unless something concurrent with the read could have overwritten it.
    assert_ok([put(b"a", 0, 1), delete(1.5, 3, c=2), get(None, 2, 3, c=1)])
    assert_ok([put(b"a", 0, 1), delete(1.5, 9, UNKNOWN, c=2), get(None, 2, 3, c=1)])


def test_delete_semantics() -> None:
    assert_ok([put(b"a", 0, 1), delete(2, 3), get(None, 4, 5)])
    assert_bad([put(b"a", 0, 1), delete(2, 3), get(b"a", 4, 5)])


def test_unknown_put_that_later_becomes_visible_is_good() -> None:
    history = [put(b"a", 0, 1), put(b"b", 2, 3, UNKNOWN, c=1), get(b"b", 5, 6), get(b"b", 7, 8)]
    assert_ok(history)
    # It may even take effect long after the client gave up, and never completed at all.
    assert_ok(
        [put(b"a", 0, 1), put(b"b", 2, math.inf, UNKNOWN, c=1), get(b"a", 5, 6), get(b"b", 9, 10)]
    )


def test_unknown_put_that_is_never_visible_is_good() -> None:
    assert_ok([put(b"a", 0, 1), put(b"b", 2, 3, UNKNOWN, c=1), get(b"a", 5, 6), get(b"a", 7, 8)])
    # Same, on a key where a mismatching cas keeps unobserved unknown writes in the search.
    assert_ok(
        [
            put(b"a", 0, 1),
            put(b"b", 2, 3, UNKNOWN, c=1),
            cas(b"x", b"y", False, 4, 5),
            get(b"a", 5, 6),
            get(b"a", 7, 8),
        ]
    )


def test_unknown_put_takes_effect_at_most_once_and_not_before_invocation() -> None:
    # Seen, then the old value again, then seen again: would need two effects.
    assert_bad(
        [
            put(b"a", 0, 1),
            put(b"b", 2, 3, UNKNOWN, c=1),
            get(b"b", 5, 6),
            get(b"a", 7, 8),
        ]
    )
    assert_bad([put(b"a", 0, 1), get(b"b", 2, 3), put(b"b", 4, 5, UNKNOWN, c=1)])


def test_equal_unknown_puts_can_each_take_effect_once() -> None:
    twice = [
        put(b"a", 0, 1),
        put(b"b", 2, 3, UNKNOWN, c=1),
        put(b"b", 2, 3, UNKNOWN, c=2),
        get(b"b", 4, 5),
        put(b"a", 6, 7),
        get(b"a", 8, 9),
        get(b"b", 10, 11),  # the second unknown put took effect only now
    ]
    assert_ok(twice)
    # A third appearance of b would need a third put.
    assert_bad([*twice, put(b"a", 12, 13), get(b"b", 14, 15)])


def test_unknown_delete_needed_late_after_other_unknown_writes() -> None:
    # Found by a random search: b'a' must come from an unknown write, and the unknown delete
    # must take effect after the first read so that the final cas(None -> a) can swap.
    history = [
        delete(0.9, 2.1, UNKNOWN),
        cas(None, b"a", None, 2.2, math.inf, UNKNOWN),
        put(b"a", 3.2, 4.2, UNKNOWN),
        get(b"a", 4.5, 6.0),
        cas(None, b"a", True, 9.2, 9.9),
        delete(11.2, 14.8),
    ]
    assert_ok(history)
    assert_bad([*history[1:4], history[4]])  # without the unknown delete


def test_unknown_writes_do_not_excuse_a_read_that_no_write_explains() -> None:
    # b was never written, whatever the unknown writes did.
    assert_bad([put(b"a", 0, 1, UNKNOWN), delete(0, 1, UNKNOWN, c=1), get(b"b", 2, 3, c=2)])


def test_cas_success_and_failure_good() -> None:
    assert_ok([put(b"a", 0, 1), cas(b"a", b"b", True, 2, 3), get(b"b", 4, 5)])
    assert_ok([put(b"a", 0, 1), cas(b"x", b"b", False, 2, 3), get(b"a", 4, 5)])
    assert_ok([cas(None, b"a", True, 0, 1), get(b"a", 2, 3)])
    assert_ok([put(b"a", 0, 1), cas(None, b"b", False, 2, 3)])
    # Two concurrent cas on the same expected value: exactly one may win.
    assert_ok(
        [
            put(b"a", 0, 1),
            cas(b"a", b"b", True, 2, 5, c=1),
            cas(b"a", b"c", False, 2, 5, c=2),
            get(b"b", 6, 7),
        ]
    )


def test_cas_success_and_failure_bad() -> None:
    # Reported a mismatch although the key held exactly the expected value.
    result = assert_bad([put(b"a", 0, 1), cas(b"a", b"b", False, 2, 3)])
    assert "mismatch" in result.violations[0].message
    # Swapped although the key held something else.
    result = assert_bad([put(b"a", 0, 1), put(b"x", 2, 3), cas(b"a", b"b", True, 4, 5)])
    assert "swapped" in result.violations[0].message
    # Swapped on "must be absent" although the key was present.
    assert_bad([put(b"a", 0, 1), cas(None, b"b", True, 2, 3)])
    # Swapped, but the new value never showed.
    assert_bad([put(b"a", 0, 1), cas(b"a", b"b", True, 2, 3), get(b"a", 4, 5)])
    # Both concurrent cas on the same expected value claim to have won.
    assert_bad(
        [
            put(b"a", 0, 1),
            cas(b"a", b"b", True, 2, 5, c=1),
            cas(b"a", b"c", True, 2, 5, c=2),
        ]
    )


def test_cas_with_unknown_outcome_may_or_may_not_have_swapped() -> None:
    swapped = [put(b"a", 0, 1), cas(b"a", b"b", None, 2, 3, UNKNOWN, c=1), get(b"b", 4, 5)]
    not_swapped = [put(b"a", 0, 1), cas(b"a", b"b", None, 2, 3, UNKNOWN, c=1), get(b"a", 4, 5)]
    assert_ok(swapped)
    assert_ok(not_swapped)
    # It can only swap from its expected value.
    assert_bad([put(b"x", 0, 1), cas(b"a", b"b", None, 2, 3, UNKNOWN, c=1), get(b"b", 4, 5)])


def test_failed_operations_are_ignored() -> None:
    assert_ok([put(b"a", 0, 1), put(b"b", 2, 3, FAILED, c=1), get(b"a", 4, 5)])
    assert_ok([put(b"a", 0, 1), delete(2, 3, FAILED, c=1), get(b"a", 4, 5)])
    assert_ok([put(b"a", 0, 1), cas(b"a", b"b", None, 2, 3, FAILED, c=1), get(b"a", 4, 5)])
    assert_ok([put(b"a", 0, 1), get(None, 2, 3, FAILED, c=1)])
    # A FAILED write did not happen, so reading its value is a violation.
    assert_bad([put(b"a", 0, 1), put(b"b", 2, 3, FAILED, c=1), get(b"b", 4, 5)])


def test_unknown_get_constrains_nothing() -> None:
    assert_ok([put(b"a", 0, 1), get(None, 2, 3, UNKNOWN, c=1), get(b"a", 4, 5)])


def test_keys_are_checked_independently() -> None:
    history = [
        put(b"a", 0, 1, key=b"x"),
        put(b"a", 0, 1, key=b"y"),
        get(b"a", 2, 3, key=b"x"),
        get(None, 2, 3, key=b"y"),  # lost write on y only
        get(None, 0, 5, key=b"z"),
    ]
    result = check(history)
    assert not result.ok
    assert result.keys_checked == 3
    assert [v.key for v in result.violations] == [b"y"]
    assert all(op.key == b"y" for op in result.violations[0].operations)


def test_violation_lists_the_operations_around_the_failure() -> None:
    history = [put(b"v%d" % i, 2 * i, 2 * i + 1) for i in range(30)]
    stale = get(b"v10", 100, 101, c=1)
    history.append(stale)
    result = assert_bad(history)
    violation = result.violations[0]
    assert stale in violation.operations
    assert put(b"v29", 58, 59) in violation.operations  # the write that makes it stale
    assert len(violation.operations) <= 40
    assert "longest linearizable prefix" in violation.message


def test_timeout_is_reported_and_never_passes() -> None:
    # 16 concurrent puts and reads that flip-flop: not linearizable, and refuting it needs
    # the whole 2^16-subset search.
    history = [put(b"v%d" % i, 0, 100, c=i) for i in range(16)]
    history += [get(b"v0", 101, 102), get(b"v1", 103, 104), get(b"v0", 105, 106)]
    history.append(get(None, 0, 1, key=b"easy"))
    result = check(history, timeout_s=0.001)
    assert not result.ok
    assert result.timed_out_keys == [K]
    assert result.keys_checked == 1  # the easy key still finished
    assert "timed out" in result.describe()
    with pytest.raises(ValueError):
        check(history, timeout_s=0)


def test_small_version_of_the_timeout_history_is_refuted() -> None:
    history = [put(b"v%d" % i, 0, 100, c=i) for i in range(8)]
    assert_ok([*history, get(b"v0", 101, 102), get(b"v0", 105, 106)])
    assert_bad([*history, get(b"v0", 101, 102), get(b"v1", 103, 104), get(b"v0", 105, 106)])


# --- random histories ------------------------------------------------------------------------


def sequential_history(rng: random.Random, n: int, keys: Sequence[bytes]) -> list[Operation]:
    """n operations, one at a time, results from a real register per key."""
    store: dict[bytes, bytes | None] = dict.fromkeys(keys)
    ops: list[Operation] = []
    t = 0.0
    for seq in range(n):
        key = rng.choice(keys)
        current = store[key]
        start, end = t + 0.1, t + 0.2 + rng.random()
        t = end
        kind = rng.choice(("put", "get", "get", "delete", "cas"))
        value = b"%d" % seq
        if kind == "put":
            store[key] = value
            ops.append(put(value, start, end, key=key))
        elif kind == "delete":
            store[key] = None
            ops.append(delete(start, end, key=key))
        elif kind == "get":
            ops.append(get(current, start, end, key=key))
        else:
            expected = current if rng.random() < 0.5 else rng.choice((None, b"%d" % (seq - 1)))
            swapped = expected == current
            if swapped:
                store[key] = value
            ops.append(cas(expected, value, swapped, start, end, key=key))
    return ops


def test_random_sequential_history_is_accepted_and_a_corrupted_read_rejected() -> None:
    rng = random.Random(1234)
    keys = [b"k0", b"k1", b"k2", b"k3"]
    history = sequential_history(rng, 300, keys)
    result = assert_ok(history)
    assert result.keys_checked == 4

    reads = [i for i, op in enumerate(history) if op.kind == "get"]
    assert len(reads) > 50
    for index in rng.sample(reads, 5):
        victim = history[index]
        # Another value that this key did hold at some point, so the reader could be fooled.
        candidates = {None} | {op.value for op in history if op.key == victim.key}
        assert not isinstance(victim.result, bool)
        candidates.discard(victim.result)
        wrong = rng.choice(sorted(candidates, key=lambda v: b"" if v is None else v))
        corrupted = list(history)
        corrupted[index] = get(wrong, victim.invoke, victim.complete, key=victim.key)
        result = check(corrupted)
        assert not result.ok
        assert [v.key for v in result.violations] == [victim.key]


def concurrent_history(
    rng: random.Random,
    *,
    keys: Sequence[bytes],
    ops_per_key: int,
    clients_per_key: int,
    unknown: float,
    failed: float,
    values: Sequence[bytes] | None = None,
) -> list[Operation]:
    """A linearizable history: each op takes effect at a random instant inside its interval.

    UNKNOWN writes take effect with probability 1/2, possibly long after the client gave up.
    With ``values`` given, writes pick from that small set, so values repeat.
    """
    history: list[Operation] = []
    for key in keys:
        # Operations that take effect: (effect time, client, kind, value, expected, outcome,
        # invoke, complete). Their results are known only once all effects are ordered.
        planned: list[tuple[float, int, Kind, bytes | None, bytes | None, Outcome, float, float]]
        planned = []
        clock = [rng.random() for _ in range(clients_per_key)]
        for seq in range(ops_per_key):
            c = rng.randrange(clients_per_key)
            start = clock[c] + rng.random() * 0.5
            end = start + 0.05 + rng.expovariate(1.0)
            clock[c] = end
            kind: Kind = rng.choice(("put", "get", "get", "delete", "cas", "cas"))
            value: bytes | None = rng.choice(values) if values else b"%d.%d" % (c, seq)
            if kind in ("get", "delete"):
                value = None
            expected: bytes | None = None
            if kind == "cas":
                written = [p[3] for p in planned if p[2] in ("put", "cas")]
                expected = rng.choice([None, *written[-3:]]) if written else None
            roll = rng.random()
            outcome = UNKNOWN if roll < unknown else FAILED if roll < unknown + failed else OK
            effect = start + rng.random() * (end - start)
            if outcome is OK or (outcome is UNKNOWN and kind != "get" and rng.random() < 0.5):
                if outcome is UNKNOWN:
                    effect += rng.expovariate(0.5)  # maybe long after the client gave up
                    end = rng.choice((end, math.inf))
                planned.append((effect, c, kind, value, expected, outcome, start, end))
            else:  # FAILED, an UNKNOWN get, or an UNKNOWN write that never took effect
                history.append(Operation(c, kind, key, value, expected, None, start, end, outcome))
        state: bytes | None = None
        for _, c, kind, value, expected, outcome, start, end in sorted(planned, key=lambda p: p[0]):
            result: bytes | bool | None = None
            if kind == "put":
                state = value
            elif kind == "delete":
                state = None
            elif kind == "get":
                result = state
            elif state == expected:
                state, result = value, True
            else:
                result = False
            if outcome is UNKNOWN:
                result = None
            history.append(Operation(c, kind, key, value, expected, result, start, end, outcome))
    rng.shuffle(history)
    return history


def test_many_concurrent_operations_with_unknowns_check_ok() -> None:
    rng = random.Random(99)
    keys = [b"key-%02d" % i for i in range(16)]
    history = concurrent_history(
        rng, keys=keys, ops_per_key=300, clients_per_key=8, unknown=0.07, failed=0.03
    )
    unknown_writes = [op for op in history if op.outcome is UNKNOWN and op.kind != "get"]
    assert len(unknown_writes) >= 16 * 8
    result = check(history, timeout_s=120)
    assert result.ok, result.describe()
    assert result.keys_checked == 16


def test_many_concurrent_operations_with_repeated_values_check_ok() -> None:
    rng = random.Random(7)
    history = concurrent_history(
        rng,
        keys=[b"a", b"b", b"c", b"d"],
        ops_per_key=300,
        clients_per_key=6,
        unknown=0.07,
        failed=0.03,
        values=[b"x", b"y", b"z"],
    )
    result = check(history, timeout_s=120)
    assert result.ok, result.describe()


def brute_force_linearizable(history: Sequence[Operation]) -> bool:
    """Reference: try every subset of UNKNOWN writes and every real-time-respecting order."""
    ops = [
        op
        for op in history
        if op.outcome is not FAILED and not (op.kind == "get" and op.outcome is UNKNOWN)
    ]
    required = [op for op in ops if op.outcome is OK]
    optional = [op for op in ops if op.outcome is UNKNOWN]

    def returns(op: Operation) -> float:
        return math.inf if op.outcome is UNKNOWN else op.complete

    def orders(chosen: list[Operation], state: bytes | None) -> bool:
        if not chosen:
            return True
        for i, op in enumerate(chosen):
            rest = chosen[:i] + chosen[i + 1 :]
            if any(returns(other) < op.invoke for other in rest):
                continue  # something must come before op
            if op.kind == "put":
                after: bytes | None = op.value
            elif op.kind == "delete":
                after = None
            elif op.kind == "get":
                if op.result != state:
                    continue
                after = state
            elif op.outcome is UNKNOWN:
                after = op.value if state == op.expected else state  # real cas semantics
            elif op.result is True:
                if state != op.expected:
                    continue
                after = op.value
            else:
                if state == op.expected:
                    continue
                after = state
            if orders(rest, after):
                return True
        return False

    for mask in range(1 << len(optional)):
        subset = [op for j, op in enumerate(optional) if mask >> j & 1]
        if orders(required + subset, None):
            return True
    return False


def mutate(rng: random.Random, history: list[Operation], values: Sequence[bytes]) -> None:
    """Change one thing about one operation, in place; the result may or may not be valid."""
    i = rng.randrange(len(history))
    op = history[i]
    choice = rng.randrange(4)
    if choice == 0 and op.outcome is OK and op.kind == "get":
        result: bytes | bool | None = rng.choice([None, *values])
    elif choice == 1 and op.outcome is OK and op.kind == "cas":
        result = not op.result
    elif choice == 2:
        shift = rng.uniform(-2, 2)
        start = max(0.0, op.invoke + shift)
        end = op.complete if math.isinf(op.complete) else max(start, op.complete + shift)
        history[i] = Operation(
            op.client, op.kind, op.key, op.value, op.expected, op.result, start, end, op.outcome
        )
        return
    else:
        outcome = rng.choice([OK, FAILED, UNKNOWN])
        if outcome is OK:
            return
        end = math.inf if outcome is UNKNOWN and rng.random() < 0.5 else op.complete
        history[i] = Operation(
            op.client, op.kind, op.key, op.value, op.expected, None, op.invoke, end, outcome
        )
        return
    history[i] = Operation(
        op.client, op.kind, op.key, op.value, op.expected, result, op.invoke, op.complete, OK
    )


def small_histories(seed: int, count: int) -> Iterator[list[Operation]]:
    rng = random.Random(seed)
    for _ in range(count):
        values = [b"a", b"b", b"c"][: rng.randint(1, 3)]
        history = concurrent_history(
            rng,
            keys=[K],
            ops_per_key=rng.randint(2, 8),
            clients_per_key=rng.randint(1, 4),
            unknown=rng.choice((0.1, 0.3, 0.5, 0.7)),
            failed=0.05,
            values=values,
        )
        for _ in range(rng.randint(0, 2)):
            mutate(rng, history, values)
        yield history


def test_agrees_with_brute_force_on_small_random_histories() -> None:
    verdicts = {True: 0, False: 0}
    for history in small_histories(seed=2024, count=6000):
        expected = brute_force_linearizable(history)
        result = check(history)
        assert not result.timed_out_keys
        assert result.ok == expected, (expected, result.describe(), history)
        verdicts[expected] += 1
    # Both kinds of history were exercised in earnest.
    assert verdicts[True] > 2000 and verdicts[False] > 250, verdicts


# --- History ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_history_records_times_results_and_unfinished_operations() -> None:
    h = History(clock=FakeClock())
    a = h.invoke(1, "put", b"k", b"v")  # t=1
    b = h.invoke(2, "get", b"k")  # t=2
    c = h.invoke(3, "cas", b"k", value=b"w", expected=b"v")  # t=3
    d = h.invoke(4, "delete", b"k")  # t=4, never completes
    assert len({a, b, c, d}) == 4
    h.complete(b, OK, b"v")  # t=5
    h.complete(a, OK)  # t=6
    done = h.complete(c, UNKNOWN)  # t=7
    assert done == Operation(3, "cas", b"k", b"w", b"v", None, 3.0, 7.0, UNKNOWN)
    assert h.operations() == [
        Operation(1, "put", b"k", b"v", None, None, 1.0, 6.0, OK),
        Operation(2, "get", b"k", None, None, b"v", 2.0, 5.0, OK),
        Operation(3, "cas", b"k", b"w", b"v", None, 3.0, 7.0, UNKNOWN),
        Operation(4, "delete", b"k", None, None, None, 4.0, math.inf, UNKNOWN),
    ]
    assert check(h.operations()).ok
    assert len(h) == 4


def test_history_rejects_misuse() -> None:
    h = History()
    handle = h.invoke(1, "cas", b"k", b"new", b"old")
    with pytest.raises(ValueError):
        h.complete(handle, OK, b"not a bool")
    with pytest.raises(ValueError):
        h.complete(handle, FAILED, True)
    h.complete(handle, OK, False)
    with pytest.raises(ValueError):
        h.complete(handle, OK, False)  # twice
    with pytest.raises(KeyError):
        h.complete(99, OK)
    with pytest.raises(ValueError):
        h.invoke(1, "scan", b"k")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Operation(0, "get", K, None, None, True, 0, 1, OK)
    with pytest.raises(ValueError):
        Operation(0, "put", K, b"v", None, None, 2, 1, OK)  # completes before invoke
    with pytest.raises(ValueError):
        Operation(0, "put", K, b"v", None, None, 0, math.inf, OK)  # OK but never completed


def test_history_is_thread_safe() -> None:
    h = History()

    def worker(client: int) -> None:
        for i in range(200):
            handle = h.invoke(client, "put", b"k%d" % client, b"%d" % i)
            h.complete(handle, OK)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ops = h.operations()
    assert len(ops) == 8 * 200
    assert all(op.outcome is OK and op.invoke <= op.complete for op in ops)
    assert [op.invoke for op in ops] == sorted(op.invoke for op in ops)
    assert check(ops).ok


def test_history_from_asyncio_tasks() -> None:
    h = History()
    store: dict[bytes, bytes] = {}

    async def client(c: int) -> None:
        for i in range(20):
            handle = h.invoke(c, "put", b"k", b"%d.%d" % (c, i))
            await asyncio.sleep(0)
            store[b"k"] = b"%d.%d" % (c, i)
            await asyncio.sleep(0)
            h.complete(handle, OK)
            handle = h.invoke(c, "get", b"k")
            await asyncio.sleep(0)
            h.complete(handle, OK, store.get(b"k"))

    async def main() -> None:
        await asyncio.gather(*(client(c) for c in range(5)))

    asyncio.run(main())
    assert len(h) == 200
    assert check(h.operations()).ok


def test_jsonl_round_trip(tmp_path: Path) -> None:
    h = History(clock=FakeClock())
    h.complete(h.invoke(1, "put", b"\x00\xffk", b"\x80binary\n"), OK)
    h.complete(h.invoke(2, "get", b"\x00\xffk"), OK, b"\x80binary\n")
    h.complete(h.invoke(3, "get", b"\x00\xffk"), OK, None)
    h.complete(h.invoke(4, "cas", b"\x00\xffk", b"n", None), OK, True)
    h.complete(h.invoke(5, "cas", b"\x00\xffk", None, b"e"), OK, False)
    h.complete(h.invoke(6, "delete", b"\x00\xffk"), FAILED)
    h.invoke(7, "put", b"\x00\xffk", b"")  # never completes
    path = tmp_path / "history.jsonl"
    h.to_jsonl(path)
    loaded = History.from_jsonl(path)
    assert loaded.operations() == h.operations()
    assert loaded.operations()[-1].complete == math.inf
    assert len(path.read_text().splitlines()) == 7
    # The module-level functions take any list of operations, e.g. a violation's.
    write_jsonl(h.operations()[:2], tmp_path / "two.jsonl")
    assert read_jsonl(tmp_path / "two.jsonl") == h.operations()[:2]


def test_jsonl_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"client": 1, "kind": "scan"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        read_jsonl(path)
