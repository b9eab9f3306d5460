"""Membership at runtime, against real node processes: nodes join and leave, replicas move,
a dead node is replaced, and no acknowledged write is lost on the way. Nodes killed in the
middle of a move are in test_move_crashes.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

from raftkv.testing.cluster import LocalCluster, wait_for
from raftkv.view import META_SHARD

from .moves import (
    Writer,
    admin,
    read_all,
    replica_load,
    settled,
    wait_converged,
    wait_membership,
)


def test_a_node_joins_under_load_takes_its_share_and_leaves_again(tmp_path: Path) -> None:
    with LocalCluster.create(tmp_path, nodes=3, shards=8, replicas=3) as c:
        c.start()
        plan = admin(c, "rebalance", "--dry-run")
        assert plan.returncode == 0 and "balanced" in plan.stdout, plan.stderr
        with Writer(c, "grow") as w:
            wait_for(lambda: len(w.acked) > 100, 30, "writes before the join")
            c.add_node("n4")
            s = wait_for(lambda: settled(c, "n1", 2), 120, "the replica moves onto n4")
            wait_for(lambda: len(w.acked) > 600, 60, "writes after the join")
        assert w.acked, "nothing was acknowledged"
        # every shard back at three replicas; n4 holds its share: 24 replicas / 4 nodes
        assert all(len(sh.replicas) == 3 for sh in s.shards)
        assert replica_load(s) == {"n1": 6, "n2": 6, "n3": 6, "n4": 6}
        wait_converged(c)
        keys = list(w.acked)
        for node in ("n1", "n4"):
            assert read_all(c, node, keys) == w.acked, f"a write was lost (read via {node})"
        n4_dirs = sorted(p.name for p in c.nodes["n4"].data_dir.glob("shard-*"))
        assert len(n4_dirs) == 6

        listed = admin(c, "member", "list", "-o", "json")
        assert listed.returncode == 0, listed.stderr
        assert '"id": "n4"' in listed.stdout

        # leave: drained first, then removed; the node stops by itself and its data goes
        out = admin(c, "member", "remove", "n4")
        assert out.returncode == 0, out.stderr
        assert "leaving" in out.stdout
        s = wait_membership(c, "n4", member=False, what="n4 to be drained and removed")
        assert replica_load(s) == {"n1": 8, "n2": 8, "n3": 8}
        proc = c.nodes["n4"].process
        assert proc is not None
        assert proc.wait(30) == 0, "a removed node stops by itself, cleanly"
        assert not list(c.nodes["n4"].data_dir.glob("shard-*")), "its replicas were deleted"
        c.forget_node("n4")
        assert read_all(c, "n2", keys) == w.acked


def test_a_dead_node_is_replaced_from_the_surviving_quorums(tmp_path: Path) -> None:
    with LocalCluster.create(tmp_path, nodes=4, shards=8, replicas=3) as c:
        c.start()
        with Writer(c, "dead", limit=400) as w:
            wait_for(lambda: len(w.acked) > 200, 60, "writes")
        c.kill("n2")
        shards_on_n2 = [sh.shard_id for sh in c.status("n1").shards if "n2" in sh.replicas]
        assert shards_on_n2
        out = admin(c, "member", "remove", "n2", "--dead")
        assert out.returncode == 0, out.stderr
        s = wait_membership(c, "n2", member=False, what="n2's replicas to be re-created elsewhere")
        for sh in s.shards:
            assert len(sh.replicas) == 3 and "n2" not in sh.replicas
        c.forget_node("n2")
        wait_converged(c)
        assert read_all(c, "n3", list(w.acked)) == w.acked


def test_bad_membership_requests_get_one_clear_line(tmp_path: Path) -> None:
    with LocalCluster.create(tmp_path, nodes=3, shards=4, replicas=3) as c:
        c.start()
        out = admin(c, "member", "remove", "n3")
        assert out.returncode == 2
        assert "fewer than the replication factor" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
        out = admin(c, "member", "remove", "n9")
        assert out.returncode == 2 and "not a member" in out.stderr
        out = admin(c, "member", "add", "n4", "--grpc", c.endpoint("n1"), "--raft", "127.0.0.1:1")
        assert out.returncode == 2 and "already used by node n1" in out.stderr
        # nothing changed
        s = c.status("n1")
        assert s.epoch == 1 and not s.moves
        assert s.meta.leader and s.meta.shard_id == META_SHARD


def test_a_joined_node_restarts_from_its_saved_view(tmp_path: Path) -> None:
    with LocalCluster.create(tmp_path, nodes=3, shards=4, replicas=3) as c:
        c.start()
        c.add_node("n4")
        wait_for(lambda: settled(c, "n1", 2), 120, "moves onto n4")
        c.stop_node("n4")
        c.start_node("n4")
        s = c.status("n4")
        assert s.epoch >= 2 and "n4" in [n.id for n in s.nodes]

        async def put_get() -> bytes:
            async with c.client([c.endpoint("n4")], timeout=10, leader_aware=False) as cl:
                await cl.put(b"after-restart", b"ok")
                return (await cl.get(b"after-restart")).value

        assert asyncio.run(put_get()) == b"ok"


def test_a_secure_cluster_grows_and_shrinks_with_tls_tokens_and_the_secret(tmp_path: Path) -> None:
    """Nodes call each other for moves without a token, vouched for by the cluster secret;
    an operator needs the admin token; a read token may look but not change membership."""
    with LocalCluster.create(tmp_path, nodes=3, shards=4, replicas=3, secure=True) as c:
        c.start()
        with Writer(c, "secure", limit=300) as w:
            wait_for(lambda: len(w.acked) > 50, 30, "writes")
            c.add_node("n4")
            wait_for(lambda: settled(c, "n1", 2), 120, "moves onto n4")
        assert read_all(c, "n4", list(w.acked)) == w.acked
        assert c.credentials is not None
        no_token = subprocess.run(
            [
                sys.executable,
                "-m",
                "raftkv",
                "admin",
                "-e",
                c.endpoint("n1"),
                "--cacert",
                str(c.credentials.ca),
                "member",
                "remove",
                "n4",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("RAFTKV_TOKEN")},
        )
        assert no_token.returncode == 6 and "not authenticated" in no_token.stderr
        out = admin(c, "member", "remove", "n4")
        assert out.returncode == 0, out.stderr
        wait_for(lambda: "n4" not in [n.id for n in c.status("n1").nodes], 120, "n4 to be removed")
        proc = c.nodes["n4"].process
        assert proc is not None and proc.wait(30) == 0, "the removed n4 learns it and stops"
        assert read_all(c, "n2", list(w.acked)) == w.acked


def test_a_node_back_with_an_empty_data_dir_is_refused_until_removed_and_rejoined(
    tmp_path: Path,
) -> None:
    """Its votes are lost with its disk: its peers refuse its Raft links (it never votes or
    acknowledges), say why in status, and accept it again once it was removed and rejoins."""
    with LocalCluster.create(tmp_path, nodes=4, shards=4, replicas=3) as c:
        c.start()
        with Writer(c, "wiped", limit=200) as w:
            wait_for(lambda: len(w.acked) > 100, 30, "writes")
        c.stop_node("n3")
        shutil.rmtree(c.nodes["n3"].data_dir)
        c.start_node("n3")

        def refused() -> str:
            links = {n.id: n.raft_link for n in c.status("n1").nodes}
            return links["n3"] if "new data dir" in links["n3"] else ""

        why = wait_for(refused, 30, "n1 to refuse the wiped n3")
        assert "remove it (raftkv admin member remove n3 --dead)" in why
        # it takes no part: every write still commits without it, and it never leads or holds data
        assert read_all(c, "n1", list(w.acked)) == w.acked
        wiped = c.status("n3")
        assert all(
            r.keys == 0 and r.role != "leader"
            for sh in wiped.shards
            for r in sh.replica_status
            if r.node == "n3"
        )

        out = admin(c, "member", "remove", "n3", "--dead")
        assert out.returncode == 0, out.stderr
        wait_membership(c, "n3", member=False, what="n3 removed")
        proc = c.nodes["n3"].process
        assert proc is not None and proc.wait(30) == 0, "the removed n3 stops by itself"
        c.forget_node("n3")
        shutil.rmtree(tmp_path / "data" / "n3")
        c.add_node("n3")  # the same id, a new data dir: a new member
        s = wait_membership(c, "n3", member=True, what="n3 to join again")
        assert "n3" in [n.id for n in s.nodes]
        wait_for(
            lambda: {n.id: n.raft_link for n in c.status("n1").nodes}["n3"] == "up",
            30,
            "n1 to accept n3's Raft link again",
        )
        wait_converged(c)
        assert read_all(c, "n3", list(w.acked)) == w.acked


def test_a_shard_that_lost_its_quorum_is_reported_never_guessed_at(tmp_path: Path) -> None:
    with LocalCluster.create(tmp_path, nodes=4, shards=8, replicas=3) as c:
        c.start()
        before = c.status("n1")
        lost = [sh.shard_id for sh in before.shards if {"n3", "n4"} <= set(sh.replicas)]
        assert lost, "the placement put no shard on both n3 and n4"
        c.kill("n3")
        c.kill("n4")
        for dead in ("n3", "n4"):
            out = admin(c, "member", "remove", dead, "--dead")
            assert out.returncode == 0, out.stderr

        def reported() -> object:
            s = c.status("n1")
            stuck = [m for m in s.stuck_moves if "lost its quorum" in m]
            return s if {f"shard {x}" for x in lost} <= {m.split(":")[0] for m in stuck} else None

        s = wait_for(reported, 90, "the shards without a quorum to be reported")
        for shard in lost:
            # its voters are untouched: nothing was removed from or added to it
            assert set(s.shards[shard].replicas) >= {"n3", "n4"}, s.shards[shard]
        out = subprocess.run(
            [sys.executable, "-m", "raftkv", "client", "-e", c.endpoint("n1"), "status"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "stuck:" in out.stdout and "lost its quorum" in out.stdout, out.stdout


def test_a_replica_seeded_from_a_snapshot_older_than_its_leader_hears_that_leader(
    tmp_path: Path,
) -> None:
    """A snapshot's configuration may predate the leader that sends it: n4 joined after the
    snapshot was taken, then became leader, and seeds n5 with that snapshot. n5 must accept
    n4's entries (Raft §4.1) rather than ignore a node its configuration does not name yet."""
    args = ("--log-compaction-entries", "100")
    with LocalCluster.create(tmp_path, nodes=3, shards=1, replicas=3, extra_args=args) as c:
        c.start()
        writes = {f"old-{i}".encode(): f"v{i}".encode() for i in range(150)}

        async def put(items: dict[bytes, bytes]) -> None:
            async with c.client(timeout=30) as cl:
                for key, value in items.items():
                    await cl.put(key, value)

        asyncio.run(put(writes))  # every replica compacts: its snapshot names n1, n2, n3
        c.add_node("n4")
        assert admin(c, "member", "remove", "n1").returncode == 0
        wait_membership(c, "n1", member=False, what="n1's replica to move onto n4")
        c.forget_node("n1")
        # Make n4 the leader: kill whichever other replica leads until n4 wins (bounded).
        for _ in range(12):
            leader = wait_for(lambda: c.leaders("n4").get(0), 30, "a leader")
            if leader == "n4":
                break
            c.kill(leader)
            wait_for(
                lambda old=leader: c.leaders("n4").get(0) not in (None, old), 30, "a new leader"
            )
            c.start_node(leader)
        assert c.leaders("n4").get(0) == "n4", "n4 never won an election"
        term = c.status("n4").shards[0].term
        c.add_node("n5")  # four nodes, one group of three: nothing moves yet
        wait_for(lambda: settled(c, "n4", 4), 60, "n5 to join")
        out = admin(c, "member", "remove", "n2")
        assert out.returncode == 0, out.stderr
        s = wait_membership(c, "n2", member=False, what="n2's replica to move onto n5")
        assert sorted(s.shards[0].replicas) == ["n3", "n4", "n5"]
        # n5 heard n4 all along: it never timed out and forced an election
        assert (s.shards[0].leader, s.shards[0].term) == ("n4", term)
        c.forget_node("n2")
        wait_converged(c)
        more = {f"new-{i}".encode(): b"x" for i in range(20)}
        asyncio.run(put(more))
        assert read_all(c, "n5", [*writes, *more]) == {**writes, **more}


