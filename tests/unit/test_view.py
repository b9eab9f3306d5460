"""The cluster view: bootstrap, changes (each a new epoch), and its codec."""

import pytest

from raftkv.config import ClusterConfig, ConfigError
from raftkv.placement import Placement
from raftkv.view import ACTIVE, DEAD, LEAVING, META_SHARD, ClusterView, Group


def _view(nodes: int = 3, shards: int = 8) -> ClusterView:
    return ClusterView.bootstrap(ClusterConfig.local(nodes, shards, 3, 7001))


def test_bootstrap_is_the_cluster_files_placement_at_epoch_one() -> None:
    config = ClusterConfig.local(4, 8, 3, 7001)
    view = ClusterView.bootstrap(config)
    placement = Placement.of(config.node_ids, 8, 3)
    assert view.epoch == 1 and view.cluster_id == config.fingerprint
    assert [g.replicas for g in view.placement] == [placement.replicas_of(s) for s in range(8)]
    assert not view.moves()
    assert view.meta.replicas == ("n1", "n2", "n3")
    assert view.hosted_by("n4") == [s for s in range(8) if "n4" in placement.replicas_of(s)]
    assert META_SHARD in view.hosted_by("n1")


def test_adding_a_member_plans_moves_and_bumps_the_epoch() -> None:
    view = _view()
    added = view.with_member("n4", "127.0.0.1:7004", "127.0.0.1:7104").planned()
    assert added.epoch > view.epoch
    assert added.node("n4") is not None and added.node("n4").state == ACTIVE  # type: ignore[union-attr]
    assert len(added.moves()) == 6
    # replicas stay where they are until the mover records each step
    assert [g.replicas for g in added.placement] == [g.replicas for g in view.placement]
    # adding the same member again changes nothing; another address for it is refused
    assert added.with_member("n4", "127.0.0.1:7004", "127.0.0.1:7104") is added
    with pytest.raises(ConfigError, match="already a member"):
        added.with_member("n4", "127.0.0.1:7005", "127.0.0.1:7105")
    with pytest.raises(ConfigError, match="already used by node n1"):
        added.with_member("n5", "127.0.0.1:7001", "127.0.0.1:7105")


def test_removing_a_member_needs_enough_nodes_left_and_marks_it() -> None:
    view = _view()
    with pytest.raises(ConfigError, match="fewer than the replication factor"):
        view.with_member_leaving("n3", dead=False)
    grown = view.with_member("n4", "127.0.0.1:7004", "127.0.0.1:7104")
    leaving = grown.with_member_leaving("n2", dead=False).planned()
    assert leaving.node("n2").state == LEAVING  # type: ignore[union-attr]
    assert all("n2" not in g.target for _, g in leaving.groups())
    dead = grown.with_member_leaving("n2", dead=True)
    assert dead.node("n2").state == DEAD  # type: ignore[union-attr]
    # a dead node may leave its groups under-replicated until another joins
    short = view.with_member_leaving("n3", dead=True).planned()
    assert all(g.target == tuple(n for n in g.replicas if n != "n3") for _, g in short.groups())
    refilled = short.with_member("n4", "127.0.0.1:7004", "127.0.0.1:7104").planned()
    assert all(len(g.target) == 3 and "n4" in g.target for g in refilled.placement)
    with pytest.raises(ConfigError, match="not a member"):
        view.with_member_leaving("n9", dead=True)


def test_recording_steps_finishes_a_move_and_drained_nodes_are_dropped() -> None:
    view = _view().with_member("n4", "127.0.0.1:7004", "127.0.0.1:7104")
    view = view.with_member_leaving("n1", dead=False).planned()
    for s, group in list(view.groups()):
        if group.moving:
            view = view.with_group(
                s, [*group.replicas, *(n for n in group.target if n not in group.replicas)]
            )
            view = view.with_group(s, list(group.target))
    assert not view.moves()
    assert view.node("n1") is not None  # still listed until it holds nothing
    done = view.without_drained()
    assert done.node("n1") is None and done.epoch == view.epoch + 1
    assert done.without_drained() is done


def test_a_group_is_moving_until_its_voters_are_its_target_in_any_order() -> None:
    assert not Group(("n1", "n2"), ("n2", "n1")).moving
    assert Group(("n1", "n2"), ("n1", "n3")).moving
    assert Group(("n1", "n2"), ("n1", "n3")).hosts == ("n1", "n2", "n3")


def test_the_view_survives_its_codec() -> None:
    view = _view().with_member("n4", "127.0.0.1:7004", "127.0.0.1:7104").planned()
    assert ClusterView.decode(view.encode()) == view
    with pytest.raises(ValueError):
        ClusterView.decode(b"")
