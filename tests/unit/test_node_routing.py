"""Node logic against fake replicas: routing a shard to its leader, leader balance, status."""

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from raftkv import command
from raftkv.errors import NotLeader, ProposalTimeout, Unavailable, status_for
from raftkv.node import VOTER_PATIENCE_S, Node, Peer
from raftkv.replica import Replica
from raftkv.statemachine import digest_of
from raftkv.testing.fake_replica import FakeReplica, fake_node
from raftkv.view import META_SHARD


class Calls:
    """A route()'s local and remote callables, recording what ran where."""

    def __init__(self, remote_error: Exception | None = None) -> None:
        self.local: list[str] = []
        self.remote: list[str] = []
        self.remote_error = remote_error

    async def run_local(self, replica: Replica) -> str:
        self.local.append(replica.info.leader)
        await replica.read_index(1.0)
        return "local"

    async def run_remote(self, peer: Peer, _timeout: float) -> str:
        self.remote.append(peer.node_id)
        if self.remote_error is not None:
            error, self.remote_error = self.remote_error, None
            raise error
        return f"remote:{peer.node_id}"


def _route(node: Node, shard: int, calls: Calls, *, forwarded: bool, wait: float = 1.0) -> Any:
    return asyncio.run(
        node.route(
            shard,
            calls.run_local,
            calls.run_remote,
            forwarded=forwarded,
            deadline=time.monotonic() + wait,
        )
    )


def test_the_leader_serves_locally(tmp_path: Path) -> None:
    node, fakes = fake_node(tmp_path)
    calls = Calls()
    assert _route(node, 0, calls, forwarded=False) == "local"
    assert calls.local == ["n1"] and calls.remote == []
    assert fakes[0].index == 1  # the local call's barrier went through the fake's log


def test_a_forwarded_request_at_a_follower_is_refused_with_the_leader_hint(
    tmp_path: Path,
) -> None:
    node, fakes = fake_node(tmp_path)
    fakes[1].follow("n3")
    calls = Calls()
    with pytest.raises(NotLeader) as e:
        _route(node, 1, calls, forwarded=True)
    assert isinstance(e.value, Unavailable)
    assert status_for(e.value) == grpc.StatusCode.UNAVAILABLE
    assert e.value.leader == "n3" and e.value.shard_id == 1
    assert calls.local == [] and calls.remote == []  # never forwarded twice


def test_a_follower_forwards_once_to_the_leader_it_knows(tmp_path: Path) -> None:
    node, fakes = fake_node(tmp_path)
    fakes[0].follow("n2")
    calls = Calls()
    assert _route(node, 0, calls, forwarded=False) == "remote:n2"
    assert calls.remote == ["n2"] and calls.local == []


def test_a_peer_that_names_another_leader_is_followed(tmp_path: Path) -> None:
    node, fakes = fake_node(tmp_path)
    fakes[0].lose_leader()  # our replica knows no leader; the cache (a reply's hint) names n2
    node.learn_leader(0, "n2")
    calls = Calls(remote_error=Unavailable("n2 lost it", leader="n3"))
    assert _route(node, 0, calls, forwarded=False) == "remote:n3"
    assert calls.remote == ["n2", "n3"]
    assert node.leader_of(0) == "n3"  # learned from the hint


def test_a_joining_replica_asks_the_groups_voters(tmp_path: Path) -> None:
    node, fakes = fake_node(tmp_path)
    fakes[0].lose_leader()
    fakes[0].joining = True  # it hears from no leader until it has been added
    calls = Calls()
    voters = [n for n in node.view.group(0).replicas if n != "n1"]
    assert _route(node, 0, calls, forwarded=False) == f"remote:{voters[0]}"
    assert calls.remote == voters[:1]


def test_leadership_lost_after_the_check_routes_again(tmp_path: Path) -> None:
    node, fakes = fake_node(tmp_path)
    fakes[0].fail(fakes[0].not_leader(), times=1)
    calls = Calls()
    assert _route(node, 0, calls, forwarded=False) == "local"
    assert calls.local == ["n1", "n1"]  # the first try raised NotLeader, the second served


