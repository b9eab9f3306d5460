"""Backups against real nodes: save under write load, restore into a new cluster, compare."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from raftkv import Client
from raftkv.backup import BackupError, read_backup
from raftkv.testing.cluster import LocalCluster, interrupt


def raftkv(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "raftkv", *args], capture_output=True, text=True, timeout=timeout
    )


def digest(pairs: dict[bytes, bytes]) -> str:
    h = hashlib.sha256()
    for key in sorted(pairs):
        h.update(len(key).to_bytes(4, "big") + key + len(pairs[key]).to_bytes(4, "big"))
        h.update(pairs[key])
    return h.hexdigest()


class Writer:
    """Writes load-* keys until stopped, remembering what was acknowledged (bounded)."""

    def __init__(self, endpoints: list[str]) -> None:
        self.endpoints = endpoints
        self.acked: dict[bytes, bytes] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with Client(",".join(self.endpoints)) as client:
            for i in range(100_000):
                if self.stop.is_set():
                    return
                key, value = f"load-{i % 3000}".encode(), f"v{i}".encode()
                await asyncio.gather(*(client.put(key + bytes([j]), value) for j in range(4)))
                for j in range(4):
                    self.acked[key + bytes([j])] = value


def test_save_under_load_then_restore_into_a_new_cluster_keeps_every_acknowledged_write(
    fresh_cluster: LocalCluster, tmp_path: Path
) -> None:
    before = {f"before-{i}".encode(): f"value-{i}".encode() * 3 for i in range(600)}

    async def write_before() -> None:
        async with Client(",".join(fresh_cluster.endpoints)) as client:
            await client.put_many(list(before.items()))

    asyncio.run(write_before())
    writer = Writer(fresh_cluster.endpoints)
    writer.thread.start()
    try:
        file = tmp_path / "cluster.backup"
        saved = raftkv(
            "admin", "-e", ",".join(fresh_cluster.endpoints), "snapshot", "save", str(file)
        )
        assert saved.returncode == 0, saved.stderr
    finally:
        writer.stop.set()
        writer.thread.join(60)
    assert len(writer.acked) > 0, "the load never wrote while the save ran"

    backup = read_backup(file)
    copied = {k: e for part in backup.shards.values() for k, e in part.items()}
    assert digest({k: copied[k].value for k in before}) == digest(before)
    # Writes that raced the save are either in the copy with a value that was written, or
    # absent; never anything else.
    for key, entry in copied.items():
        if key.startswith(b"load-"):
            assert entry.value.startswith(b"v"), (key, entry.value)

    # A new cluster of another shape: 3 nodes, 4 shards.
    target = LocalCluster.create(tmp_path / "restored", nodes=3, shards=4, replicas=3)
    target.base_dir.mkdir(parents=True)
    target.cluster_file.write_text(target.config.to_toml())
    restored = raftkv(
        "admin", "snapshot", "restore", str(file), "--cluster", str(target.cluster_file),
        "--data-dir", str(target.base_dir / "data"),
    )  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    assert f"restored {len(copied):,} keys" in restored.stdout

    with target:
        target.start()

        async def read_back() -> dict[bytes, tuple[bytes, int]]:
            async with Client(",".join(target.endpoints)) as client:
                got = {}
                for key in copied:
                    r = await client.get(key)
                    got[key] = (r.value, r.version)
                await client.put(b"after-restore", b"writable")
                assert (await client.get(b"after-restore")).value == b"writable"
                return got

        got = asyncio.run(read_back())
    assert digest({k: got[k][0] for k in before}) == digest(before)
    assert {k: got[k] for k in copied} == {k: (e.value, e.version) for k, e in copied.items()}


def test_a_damaged_backup_is_refused_with_a_clear_message(
    cluster3: LocalCluster, tmp_path: Path
) -> None:
    file = tmp_path / "ok.backup"
    saved = raftkv("admin", "-e", ",".join(cluster3.endpoints), "snapshot", "save", str(file))
    assert saved.returncode == 0, saved.stderr
    assert raftkv("admin", "snapshot", "status", str(file)).returncode == 0
    data = file.read_bytes()
    cases = {
        "flipped": data[:40] + bytes([data[40] ^ 0xFF]) + data[41:],
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "not a backup": b"hello, this is a text file\n",
    }
    for name, body in cases.items():
        bad = tmp_path / f"{name}.backup"
        bad.write_bytes(body)
        with pytest.raises(BackupError):
            read_backup(bad)
        for args in (
            ("status", str(bad)),
            ("restore", str(bad), "--cluster", str(cluster3.cluster_file), "--data-dir",
             str(tmp_path / f"dirs-{name}")),
        ):  # fmt: skip
            out = raftkv("admin", "snapshot", *args)
            assert out.returncode == 5, (name, out.stdout)
            assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr, out.stderr
            assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert not (tmp_path / f"dirs-{name}").exists()


def test_restore_never_writes_over_an_existing_data_dir(
    cluster3: LocalCluster, tmp_path: Path
) -> None:
    file = tmp_path / "b.backup"
    assert (
        raftkv(
            "admin", "-e", ",".join(cluster3.endpoints), "snapshot", "save", str(file)
        ).returncode
        == 0
    )
    taken = tmp_path / "dirs" / "n1"
    taken.mkdir(parents=True)
    (taken / "something").write_text("x")
    out = raftkv(
        "admin", "snapshot", "restore", str(file), "--cluster", str(cluster3.cluster_file),
        "--data-dir", str(tmp_path / "dirs"),
    )  # fmt: skip
    assert out.returncode == 5 and "is not empty" in out.stderr, out.stderr
    assert sorted(p.name for p in (tmp_path / "dirs").iterdir()) == ["n1"]


def test_local_up_restore_starts_a_new_local_cluster_from_a_backup(
    cluster3: LocalCluster, tmp_path: Path
) -> None:
    eps = ",".join(cluster3.endpoints)
    assert raftkv("client", "-e", eps, "put", "restore-me", "still here").returncode == 0
    file = tmp_path / "for-local.backup"
    assert raftkv("admin", "-e", eps, "snapshot", "save", str(file)).returncode == 0
    port = 7400 + os.getpid() % 150
    proc = subprocess.Popen(
        [sys.executable, "-m", "raftkv", "local", "up", "--dir", str(tmp_path / "new"),
         "--base-port", str(port), "--restore", str(file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("endpoints:"):
                endpoints = line.split()[1]
                break
        else:
            raise AssertionError("".join(lines) + (proc.stderr.read() if proc.stderr else ""))
        assert any(line.startswith("restored ") for line in lines), lines
        got = raftkv("client", "-e", endpoints, "get", "restore-me")
        assert got.returncode == 0 and got.stdout == "still here", got.stderr
    finally:
        interrupt(proc)
    # Again into the same directory: it holds a cluster now, which a restore never overwrites.
    again = raftkv(
        "local", "up", "--dir", str(tmp_path / "new"), "--base-port", str(port),
        "--restore", str(file),
    )  # fmt: skip
    assert again.returncode == 5, again.stderr
    assert "holds one: add --fresh" in again.stderr
