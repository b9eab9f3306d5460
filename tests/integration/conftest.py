"""Integration fixtures: real ``raftkv serve`` processes on loopback, free ports, temp dirs.

Every cluster is a context manager, so its processes stop even when a test fails.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from raftkv.testing.cluster import LocalCluster


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A shared, healthy 3-node, 8-shard, 3-replica cluster for tests that do not hurt it."""
    base = tmp_path_factory.mktemp("cluster3")
    with LocalCluster.create(base, nodes=3, shards=8, replicas=3) as c:
        c.start()
        yield c


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A 3-node cluster of its own, for tests that kill or restart nodes."""
    with LocalCluster.create(tmp_path, nodes=3, shards=8, replicas=3) as c:
        c.start()
        yield c
