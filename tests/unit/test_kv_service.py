"""The KV handlers against fake replicas: values, versions, errors and leader hints."""

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv.errors import (
    InvalidArgument,
    KeyNotFound,
    NotLeader,
    PreconditionFailed,
    ProposalTimeout,
    status_for,
)
from raftkv.node import Node
from raftkv.server import Caller, KVService, Received
from raftkv.testing.fake_replica import FakeReplica, fake_node

T = TypeVar("T")


def received(message: Any) -> Received[Any]:
    return Received(message, message.SerializeToString())


CLIENT = Caller(identity=None, forward_metadata=(), forwarded=False)
FORWARDED = Caller(identity=None, forward_metadata=(), forwarded=True)


class Context:
    """The one thing the handlers ask of a grpc.aio context: the client's deadline."""

    def time_remaining(self) -> float:
        return 2.0


def _run(call: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(call)


def _service(tmp_path: Path) -> tuple[KVService, Node, dict[int, FakeReplica]]:
    node, fakes = fake_node(tmp_path)
    return KVService(node), node, fakes


def test_put_then_get_at_the_leader(tmp_path: Path) -> None:
    svc, node, fakes = _service(tmp_path)
    put = _run(svc.put(received(kv.PutRequest(key=b"k", value=b"v1")), Context(), CLIENT))
    shard = node.shard_for(b"k")
    assert put.version == fakes[shard].index == 1
    assert (put.header.shard_id, put.header.leader, put.header.index) == (shard, "n1", 1)
    assert put.header.leader_endpoint == node.endpoints["n1"]
    got = _run(svc.get(received(kv.GetRequest(key=b"k")), Context(), CLIENT))
    assert (got.value, got.version) == (b"v1", 1)
    assert got.header.index == 2  # read after the barrier that followed the write


def test_a_missing_key_is_not_found(tmp_path: Path) -> None:
    svc, _, _ = _service(tmp_path)
    with pytest.raises(KeyNotFound) as e:
        _run(svc.get(received(kv.GetRequest(key=b"nope")), Context(), CLIENT))
    assert status_for(e.value) == grpc.StatusCode.NOT_FOUND


def test_compare_and_swap_checks_the_version(tmp_path: Path) -> None:
    svc, _, _ = _service(tmp_path)
    first = _run(svc.put(received(kv.PutRequest(key=b"k", value=b"a")), Context(), CLIENT))
    with pytest.raises(PreconditionFailed) as e:
        _run(
            svc.compare_and_swap(
                received(
                    kv.CompareAndSwapRequest(
                        key=b"k", value=b"b", expected_version=first.version + 7
                    )
                ),
                Context(),
                CLIENT,
            )
        )
    assert status_for(e.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.current_version == first.version
    swapped = _run(
        svc.compare_and_swap(
            received(kv.CompareAndSwapRequest(key=b"k", value=b"b", expected_value=b"a")),
            Context(),
            CLIENT,
        )
    )
    assert swapped.version > first.version
    got = _run(svc.get(received(kv.GetRequest(key=b"k")), Context(), CLIENT))
    assert (got.value, got.version) == (b"b", swapped.version)


def test_compare_and_swap_on_an_absent_key_says_so(tmp_path: Path) -> None:
    svc, _, _ = _service(tmp_path)
    with pytest.raises(PreconditionFailed, match="the key does not exist"):
        _run(
            svc.compare_and_swap(
                received(kv.CompareAndSwapRequest(key=b"new", value=b"x", expected_version=3)),
                Context(),
                CLIENT,
            )
        )


def test_a_request_id_reused_for_another_write_is_refused(tmp_path: Path) -> None:
    svc, node, fakes = _service(tmp_path)
    rid = kv.RequestId(client_id=b"c1", seq=1)
    first = _run(
        svc.put(received(kv.PutRequest(key=b"k", value=b"a", request_id=rid)), Context(), CLIENT)
    )
    again = _run(
        svc.put(received(kv.PutRequest(key=b"k", value=b"a", request_id=rid)), Context(), CLIENT)
    )
    assert again.version == first.version  # a retry: applied once
    with pytest.raises(InvalidArgument, match="already used"):
        _run(
            svc.put(
                received(kv.PutRequest(key=b"k", value=b"b", request_id=rid)), Context(), CLIENT
            )
        )
    entry = fakes[node.shard_for(b"k")].read_local(b"k")
    assert entry is not None and entry.value == b"a"  # nothing of the refused write applied


def test_a_forwarded_write_at_a_follower_names_the_leader(tmp_path: Path) -> None:
    svc, node, fakes = _service(tmp_path)
    shard = node.shard_for(b"k")
    fakes[shard].follow("n2")
    with pytest.raises(NotLeader) as e:
        _run(svc.put(received(kv.PutRequest(key=b"k", value=b"v")), Context(), FORWARDED))
    assert status_for(e.value) == grpc.StatusCode.UNAVAILABLE
    assert (e.value.leader, e.value.shard_id) == ("n2", shard)
    assert fakes[shard].proposed == []


def test_a_stale_read_at_a_follower_is_served_without_a_barrier(tmp_path: Path) -> None:
    svc, node, fakes = _service(tmp_path)
    _run(svc.put(received(kv.PutRequest(key=b"k", value=b"v")), Context(), CLIENT))
    fake = fakes[node.shard_for(b"k")]
    fake.follow("n2")
    got = _run(
        svc.get(received(kv.GetRequest(key=b"k", consistency=kv.STALE)), Context(), FORWARDED)
    )
    assert got.value == b"v" and got.header.leader == "n2"
    assert len(fake.proposed) == 1  # the put; no barrier
    with pytest.raises(NotLeader):  # a linearizable one needs the leader
        _run(svc.get(received(kv.GetRequest(key=b"k")), Context(), FORWARDED))


def test_a_write_whose_outcome_is_unknown_says_so(tmp_path: Path) -> None:
    svc, node, fakes = _service(tmp_path)
    fakes[node.shard_for(b"k")].fail(ProposalTimeout("no quorum"))
    with pytest.raises(ProposalTimeout):
        _run(svc.put(received(kv.PutRequest(key=b"k", value=b"v")), Context(), CLIENT))
    with pytest.raises(ProposalTimeout):  # the read barrier cannot commit either
        _run(svc.get(received(kv.GetRequest(key=b"k")), Context(), CLIENT))


def test_bulk_calls_fail_only_the_keys_of_a_failing_shard(tmp_path: Path) -> None:
    svc, node, fakes = _service(tmp_path)
    keys = [f"key-{i}".encode() for i in range(20)]
    shards = {node.shard_for(k) for k in keys}
    assert shards == {0, 1}
    fakes[1].fail(ProposalTimeout("no quorum"))
    items = [kv.KeyValue(key=k, value=k.upper()) for k in keys]
    put = _run(svc.put_many(kv.PutManyRequest(items=items), Context(), CLIENT))
    for k, r in zip(keys, put.results, strict=True):
        failed = node.shard_for(k) == 1
        assert bool(r.error.code) == failed
        if failed:
            assert r.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.name
    fakes[1].heal()
    got = _run(svc.get_many(kv.GetManyRequest(keys=keys), Context(), CLIENT))
    for k, r in zip(keys, got.results, strict=True):
        assert r.found == (node.shard_for(k) == 0)
        assert r.value == (k.upper() if r.found else b"")
