from collections import Counter

import pytest

from raftkv.placement import Placement

NODES = ("n1", "n2", "n3", "n4", "n5")


def test_each_shard_gets_distinct_replicas_of_the_requested_count() -> None:
    p = Placement.of(NODES, shards=32, replicas=3)
    for s in range(32):
        reps = p.replicas_of(s)
        assert len(reps) == 3
        assert len(set(reps)) == 3
        assert set(reps) <= set(NODES)


def test_placement_is_deterministic_and_independent_of_node_order() -> None:
    a = Placement.of(NODES, shards=16, replicas=2)
    b = Placement.of(tuple(reversed(NODES)), shards=16, replicas=2)
    assert [a.replicas_of(s) for s in range(16)] == [b.replicas_of(s) for s in range(16)]


def test_shards_on_is_the_inverse_of_replicas_of() -> None:
    p = Placement.of(("n1", "n2", "n3"), shards=8, replicas=2)
    for node in ("n1", "n2", "n3"):
        for s in p.shards_on(node):
            assert node in p.replicas_of(s)
    assert sum(len(p.shards_on(n)) for n in ("n1", "n2", "n3")) == 16


def test_replicas_spread_over_nodes() -> None:
    p = Placement.of(NODES, shards=100, replicas=3)
    load = Counter(n for s in range(100) for n in p.replicas_of(s))
    assert min(load.values()) >= 30  # mean is 60


def test_full_replication_puts_every_shard_on_every_node() -> None:
    p = Placement.of(("n1", "n2", "n3"), shards=8, replicas=3)
    assert all(set(p.replicas_of(s)) == {"n1", "n2", "n3"} for s in range(8))


@pytest.mark.parametrize("replicas", [0, 4])
def test_rejects_impossible_replica_counts(replicas: int) -> None:
    with pytest.raises(ValueError):
        Placement.of(("n1", "n2", "n3"), shards=8, replicas=replicas)
