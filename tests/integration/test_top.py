"""`raftkv top` against real nodes: the view, a killed node, and Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from raftkv.testing.cluster import LocalCluster, wait_for


def top(cluster: LocalCluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "raftkv", "top", "-e", ",".join(cluster.endpoints), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "140"},
    )


def test_top_shows_every_node_and_shard_and_then_a_killed_node(
    fresh_cluster: LocalCluster,
) -> None:
    out = top(fresh_cluster, "-n", "1", "--interval", "0.5")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for n in ("n1", "n2", "n3"):
        row = next(line for line in lines if line.startswith(f"│ {n} "))
        assert "yes" in row
    shard_rows = [
        line for line in lines if line.startswith("│") and line.split("│")[1].strip().isdigit()
    ]
    assert len(shard_rows) == 8
    assert all(row.split("│")[2].strip() in ("n1", "n2", "n3") for row in shard_rows)
    assert sum(int(line.split("│")[5]) for line in lines if line.startswith("│ n")) == 8

    fresh_cluster.kill("n3")
    deadline = time.monotonic() + 30
    while True:
        out = top(fresh_cluster, "-n", "1", "--interval", "0.5")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        n3 = next(line for line in lines if line.startswith("│ n3 "))
        leaders = [
            line.split("│")[2].strip()
            for line in lines
            if line.startswith("│") and line.split("│")[1].strip().isdigit()
        ]
        if "NO" in n3 and all(leader in ("n1", "n2") for leader in leaders):
            break
        assert time.monotonic() < deadline, out.stdout
        time.sleep(0.5)


def test_top_against_no_cluster_prints_its_frames_and_exits_4() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    out = subprocess.run(
        [sys.executable, "-m", "raftkv", "top", "-e", dead, "-n", "2", "--interval", "0.5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 4, out.stderr
    assert out.stdout.count(f"no node answered: {dead}") == 2, out.stdout
    assert "error: no node answered" in out.stderr


def test_top_refuses_json_and_says_where_json_is() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "raftkv", "top", "-w", "json", "-n", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "client status -w json" in out.stderr


def test_a_frame_written_to_a_pipe_keeps_every_column(cluster3: LocalCluster) -> None:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run(
        [sys.executable, "-m", "raftkv", "top", "-e", ",".join(cluster3.endpoints), "-n", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    for endpoint in cluster3.endpoints:  # rich cuts these at 80 columns ("127.0.0.1:…")
        assert f"│ {endpoint} " in out.stdout, out.stdout


def _default_sigint() -> None:
    # A job started in the background by a non-interactive shell (a CI runner, nohup) inherits
    # SIGINT ignored, and so would top: give it the disposition a terminal user's process has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_top_exits_cleanly_on_ctrl_c(cluster3: LocalCluster) -> None:
    start = cluster3.status("n1").requests_handled
    proc = subprocess.Popen(
        [sys.executable, "-m", "raftkv", "top", "-e", ",".join(cluster3.endpoints)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    try:
        polls = 0

        def sampled_a_few_times() -> bool:
            # top asks every node for its Status once a refresh; our own probe counts one too
            nonlocal polls
            polls += 1
            return cluster3.status("n1").requests_handled - start - polls >= 3

        wait_for(sampled_a_few_times, 30, "top to refresh its view a few times", interval=0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "shards" in out