def test_a_drained_meta_member_learns_it_was_removed_and_stops(tmp_path: Path) -> None:
    """A replica removed from the meta group is never told so by Raft: its node must still
    find out, from its peers, that the view no longer lists it, and stop."""
    with LocalCluster.create(tmp_path, nodes=3, shards=2, replicas=3) as c:
        c.start()
        c.add_node("n4")
        wait_membership(c, "n4", member=True, what="n4 to join")
        assert "n1" in c.status("n1").meta.replicas
        out = admin(c, "member", "remove", "n1")
        assert out.returncode == 0, out.stderr
        s = wait_membership(c, "n1", member=False, what="n1 to be drained and removed")
        assert "n1" not in s.meta.replicas and len(s.meta.replicas) == 3
        proc = c.nodes["n1"].process
        assert proc is not None
        assert proc.wait(30) == 0, "a removed node stops by itself, cleanly"


def test_a_node_added_ahead_of_time_gets_its_replicas_once_it_runs(tmp_path: Path) -> None:
    """etcd's order: ``member add`` first, then start the node with ``serve --join``."""
    with LocalCluster.create(tmp_path, nodes=3, shards=8, replicas=3) as c:
        c.start()
        n4 = c.add_node("n4", start=False)
        out = admin(c, "member", "add", "n4", "--grpc", n4.address.grpc, "--raft", n4.address.raft)
        assert out.returncode == 0, out.stderr
        listed = admin(c, "member", "list")
        assert listed.returncode == 0 and "n4" in listed.stdout

        def waiting_for_n4() -> bool:
            s = c.status("n1")
            return any("n4" in m and "is it running" in m for m in s.stuck_moves)

        # the moves wait for the node, and status says why
        wait_for(waiting_for_n4, 60, "status to say the moves wait for n4")
        c.start_node("n4")
        s = wait_membership(c, "n4", member=True, what="the replicas to move onto n4")
        assert replica_load(s) == {"n1": 6, "n2": 6, "n3": 6, "n4": 6}
        wait_converged(c)
