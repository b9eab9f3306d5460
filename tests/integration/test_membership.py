"""Cluster shape and identity: replica counts, foreign cluster files, data dir guards."""

import asyncio
import subprocess
from pathlib import Path

import grpc
import pytest

from raftkv import Client
from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv._pb.raftkv.v1 import kv_pb2_grpc as kv_grpc
from raftkv.config import ClusterConfig
from raftkv.testing.cluster import LocalCluster, wait_for


def test_with_two_replicas_on_three_nodes_each_shard_lives_on_exactly_two(tmp_path: Path) -> None:
    with LocalCluster.create(tmp_path, nodes=3, shards=8, replicas=2) as c:
        c.start()
        status = c.status()
        for shard in status.shards:
            assert len(shard.replicas) == 2
            assert sorted(r.node for r in shard.replica_status) == sorted(shard.replicas)
            assert shard.leader in shard.replicas

        async def rw() -> None:
            # every node serves every key, including shards it holds no replica of
            for ep in c.endpoints:
                async with Client(ep, leader_aware=False) as cl:
                    for i in range(16):
                        await cl.put(f"{ep}-{i}".encode(), b"x")
                        assert (await cl.get(f"{ep}-{i}".encode())).value == b"x"

        asyncio.run(rw())


def test_nodes_from_different_cluster_files_refuse_each_other(tmp_path: Path) -> None:
    with LocalCluster.create(tmp_path, nodes=3, shards=4, replicas=3) as c:
        # n3 gets a cluster file with the same addresses but another shard count
        other = ClusterConfig(shards=5, replicas=3, nodes=c.config.nodes)
        odd = tmp_path / "other.toml"
        odd.write_text(other.to_toml())
        c.base_dir.mkdir(parents=True, exist_ok=True)
        c.cluster_file.write_text(c.config.to_toml())
        c.start_node("n1", wait=False)
        c.start_node("n2", wait=False)
        n3 = c.nodes["n3"]
        n3.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = c.command("n3")
        cmd[cmd.index("--cluster") + 1] = str(odd)
        n3.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        c.wait_healthy(30)
        log_n1 = n3.log_dir / "n1" / "raftkv.log"
        log_n3 = n3.log_dir / "n3" / "raftkv.log"

        def refused() -> bool:
            return "different cluster files" in log_n1.read_text() and (
                "different cluster files" in log_n3.read_text()
            )

        wait_for(refused, 20, "both sides to log the refusal")
        # n1 and n2 still form a working cluster on their own
        c.wait_leaders(30, exclude={"n3"})


def test_a_data_dir_of_another_node_is_refused(tmp_path: Path) -> None:
    with LocalCluster.create(tmp_path, nodes=3, shards=2, replicas=3) as c:
        c.start()
        c.stop()
        cmd = c.command("n2")
        cmd[cmd.index("--data-dir") + 1] = str(c.nodes["n1"].data_dir)
        got = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert got.returncode != 0
        assert "belongs to node 'n1'" in got.stderr


def test_without_quorum_requests_fail_unavailable_with_a_reason(tmp_path: Path) -> None:
    with LocalCluster.create(
        tmp_path,
        nodes=3,
        shards=2,
        replicas=3,
        extra_args=("--leader-wait", "1", "--proposal-timeout", "1"),
    ) as c:
        c.start()
        with c.channel("n1") as ch:
            stub = kv_grpc.KVStub(ch)
            stub.Put(kv.PutRequest(key=b"q", value=b"1"), timeout=10)
            # a follower learns the commit on the next heartbeat: wait until n1 has applied it
            wait_for(
                lambda: stub.Get(kv.GetRequest(key=b"q", consistency=kv.STALE), timeout=5).value,
                10,
                "n1 to apply the write",
            )
        c.kill("n2")
        c.kill("n3")
        with c.channel("n1") as ch:
            stub = kv_grpc.KVStub(ch)
            for request, method in (
                (kv.PutRequest(key=b"q", value=b"2"), stub.Put),
                (kv.GetRequest(key=b"q"), stub.Get),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    method(request, timeout=15)
                assert info.value.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ), info.value
                assert "shard" in (info.value.details() or "")
            # stale reads still work from the surviving replica
            got = stub.Get(kv.GetRequest(key=b"q", consistency=kv.STALE), timeout=10)
            assert got.value == b"1"
        assert c.nodes["n1"].running


def test_leadership_spreads_over_the_nodes(tmp_path: Path) -> None:
    with LocalCluster.create(tmp_path, nodes=3, shards=8, replicas=3) as c:
        c.start()

        def balanced() -> dict[str, int] | None:
            counts = c.leader_counts()
            return counts if sum(counts.values()) == 8 and max(counts.values()) <= 3 else None

        counts = wait_for(balanced, 40, "leaders to spread to at most 3 shards per node")
        assert min(counts.values()) >= 2


def test_a_shared_secret_authenticates_raft_peers_and_a_wrong_one_is_named(
    tmp_path: Path,
) -> None:
    with LocalCluster.create(
        tmp_path, nodes=3, shards=2, replicas=3, env={"RAFTKV_RAFT_SECRET": "correct horse"}
    ) as c:
        c.start()

        async def rw() -> None:
            async with Client(c.endpoints) as cl:
                for i in range(20):
                    await cl.put(f"s{i}".encode(), b"v")
                assert (await cl.get(b"s7")).value == b"v"

        asyncio.run(rw())
        # A node with another secret cannot join. It says why in its own log, its peers name
        # it and the reason in theirs, and status shows its Raft link down.
        c.kill("n3")
        c.env = {"RAFTKV_RAFT_SECRET": "wrong"}
        c.start_node("n3")
        log_of = {n: c.nodes[n].log_dir / n / "raftkv.log" for n in ("n1", "n2", "n3")}
        wait_for(
            lambda: "proof does not match our cluster secret" in log_of["n3"].read_text(),
            20,
            "n3 to log that its peers' proofs do not match its secret",
        )
        wait_for(
            lambda: any(
                "n3 (" in line and "n3's proof does not match our cluster secret" in line
                for n in ("n1", "n2")
                for line in log_of[n].read_text().splitlines()
            ),
            20,
            "n1 or n2 to log that n3 failed authentication",
        )
        status = wait_for(
            lambda: (
                st
                if (st := c.status("n1")).nodes[2].raft_link.startswith("down")
                and "secret" in st.nodes[2].raft_link
                else None
            ),
            20,
            "status to show n3's Raft link down with the reason",
        )
        assert status.nodes[2].id == "n3"
        with c.channel("n3") as ch:
            status = kv_grpc.ClusterStub(ch).Status(kv.StatusRequest(local_only=True), timeout=5)
        assert all(
            not r.leader or r.leader == "n3" for s in status.shards for r in s.replica_status
        )
