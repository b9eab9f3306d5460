"""raftkv: a sharded, Raft-replicated key-value store.

Architecture map (see DESIGN.md for the long form)::

    client ──gRPC (TLS)──▶ any node: server.py   safe decode → Guard → handler → node
                        │  admission.py   bounded RPCs in flight; Gate for expensive calls
                        │  auth.py        bearer tokens → identity → role (read/readwrite/admin)
                        │  ring.py        key   → shard      (mmh3, virtual nodes)
                        │  view.py        the cluster view: nodes, shard → replicas/target,
                        │                 an epoch; one immutable object, swapped whole
                        │  placement.py   bootstrap placement; minimal-movement rebalancing
                        │  membership.py  at the meta leader: view CAS + the replica mover
                        │  node.py        leader here? run it : forward once (caller's token);
                        │                 opens and checks every replica's files at start-up
                        ▼
                     replica.py  Replica: the one seam the code above sees (propose,
                        │        read_index, read_local, info, change_member, ...)
                     shard.py    ShardReplica, the real Replica: asyncio ⇄ Raft thread,
                        │        read barriers, fsync, disk failures, recovery term fence
                        ├─ raft/        the Raft engine; it and shard.py alone import
                        │               pysyncobj (see its map): group (pysyncobj patches),
                        │               conf_change (membership entries), driver (one
                        │               thread ticks every group of the node), wire
                        │               (protobuf frames, never pickle), handshake (peer
                        │               proof / mTLS), link (limits, TLS), transport (mux),
                        │               journal + snapshot + storage (checksummed, checked)
                        └─ statemachine.py pure KV map + dedup; command.py is its log format

    networking:  network.py   every gRPC channel, credential and Raft TLS context
                 certs.py     CA, node and client certificates; credentials.py ties certs,
                              the cluster secret and tokens into serve flags
    client side: client.py  ring + leader cache, retries with backoff, bulk calls
                 batcher.py concurrent puts/gets of one client share one bulk RPC per node

    tools:       cli.py (serve, client, admin, shell, certs, auth, local up, demo, bench),
                 demo.py, bench.py
                 shell.py interactive shell: one client session, a table of commands
    testing/:    cluster.py LocalCluster of real processes (plain or secure); nemesis.py
                 faults under load; history.py + linearizability.py check histories;
                 files.py reads journal layouts for storage fault tests; fake_replica.py
                 an in-memory Replica for testing server and node logic without Raft
    throttle.py: log lines the outside world can trigger are rate-limited

Public API: :class:`Client` / :class:`SyncClient`, the errors in :mod:`raftkv.errors`, and the
configuration types in :mod:`raftkv.config`. Test helpers live in :mod:`raftkv.testing`.
"""

from raftkv.client import Client, GetResult, SyncClient
from raftkv.config import ClusterConfig, NodeAddress, NodeSettings
from raftkv.errors import (
    ClusterMismatch,
    InvalidArgument,
    KeyNotFound,
    NoSpace,
    NotLeader,
    Overloaded,
    PermissionDenied,
    PreconditionFailed,
    ProposalTimeout,
    RaftKVError,
    StorageError,
    Unauthenticated,
    Unavailable,
)
from raftkv.network import ClientTLS

__all__ = [
    "Client",
    "ClientTLS",
    "ClusterConfig",
    "ClusterMismatch",
    "GetResult",
    "InvalidArgument",
    "KeyNotFound",
    "NoSpace",
    "NodeAddress",
    "NodeSettings",
    "NotLeader",
    "Overloaded",
    "PermissionDenied",
    "PreconditionFailed",
    "ProposalTimeout",
    "RaftKVError",
    "StorageError",
    "SyncClient",
    "Unauthenticated",
    "Unavailable",
]
__version__ = "0.1.0"
