"""The raftkv command line against real nodes, run as a user would run it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raftkv.testing.cluster import LocalCluster, interrupt, wait_for


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
    assert mismatch.returncode == 3 and "value is not the expected one" in mismatch.stderr.decode()
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
    started = time.monotonic()
    got = raftkv("client", "--endpoints", f"127.0.0.1:{port}", "--timeout", "1", "get", "k")
    # --timeout bounds the whole command (it took twice that, retries and refresh apart).
    assert time.monotonic() - started < 5
    assert got.returncode == 4
    stderr = got.stderr.decode()
    assert "unavailable" in stderr.lower() or "no answer within --timeout 1s" in stderr
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


def test_usage_lines_name_arguments_plainly() -> None:
    # typer's own rendering is "put [OPTIONS] {KEY} {VALUE}"
    usage = raftkv("client", "put", "--help").stdout.decode()
    assert "raftkv client put [OPTIONS] KEY VALUE" in usage, usage


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
    # SO_REUSEADDR, as the node's own sockets: a port left in TIME_WAIT by an earlier run
    # (scripts/demo) is free for the node, and must not make this test skip.
    with socket.socket() as s, socket.socket() as r:
        try:
            for sock, port in ((s, 7001), (r, 7101)):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
                sock.listen()
        except OSError:
            pytest.skip("ports 7001/7101 are in use by a running process on this machine")
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


# -- etcdctl-shaped CLI ----------------------------------------------------------------------


def test_global_options_work_after_the_command_as_with_etcdctl(cluster3: LocalCluster) -> None:
    eps = ",".join(cluster3.endpoints)
    put = raftkv("client", "put", "after-k", "after-v", "--endpoints", eps)
    assert put.returncode == 0, put.stderr
    got = raftkv("client", "get", "after-k", "-w", "json", f"--endpoints={eps}")
    assert got.returncode == 0, got.stderr
    doc = json.loads(got.stdout)
    assert doc["value"] == "after-v" and doc["version"] > 0
    # -w simple is the bare value, as without -w
    assert raftkv("client", "-e", eps, "get", "after-k", "-w", "simple").stdout == b"after-v"


def test_exit_codes_tell_a_conflict_from_an_outage_from_a_typo(cluster3: LocalCluster) -> None:
    assert client(cluster3, "put", "codes", "a").returncode == 0
    assert client(cluster3, "cas", "codes", "b", "--expected-version", "1").returncode == 3
    assert client(cluster3, "get", "codes-absent").returncode == 1
    assert client(cluster3, "put", "k" * 5000, "v").returncode == 2
    for bad in ("notahost", "127.0.0.1:abc", "a;b"):
        started = time.monotonic()
        out = raftkv("client", "-e", bad, "get", "k")
        assert time.monotonic() - started < 10  # checked before dialling, not timed out
        lines = out.stderr.decode().strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and "is not HOST:PORT" in lines[0]
    help_text = raftkv("--help").stdout.decode()
    assert "Exit codes" in help_text and "compare-and-swap conflict" in help_text


def test_version_and_endpoint_health_and_status(cluster3: LocalCluster) -> None:
    from raftkv import __version__

    assert __version__ in raftkv("--version").stdout.decode()
    assert raftkv("version").stdout.decode().startswith(f"raftkv {__version__}")
    health = json.loads(client(cluster3, "endpoint", "health", "-w", "json").stdout)
    assert {h["endpoint"] for h in health} == set(cluster3.endpoints)
    assert all(h["healthy"] and h["took_ms"] > 0 for h in health)
    one = raftkv(
        "client", "-e", cluster3.endpoints[0], "endpoint", "status", "--cluster", "-w", "json"
    )
    status = json.loads(one.stdout)
    assert sorted(s["node"] for s in status) == ["n1", "n2", "n3"]
    # data shards only, as client status, top and member list count them
    assert all(s["version"] == __version__ and s["replicas"] == 8 for s in status)
    assert sum(s["leads"] for s in status) == 8


def test_dash_o_is_the_output_flag_of_every_command(cluster3: LocalCluster) -> None:
    assert client(cluster3, "put", "o-key", "o-value").returncode == 0
    got = json.loads(client(cluster3, "get", "o-key", "-o", "json").stdout)
    assert got["key"] == "o-key" and got["value"] == "o-value"
    status = json.loads(client(cluster3, "endpoint", "status", "--output", "json").stdout)
    assert {s["endpoint"] for s in status} == set(cluster3.endpoints)


def test_endpoint_health_reports_a_dead_endpoint_and_exits_4(cluster3: LocalCluster) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    out = raftkv(
        "client", "-e", f"{cluster3.endpoints[0]},{dead}", "--timeout", "3", "endpoint", "health"
    )
    assert out.returncode == 4
    text = out.stdout.decode()
    assert f"{cluster3.endpoints[0]} is healthy" in text and f"{dead} is unhealthy" in text


def test_serve_validates_its_log_level() -> None:
    out = raftkv("serve", "--log-level", "verbose")
    assert out.returncode == 2
    assert "verbose" in out.stderr.decode() and "Traceback" not in out.stderr.decode()


def test_a_second_serve_on_a_live_data_dir_names_the_running_node(cluster3: LocalCluster) -> None:
    n1 = cluster3.nodes["n1"]
    log = n1.log_dir / "n1" / "raftkv.log"
    before = log.read_bytes()
    out = raftkv(*cluster3.command("n1")[3:])  # the same serve command line again
    assert out.returncode == 4, out.stderr
    line = out.stderr.decode().strip().splitlines()[-1]
    assert f"node n1 (pid {n1.pid}) is running on it" in line, line
    assert "port" not in line
    assert log.read_bytes()[: len(before)] == before
    assert b"is in use" not in log.read_bytes()


def test_serve_logs_json_lines_with_its_effective_configuration(tmp_path: Path) -> None:
    with LocalCluster.create(
        tmp_path, nodes=1, shards=2, replicas=1, extra_args=("--log-format", "json")
    ) as c:
        c.start()
        lines = (c.nodes["n1"].log_dir / "n1" / "raftkv.log").read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    assert all({"ts", "level", "node", "logger", "msg"} <= set(d) for d in docs)
    config = [d["msg"] for d in docs if d["msg"].startswith("effective configuration")]
    assert len(config) == 1
    assert "fsync on" in config[0] and "cluster secret not set" in config[0]


def test_local_up_refuses_other_settings_in_its_dir_and_says_what_differs(tmp_path: Path) -> None:
    (tmp_path / "cluster.toml").write_text(
        'shards = 4\nreplicas = 1\n[nodes.n1]\ngrpc = "127.0.0.1:7001"\nraft = "127.0.0.1:7101"\n'
    )
    started = time.monotonic()
    out = raftkv(
        "local", "up", "--dir", str(tmp_path), "--nodes", "1", "--shards", "8", "--replicas", "1"
    )
    assert time.monotonic() - started < 15
    line = out.stderr.decode().strip()
    assert out.returncode == 2 and "shards 4, not 8" in line and "--fresh" in line, line
    assert len(line.splitlines()) == 1


def test_local_up_keeps_the_others_running_when_a_node_dies(tmp_path: Path) -> None:
    port = 7600 + os.getpid() % 200
    errors = tmp_path / "local-up.stderr"
    with open(errors, "w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raftkv", "local", "up", "--dir", str(tmp_path / "c"),
             "--base-port", str(port)],
            stdout=subprocess.PIPE,
            stderr=err_file,
            text=True,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("endpoints:"):
                endpoints = line.split()[1]
            if line.startswith("pids:"):  # the pids a user kills, as the README says
                pids = dict(item.split("=") for item in line.split()[1:])
                break
        else:
            raise AssertionError(errors.read_text())
        lock = (tmp_path / "c" / "data" / "n2" / "LOCK").read_text()
        assert lock.split("pid ")[1].rstrip(")\n") == pids["n2"], (lock, pids)
        os.kill(int(pids["n2"]), signal.SIGKILL)
        wait_for(lambda: "node n2 exited" in errors.read_text(), 30, "local up to report the exit")
        wait_for(
            lambda: (
                raftkv("client", "-e", endpoints, "--timeout", "5", "put", "still", "up").returncode
                == 0
            ),
            30,
            "the other two nodes to take a write",
        )
        assert proc.poll() is None  # local up is still running
    finally:
        interrupt(proc)
    err = errors.read_text()
    assert "node n2 exited (killed by signal 9); the other nodes keep running" in err, err
    assert "To start it now by hand" in err and "local up --restart" in err
