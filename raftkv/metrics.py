"""Prometheus metrics of one node: what an operator scrapes, graphs and alerts on.

Names follow etcd's where raftkv has a counterpart (``etcd_server_is_leader`` is
``raftkv_server_is_leader`` here, ``etcd_disk_wal_fsync_duration_seconds`` is
``raftkv_disk_wal_fsync_duration_seconds``), and gRPC's follow go-grpc-prometheus
(``grpc_server_handled_total``), so existing dashboards and alerts carry over. Every shard
metric has a ``shard`` label; the meta group is ``shard="meta"``.

Two kinds, so that the request path pays almost nothing:
- events (proposals, reads, fsyncs, snapshots, RPCs) are counted where they happen, from any
  thread: prometheus_client's metrics lock themselves;
- state (leadership, term, indexes, journal size, epoch, forwarding counters) is read when
  scraped, from each replica's last :class:`~raftkv.replica.ReplicaInfo` and the node's
  counters, by :class:`NodeCollector`.

The HTTP endpoint (``serve --metrics-addr``) is prometheus_client's own server on its own
thread: a scrape never waits for, or blocks, the event loop or the Raft thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from raftkv.config import ConfigError
from raftkv.errors import Unavailable
from raftkv.view import META_SHARD

if TYPE_CHECKING:
    from raftkv.replica import ReplicaInfo

# Latency buckets from 0.5 ms to 10 s: a loopback commit takes about a millisecond, a
# write stuck behind an election seconds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024,
    2.048, 4.096, 10.0,
)  # fmt: skip

PROPOSALS_COMMITTED = Counter(
    "raftkv_server_proposals_committed",
    "Proposals this node made that committed and applied.",
    ["shard"],
)
PROPOSALS_FAILED = Counter(
    "raftkv_server_proposals_failed",
    "Proposals this node made that failed or whose outcome is unknown (timeouts).",
    ["shard"],
)
PROPOSALS_PENDING = Gauge(
    "raftkv_server_proposals_pending",
    "Proposals this node made that have not committed yet.",
    ["shard"],
)
PROPOSAL_DURATION = Histogram(
    "raftkv_server_proposal_duration_seconds",
    "From proposing a command to its being applied on this node.",
    ["shard"],
    buckets=LATENCY_BUCKETS,
)
READ_INDEX_DURATION = Histogram(
    "raftkv_server_read_index_duration_seconds",
    "Time a linearizable read waits for its ReadIndex round (or barrier) and the apply.",
    ["shard"],
    buckets=LATENCY_BUCKETS,
)
READ_INDEX_FAILED = Counter(
    "raftkv_server_read_indexes_failed",
    "Linearizable reads whose ReadIndex round failed (no leader, no quorum, timeout).",
    ["shard"],
)
WAL_FSYNC_DURATION = Histogram(
    "raftkv_disk_wal_fsync_duration_seconds",
    "fdatasync of a shard journal (one per group-commit round and journal).",
    buckets=LATENCY_BUCKETS,
)
SNAPSHOT_SAVE_DURATION = Histogram(
    "raftkv_snapshot_save_duration_seconds",
    "Writing a shard's snapshot (log compaction); _count is the number of snapshots.",
    buckets=LATENCY_BUCKETS,
)
COMPACTION_DURATION = Histogram(
    "raftkv_log_compaction_duration_seconds",
    "Rewriting a shard's journal after a snapshot; _count is the number of compactions.",
    buckets=LATENCY_BUCKETS,
)
GRPC_HANDLED = Counter(
    "grpc_server_handled",
    "RPCs completed on the server, by method and status code.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time from an RPC's arrival at the handler to its answer.",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)


@dataclass(frozen=True)
class ShardMetrics:
    """One shard's event metrics, with their labels resolved once (a lookup per request
    would cost more than the update)."""

    committed: Counter
    failed: Counter
    pending: Gauge
    proposal_duration: Histogram
    read_duration: Histogram
    read_failed: Counter

    @classmethod
    def for_shard(cls, shard: str) -> ShardMetrics:
        return cls(
            PROPOSALS_COMMITTED.labels(shard),
            PROPOSALS_FAILED.labels(shard),
            PROPOSALS_PENDING.labels(shard),
            PROPOSAL_DURATION.labels(shard),
            READ_INDEX_DURATION.labels(shard),
            READ_INDEX_FAILED.labels(shard),
        )


@dataclass(frozen=True)
class NodeState:
    """What the collector reads from the node at scrape time."""

    infos: Callable[[], list[ReplicaInfo]]
    epoch: Callable[[], int]
    forwarded_requests: Callable[[], int]
    forward_batches: Callable[[], int]
    via_leader_requests: Callable[[], int]


def shard_label(shard_id: int) -> str:
    return "meta" if shard_id == META_SHARD else str(shard_id)


class NodeCollector(Collector):
    """State metrics, read from the node when Prometheus scrapes."""

    def __init__(self, state: NodeState) -> None:
        self._state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._state
        gauges = {
            "is_leader": ("raftkv_server_is_leader", "1 if this replica leads its shard."),
            "has_leader": ("raftkv_server_has_leader", "1 if this replica knows a leader."),
            "term": ("raftkv_server_term", "The replica's current Raft term."),
            "commit": ("raftkv_server_commit_index", "Highest log index known committed."),
            "applied": ("raftkv_server_applied_index", "Highest log index applied here."),
            "lag": ("raftkv_server_apply_lag", "Committed entries not applied here yet."),
            "keys": ("raftkv_server_keys", "Keys in this replica's map."),
            "journal": ("raftkv_disk_journal_bytes", "Size of the replica's journal file."),
        }
        families = {k: GaugeMetricFamily(n, h, labels=["shard"]) for k, (n, h) in gauges.items()}
        changes = CounterMetricFamily(
            "raftkv_server_leader_changes_seen",
            "Leader changes this replica has seen since the node started.",
            labels=["shard"],
        )
        for info in s.infos():
            label = [shard_label(info.shard_id)]
            values = {
                "is_leader": float(info.role == "leader"),
                "has_leader": float(bool(info.leader)),
                "term": info.term,
                "commit": info.commit_index,
                "applied": info.last_applied,
                "lag": max(0, info.commit_index - info.last_applied),
                "keys": info.keys,
                "journal": info.journal_bytes,
            }
            for key, value in values.items():
                families[key].add_metric(label, float(value))
            changes.add_metric(label, float(info.leader_changes))
        yield from families.values()
        yield changes
        yield GaugeMetricFamily(
            "raftkv_cluster_epoch", "Epoch of the cluster view this node routes by.", s.epoch()
        )
        for name, doc, value in (
            (
                "raftkv_server_forwarded_requests",
                "Requests this node sent to another node's leader over gRPC (Forward).",
                s.forwarded_requests(),
            ),
            (
                "raftkv_server_forward_batches",
                "Forward calls this node made (each carries a batch of requests).",
                s.forward_batches(),
            ),
            (
                "raftkv_server_via_leader_requests",
                "Requests this node served as a follower through the leader over the Raft "
                "link (etcd's MsgProp and MsgReadIndex).",
                s.via_leader_requests(),
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)


def parse_address(address: str) -> tuple[str, int]:
    """``--metrics-addr``'s (host, port), or a ConfigError that says what is expected."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"--metrics-addr {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9101")
    return host.strip("[]"), int(port_text)


def start_endpoint(address: str, state: NodeState) -> None:
    """Serve ``/metrics`` on ``address`` (HOST:PORT) from a thread of its own."""
    host, port = parse_address(address)
    # etcd exposes no *_created series; they would double what a scrape carries.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    REGISTRY.register(NodeCollector(state))
    try:
        start_http_server(port, addr=host)
    except OSError as e:
        raise Unavailable(
            f"cannot serve metrics on {address}: {e.strerror or e} (is the port in use?)"
        ) from None
