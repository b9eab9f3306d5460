"""Prometheus metrics, scraped from live nodes: they exist, and they move as the cluster works."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from raftkv import Client
from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv._pb.raftkv.v1 import kv_pb2_grpc as kv_grpc
from raftkv.testing.cluster import LocalCluster, free_port

Sample = tuple[str, tuple[tuple[str, str], ...]]


def scrape(address: str) -> dict[Sample, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


ROOT = Path(__file__).resolve().parents[2]


def documented_metrics() -> set[str]:
    """Metric names in docs/operations.md's table (first column, back-quoted)."""
    text = (ROOT / "docs" / "operations.md").read_text()
    return set(re.findall(r"^\| `((?:raftkv|grpc)_[a-z_]+)` \|", text, re.M))


def total(samples: dict[Sample, float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def wait_for(check: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[tuple[LocalCluster, dict[str, str]]]:
    cluster = LocalCluster.create(tmp_path)
    addrs = {n: f"127.0.0.1:{free_port()}" for n in cluster.nodes}
    cluster.node_args = {n: ("--metrics-addr", addr) for n, addr in addrs.items()}
    with cluster:
        cluster.start()
        yield cluster, addrs


def test_metrics_of_live_nodes_move_as_writes_happen(
    metered: tuple[LocalCluster, dict[str, str]],
) -> None:
    cluster, addrs = metered

    def one_leader_per_shard() -> bool:
        scrapes = [scrape(a) for a in addrs.values()]
        return all(
            sum(total(s, "raftkv_server_is_leader", shard=str(shard)) for s in scrapes) == 1
            for shard in range(8)
        )

    wait_for(one_leader_per_shard, "exactly one node reporting itself leader of each shard")
    before = {n: scrape(a) for n, a in addrs.items()}

    async def write(count: int) -> None:
        # Not leader-aware, all through n1: writes for shards n1 does not lead go through
        # their leader, and n1's gRPC counters see every one of them.
        async with Client(cluster.endpoints[0], leader_aware=False) as client:
            for i in range(count):
                await client.put(f"metric-key-{i}".encode(), b"v" * 50)
            assert (await client.get(b"metric-key-0")).value == b"v" * 50

    asyncio.run(write(200))
    with grpc.insecure_channel(cluster.endpoints[0]) as channel:
        with pytest.raises(grpc.RpcError) as bad:
            kv_grpc.KVStub(channel).Put(kv.PutRequest(key=b"", value=b"x"), timeout=5)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def applied_everywhere() -> bool:
        # Every node applies every entry of the shards it hosts (R=3: all of them).
        return all(
            total(scrape(a), "raftkv_server_applied_index")
            >= total(before[n], "raftkv_server_applied_index") + 200
            for n, a in addrs.items()
        )

    wait_for(applied_everywhere, "every replica to apply the 200 writes")
    after = {n: scrape(a) for n, a in addrs.items()}

    def grew(name: str, **labels: str) -> float:
        return sum(
            total(after[n], name, **labels) - total(before[n], name, **labels) for n in addrs
        )

    put_ok = dict(grpc_service="raftkv.v1.KV", grpc_method="Put", grpc_code="OK")
    assert (
        total(after["n1"], "grpc_server_handled_total", **put_ok)
        - total(before["n1"], "grpc_server_handled_total", **put_ok)
        >= 200
    )
    invalid = dict(grpc_method="Put", grpc_code="INVALID_ARGUMENT")
    assert (
        total(after["n1"], "grpc_server_handled_total", **invalid)
        - total(before["n1"], "grpc_server_handled_total", **invalid)
        == 1
    )
    assert grew("raftkv_server_proposals_committed_total") >= 200
    assert grew("raftkv_server_proposal_duration_seconds_count") >= 200
    assert grew("raftkv_server_read_index_duration_seconds_count") >= 1
    assert grew("raftkv_disk_wal_fsync_duration_seconds_count") > 0
    assert grew("raftkv_disk_journal_bytes") >= 3 * 200 * 50  # three replicas of each value
    assert grew("grpc_server_handling_seconds_count", grpc_method="Put") >= 200
    # Two thirds of n1's writes were for shards another node leads.
    assert (
        grew("raftkv_server_via_leader_requests_total")
        + grew("raftkv_server_forwarded_requests_total")
        > 0
    )
    # docs/operations.md lists every metric a node exports (counters under their _total name),
    # and the Grafana dashboard graphs only metrics that exist.
    exported = set()
    for name, _ in after["n1"]:
        if name.startswith(("raftkv_", "grpc_")):
            exported.add(re.sub(r"_(bucket|count|sum)$", "", name))
    documented = documented_metrics()
    assert exported - documented == set(), "exported but not in docs/operations.md"
    assert documented - exported == set(), "in docs/operations.md but not exported"
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "raftkv.json").read_text())
    graphed = {
        re.sub(r"_(bucket|count|sum)$", "", m)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for m in re.findall(r"\b(raftkv_[a-z_]+|grpc_server_[a-z_]+)", target["expr"])
    }
    assert graphed and graphed <= exported, graphed - exported
    for n in addrs:
        assert total(after[n], "raftkv_server_proposals_pending") == 0
        assert total(after[n], "raftkv_cluster_epoch") >= 1
        assert total(after[n], "raftkv_server_is_leader", shard="meta") in (0, 1)


def test_serve_refuses_a_bad_or_taken_metrics_address_with_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        for addr, expected, code in (
            ("nonsense", "expected HOST:PORT", 2),
            ("127.0.0.1:99999", "expected HOST:PORT", 2),
            (busy, "is the port in use?", 4),
        ):
            grpc_port, raft_port = free_port(), free_port()
            cluster = tmp_path / f"cluster-{grpc_port}.toml"
            cluster.write_text(
                f'shards = 2\nreplicas = 1\n[nodes.n1]\ngrpc = "127.0.0.1:{grpc_port}"\n'
                f'raft = "127.0.0.1:{raft_port}"\n'
            )
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "raftkv",
                    "serve",
                    "-c",
                    str(cluster),
                    "--id",
                    "n1",
                    "--data-dir",
                    str(tmp_path / f"d-{grpc_port}"),
                    "--log-dir",
                    str(tmp_path / "l"),
                    "--metrics-addr",
                    addr,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == code, out.stderr
            assert expected in out.stderr, out.stderr
            assert "Traceback" not in out.stderr
