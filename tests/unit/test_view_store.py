"""Membership logic against a fake meta replica: the view's compare-and-swap, member changes."""

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from raftkv import command
from raftkv._pb.raftkv.v1 import admin_pb2 as admin
from raftkv.errors import NotLeader, Unavailable
from raftkv.membership import ViewStore, change_replicas
from raftkv.node import load_saved_view
from raftkv.server import AdminService, Caller
from raftkv.testing.fake_replica import fake_node
from raftkv.view import META_SHARD, VIEW_KEY, ClusterView

T = TypeVar("T")
N4 = ("n4", "127.0.0.1:7004", "127.0.0.1:7104")
N5 = ("n5", "127.0.0.1:7005", "127.0.0.1:7105")


def _run(call: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(call)


class Context:
    def time_remaining(self) -> float:
        return 2.0


def test_an_empty_meta_group_holds_the_bootstrap_view(tmp_path: Path) -> None:
    node, fakes = fake_node(tmp_path)
    meta = fakes[META_SHARD]
    view, version = _run(ViewStore(node).read(meta, 1.0))
    assert (view, version) == (node.bootstrap_view(), 0)
    assert meta.proposed == [command.BARRIER]  # read linearizably, through a barrier


def test_an_update_is_a_compare_and_swap_the_node_adopts(tmp_path: Path) -> None:
    node, fakes = fake_node(tmp_path)
    meta, store = fakes[META_SHARD], ViewStore(node)
    before, after = _run(store.update(meta, lambda v: v.with_member(*N4), 1.0))
    assert before.epoch == 1 and after.epoch == 2 and after.node("n4") is not None
    entry = meta.read_local(VIEW_KEY)
    assert entry is not None and ClusterView.decode(entry.value) == after
    assert node.view == after and "n4" in node.peers
    assert load_saved_view(tmp_path) == after
    # the next change swaps against the version it read
    _, third = _run(store.update(meta, lambda v: v.with_member(*N5), 1.0))
    assert third.epoch == 3 and third.node("n4") is not None and third.node("n5") is not None
    entry = meta.read_local(VIEW_KEY)
    assert entry is not None and _run(store.read(meta, 1.0)) == (third, entry.version)


def test_an_update_that_raced_another_change_is_redone_on_the_newer_view(
    tmp_path: Path,
) -> None:
    node, fakes = fake_node(tmp_path)
    meta, store = fakes[META_SHARD], ViewStore(node)
    seen: list[int] = []

    def change(view: ClusterView) -> ClusterView:
        seen.append(view.epoch)
        if len(seen) == 1:  # another leader's change commits between our read and our swap
            meta.commit(command.put(VIEW_KEY, view.with_member(*N5).encode()))
        return view.with_member(*N4)

    _, after = _run(store.update(meta, change, 1.0))
    assert seen == [1, 2]
    assert after.epoch == 3 and after.node("n4") is not None and after.node("n5") is not None


def test_a_change_that_changes_nothing_proposes_nothing(tmp_path: Path) -> None:
    node, fakes = fake_node(tmp_path)
    meta = fakes[META_SHARD]
    before, after = _run(ViewStore(node).update(meta, lambda v: v, 1.0))
    assert before is after and meta.proposed == [command.BARRIER]


def test_the_view_is_read_only_at_the_meta_leader(tmp_path: Path) -> None:
    node, fakes = fake_node(tmp_path)
    fakes[META_SHARD].follow("n2")
    with pytest.raises(NotLeader) as e:
        _run(ViewStore(node).read(fakes[META_SHARD], 1.0))
    assert e.value.leader == "n2"


def test_member_add_at_the_meta_leader_plans_moves(tmp_path: Path) -> None:
    node, fakes = fake_node(tmp_path, shards=4)
    service = AdminService(node, ViewStore(node))
    request = admin.MemberAddRequest(id=N4[0], grpc=N4[1], raft=N4[2])
    caller = Caller(identity=None, forward_metadata=(), forwarded=False)
    reply = _run(service.member_add(request, Context(), caller))
    assert reply.moves > 0 and any(n.id == "n4" for n in reply.view.nodes)
    assert node.view.epoch == reply.view.epoch > 1 and node.view.moves()
    assert len(fakes[META_SHARD].proposed) == 2  # a barrier, then the swap


def test_replica_changes_run_at_the_groups_leader(tmp_path: Path) -> None:
    node, fakes = fake_node(tmp_path)
    members = _run(change_replicas(node, 1, False, "n4", 2, forwarded=False))
    assert members == ["n1", "n2", "n3", "n4"] == fakes[1].members
    # removing the leader's own replica hands leadership away first; the caller retries there
    with pytest.raises(Unavailable) as e:
        _run(change_replicas(node, 1, True, "n1", 2, forwarded=True))
    assert e.value.leader in ("n2", "n3", "n4") and fakes[1].transfers == [e.value.leader]
    assert fakes[1].members == ["n1", "n2", "n3", "n4"]
    with pytest.raises(NotLeader):  # now a follower: a forwarded change is refused
        _run(change_replicas(node, 1, False, "n5", 2, forwarded=True))


class ViewServer:
    """Stands in for a peer's Admin stub: answers GetView with ``view`` and counts calls."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view
        self.calls = 0

    async def GetView(self, _request: Any, **_kw: Any) -> Any:
        self.calls += 1
        return self.view.to_proto()


def test_a_meta_replica_whose_leader_is_cut_off_is_not_trusted_for_the_view(
    tmp_path: Path,
) -> None:
    # A replica removed from the meta group keeps believing in its last leader, but every
    # peer has closed its link: the node must ask its peers, or never learn of its removal.
    node, fakes = fake_node(tmp_path)
    fakes[META_SHARD].follow("n2")
    newer = node.view.with_member(*N4)
    servers = {n: ViewServer(newer) for n in ("n2", "n3")}
    for n, server in servers.items():
        node.peers[n]._admin = server  # type: ignore[assignment]
    links_up = {"n2": True}
    node.driver.transport.is_connected = lambda p: links_up.get(p, False)  # type: ignore[method-assign]

    _run(node.refresh_view())  # leader reachable, and nobody asked for more: trust it
    assert node.view.epoch == 1 and servers["n2"].calls == 0
    _run(node.refresh_view(min_epoch=2))  # a caller has seen epoch 2: ask the peers
    assert node.view == newer and servers["n2"].calls == 1

    newest = newer.with_member(*N5)
    servers["n2"].view = servers["n3"].view = newest
    links_up["n2"] = False
    _run(node.refresh_view())  # the leader's link is down: ask the peers
    assert node.view == newest
