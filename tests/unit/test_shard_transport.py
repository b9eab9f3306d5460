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
