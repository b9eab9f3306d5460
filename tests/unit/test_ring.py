import os
import random
from collections import Counter

import pytest

from raftkv.ring import DEFAULT_VNODES, Ring


def test_busiest_shard_holds_at_most_115_percent_of_mean_over_100k_keys() -> None:
    ring = Ring(8)
    rng = random.Random(42)
    counts = Counter(ring.shard_for(rng.randbytes(16)) for _ in range(100_000))
    assert set(counts) == set(range(8))
    mean = 100_000 / 8
    assert max(counts.values()) <= 1.15 * mean, counts


@pytest.mark.parametrize("shards", [1, 3, 16])
def test_balance_holds_for_other_shard_counts(shards: int) -> None:
    ring = Ring(shards)
    counts = Counter(ring.shard_for(os.urandom(12)) for _ in range(100_000))
    assert max(counts.values()) <= 1.15 * 100_000 / shards


def test_mapping_is_deterministic_across_instances() -> None:
    keys = [f"key-{i}".encode() for i in range(2000)]
    a, b = Ring(8), Ring(8, DEFAULT_VNODES)
    assert [a.shard_for(k) for k in keys] == [b.shard_for(k) for k in keys]


def test_known_keys_map_to_fixed_shards() -> None:
    # Pinned values: a change here means every existing cluster would re-shard its data.
    ring = Ring(8)
    assert [ring.shard_for(k) for k in (b"a", b"hello", b"user:42")] == PINNED


PINNED = [1, 4, 2]


def test_rejects_empty_ring() -> None:
    with pytest.raises(ValueError):
        Ring(0)
