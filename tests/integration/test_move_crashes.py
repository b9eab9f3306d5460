"""Nodes killed with SIGKILL in the middle of a replica move, against real node processes.

Issue #8 asks that a move survive the crash of each node that takes part in it: the node
receiving a replica, the node giving one up, and the meta group's leader (which runs the
mover), one at a time; and the crash of every node at once. Each test joins a fourth node to a
loaded 3-node cluster (6 of the 24 replicas move onto it), kills while a group is half way
through its move (the new replica added as a voter, the old one not yet removed), and checks
that the move finishes, that the cluster kept serving writes while a single node was down,
that every replica converges, and that no acknowledged write is lost.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv.testing.cluster import LocalCluster, wait_for

from .moves import Writer, moves, read_all, replica_load, settled, wait_converged

NEW_NODE = "n4"
BALANCED = {"n1": 6, "n2": 6, "n3": 6, NEW_NODE: 6}
# Writes acknowledged while a node is down, to show the cluster kept serving.
WRITES_WHILE_DOWN = 50


def half_way(c: LocalCluster) -> kv.StatusResponse | None:
    """The status once some group is half way through its move onto the new node: the new
    replica is a voter and the old one not yet removed (more voters than the target)."""
    s = c.status("n1")
    return s if any(len(m.replicas) > len(m.target) for m in moves(s)) else None


def join_under_load(c: LocalCluster, w: Writer) -> kv.StatusResponse:
    """Start the new node and return the status seen half way through a move onto it."""
    wait_for(lambda: len(w.acked) > 100, 30, "writes before the join")
    c.add_node(NEW_NODE, wait=False)
    s = wait_for(lambda: half_way(c), 60, "a group half way through its move")
    assert all(NEW_NODE in m.target for m in moves(s)), f"a move not onto {NEW_NODE}: {s.moves}"
    return s


def victim_for(role: str, s: kv.StatusResponse) -> str:
    """The node that plays ``role`` in the moves of status ``s``."""
    meta_leader = s.meta.leader
    assert meta_leader, "the meta group has no leader"
    if role == "receiver":
        return NEW_NODE  # every move of a join goes onto the joining node
    if role == "giver":
        givers = sorted({g for m in moves(s) if len(m.replicas) > len(m.target) for g in m.givers})
        assert givers, s.moves
        # A giver that is not also the meta leader, when there is one: one role at a time.
        return next((g for g in givers if g != meta_leader), givers[0])
    assert role == "meta-leader", role
    return meta_leader


def survivor(c: LocalCluster, victim: str) -> str:
    return next(n for n in sorted(c.nodes) if n != victim)


def assert_moved_and_nothing_lost(
    c: LocalCluster, s: kv.StatusResponse, acked: dict[bytes, bytes], read_via: list[str]
) -> None:
    """The moves finished, every replica converged, the replicas a node gave up are deleted,
    and every acknowledged write reads back through each node of ``read_via``."""
    assert all(len(sh.replicas) == 3 for sh in s.shards), [list(sh.replicas) for sh in s.shards]
    assert replica_load(s) == BALANCED
    wait_converged(c)
    placed = {
        node: sorted(f"shard-{sh.shard_id}" for sh in s.shards if node in sh.replicas)
        for node in c.nodes
    }

    def shard_dirs() -> dict[str, list[str]]:
        return {n: sorted(p.name for p in c.nodes[n].data_dir.glob("shard-*")) for n in c.nodes}

    wait_for(lambda: shard_dirs() == placed, 30, "each node to hold exactly its replicas' data")
    assert acked, "nothing was acknowledged"
    keys = list(acked)
    for node in read_via:
        assert read_all(c, node, keys) == acked, f"a write was lost (read via {node})"


@pytest.mark.parametrize("role", ["receiver", "giver", "meta-leader"])
def test_a_node_killed_mid_move_leaves_the_move_finished_and_the_cluster_serving(
    tmp_path: Path, role: str
) -> None:
    with LocalCluster.create(tmp_path, nodes=3, shards=8, replicas=3) as c:
        c.start()
        with Writer(c, role, limit=20000) as w:
            mid = join_under_load(c, w)
            victim = victim_for(role, mid)
            c.kill(victim)
            acked_at_kill = len(w.acked)
            wait_for(
                lambda: len(w.acked) >= acked_at_kill + WRITES_WHILE_DOWN,
                60,
                f"writes to be acknowledged while {victim} ({role}) is down",
            )
            acked_while_down = len(w.acked) - acked_at_kill
            c.start_node(victim)
            c.wait_healthy(30, [NEW_NODE])
            s = wait_for(
                lambda: settled(c, survivor(c, victim), mid.epoch),
                90,
                f"the moves to finish after {victim} ({role}) came back",
            )
        assert acked_while_down >= WRITES_WHILE_DOWN, "the cluster stopped serving"
        assert_moved_and_nothing_lost(c, s, w.acked, read_via=[victim, survivor(c, victim)])


def test_every_node_killed_mid_move_comes_back_consistent_and_finishes_the_move(
    tmp_path: Path,
) -> None:
    with LocalCluster.create(tmp_path, nodes=3, shards=8, replicas=3) as c:
        c.start()
        with Writer(c, "all", limit=20000) as w:
            mid = join_under_load(c, w)
            c.kill_all()
            acked_at_kill = len(w.acked)
            for node in c.nodes:
                c.start_node(node, wait=False)
            c.wait_healthy(30)
            s = wait_for(lambda: settled(c, "n1", mid.epoch), 90, "the moves to finish")
            wait_for(
                lambda: len(w.acked) >= acked_at_kill + WRITES_WHILE_DOWN,
                60,
                "writes to be acknowledged after the restart",
            )
        assert_moved_and_nothing_lost(c, s, w.acked, read_via=["n1", NEW_NODE])