def test_other_errors_of_the_leader_reach_the_caller(tmp_path: Path) -> None:
    node, fakes = fake_node(tmp_path)
    fakes[0].fail(ProposalTimeout("no quorum"))
    with pytest.raises(ProposalTimeout):
        _route(node, 0, Calls(), forwarded=False)


def test_no_leader_anywhere_is_unavailable_by_the_deadline(tmp_path: Path) -> None:
    node, fakes = fake_node(tmp_path)
    fakes[0].lose_leader()
    started = time.monotonic()
    calls = Calls()
    with pytest.raises(Unavailable) as e:
        _route(node, 0, calls, forwarded=False, wait=0.2)
    assert not isinstance(e.value, NotLeader)
    assert calls.remote == []  # a voter waits for its own group to elect, it does not guess
    assert "no leader is known" in str(e.value)
    assert time.monotonic() - started < 2.0


def test_a_voter_that_hears_no_leader_for_long_asks_the_group(tmp_path: Path) -> None:
    """A replica whose addition a new leader truncated believes it is a voter, but no leader
    talks to it: after an election's worth of waiting its node asks the other replicas (the
    mover at the meta leader stalled for good on this)."""
    node, fakes = fake_node(tmp_path)
    fakes[0].lose_leader()
    calls = Calls()
    others = [n for n in node.view.group(0).replicas if n != "n1"]
    started = time.monotonic()
    assert _route(node, 0, calls, forwarded=False, wait=5.0) == f"remote:{others[0]}"
    assert time.monotonic() - started >= VOTER_PATIENCE_S


def test_a_stopped_node_routes_nothing(tmp_path: Path) -> None:
    node, _ = fake_node(tmp_path)
    node.started = False
    calls = Calls()
    with pytest.raises(Unavailable, match="starting or stopping"):
        _route(node, 0, calls, forwarded=False)
    assert calls.local == [] and calls.remote == []


def test_a_node_leading_more_than_its_share_hands_one_leadership_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, fakes = fake_node(tmp_path, shards=6)
    monkeypatch.setattr(node.driver.transport, "is_connected", lambda _peer: True)
    shards = [f for s, f in fakes.items() if s != META_SHARD]
    assert len(shards) == 6 and all(f.is_leader for f in shards)
    assert node.rebalance_once()
    moved = [f for f in shards if f.transfers]
    assert len(moved) == 1 and moved[0].transfers[0] in ("n2", "n3")
    # two per node is the fair share of 6 shards on 3 nodes: keep going until it is reached
    while node.rebalance_once():
        pass
    led = [f.info.leader for f in shards]
    assert sorted(led.count(n) for n in ("n1", "n2", "n3")) == [2, 2, 2]


def test_leadership_is_never_handed_to_a_peer_out_of_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node that is down leads nothing, so it looks like the best target; pysyncobj would
    # decline every transfer to it (and the log said so every 3 s).
    node, fakes = fake_node(tmp_path, shards=6)
    monkeypatch.setattr(node.driver.transport, "is_connected", lambda peer: peer == "n2")
    while node.rebalance_once():
        pass
    targets = [t for f in fakes.values() for t in f.transfers]
    assert targets and set(targets) == {"n2"}


def test_no_leadership_moves_while_an_election_is_under_way(tmp_path: Path) -> None:
    node, fakes = fake_node(tmp_path, shards=6)
    fakes[3].lose_leader()
    assert not node.rebalance_once()
    assert not any(f.transfers for f in fakes.values())


def test_local_status_reports_each_replica_and_its_digest(tmp_path: Path) -> None:
    node, fakes = fake_node(tmp_path)
    fake: FakeReplica = fakes[1]
    asyncio.run(fake.propose(command.put(b"k", b"v"), 1.0))
    fakes[0].follow("n2")
    status = asyncio.run(node.local_status(digest=True))
    one = status.shards[1].replica_status[0]
    assert (one.node, one.role, one.keys, one.last_applied) == ("n1", "leader", 1, 1)
    assert one.digest == digest_of(fake.machine.items())
    zero = status.shards[0].replica_status[0]
    assert (zero.role, zero.leader) == ("follower", "n2")
    assert status.shards[1].leader == "n1" and status.shards[0].leader == ""
