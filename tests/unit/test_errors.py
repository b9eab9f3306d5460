import grpc
import pytest

from raftkv import errors


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.KeyNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.PreconditionFailed("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.NotLeader("x", leader="n2"), grpc.StatusCode.UNAVAILABLE),
        (errors.ProposalTimeout("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Overloaded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_table_maps_each_error_and_back(error: errors.RaftKVError, code: grpc.StatusCode) -> None:
    assert errors.status_for(error) == code
    back = errors.error_from_status(code, "msg")
    assert isinstance(back, errors.RaftKVError)
    assert back.retryable == error.retryable


def test_every_error_class_has_a_status() -> None:
    def all_subclasses(cls: type) -> set[type]:
        return set(cls.__subclasses__()).union(*(all_subclasses(c) for c in cls.__subclasses__()))

    import raftkv.raft.journal  # noqa: F401  (defines StorageError subclasses)

    for cls in all_subclasses(errors.RaftKVError):
        mapped = [c for c in cls.__mro__ if c in errors.GRPC_STATUS]
        assert mapped, f"{cls} maps to no gRPC status"


def test_unavailable_carries_the_leader_hint_back() -> None:
    err = errors.error_from_status(
        grpc.StatusCode.UNAVAILABLE,
        "no leader",
        {errors.LEADER_METADATA: "n3", errors.LEADER_ENDPOINT_METADATA: "h:1", "raftkv-shard": "4"},
    )
    assert isinstance(err, errors.Unavailable)
    assert (err.leader, err.leader_endpoint, err.shard_id) == ("n3", "h:1", 4)
