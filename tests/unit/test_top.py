"""raftkv top's view, from hand-made Status samples: rates, lag, unreachable nodes, changes."""

from __future__ import annotations

from rich.console import Console

from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv.top import Sample, leader_changes, render


def status(
    leader: str, commit: int, applied_n3: int, reachable_n3: bool = True
) -> kv.StatusResponse:
    s = kv.StatusResponse(node="n1", shard_count=1, epoch=3, cluster_fingerprint="abc")
    for n in ("n1", "n2", "n3"):
        s.nodes.add(id=n, grpc=f"127.0.0.1:700{n[1]}", reachable=n != "n3" or reachable_n3)
    shard = s.shards.add(shard_id=0, leader=leader, term=4, commit_index=commit)
    shard.replicas.extend(["n1", "n2", "n3"])
    for n in ("n1", "n2", "n3"):
        shard.replica_status.add(
            node=n, last_applied=applied_n3 if n == "n3" else commit, keys=10, leader=leader
        )
    return s


def text(view: object) -> str:
    console = Console(width=140, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(view)
    return console.export_text()


def test_rates_come_from_two_samples_and_the_laggard_is_named() -> None:
    before = Sample(
        10.0, status("n1", 100, 100), "e", {"n1": kv.StatusResponse(requests_handled=50)}
    )
    after = Sample(
        12.0, status("n1", 300, 250), "e", {"n1": kv.StatusResponse(requests_handled=250)}
    )
    out = text(render(before, after))
    shard_row = next(
        line
        for line in out.splitlines()
        if line.startswith("│") and line.split("│")[1].strip() == "0"
    )
    assert "100" in shard_row.split("│")[5]  # (300 - 100) entries / 2 s
    assert "50 (n3)" in shard_row  # n3 applied 250 of 300
    n1_row = next(line for line in out.splitlines() if line.startswith("│ n1"))
    assert n1_row.split("│")[4].strip() == "100"  # (250 - 50) RPCs / 2 s


def test_an_unreachable_node_and_a_leader_change_are_shown() -> None:
    before = Sample(1.0, status("n3", 5, 5), "e", {})
    after = Sample(2.0, status("n2", 6, 5, reachable_n3=False), "e", {"n1": kv.StatusResponse()})
    changes = leader_changes(before, after)
    assert [(c.shard, c.before, c.after, c.term) for c in changes] == [(0, "n3", "n2", 4)]
    out = text(render(before, after, changes))
    n3_row = next(line for line in out.splitlines() if line.startswith("│ n3"))
    assert "NO" in n3_row
    assert any("n3" in line and "n2" in line and "│ 0 " in line for line in out.splitlines())


def test_no_node_answering_is_one_line_that_says_so() -> None:
    out = text(render(None, Sample(1.0, None, error="127.0.0.1:1: UNAVAILABLE: refused")))
    assert "no node answered" in out and "UNAVAILABLE" in out
