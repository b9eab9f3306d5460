"""``raftkv top``: a live terminal view of a running cluster, refreshed every second.

etcd has no such view, and an operator of a sharded store needs one more: which nodes are up
and how busy each is, who leads which shard, how far replicas lag, which shards take the load,
and which leaderships just moved. It reads the ``Cluster.Status`` API only (the shard table
from one node's fan-out, each node's own request counter from a local Status), so it works
against any cluster a client reaches: local processes, compose, Kubernetes.

:class:`Sampler` takes one sample of the cluster; :func:`render` turns two consecutive samples
into the view (rates are their differences), so the view is testable without a terminal.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv._pb.raftkv.v1 import kv_pb2_grpc as kv_grpc
from raftkv.network import Dialer
from raftkv.view import META_SHARD

# How many leader changes the view keeps.
RECENT_CHANGES = 8


@dataclass(frozen=True)
class Sample:
    """The cluster at one moment, as far as it answered."""

    at: float
    cluster: kv.StatusResponse | None  # one node's fan-out; None: no endpoint answered
    answered_by: str = ""
    # Node id -> that node's own Status (its counters); None where it did not answer.
    nodes: dict[str, kv.StatusResponse | None] = field(default_factory=dict)
    error: str = ""


@dataclass
class LeaderChange:
    at: float
    shard: int
    before: str
    after: str
    term: int


class Sampler:
    """Takes samples through the given endpoints (the first that answers gives the shards)."""

    def __init__(self, endpoints: Sequence[str], dialer: Dialer, timeout: float = 2.0) -> None:
        self._endpoints = list(endpoints)
        self._dialer = dialer
        self._timeout = timeout
        self._stubs: dict[str, kv_grpc.ClusterStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def _stub(self, endpoint: str) -> kv_grpc.ClusterStub:
        stub = self._stubs.get(endpoint)
        if stub is None:
            channel = self._dialer.channel(endpoint)
            self._channels.append(channel)
            stub = self._stubs[endpoint] = kv_grpc.ClusterStub(channel)
        return stub

    async def _status(self, endpoint: str, local_only: bool) -> kv.StatusResponse:
        reply: kv.StatusResponse = await self._stub(endpoint).Status(
            kv.StatusRequest(local_only=local_only),
            timeout=self._timeout,
            metadata=self._dialer.metadata,
        )
        return reply

    async def sample(self) -> Sample:
        cluster, answered_by, error = None, "", ""
        for endpoint in self._endpoints:
            try:
                cluster = await self._status(endpoint, local_only=False)
            except grpc.aio.AioRpcError as e:
                error = f"{endpoint}: {e.code().name}: {e.details()}"
                continue
            answered_by = endpoint
            break
        if cluster is None:
            return Sample(time.monotonic(), None, error=error or "no endpoint given")

        async def local(node: kv.NodeInfo) -> kv.StatusResponse | None:
            try:
                return await self._status(node.grpc, local_only=True)
            except grpc.aio.AioRpcError:
                return None

        answers = await asyncio.gather(*(local(n) for n in cluster.nodes))
        nodes = {n.id: a for n, a in zip(cluster.nodes, answers, strict=True)}
        return Sample(time.monotonic(), cluster, answered_by, nodes)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)


def leader_changes(before: Sample | None, after: Sample) -> list[LeaderChange]:
    """Shards whose leader differs between two samples."""
    if before is None or before.cluster is None or after.cluster is None:
        return []
    old = {s.shard_id: s for s in before.cluster.shards}
    changes = []
    for s in after.cluster.shards:
        prev = old.get(s.shard_id)
        if prev is not None and prev.leader != s.leader:
            changes.append(LeaderChange(after.at, s.shard_id, prev.leader, s.leader, s.term))
    return changes


def _rate(now: int, then: int | None, seconds: float) -> str:
    if then is None or seconds <= 0 or now < then:
        return "-"
    return f"{(now - then) / seconds:,.0f}"


def render(
    before: Sample | None,
    after: Sample,
    changes: Sequence[LeaderChange] = (),
    wall_clock: float | None = None,
) -> RenderableType:
    """The view of ``after``; rates are per second since ``before``."""
    clock = time.strftime("%H:%M:%S", time.localtime(wall_clock))
    if after.cluster is None:
        return Text(f"raftkv top  {clock}  no node answered: {after.error}", style="bold red")
    c = after.cluster
    seconds = after.at - before.at if before is not None else 0.0
    prev_nodes = before.nodes if before is not None else {}
    prev_shards: dict[int, kv.ShardStatus] = {}
    if before is not None and before.cluster is not None:
        b = before.cluster
        prev_shards = {
            s.shard_id: s for s in [*b.shards, *([b.meta] if b.HasField("meta") else [])]
        }
    led: dict[str, int] = {}
    for s in c.shards:
        if s.leader:
            led[s.leader] = led.get(s.leader, 0) + 1
    leaderless = sum(1 for s in c.shards if not s.leader)
    header = Text.assemble(
        ("raftkv top", "bold"),
        f"  {clock}  cluster {c.cluster_fingerprint}  epoch {c.epoch}  "
        f"{len(c.nodes)} nodes  {c.shard_count} shards  (from {after.answered_by})",
    )
    if leaderless:
        header.append(f"  {leaderless} shard(s) without a leader", style="bold red")

    nodes = Table(title="nodes", title_justify="left", expand=False)
    for column in ("NODE", "UP", "STATE", "RPC/S", "LEADS", "REPLICAS", "GRPC", "RAFT LINK"):
        nodes.add_column(column, justify="right" if column in ("RPC/S", "LEADS") else "left")
    for n in c.nodes:
        own = after.nodes.get(n.id)
        then = prev_nodes.get(n.id)
        up = own is not None
        nodes.add_row(
            n.id,
            Text("yes", style="green") if up else Text("NO", style="bold red"),
            n.state or "active",
            _rate(own.requests_handled, then.requests_handled if then else None, seconds)
            if own is not None
            else "-",
            str(led.get(n.id, 0)),
            str(n.replicas),
            n.grpc,
            n.raft_link or "(answering node)" if n.id == c.node else n.raft_link or "",
        )

    shards = Table(title="shards", title_justify="left", expand=False)
    for column in ("SHARD", "LEADER", "TERM", "COMMIT", "OPS/S", "MAX LAG", "KEYS", "REPLICAS"):
        shards.add_column(column, justify="left" if column in ("LEADER", "REPLICAS") else "right")
    for s in [*c.shards, *([c.meta] if c.HasField("meta") else [])]:
        lags = [
            (s.commit_index - r.last_applied, r.node)
            for r in s.replica_status
            if r.last_applied <= s.commit_index
        ]
        lag, laggard = max(lags) if lags else (0, "")
        prev = prev_shards.get(s.shard_id)
        shards.add_row(
            "meta" if s.shard_id == META_SHARD else str(s.shard_id),
            Text(s.leader, style="bold") if s.leader else Text("none", style="bold red"),
            str(s.term),
            f"{s.commit_index:,}",
            _rate(s.commit_index, prev.commit_index if prev else None, seconds),
            f"{lag:,} ({laggard})" if lag else "0",
            f"{max((r.keys for r in s.replica_status), default=0):,}",
            ",".join(s.replicas),
        )

    recent = Table(title="recent leader changes", title_justify="left", expand=False)
    for column in ("TIME", "SHARD", "FROM", "TO", "TERM"):
        recent.add_column(column)
    for ch in reversed(changes):
        recent.add_row(
            time.strftime("%H:%M:%S", time.localtime(time.time() - (time.monotonic() - ch.at))),
            "meta" if ch.shard == META_SHARD else str(ch.shard),
            ch.before or "none",
            ch.after or "none",
            str(ch.term),
        )
    if not changes:
        recent.add_row("-", "-", "-", "-", "-")
    parts: list[RenderableType] = [header, nodes, shards, recent]
    if c.moves:
        parts.append(Text("moves in progress: " + "; ".join(c.moves), style="yellow"))
    return Group(*parts)


async def run(
    sampler: Sampler,
    interval: float,
    iterations: int | None,
    show: Callable[[RenderableType], None],
) -> bool:
    """Sample every ``interval`` seconds and hand each view to ``show`` (a rich Live's
    update, or a printer); ``iterations`` bounds the number of views (None: until stopped).
    Returns whether the last view reached the cluster.

    With ``iterations``, a view waits for a second sample so that its rates are filled in;
    a sample that reached no node is shown at once (it has no rates to wait for), so a
    script against a cluster that is down gets its frames and an answer, never a hang."""
    changes: deque[LeaderChange] = deque(maxlen=RECENT_CHANGES)
    before: Sample | None = None
    shown = 0
    reached = False
    try:
        while iterations is None or shown < iterations:
            started = time.monotonic()
            after = await sampler.sample()
            reached = after.cluster is not None
            changes.extend(leader_changes(before, after))
            if before is not None or iterations is None or not reached:
                show(render(before, after, list(changes)))
                shown += 1
            if reached:
                before = after
            if iterations is not None and shown >= iterations:
                break
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
    finally:
        await sampler.close()
    return reached
