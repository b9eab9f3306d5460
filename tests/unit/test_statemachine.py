from raftkv import command
from raftkv._pb.raftkv.v1 import command_pb2 as pb
from raftkv.statemachine import StateMachine


def test_put_get_delete() -> None:
    sm = StateMachine()
    r = sm.apply(command.put(b"k", b"v1"), index=5)
    assert r.version == 5
    entry = sm.get(b"k")
    assert entry is not None and entry.value == b"v1" and entry.version == 5
    assert sm.apply(command.delete(b"k"), index=6).existed is True
    assert sm.get(b"k") is None
    assert sm.apply(command.delete(b"k"), index=7).existed is False


def test_cas_by_value_and_version() -> None:
    sm = StateMachine()
    sm.apply(command.put(b"k", b"a"), index=3)
    miss = sm.apply(command.cas(b"k", b"b", expected_value=b"zzz"), index=4)
    assert miss.code == pb.CommandResult.PRECONDITION_FAILED
    assert miss.current_version == 3
    assert sm.get(b"k").value == b"a"  # type: ignore[union-attr]
    hit = sm.apply(command.cas(b"k", b"b", expected_value=b"a"), index=5)
    assert hit.code == pb.CommandResult.OK and hit.version == 5
    hit2 = sm.apply(command.cas(b"k", b"c", expected_version=5), index=6)
    assert hit2.code == pb.CommandResult.OK
    assert sm.get(b"k").value == b"c"  # type: ignore[union-attr]


def test_cas_expected_version_zero_means_create_if_absent() -> None:
    sm = StateMachine()
    assert sm.apply(command.cas(b"n", b"x", expected_version=0), index=2).code == 0
    again = sm.apply(command.cas(b"n", b"y", expected_version=0), index=3)
    assert again.code == pb.CommandResult.PRECONDITION_FAILED
    absent = sm.apply(command.cas(b"m", b"y", expected_value=b""), index=4)
    assert absent.code == pb.CommandResult.PRECONDITION_FAILED


def test_retried_request_applies_once() -> None:
    sm = StateMachine()
    first = sm.apply(command.put(b"k", b"v1", b"client", 1), index=2)
    sm.apply(command.put(b"k", b"v2", b"client", 2), index=3)
    retry = sm.apply(command.put(b"k", b"v1", b"client", 1), index=4)
    assert retry.version == first.version == 2
    assert sm.get(b"k").value == b"v2"  # type: ignore[union-attr]


def test_dedup_table_is_bounded_in_apply_order() -> None:
    sm = StateMachine(dedup_capacity=2)
    for seq in (1, 2, 3):
        sm.apply(command.put(b"k", str(seq).encode(), b"c", seq), index=seq + 1)
    # seq 1 was evicted, so a very late retry applies again (documented window).
    sm.apply(command.put(b"k", b"1", b"c", 1), index=10)
    assert sm.get(b"k").value == b"1"  # type: ignore[union-attr]


def test_snapshot_round_trip_restores_data_versions_and_dedup() -> None:
    sm = StateMachine()
    sm.apply(command.put(b"a", b"1", b"c", 1), index=2)
    sm.apply(command.put(b"b", b"2"), index=3)
    snap = pb.Snapshot()
    snap.ParseFromString(sm.snapshot().SerializeToString())
    other = StateMachine()
    other.restore(snap)
    assert other.get(b"a") == sm.get(b"a") and other.get(b"b") == sm.get(b"b")
    assert other.applied_index == 3
    # the dedup entry survived: the retry is not applied again
    other.apply(command.put(b"a", b"changed", b"c", 1), index=4)
    assert other.get(b"a").value == b"1"  # type: ignore[union-attr]


def test_barrier_changes_nothing() -> None:
    sm = StateMachine()
    sm.apply(command.put(b"a", b"1"), index=2)
    sm.apply(command.BARRIER, index=3)
    assert len(sm) == 1 and sm.applied_index == 3


def test_a_request_id_reused_for_another_command_applies_nothing() -> None:
    sm = StateMachine()
    first = sm.apply(command.put(b"a", b"1", b"client", 7), index=2)
    assert first.code == pb.CommandResult.OK and first.version == 2
    reused = sm.apply(command.put(b"b", b"2", b"client", 7), index=3)
    assert reused.code == pb.CommandResult.REQUEST_ID_REUSED
    assert sm.get(b"b") is None
    other_value = sm.apply(command.put(b"a", b"X", b"client", 7), index=4)
    assert other_value.code == pb.CommandResult.REQUEST_ID_REUSED
    assert sm.get(b"a").value == b"1"  # type: ignore[union-attr]
    # the same command again is a retry: the first result, nothing applied twice
    assert sm.apply(command.put(b"a", b"1", b"client", 7), index=5) == first


def test_request_id_hashes_survive_a_snapshot() -> None:
    sm = StateMachine()
    sm.apply(command.delete(b"a", b"client", 1), index=2)
    restored = StateMachine()
    restored.restore(sm.snapshot())
    again = restored.apply(command.put(b"a", b"v", b"client", 1), index=3)
    assert again.code == pb.CommandResult.REQUEST_ID_REUSED


def test_a_bulk_request_s_bytes_make_the_same_batch_command() -> None:
    """PutMany's items are encoded once and used as the BatchOp as they are: the command must
    be the one built key by key, and a client's unknown fields must not reach the log."""
    from raftkv._pb.raftkv.v1 import kv_pb2 as kv

    items = [(b"a", b"1"), (b"b", b""), (b"\x00\xff", b"v" * 300)]
    request = kv.PutManyRequest(items=[kv.KeyValue(key=k, value=v) for k, v in items])
    # a client's item with a field raftkv does not know (number 9, bytes)
    request.items[0].MergeFromString(b"\x4a\x03zzz")
    request.DiscardUnknownFields()
    encoded = command.put_batch_encoded(request.SerializeToString(), b"client", 7)
    built_key_by_key = pb.Command(
        client_id=b"client",
        seq=7,
        batch=pb.BatchOp(puts=[pb.PutOp(key=k, value=v) for k, v in items]),
    )
    assert command.decode(encoded) == built_key_by_key
    sm = StateMachine()
    assert sm.apply(encoded, index=4).version == 4
    assert [sm.get(k) for k, _ in items] == [(v, 4) for _, v in items]
