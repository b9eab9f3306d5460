"""The raftkv command line against real nodes, run as a user would run it."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from raftkv.testing.cluster import LocalCluster, wait_for


def raftkv(
    *args: str, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "raftkv", *args], input=stdin, capture_output=True, timeout=timeout
    )


def client(
    cluster: LocalCluster, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return raftkv("client", "--endpoints", ",".join(cluster.endpoints), *args, stdin=stdin)


def test_put_then_get_prints_only_the_value(cluster3: LocalCluster) -> None:
    assert client(cluster3, "put", "cli-key", "cli value").returncode == 0
    got = client(cluster3, "get", "cli-key")
    assert got.returncode == 0
    assert got.stdout == b"cli value"


def test_put_dash_reads_the_value_from_stdin(cluster3: LocalCluster) -> None:
    blob = bytes(range(256)) * 4
    assert client(cluster3, "put", "cli-stdin", "-", stdin=blob).returncode == 0
    assert client(cluster3, "get", "cli-stdin").stdout == blob


def test_missing_key_exits_1_with_one_line_on_stderr(cluster3: LocalCluster) -> None:
    got = client(cluster3, "get", "cli-missing")
    assert got.returncode == 1
    assert got.stdout == b""
    lines = got.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "not found" in lines[0]


def test_bad_input_is_a_clear_cli_error(cluster3: LocalCluster) -> None:
    got = client(cluster3, "put", "k" * 5000, "v")
    assert got.returncode == 2
    assert "4096" in got.stderr.decode() and "Traceback" not in got.stderr.decode()


def test_delete_and_cas(cluster3: LocalCluster) -> None:
    assert client(cluster3, "put", "cli-cas", "a").returncode == 0
    mismatch = client(cluster3, "cas", "cli-cas", "b", "--expected", "zzz")
    assert mismatch.returncode == 2 and "version" in mismatch.stderr.decode()
    assert client(cluster3, "cas", "cli-cas", "b", "--expected", "a").returncode == 0
    assert client(cluster3, "get", "cli-cas").stdout == b"b"
    assert client(cluster3, "delete", "cli-cas").returncode == 0
    assert client(cluster3, "get", "cli-cas").returncode == 1


def test_status_table_and_json(cluster3: LocalCluster) -> None:
    table = client(cluster3, "status")
    assert table.returncode == 0
    text = table.stdout.decode()
    assert "SHARD" in text and "LEADER" in text and "COMMIT" in text
    data = json.loads(client(cluster3, "status", "-o", "json").stdout)
    assert len(data["shards"]) == 8
    assert all(s["leader"] in s["replicas"] for s in data["shards"])
    assert all(isinstance(s["commit_index"], int) and s["term"] >= 1 for s in data["shards"])


def test_unreachable_endpoint_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    got = raftkv("client", "--endpoints", f"127.0.0.1:{port}", "--timeout", "1", "get", "k")
    assert got.returncode == 2
    assert "unavailable" in got.stderr.decode().lower()
    assert "Traceback" not in got.stderr.decode()


def test_every_command_has_help() -> None:
    for args in (
        (),
        ("serve",),
        ("client",),
        ("client", "put"),
        ("client", "get"),
        ("client", "status"),
        ("local", "up"),
        ("demo",),
        ("admin", "member", "remove"),
    ):
        got = raftkv(*args, "--help")
        assert got.returncode == 0, args
        assert len(got.stdout.decode().strip().splitlines()) > 3, args


def _free_block(n: int) -> int:
    for base in range(21000, 29000, 250):
        ports = [base + i for i in range(n)] + [base + 100 + i for i in range(n)]
        try:
            for p in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port block")


def test_local_up_runs_a_cluster_and_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    base = _free_block(3)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "raftkv",
            "local",
            "up",
            "--nodes",
            "3",
            "--base-port",
            str(base),
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode())
            if raw.startswith(b"endpoints:"):
                break
        assert any(f"127.0.0.1:{base}" in ln for ln in lines), lines
        assert (tmp_path / "cluster.toml").exists()
        endpoints = ",".join(f"127.0.0.1:{base + i}" for i in range(3))
        assert raftkv("client", "-e", endpoints, "put", "lu", "1").returncode == 0
        pids = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-P", str(proc.pid)],
                capture_output=True,
                text=True,
            ).stdout.split()
        ]
        assert len(pids) == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0

        def gone() -> bool:
            return not any(os.path.exists(f"/proc/{p}") and not _zombie(p) for p in pids)

        wait_for(gone, 10, "every node process to exit")
    finally:
        if proc.poll() is None:
            proc.terminate()  # local up stops its nodes on SIGTERM
            proc.wait(30)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_serve_without_flags_runs_a_single_node_cluster(tmp_path: Path) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 7001))
            with socket.socket() as r:
                r.bind(("127.0.0.1", 7101))
        except OSError:
            pytest.skip("ports 7001/7101 are busy on this machine")
    proc = subprocess.Popen(
        [sys.executable, "-m", "raftkv", "serve"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        wait_for(
            lambda: raftkv("client", "--timeout", "2", "put", "solo", "1").returncode == 0,
            30,
            "the default node to accept a write",
        )
        assert raftkv("client", "get", "solo").stdout == b"1"
        assert (tmp_path / "data" / "n1" / "node.json").exists()
        assert (tmp_path / "logs" / "n1" / "raftkv.log").exists()
    finally:
        proc.terminate()
        proc.wait(15)


def test_the_membership_demo_grows_shrinks_and_heals_without_losing_a_key(tmp_path: Path) -> None:
    base = _free_block(3)
    got = raftkv(
        "demo",
        "--story",
        "membership",
        "--keys",
        "3000",
        "--base-port",
        str(base),
        "--dir",
        str(tmp_path),
        timeout=400,
    )
    out = got.stdout.decode()
    assert got.returncode == 0, out[-3000:] + got.stderr.decode()[-3000:]
    for step in ("Adding n4", "Adding n5", "Removing n2", "Killing n3 for good"):
        assert step in out, step
    assert "raftkv serve --join" in out
    assert "every shard at 3 replicas: yes" in out
    assert "3000/3000 keys intact" in out
    assert "demo OK" in out
