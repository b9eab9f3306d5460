"""raftkv: a sharded, Raft-replicated key-value store.

Architecture map (see DESIGN.md for the long form)::

    client ──gRPC──▶ any node: server.py   validate → node → one error→status table
                        │  ring.py        key   → shard      (mmh3, virtual nodes)
                        │  placement.py   shard → replicas   (deterministic from the file)
                        │  node.py        leader here? run it : forward once to the leader
                        ▼
                     shard.py  ShardReplica: the only pysyncobj user; asyncio ⇄ Raft thread
                        │       RaftDriver: one thread ticks every group of the node
                        ├─ transport.py    one Raft port, frames tagged by shard id
                        └─ statemachine.py pure KV map + dedup; command.py is its log format

    client side: client.py  ring + leader cache, retries with backoff, bulk calls
                 batcher.py concurrent puts/gets of one client share one bulk RPC per node

    tools:       cli.py (serve, client, local up, demo, bench), demo.py, bench.py
    testing/:    cluster.py LocalCluster of real processes; nemesis.py faults under load;
                 history.py + linearizability.py record and check histories

Public API: :class:`Client` / :class:`SyncClient`, the errors in :mod:`raftkv.errors`, and the
configuration types in :mod:`raftkv.config`. Test helpers live in :mod:`raftkv.testing`.
"""

from raftkv.client import Client, GetResult, SyncClient
from raftkv.config import ClusterConfig, NodeAddress, NodeSettings
from raftkv.errors import (
    ClusterMismatch,
    InvalidArgument,
    KeyNotFound,
    NotLeader,
    Overloaded,
    PreconditionFailed,
    ProposalTimeout,
    RaftKVError,
    Unavailable,
)

__all__ = [
    "Client",
    "ClusterConfig",
    "ClusterMismatch",
    "GetResult",
    "InvalidArgument",
    "KeyNotFound",
    "NodeAddress",
    "NodeSettings",
    "NotLeader",
    "Overloaded",
    "PreconditionFailed",
    "ProposalTimeout",
    "RaftKVError",
    "SyncClient",
    "Unavailable",
]
__version__ = "0.1.0"
