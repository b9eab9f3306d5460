"""The placement planner: minimal movement and the balance bound, for growing and shrinking."""

from collections import Counter

import pytest

from raftkv.placement import Placement, meta_members, rebalanced


def _table(nodes: list[str], shards: int) -> tuple[tuple[str, ...], ...]:
    return tuple(Placement.of(nodes, shards, 3).replicas_of(s) for s in range(shards))


def _moves(before: tuple[tuple[str, ...], ...], after: tuple[tuple[str, ...], ...]) -> int:
    return sum(len(set(a) - set(b)) for b, a in zip(before, after, strict=True))


def _check_balanced(table: tuple[tuple[str, ...], ...], nodes: list[str], r: int) -> None:
    load = Counter(n for shard in table for n in shard)
    mean = len(table) * r / len(nodes)
    for n in nodes:
        assert abs(load[n] - mean) <= 1, (n, load[n], mean)
    for shard in table:
        assert len(shard) == r and len(set(shard)) == r and set(shard) <= set(nodes)


@pytest.mark.parametrize("shards", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("nodes", [3, 4, 5, 7])
def test_adding_a_node_moves_only_its_share_and_balances(shards: int, nodes: int) -> None:
    r = 3
    old = [f"n{i}" for i in range(1, nodes + 1)]
    start = rebalanced(
        tuple(Placement.of(old, shards, r).replicas_of(s) for s in range(shards)), old, r
    )
    new = [*old, f"n{nodes + 1}"]
    after = rebalanced(start, new, r)
    _check_balanced(after, new, r)
    # The new node's share (R*S/N'), rounded up: nothing else moves.
    assert _moves(start, after) <= -(-r * shards // len(new))


def test_three_to_four_nodes_with_the_default_shards_moves_a_quarter_of_the_replicas() -> None:
    old = ["n1", "n2", "n3"]
    start = tuple(Placement.of(old, 8, 3).replicas_of(s) for s in range(8))
    after = rebalanced(start, [*old, "n4"], 3)
    assert _moves(start, after) == 6  # R*S/4
    assert Counter(n for shard in after for n in shard) == {"n1": 6, "n2": 6, "n3": 6, "n4": 6}


def test_removing_a_node_moves_exactly_its_replicas_and_keeps_balance() -> None:
    nodes = ["n1", "n2", "n3", "n4", "n5"]
    start = rebalanced(
        tuple(Placement.of(nodes, 32, 3).replicas_of(s) for s in range(32)), nodes, 3
    )
    on_n3 = sum("n3" in shard for shard in start)
    left = [n for n in nodes if n != "n3"]
    after = rebalanced(start, left, 3)
    _check_balanced(after, left, 3)
    assert all("n3" not in shard for shard in after)
    # its replicas move, plus at most a few to even out the rounding
    assert on_n3 <= _moves(start, after) <= on_n3 + 2


def test_a_balanced_table_does_not_move_and_the_plan_is_deterministic() -> None:
    nodes = ["n1", "n2", "n3", "n4"]
    table = rebalanced(
        tuple(Placement.of(nodes, 16, 3).replicas_of(s) for s in range(16)), nodes, 3
    )
    assert rebalanced(table, nodes, 3) == table
    assert rebalanced(table, list(reversed(nodes)), 3) == table


def test_fewer_nodes_than_replicas_holds_every_node() -> None:
    table = (("n1", "n2", "n3"),) * 4
    after = rebalanced(table, ["n1", "n2"], 3)
    assert all(set(shard) == {"n1", "n2"} for shard in after)


def test_the_meta_group_has_three_voters_five_from_five_nodes_and_keeps_its_own() -> None:
    assert meta_members((), ["n1"]) == ("n1",)
    assert meta_members((), ["n3", "n1", "n2", "n4"]) == ("n1", "n2", "n3")
    assert meta_members(("n2", "n3", "n4"), ["n1", "n2", "n3", "n4"]) == ("n2", "n3", "n4")
    assert meta_members(("n2", "n3", "n4"), ["n1", "n2", "n4"]) == ("n2", "n4", "n1")
    five = meta_members(("n1", "n2", "n3"), ["n1", "n2", "n3", "n4", "n5", "n6"])
    assert five[:3] == ("n1", "n2", "n3") and len(five) == 5
