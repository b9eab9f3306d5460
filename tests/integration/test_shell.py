"""The shell against a real 3-node cluster, driven through stdin as a script would drive it."""

import re
import subprocess
import sys
from pathlib import Path

from raftkv.testing.cluster import LocalCluster


# `raftkv shell` is not wired into the CLI yet: run the module's entry point directly.
def shell(cluster: LocalCluster, *lines: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "raftkv", "shell", "-e", ",".join(cluster.endpoints)],
        input="".join(f"{line}\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_scripted_session(tmp_path: Path) -> None:
    with LocalCluster.create(tmp_path) as c:
        c.start()
        got = shell(
            c,
            'put a "hello world"',
            "get a",
            'cas a new --expected "hello world"',
            "get a",
            "bogus",
            "get missing",
            "delete a",
            "get a",
            "members",
            "status",
            "exit",
            "put after-exit 1",
        )
        node_ids = sorted(c.nodes)
    assert got.returncode == 0, got.stderr
    assert "Traceback" not in got.stderr
    lines = got.stdout.splitlines()
    # A version is the Raft index of the key's last write: it grows, but not by one.
    put_version, cas_version = (int(v) for v in re.findall(r"^OK version=(\d+)$", got.stdout, re.M))
    assert cas_version > put_version
    assert lines[:8] == [
        f"OK version={put_version}",
        "hello world",
        f"OK version={cas_version}",
        "new",
        "error: unknown command 'bogus'; type 'help' to list the commands",
        "error: key 'missing' not found",
        "deleted",
        "error: key 'a' not found",
    ]
    assert [line for line in lines if line.startswith("error: ")] == [lines[4], lines[5], lines[7]]

    members = lines[8 : 9 + len(node_ids)]
    assert members[0].split() == ["ID", "GRPC", "RAFT", "STATE", "REPLICAS", "META"]
    assert sorted(row.split()[0] for row in members[1:]) == node_ids
    assert all(row.split()[3] == "active" for row in members[1:])

    status = lines[9 + len(node_ids) :]
    assert status[0].startswith("epoch ") and "moves in progress: none" in status[0]
    shard_rows = [row.split() for row in status if row[:1].isdigit()]
    assert len(shard_rows) == 8
    assert all(row[1] in node_ids for row in shard_rows), "every shard has a leader"
    assert any(row.startswith("meta ") for row in status)
