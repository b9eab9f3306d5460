"""Configuration: the cluster file every node shares, and the settings of one node.

The cluster file is TOML::

    shards = 8            # number of Raft groups
    replicas = 3          # replicas per shard (<= number of nodes)
    # vnodes = 256        # ring points per shard (optional)
    # secret = "..."      # optional shared secret: encrypts and authenticates Raft traffic
    [nodes.n1]
    grpc = "127.0.0.1:7001"
    raft = "127.0.0.1:7101"

Everything here is a frozen dataclass: configuration is read once and never mutated. The
cluster *fingerprint* (a hash of shards, replicas, vnodes and the node table) is what nodes
compare on the Raft handshake and what ``DATA_DIR/node.json`` remembers, so two clusters can
never silently mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from raftkv.errors import InvalidArgument
from raftkv.ring import DEFAULT_VNODES

DEFAULT_GRPC = "127.0.0.1:7001"
DEFAULT_RAFT = "127.0.0.1:7101"
SECRET_ENV = "RAFTKV_RAFT_SECRET"
SECRET_FILE_ENV = "RAFTKV_SECRET_FILE"

MAX_KEY_BYTES = 4096
MAX_VALUE_BYTES = 1024 * 1024


class ConfigError(ValueError):
    """The cluster file or a flag is wrong; the message says what and where."""


def split_hostport(addr: str, what: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: expected HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class NodeAddress:
    id: str
    grpc: str
    raft: str


@dataclass(frozen=True)
class ClusterConfig:
    shards: int
    replicas: int
    nodes: tuple[NodeAddress, ...]
    vnodes: int = DEFAULT_VNODES
    secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ConfigError(f"shards must be >= 1, got {self.shards}")
        if not self.nodes:
            raise ConfigError("the cluster needs at least one [nodes.<id>] table")
        if not 1 <= self.replicas <= len(self.nodes):
            raise ConfigError(
                f"replicas must be between 1 and the number of nodes ({len(self.nodes)}), "
                f"got {self.replicas}"
            )
        seen: set[str] = set()
        for n in self.nodes:
            for addr in (n.grpc, n.raft):
                split_hostport(addr, f"nodes.{n.id}")
                if addr in seen:
                    raise ConfigError(f"address {addr} is used twice in the cluster file")
                seen.add(addr)

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(n.id for n in self.nodes)

    def node(self, node_id: str) -> NodeAddress:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise ConfigError(
            f"node {node_id!r} is not in the cluster file (known: {', '.join(self.node_ids)})"
        )

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(
            {
                "shards": self.shards,
                "replicas": self.replicas,
                "vnodes": self.vnodes,
                "nodes": sorted([n.id, n.grpc, n.raft] for n in self.nodes),
            },
            sort_keys=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_toml(self) -> str:
        lines = [f"shards = {self.shards}", f"replicas = {self.replicas}"]
        if self.vnodes != DEFAULT_VNODES:
            lines.append(f"vnodes = {self.vnodes}")
        for n in self.nodes:
            lines += ["", f"[nodes.{n.id}]", f'grpc = "{n.grpc}"', f'raft = "{n.raft}"']
        return "\n".join(lines) + "\n"

    @classmethod
    def single_node(cls, grpc: str = DEFAULT_GRPC, raft: str = DEFAULT_RAFT) -> ClusterConfig:
        """The embedded default: one node, one replica per shard, on loopback."""
        return cls(shards=8, replicas=1, nodes=(NodeAddress("n1", grpc, raft),))

    @classmethod
    def local(
        cls, nodes: int, shards: int, replicas: int, base_port: int, host: str = "127.0.0.1"
    ) -> ClusterConfig:
        """A loopback cluster: node i gets gRPC base_port+i-1 and Raft base_port+100+i-1."""
        return cls(
            shards=shards,
            replicas=replicas,
            nodes=tuple(
                NodeAddress(f"n{i}", f"{host}:{base_port + i - 1}", f"{host}:{base_port + 99 + i}")
                for i in range(1, nodes + 1)
            ),
        )

    @classmethod
    def load(cls, path: str | Path) -> ClusterConfig:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"cluster file {p} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"cluster file {p} is not valid TOML: {e}") from None
        return cls.from_dict(raw, source=str(p))

    @classmethod
    def from_dict(cls, raw: dict[str, object], source: str = "cluster file") -> ClusterConfig:
        unknown = set(raw) - {"shards", "replicas", "vnodes", "secret", "nodes"}
        if unknown:
            known = "shards, replicas, vnodes, secret, nodes"
            raise ConfigError(
                f"{source}: unknown keys: {', '.join(sorted(unknown))} (known: {known})"
            )
        nodes_raw = raw.get("nodes")
        if not isinstance(nodes_raw, dict) or not nodes_raw:
            raise ConfigError(f"{source}: needs [nodes.<id>] tables with grpc and raft addresses")
        nodes = []
        for node_id, spec in nodes_raw.items():
            if not isinstance(spec, dict):
                raise ConfigError(f"{source}: [nodes.{node_id}] must be a table (grpc, raft)")
            # Unknown keys first: a typo (grcp =) is the likeliest reason one is missing.
            if set(spec) - {"grpc", "raft"}:
                extra = ", ".join(sorted(set(spec) - {"grpc", "raft"}))
                raise ConfigError(
                    f"{source}: [nodes.{node_id}] has unknown keys: {extra} "
                    "(a node table takes grpc and raft)"
                )
            if not {"grpc", "raft"} <= set(spec):
                missing = " and ".join(sorted({"grpc", "raft"} - set(spec)))
                raise ConfigError(f"{source}: [nodes.{node_id}] needs its {missing} address")
            nodes.append(NodeAddress(str(node_id), str(spec["grpc"]), str(spec["raft"])))
        secret = os.environ.get(SECRET_ENV) or raw.get("secret")
        try:
            return cls(
                shards=int(raw.get("shards", 8)),  # type: ignore[call-overload]
                replicas=int(raw.get("replicas", min(3, len(nodes)))),  # type: ignore[call-overload]
                nodes=tuple(nodes),
                vnodes=int(raw.get("vnodes", DEFAULT_VNODES)),  # type: ignore[call-overload]
                secret=str(secret) if secret else None,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None


MIN_SECRET_CHARS = 16


def read_secret_file(path: Path) -> str:
    """The cluster secret from a file (surrounding whitespace ignored)."""
    try:
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the secret file {path}: {e}") from None
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"the secret in {path} is {len(secret)} characters; use at least "
            f"{MIN_SECRET_CHARS} (for example: raftkv auth secret {path})"
        )
    return secret


@dataclass(frozen=True)
class Limits:
    """Sizes and counts a node accepts; beyond them it refuses with a clear error."""

    max_key_bytes: int = MAX_KEY_BYTES
    max_value_bytes: int = MAX_VALUE_BYTES
    # Requests one bulk call may carry.
    max_bulk_items: int = 10_000
    # Bytes of values one reply may carry (a GetMany listing a big key many times must not
    # make the node build gigabytes): keys past it fail with RESOURCE_EXHAUSTED, retryable.
    max_reply_bytes: int = 4 * 1024 * 1024
    # RPCs handled at once by this node; more are refused with RESOURCE_EXHAUSTED at once,
    # so an overload costs the excess a retry instead of costing everyone latency.
    max_concurrent_rpcs: int = 1024
    # Open gRPC connections; beyond it the server stops accepting (file descriptors must be
    # left for the journals and the Raft port).
    max_grpc_connections: int = 4096

    def check(self, key: bytes, value: bytes | None = None) -> None:
        if not key:
            raise InvalidArgument("key must not be empty")
        if len(key) > self.max_key_bytes:
            raise InvalidArgument(
                f"key is {len(key)} bytes; the limit is {self.max_key_bytes} bytes"
            )
        if value is not None and len(value) > self.max_value_bytes:
            raise InvalidArgument(
                f"value is {len(value)} bytes; the limit is {self.max_value_bytes} bytes"
            )


@dataclass(frozen=True)
class RaftTuning:
    """pysyncobj timing. Defaults favour fast failover on a LAN; see docs/reliability.md."""

    election_min_s: float = 0.4
    election_max_s: float = 1.0
    heartbeat_s: float = 0.05
    # A leader that hears from no quorum for this long steps down. Reads never rely on it
    # (they use a log barrier), it only bounds how long a cut-off leader keeps accepting.
    leader_fallback_s: float = 2.0
    connection_timeout_s: float = 3.0
    log_compaction_entries: int = 20000
    log_compaction_s: float = 600.0
    # Linearizable reads by ReadIndex (a heartbeat round confirms leadership, no log entry);
    # False: every batch of reads commits a barrier entry (--read-path log-barrier).
    read_index: bool = True
    # fsync the journal before an entry counts toward a commit (group commit on the node's
    # fsync thread), and term/vote before they are used: acknowledged writes survive power
    # loss. False only with `serve --unsafe-no-fsync`.
    fsync: bool = True


@dataclass(frozen=True)
class ServerTLS:
    """TLS on the gRPC port (etcd's --cert-file, --key-file, --trusted-ca-file)."""

    cert_file: Path
    key_file: Path
    # Verifies client certificates (with client_cert_auth) and other nodes' gRPC servers
    # when this node forwards a request.
    trusted_ca_file: Path | None = None
    client_cert_auth: bool = False


@dataclass(frozen=True)
class PeerTLS:
    """Mutual TLS on the Raft port (etcd's --peer-cert-file, --peer-key-file, ...)."""

    cert_file: Path
    key_file: Path
    trusted_ca_file: Path


@dataclass(frozen=True)
class Security:
    """How a node protects its two ports. The default (nothing) is allowed on loopback only."""

    grpc_tls: ServerTLS | None = None
    peer_tls: PeerTLS | None = None
    # Bearer tokens: a file of static tokens and/or a key that verifies minted tokens.
    auth_token_file: Path | None = None
    auth_key_file: Path | None = None

    @property
    def auth(self) -> bool:
        return self.auth_token_file is not None or self.auth_key_file is not None


@dataclass(frozen=True)
class NodeSettings:
    """What one ``raftkv serve`` process needs beyond the cluster file."""

    node_id: str
    data_dir: Path
    log_dir: Path
    limits: Limits = Limits()
    raft: RaftTuning = RaftTuning()
    security: Security = Security()
    # Rebuild every replica whose files fail their checks from its peers (the broken
    # directory is kept aside); without it the node refuses to start and says why.
    recover_from_peers: bool = False
    # How long a request waits for a shard to elect a leader before UNAVAILABLE.
    leader_wait_s: float = 3.0
    # Deadline of one proposal (and of one forwarded request).
    proposal_timeout_s: float = 5.0
    forward_timeout_s: float = 5.0
    # HOST:PORT of the Prometheus endpoint (/metrics); None: no endpoint.
    metrics_addr: str | None = None
