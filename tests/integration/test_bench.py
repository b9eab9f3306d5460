"""``raftkv bench`` against a real local cluster, run as a user would run it."""

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from raftkv.testing.cluster import LocalCluster

# Codes a healthy cluster may still return now and then (a leader change, a full queue).
RETRIABLE = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}


@pytest.fixture(scope="module")
def bench_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base: Path = tmp_path_factory.mktemp("bench")
    with LocalCluster.create(base, nodes=3, shards=4, replicas=3) as c:
        c.start()
        yield c


def run_bench(cluster: LocalCluster, *args: str) -> dict[str, object]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "raftkv",
            "bench",
            "--json",
            "--duration",
            "2",
            "--warmup",
            "0.5",
            "--keys",
            "100",
            "--concurrency",
            "4",
            "--endpoints",
            ",".join(cluster.endpoints),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # exactly one JSON object, nothing else
    result: dict[str, object] = json.loads(lines[0])
    return result


@pytest.mark.parametrize(
    ("workload", "client"), [("put", "raftkv"), ("mixed", "raftkv"), ("mixed", "plain")]
)
def test_bench_json_against_a_local_cluster(
    bench_cluster: LocalCluster, workload: str, client: str
) -> None:
    r = run_bench(
        bench_cluster, "--workload", workload, *(["--plain"] if client == "plain" else [])
    )
    assert r["workload"] == workload
    assert r["target"] == ("raftkv-plain" if client == "plain" else "raftkv")
    assert isinstance(r["ops"], int) and r["ops"] > 0
    assert isinstance(r["ops_per_s"], float) and r["ops_per_s"] > 0
    errors = r["errors"]
    assert isinstance(errors, dict) and set(errors) <= RETRIABLE, errors
    p50, p99, p999 = (float(str(r[k])) for k in ("p50_ms", "p99_ms", "p999_ms"))
    assert 0 < p50 <= p99 <= p999
    assert float(str(r["client_cpu_s"])) > 0
    assert r["misses"] == 0  # the key space was preloaded
