"""The bench's math without a cluster: percentiles, histogram merging, the JSON summary, and a
short end-to-end run of the load generator against an in-memory target in spawned processes."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import grpc
import pytest

from raftkv import bench, errors
from raftkv.bench import BenchConfig, BenchError, Merged, Recorder, Workload

REQUIRED_KEYS = {
    "ops_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "errors",
    "ops",
    "duration_s",
    "workload",
    "concurrency",
    "procs",
    "client_cpu_s",
    "client_cpu_us_per_op",
}


def recorder_with(ms_values: range, kind: str = "put") -> Recorder:
    rec = Recorder()
    for ms in ms_values:
        rec.record(kind, ms / 1000.0)
    return rec


def test_percentiles_from_recorded_values() -> None:
    merged = Merged()
    merged.add(recorder_with(range(1, 1001)).to_wire())  # 1..1000 ms, once each
    s = bench.summarize(merged, BenchConfig(duration=2.0))
    assert s["ops"] == 1000
    assert s["ops_per_s"] == 500.0
    # 3 significant digits: each value is within 0.1% of the exact order statistic.
    for key, exact in [("p50_ms", 500), ("p90_ms", 900), ("p99_ms", 990), ("p999_ms", 999)]:
        assert s[key] == pytest.approx(exact, rel=1e-3), key
    assert s["max_ms"] == pytest.approx(1000, rel=1e-3)
    assert s["mean_ms"] == pytest.approx(500.5, rel=1e-3)
    assert s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["p999_ms"] <= s["max_ms"]


def test_latency_is_clamped_into_the_histogram_range() -> None:
    rec = Recorder()
    rec.record("get", 0.0)  # below 1 µs
    rec.record("get", 3600.0)  # above 60 s
    assert rec.hists["get"].get_total_count() == 2
    assert rec.hists["get"].get_max_value() >= 59_000_000


def test_merging_two_histograms_equals_recording_everything_in_one() -> None:
    low, high = recorder_with(range(1, 501)), recorder_with(range(501, 1001))
    low.errors["UNAVAILABLE"] += 2
    high.errors["UNAVAILABLE"] += 1
    high.errors["DEADLINE_EXCEEDED"] += 4
    low.cpu_s, high.cpu_s = 0.25, 0.75
    merged = Merged()
    merged.add(low.to_wire())
    merged.add(high.to_wire())
    one = Merged()
    one.add(recorder_with(range(1, 1001)).to_wire())
    cfg = BenchConfig(duration=1.0)
    a, b = bench.summarize(merged, cfg), bench.summarize(one, cfg)
    for key in ("ops", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"):
        assert a[key] == b[key], key
    assert a["errors"] == {"DEADLINE_EXCEEDED": 4, "UNAVAILABLE": 3}
    assert a["client_cpu_s"] == 1.0
    assert a["client_cpu_us_per_op"] == pytest.approx(1000.0)


def test_mixed_reports_each_operation_kind() -> None:
    merged = Merged()
    merged.add(recorder_with(range(1, 11), "get").to_wire())
    merged.add(recorder_with(range(100, 103), "put").to_wire())
    s = bench.summarize(merged, BenchConfig(workload=Workload.mixed, duration=1.0))
    assert s["ops"] == 13
    assert s["by_op"]["get"]["ops"] == 10 and s["by_op"]["put"]["ops"] == 3
    assert s["by_op"]["put"]["p50_ms"] == pytest.approx(101, rel=1e-3)
    assert s["read_ratio"] == 0.5


def test_summary_is_one_json_object_with_the_documented_keys() -> None:
    merged = Merged()
    merged.add(recorder_with(range(1, 5)).to_wire())
    s = bench.summarize(merged, BenchConfig(), server_cpu_s=0.5, extra={"target": "x"})
    back = json.loads(json.dumps(s))
    assert set(back) >= REQUIRED_KEYS
    assert back["errors"] == {}
    assert back["target"] == "x"
    assert back["server_cpu_us_per_op"] == pytest.approx(125_000.0)
    assert "p50" in bench.render_text(s)


def test_empty_run_has_zeros_not_errors() -> None:
    s = bench.summarize(Merged(), BenchConfig())
    assert s["ops"] == 0 and s["ops_per_s"] == 0.0
    assert s["p99_ms"] == 0.0 and s["client_cpu_us_per_op"] == 0.0


def test_keys_splits_and_validation() -> None:
    assert bench.key_name(42, 16) == b"k000000000000042"
    assert len(bench.key_name(9999, 16)) == 16
    assert bench.split_evenly(16, 3) == [6, 5, 5]
    assert sum(bench.split_evenly(7, 7)) == 7
    with pytest.raises(BenchError):
        BenchConfig(keys=1000, key_size=3).validate()
    with pytest.raises(BenchError):
        BenchConfig(concurrency=2, procs=3).validate()
    with pytest.raises(BenchError):
        BenchConfig(read_ratio=1.5).validate()


def test_error_codes_are_grpc_status_names() -> None:
    assert bench.error_code(errors.Unavailable("x")) == "UNAVAILABLE"
    assert bench.error_code(errors.ProposalTimeout("x")) == "DEADLINE_EXCEEDED"

    class FakeRpcError(Exception):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.RESOURCE_EXHAUSTED

    assert bench.error_code(FakeRpcError()) == "RESOURCE_EXHAUSTED"
    assert bench.error_code(RuntimeError()) == "RuntimeError"


# -- the generator itself, against an in-memory target ----------------------------------------


class MemoryTarget:
    """Versions in a dict; every 50th put fails with UNAVAILABLE."""

    def __init__(self) -> None:
        self.data: dict[bytes, int] = {}
        self.puts = 0

    async def put(self, key: bytes, value: bytes) -> None:
        await asyncio.sleep(0.001)
        self.puts += 1
        if self.puts % 50 == 0:
            raise errors.Unavailable("injected")
        self.data[key] = self.data.get(key, 0) + 1

    async def get(self, key: bytes) -> int | None:
        await asyncio.sleep(0.001)
        return self.data.get(key)

    async def cas(self, key: bytes, value: bytes, expected_version: int) -> bool:
        await asyncio.sleep(0.001)
        if self.data.get(key, 0) != expected_version:
            return False
        self.data[key] = expected_version + 1
        return True

    async def close(self) -> None:
        pass


@dataclass(frozen=True)
class MemoryTargetFactory:
    def __call__(self) -> MemoryTarget:
        return MemoryTarget()


def test_run_in_two_processes_merges_results() -> None:
    cfg = BenchConfig(
        workload=Workload.put, keys=100, concurrency=4, procs=2, duration=0.6, warmup=0.2
    )
    s = bench.run(cfg, MemoryTargetFactory(), progress=False)
    assert set(s) >= REQUIRED_KEYS
    assert s["procs"] == 2 and s["ops"] > 50
    assert set(s["errors"]) == {"UNAVAILABLE"}
    assert 0 < s["p50_ms"] <= s["p99_ms"]
    assert s["client_cpu_s"] > 0


def test_cas_conflicts_are_not_errors() -> None:
    # Two workers on one key in one process: reads and swaps interleave, so some swaps conflict.
    cfg = BenchConfig(
        workload=Workload.cas, keys=1, key_size=4, concurrency=2, duration=0.5, warmup=0.1
    )
    s = bench.run(cfg, MemoryTargetFactory(), progress=False)
    assert s["ops"] > 0 and s["conflicts"] > 0
    assert "FAILED_PRECONDITION" not in s["errors"]
    assert s["by_op"]["cas"]["ops"] == s["ops"]
