"""The gRPC guard's forwarding check: only a node that knows the secret can vouch."""

from types import SimpleNamespace
from typing import Any

from raftkv.admission import Admission
from raftkv.server import Guard


def guard(secret: str | None, node_id: str = "n1") -> Guard:
    node: Any = SimpleNamespace(
        id=node_id,
        endpoints={"n1": "a:1", "n2": "b:1", "n3": "c:1"},
        cluster=SimpleNamespace(secret=secret),
        settings=SimpleNamespace(security=SimpleNamespace(grpc_tls=None)),
    )
    return Guard(node, None, Admission(4), Admission(8))


class Context:
    def __init__(self, *metadata: tuple[str, str]) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


def test_a_marker_made_with_the_secret_is_vouched_for_and_a_made_up_one_is_not() -> None:
    n2 = guard("the-cluster-secret", "n2")
    real = n2._own_forward[0][1]  # what n2 sends when it forwards
    n1 = guard("the-cluster-secret")
    assert n1._read_metadata(Context(("raftkv-forwarded", real))) == ("", True, True, 0)
    for fake in ("n2", "n2.00ff", real.replace("n2.", "n3."), "n9." + real.split(".")[1]):
        assert n1._read_metadata(Context(("raftkv-forwarded", fake))) == ("", True, False, 0)
    other = guard("another-secret")
    assert other._read_metadata(Context(("raftkv-forwarded", real)))[2] is False
    assert n1._read_metadata(Context(("authorization", "Bearer t"))) == (
        "Bearer t",
        False,
        False,
        0,
    )


def test_the_callers_view_epoch_is_read_and_nonsense_counts_as_none() -> None:
    n1 = guard("the-cluster-secret")
    assert n1._read_metadata(Context(("raftkv-epoch", "42")))[3] == 42
    for junk in ("-1", "4e9", "9" * 40, "", "0x10", "\uff11\uff12"):
        assert n1._read_metadata(Context(("raftkv-epoch", junk)))[3] == 0


def test_without_a_secret_or_client_certificates_nothing_can_be_checked() -> None:
    plain = guard(None)
    assert plain._read_metadata(Context(("raftkv-forwarded", "n2"))) == ("", True, True, 0)


def test_a_node_out_of_the_view_is_vouched_for_only_to_learn_the_view() -> None:
    """A removed node asks for the view to learn that it was removed; nothing else."""
    n9 = guard("the-cluster-secret", "n9")  # not in n1's view (nodes n1..n3)
    marker = n9._own_forward[0][1]
    n1 = guard("the-cluster-secret")
    ctx = Context(("raftkv-forwarded", marker))
    assert n1._read_metadata(ctx, "/raftkv.v1.Admin/GetView")[2] is True
    assert n1._read_metadata(ctx, "/raftkv.v1.Admin/ChangeReplicas")[2] is False
    assert n1._read_metadata(ctx, "/raftkv.v1.KV/Put")[2] is False
