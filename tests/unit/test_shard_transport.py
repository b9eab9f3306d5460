"""Which Raft messages a shard's transport hands to pysyncobj, by sender."""

from typing import Any

from pysyncobj.node import Node

from raftkv.raft.transport import ShardTransport


class Mux:
    """Stands in for the node's mux: every peer's link is up."""

    def is_connected(self, _peer_id: str) -> bool:
        return True


def shard_transport(members: list[str]) -> tuple[ShardTransport, list[tuple[str, str]]]:
    mux: Any = Mux()
    transport = ShardTransport(mux, 7, {m: Node(m) for m in members})
    received: list[tuple[str, str]] = []
    transport.setOnMessageReceivedCallback(
        lambda node, msg: received.append((node.id, msg["type"]))
    )
    return transport, received


def test_a_leader_the_configuration_does_not_name_yet_is_heard_but_cannot_get_a_vote() -> None:
    # n5 was seeded with a snapshot whose configuration (n1, n2, n3) predates its leader n4
    transport, received = shard_transport(["n1", "n2", "n3"])
    transport.deliver("n4", {"type": "append_entries", "term": 7})
    transport.deliver("n4", {"type": "request_vote", "term": 8})
    transport.deliver("n4", {"type": "timeout_now", "term": 8})
    transport.deliver("n2", {"type": "request_vote", "term": 8})
    assert received == [("n4", "append_entries"), ("n2", "request_vote")]


class Recorder:
    """Stands in for the mux: records what a shard sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def is_connected(self, _peer_id: str) -> bool:
        return True

    def send(self, peer_id: str, _shard_id: int, message: dict[str, Any]) -> bool:
        self.sent.append((peer_id, dict(message)))
        return True


def test_read_rounds_are_stamped_echoed_to_their_sender_and_counted_at_the_leader() -> None:
    mux: Any = Recorder()
    follower = ShardTransport(mux, 7, {"n1": Node("n1"), "n2": Node("n2")})
    # pysyncobj answers an AppendEntries within the delivery: reply as it would
    follower.setOnMessageReceivedCallback(
        lambda node, msg: (
            follower.send(node, {"type": "next_node_idx", "next_node_idx": 5})
            if msg["type"] == "append_entries"
            else None
        )
    )
    follower.deliver("n1", {"type": "append_entries", "term": 3, "read_round": 41})
    follower.deliver("n2", {"type": "append_entries", "term": 2, "read_round": 9})
    assert [(p, m["read_round"]) for p, m in mux.sent] == [("n1", 41), ("n2", 9)]

    leader = ShardTransport(mux, 7, {"n2": Node("n2"), "n3": Node("n3")})
    leader.setOnMessageReceivedCallback(lambda node, msg: None)
    leader.read_round = 42
    leader.send(Node("n2"), {"type": "append_entries", "term": 3})
    assert mux.sent[-1] == ("n2", {"type": "append_entries", "term": 3, "read_round": 42})
    leader.deliver("n2", {"type": "next_node_idx", "read_round": 42})
    leader.deliver("n2", {"type": "next_node_idx", "read_round": 40})  # a late reply
    leader.deliver("n3", {"type": "next_node_idx", "read_round": 0})
    assert leader.read_acks == {"n2": 42}
