"""A node: hosts this process's shard replicas, routes a shard id to its leader, owns the data dir.

Routing, for a request on shard ``s`` arriving at any node:

* this node holds ``s``'s leader → run it locally;
* otherwise forward it, once, to the node believed to lead ``s`` (from the local replica, or a
  cache fed by the hints in replies), with a deadline. A forwarded request is never forwarded
  again: the receiver either serves it or answers UNAVAILABLE naming the leader it knows;
* no leader known yet → wait, bounded by ``leader_wait_s``, for an election, then UNAVAILABLE
  with whatever hint exists.

The data dir holds ``node.json`` (node id and cluster fingerprint, checked at every start so a
data dir can never be served under another identity or cluster) and ``shard-<s>/``. Every
replica's files are checked before the node starts (see :mod:`raftkv.raft.storage`): a node
with a corrupt or incomplete replica refuses to start and lists them all, unless told to
rebuild them from their peers (``recover_from_peers``).

Exposure rules, checked here at start-up: a Raft port on a non-loopback address needs a
cluster secret or peer TLS (or anyone who reaches it could pose as a peer), and a gRPC port on
a non-loopback address needs client authentication (tokens or client certificates).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc

from raftkv import __version__
from raftkv._pb.raftkv.v1 import admin_pb2 as admin
from raftkv._pb.raftkv.v1 import admin_pb2_grpc as admin_grpc
from raftkv._pb.raftkv.v1 import forward_pb2_grpc as fwd_grpc
from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv._pb.raftkv.v1 import kv_pb2_grpc as kv_grpc
from raftkv.admission import Gate
from raftkv.config import ClusterConfig, ConfigError, NodeSettings, split_hostport
from raftkv.durable import write_file
from raftkv.errors import (
    LEADER_ENDPOINT_METADATA,
    LEADER_METADATA,
    SHARD_METADATA,
    ClusterMismatch,
    NotLeader,
    RaftKVError,
    StorageError,
    Unavailable,
    rpc_error,
)
from raftkv.forwarding import Forwarder
from raftkv.network import Dialer, is_loopback, node_dialer, peer_contexts
from raftkv.raft.driver import RaftDriver
from raftkv.raft.handshake import Secret
from raftkv.raft.link import LinkSecurity
from raftkv.raft.storage import ReplicaStorage, create_recovering, open_storage, set_aside
from raftkv.replica import Replica
from raftkv.ring import Ring
from raftkv.shard import ShardReplica
from raftkv.statemachine import digest_of
from raftkv.view import META_SHARD, VIEW_KEY, ClusterView, group_name

log = logging.getLogger("raftkv.node")

T = TypeVar("T")
# Makes this node's replica of a group from its opened storage (see Node.__init__).
ReplicaFactory = Callable[[int, ReplicaStorage], Replica]
FORWARDED_METADATA = "raftkv-forwarded"
DATA_FORMAT = 2  # node.json "format": 2 = checksummed journals and snapshots
VIEW_FILE = "view.pb"
# The incarnation of every peer this node has linked with (see _check_incarnation).
PEERS_FILE = "peers.json"
# How often a node checks the meta group for a newer cluster view.
VIEW_REFRESH_S = 0.5
# After a fetch prompted by a newer epoch found nothing newer, the next waits this long.
ENSURE_EPOCH_HOLD_S = 0.5
# After a peer refuses a connection, do not try it again for this long.
PEER_BACKOFF_S = 0.3
# How long a node holding a voter of the shard waits for its own replica to learn the leader
# before it asks the group's other replicas (about an election's worth).
VOTER_PATIENCE_S = 1.5


class Peer:
    """A gRPC link to another node, opened lazily and reused."""

    def __init__(self, node_id: str, endpoint: str, dialer: Dialer) -> None:
        self.node_id = node_id
        self.endpoint = endpoint
        self._dialer = dialer
        self._channel: grpc.aio.Channel | None = None
        # Stubs are cached: building one creates a callable per RPC method.
        self._kv: kv_grpc.KVStub | None = None
        self._cluster: kv_grpc.ClusterStub | None = None
        self._admin: admin_grpc.AdminStub | None = None
        self._forwarding: fwd_grpc.ForwardingStub | None = None
        self.failed_at = 0.0

    @property
    def admin(self) -> admin_grpc.AdminStub:
        if self._admin is None:
            self._admin = admin_grpc.AdminStub(self.channel)
        return self._admin

    @property
    def kv(self) -> kv_grpc.KVStub:
        if self._kv is None:
            self._kv = kv_grpc.KVStub(self.channel)
        return self._kv

    @property
    def forwarding(self) -> fwd_grpc.ForwardingStub:
        if self._forwarding is None:
            self._forwarding = fwd_grpc.ForwardingStub(self.channel)
        return self._forwarding

    @property
    def cluster(self) -> kv_grpc.ClusterStub:
        if self._cluster is None:
            self._cluster = kv_grpc.ClusterStub(self.channel)
        return self._cluster

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = self._dialer.channel(self.endpoint)
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
            self._kv = self._cluster = None
            self._admin = self._forwarding = None


class Node:
    """One ``raftkv serve`` process."""

    def __init__(
        self,
        cluster: ClusterConfig,
        settings: NodeSettings,
        view: ClusterView | None = None,
        *,
        bootstrapped: bool = True,
        replica_factory: ReplicaFactory | None = None,
    ) -> None:
        """Start from the newest of: the view saved in the data dir, ``view`` (what a joining
        node was given), and the view the cluster file bootstraps (``bootstrapped``: the
        ``cluster`` given is a real cluster file, not one made from a view).

        After bootstrap, the cluster file no longer decides membership or placement.

        ``replica_factory`` makes each replica from its opened storage: by default a
        :class:`~raftkv.shard.ShardReplica` on this node's Raft thread; tests hand it fakes
        (:mod:`raftkv.testing.fake_replica`).
        """
        self.cluster = cluster
        self.settings = settings
        self.id = settings.node_id
        saved = load_saved_view(settings.data_dir)
        self._bootstrap = ClusterView.bootstrap(cluster) if bootstrapped else None
        candidates = [v for v in (saved, view, self._bootstrap) if v is not None]
        if not candidates:
            raise ConfigError(
                f"no cluster view: give --cluster (a new cluster), --join (a new node of a "
                f"running cluster), or a data dir that holds one ({settings.data_dir})"
            )
        self.view = max(candidates, key=lambda v: v.epoch)
        if self._bootstrap is not None and self._bootstrap.cluster_id != self.view.cluster_id:
            raise ClusterMismatch(
                f"data dir {settings.data_dir} holds the view of cluster "
                f"{self.view.cluster_id}, but the cluster file is for "
                f"{self._bootstrap.cluster_id}; "
                "the cluster file only bootstraps a cluster: keep it as it was, or omit "
                "--cluster (the node remembers its view); to start another cluster, give "
                "it another --data-dir (or delete this one: its data is lost)"
            )
        if view is not None and view.cluster_id != self.view.cluster_id:
            raise ClusterMismatch(
                f"{settings.data_dir / VIEW_FILE} belongs to cluster {self.view.cluster_id}, "
                f"not {view.cluster_id}; use another --data-dir"
            )
        self.cluster_id = self.view.cluster_id
        if self.view.node(self.id) is None:
            raise ConfigError(
                f"node {self.id!r} is not a member of the cluster (members: "
                f"{', '.join(self.view.node_ids)}); add it with raftkv admin member add, or "
                "start it with serve --join"
            )
        self.ring = Ring(self.view.shards, self.view.vnodes)
        security = settings.security
        link_security = self._check_exposure()
        self._dialer = node_dialer(security.grpc_tls, security.peer_tls)
        self.peers: dict[str, Peer] = {}
        self.forwarder = Forwarder(self)
        self.via_leader_requests = 0
        # Leader balancing: (shard, target) -> (not before, last delay) after an attempt.
        self._transfer_backoff: dict[tuple[int, str], tuple[float, float]] = {}
        self.requests_handled = 0  # RPCs answered (counted by the server's guard)
        self._sync_peers()
        self._leader_cache: dict[int, str] = {}
        # {} on a new data dir: a node.json means "this node has been a member", so a shard
        # directory missing later is state that was lost (see _open_storages).
        node_json = self._check_data_dir()
        # Made once per data dir: peers remember it, so this node id coming back with an
        # empty data dir (and no memory of its votes) is refused instead of voting blind.
        self.incarnation = str(node_json.get("incarnation") or secrets.token_hex(8))
        self._known_incarnations = self._load_incarnations()
        storages = self._open_storages(bool(node_json), meta_known=bool(node_json.get("meta")))
        if not node_json.get("meta") or not node_json.get("incarnation"):
            # Written only now, once the replicas opened (and for data dirs from before the
            # meta group and incarnations, to record them).
            self._write_node_json()
        self._save_view(self.view)
        self.driver = RaftDriver(
            self.view,
            self.id,
            settings.raft,
            link_security,
            incarnation=self.incarnation,
            check_incarnation=self._check_incarnation,
        )
        self._replica: ReplicaFactory = replica_factory or self._shard_replica
        self.replicas: dict[int, Replica] = {}
        for s, storage in storages.items():
            self.replicas[s] = self._replica(s, storage)
        self.started = False
        # Moves that cannot progress and why (written by the mover while this node leads
        # the meta group), for status.
        self.stuck_moves: dict[int, str] = {}
        # Set when a newer view no longer lists this node: it stops serving.
        self.removed = asyncio.Event()
        self._view_lock = asyncio.Lock()
        # Digests walk every key: one at a time per node, and only a few callers may queue.
        self._digest_gate = Gate(1, max_waiting=4, what="a data digest")

    @property
    def endpoints(self) -> dict[str, str]:
        return self.view.endpoints()

    def _shard_replica(self, shard_id: int, storage: ReplicaStorage) -> ShardReplica:
        group = self.view.group(shard_id)
        return ShardReplica(
            shard_id,
            self.id,
            [n for n in group.replicas if n != self.id],
            storage,
            self.driver,
            joining=self.id not in group.replicas,
        )

    def _sync_peers(self) -> list[Peer]:
        """Make the gRPC peers match the view; return the ones no longer in it."""
        want = {n.id: n.grpc for n in self.view.nodes if n.id != self.id}
        gone = [p for nid, p in self.peers.items() if want.get(nid) != p.endpoint]
        for p in gone:
            del self.peers[p.node_id]
        for nid, endpoint in want.items():
            if nid not in self.peers:
                self.peers[nid] = Peer(nid, endpoint, self._dialer)
        return gone

    def group_dir(self, shard_id: int) -> Path:
        name = "meta" if shard_id == META_SHARD else f"shard-{shard_id}"
        return self.settings.data_dir / name

    # -- the cluster view ---------------------------------------------------------------------

    # -- incarnations (a node id that lost its data dir) ---------------------------------------

    def _load_incarnations(self) -> dict[str, str]:
        path = self.settings.data_dir / PEERS_FILE
        try:
            known = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise StorageError(f"{path} is unreadable ({e}); move it aside") from None
        if not isinstance(known, dict):
            raise StorageError(f"{path} is not a JSON object; move it aside")
        return {str(k): str(v) for k, v in known.items()}

    def _save_incarnations(self) -> None:
        data = json.dumps(self._known_incarnations, indent=2, sort_keys=True) + "\n"
        write_file(self.settings.data_dir / PEERS_FILE, data.encode(), overwrite=True)

    def _check_incarnation(self, peer_id: str, incarnation: str) -> str:
        """Why a peer's Raft link must be refused ("" to accept it); on the Raft thread."""
        known = self._known_incarnations.get(peer_id)
        if known == incarnation:
            return ""
        if known is None:
            self._known_incarnations[peer_id] = incarnation
            try:
                self._save_incarnations()
            except OSError as e:
                log.error("cannot record %s's incarnation: %s", peer_id, e.strerror or e)
            return ""
        return (
            f"{peer_id} came back with a new data dir (incarnation {incarnation}, this node "
            f"knew {known}): it lost its state, and with it its votes, so it must not take part; "
            f"remove it (raftkv admin member remove {peer_id} --dead) and start it again with "
            "serve --join, or restore its data dir"
        )

    def _forget_incarnations(self, view: ClusterView) -> None:
        """A node that left the view may come back (serve --join) with a new data dir."""
        gone = [n for n in self._known_incarnations if view.node(n) is None]
        for n in gone:
            del self._known_incarnations[n]
        if gone:
            self._save_incarnations()

    def bootstrap_view(self) -> ClusterView:
        """The view the meta group holds before its first change (epoch 1)."""
        if self._bootstrap is None:
            raise Unavailable(
                "the meta group holds no cluster view yet and this node was not started "
                "from the cluster file; ask a node that was"
            )
        return self._bootstrap

    def _save_view(self, view: ClusterView) -> None:
        write_file(self.settings.data_dir / VIEW_FILE, view.encode(), overwrite=True)

    async def apply_view(self, view: ClusterView) -> bool:
        """Adopt a newer view: peers, Raft links, and the replicas this node hosts."""
        async with self._view_lock:
            if view.epoch <= self.view.epoch or view.cluster_id != self.cluster_id:
                return False
            old = self.view
            await asyncio.to_thread(self._save_view, view)
            self.view = view
            log.info(
                "cluster view epoch %d (was %d)%s",
                view.epoch,
                old.epoch,
                "; moves: " + "; ".join(view.moves()) if view.moves() else "",
            )
            for p in self._sync_peers():
                await p.close()
            raft_peers = {n.id: n.raft for n in view.nodes}

            def update_peers() -> None:
                self.driver.transport.set_peers(raft_peers)
                self._forget_incarnations(view)

            self.driver.call_soon(update_peers)
            if view.node(self.id) is None:
                log.warning("node %s is no longer a member of the cluster: stopping", self.id)
                self.removed.set()
                return True
            await self._reconcile_replicas()
            return True

    async def _reconcile_replicas(self) -> None:
        hosted = set(self.view.hosted_by(self.id))
        for s in sorted(set(self.replicas) - hosted):
            replica = self.replicas.pop(s)
            await self.driver.call(lambda r=replica: self.driver.remove(r))  # type: ignore[misc]
            directory = self.group_dir(s)
            await asyncio.to_thread(shutil.rmtree, directory, True)
            log.warning(
                "%s: this replica was removed from its group; stopped it and deleted %s",
                group_name(s),
                directory,
            )
        for s in sorted(hosted - set(self.replicas)):
            await self.open_replica(s)

    async def open_replica(self, shard_id: int) -> Replica:
        """Host a replica of a group this node is joining (empty, or what a crash left)."""
        existing = self.replicas.get(shard_id)
        if existing is not None:
            return existing
        directory = self.group_dir(shard_id)
        storage = await asyncio.to_thread(
            open_storage, directory, shard_id, durable=self.settings.raft.fsync
        )
        replica = await self.driver.call(lambda: self._replica(shard_id, storage))
        self.replicas[shard_id] = replica
        log.info(
            "%s: opened a replica here (%s)",
            group_name(shard_id),
            replica.info.problem or "a voter",
        )
        return replica

    async def ensure_epoch(self, epoch: int, timeout: float = 2.0) -> None:
        """Fetch the view if someone has seen a newer one than ours.

        Concurrent callers share one fetch, and a fetch that found nothing newer is not
        repeated for ENSURE_EPOCH_HOLD_S: a caller claiming an epoch that does not exist yet
        must not turn every request into a round of GetView calls."""
        if epoch <= self.view.epoch or time.monotonic() < self._epoch_hold_until:
            return
        if self._epoch_fetch is None or self._epoch_fetch.done():
            self._epoch_fetch = asyncio.ensure_future(self.refresh_view(timeout, epoch))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._epoch_fetch), timeout)
        if epoch > self.view.epoch:
            self._epoch_hold_until = time.monotonic() + ENSURE_EPOCH_HOLD_S

    _epoch_fetch: asyncio.Future[None] | None = None
    _epoch_hold_until = 0.0

    async def refresh_view(self, timeout: float = 1.0, min_epoch: int = 0) -> None:
        """Adopt the newest view the meta group holds: locally if we host it, else asked.

        Our own meta replica is trusted only while its leader is reachable and it holds at
        least ``min_epoch``. A replica removed from the meta group is never told so: it keeps
        believing in its last leader while every peer has closed its link, and a node that
        trusted it would never learn that it was removed."""
        meta = self.replicas.get(META_SHARD)
        if meta is not None:
            entry = meta.read_local(VIEW_KEY)
            if entry is not None:
                await self.apply_view(ClusterView.decode(entry.value))
            leader = meta.info.leader
            reachable = leader == self.id or self.driver.transport.is_connected(leader)
            if leader and reachable and self.view.epoch >= min_epoch:
                return  # our replica follows a leader: it is as fresh as a peer's would be
            # Cut off, refused by its peers, or behind a caller: ask them over gRPC.
        hosts = [self.peers[n] for n in self.view.meta.hosts if n in self.peers]

        async def ask(peer: Peer) -> ClusterView | None:
            try:
                reply = await peer.admin.GetView(
                    admin.GetViewRequest(), timeout=timeout, metadata=self.node_metadata()
                )
                return ClusterView.from_proto(reply)
            except (grpc.aio.AioRpcError, ValueError):
                return None

        views = [v for v in await asyncio.gather(*(ask(p) for p in hosts)) if v is not None]
        if views:
            await self.apply_view(max(views, key=lambda v: v.epoch))

    def node_metadata(self) -> tuple[tuple[str, str], ...]:
        """What this node sends on its own calls to other nodes (set by the server's guard)."""
        return self._node_metadata

    def set_node_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._node_metadata = metadata

    _node_metadata: tuple[tuple[str, str], ...] = ()

    async def watch_view(self) -> None:
        while True:
            await asyncio.sleep(VIEW_REFRESH_S)
            try:
                await self.refresh_view()
            except Exception:
                log.exception("refreshing the cluster view failed")

    def _check_exposure(self) -> LinkSecurity:
        """Refuse to expose a port without protection; build the Raft port's security."""
        me = self.view.node(self.id)
        assert me is not None
        security = self.settings.security
        raft_host, _ = split_hostport(me.raft, f"nodes.{self.id}.raft")
        if not is_loopback(raft_host) and not self.cluster.secret and security.peer_tls is None:
            raise ConfigError(
                f"refusing to start: the Raft port {me.raft} is not a loopback address and "
                "there is no cluster secret (--secret-file or RAFTKV_RAFT_SECRET) or peer TLS "
                "(--peer-cert-file/--peer-key-file/--peer-trusted-ca-file): anyone who can "
                "reach it could pose as a peer"
            )
        grpc_host, _ = split_hostport(me.grpc, f"nodes.{self.id}.grpc")
        client_certs = security.grpc_tls is not None and security.grpc_tls.client_cert_auth
        if not is_loopback(grpc_host) and not security.auth and not client_certs:
            raise ConfigError(
                f"refusing to start: the gRPC port {me.grpc} is not a loopback address and "
                "clients are not authenticated: set --auth-token-file or --auth-key-file "
                "(bearer tokens) or --client-cert-auth (client certificates)"
            )
        if not is_loopback(grpc_host) and security.auth and security.grpc_tls is None:
            log.warning(
                "the gRPC port %s is not loopback and has no TLS: bearer tokens cross the "
                "network in clear text (set --cert-file/--key-file)",
                me.grpc,
            )
        tls_server = tls_client = None
        if security.peer_tls is not None:
            tls_server, tls_client = peer_contexts(security.peer_tls)
        return LinkSecurity(
            node_id=self.id,
            fingerprint=self.cluster_id,
            secret=Secret(self.cluster.secret) if self.cluster.secret else None,
            tls_server=tls_server,
            tls_client=tls_client,
        )

    def _open_storages(self, initialized: bool, *, meta_known: bool) -> dict[int, ReplicaStorage]:
        """Open and check every replica's files; rebuild or refuse the broken ones.

        A shard directory that is missing on a node that has run before was removed (by an
        operator, or with its disk): it is rebuilt from its peers, safely, as a recovering
        replica. A directory whose files fail their checks is refused unless
        ``recover_from_peers`` says to rebuild it (its files are kept aside).
        """
        storages: dict[int, ReplicaStorage] = {}
        problems: list[str] = []
        durable = self.settings.raft.fsync
        for s in self.view.hosted_by(self.id):
            directory = self.group_dir(s)
            group = self.view.group(s)
            has_peers = len(group.replicas) > 1
            missing = not directory.exists() or not any(directory.iterdir())
            voter = self.id in group.replicas
            if missing and (not initialized or not voter or (s == META_SHARD and not meta_known)):
                # A new node, a replica moving onto this node (it joins the group empty), or
                # the meta group on a data dir from before it existed.
                storages[s] = open_storage(directory, s, durable=durable)
                continue
            if missing:
                if not has_peers:
                    problems.append(
                        f"{group_name(s)}: {directory} is gone and has no other replica"
                    )
                    continue
                log.warning(
                    "%s: %s is missing or empty; rebuilding this replica from its peers "
                    "(it will not vote until it has caught up)",
                    group_name(s),
                    directory,
                )
                storages[s] = create_recovering(directory, s, durable=durable)
                continue
            try:
                storages[s] = open_storage(directory, s, durable=durable)
                continue
            except StorageError as e:
                if not self.settings.recover_from_peers:
                    problems.append(str(e))
                    continue
                reason = str(e)
            if not has_peers:
                problems.append(f"shard {s} has no other replica to recover from: {reason}")
                continue
            aside = set_aside(directory)
            log.warning(
                "shard %d: %s; moved the directory to %s and rebuilding this replica from its "
                "peers (it will not vote until it has caught up)",
                s,
                reason,
                aside,
            )
            storages[s] = create_recovering(directory, s, durable=durable)
        if problems:
            for st in storages.values():
                st.journal._destroy()
            hint = (
                ""
                if self.settings.recover_from_peers or "--recover-from-peers" in problems[0]
                else " (to rebuild the broken replicas from their peers, which keeps the "
                "broken files aside: raftkv serve --recover-from-peers)"
            )
            raise StorageError(f"refusing to start node {self.id}: " + "; ".join(problems) + hint)
        return storages

    def _check_data_dir(self) -> dict[str, object]:
        """Check the data dir is ours and writable; its node.json ({} if it is new)."""
        d = self.settings.data_dir
        probe = d / ".write-test"
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StorageError(
                f"the data dir {d} is not writable: {e.strerror or e}; check its permissions, "
                "the mount (read-only?) and free space"
            ) from None
        meta_path = d / "node.json"
        if meta_path.exists():
            try:
                have = json.loads(meta_path.read_text())
                if not isinstance(have, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:
                raise StorageError(f"{meta_path} is unreadable ({e})") from None
            if have.get("node_id") != self.id:
                raise ClusterMismatch(
                    f"data dir {d} belongs to node {have.get('node_id')!r}, not {self.id!r}; "
                    "use that node's id or another --data-dir"
                )
            if have.get("cluster_fingerprint") != self.cluster_id:
                raise ClusterMismatch(
                    f"data dir {d} was created by a cluster with fingerprint "
                    f"{have.get('cluster_fingerprint')}, but this cluster's is "
                    f"{self.cluster_id}; the cluster file only bootstraps a cluster: to change "
                    "its nodes use raftkv admin member add/remove, and keep the file as it was"
                )
            if have.get("format") != DATA_FORMAT:
                raise StorageError(
                    f"data dir {d} was written by raftkv 0.1 (no checksums); this version "
                    "cannot serve it. Move it aside and start the node with an empty data dir "
                    "so it rebuilds from its peers"
                )
            return have
        return {}

    def _write_node_json(self) -> None:
        meta_path = self.settings.data_dir / "node.json"
        want = {
            "node_id": self.id,
            "cluster_fingerprint": self.cluster_id,
            "format": DATA_FORMAT,
            # This data dir has had a meta group directory (if the view placed one here) since
            # it was created: a missing one is lost state, not an upgrade from before 0.3.
            "meta": True,
            "incarnation": self.incarnation,
        }
        write_file(meta_path, (json.dumps(want, indent=2) + "\n").encode(), overwrite=True)

    def start(self) -> None:
        self.driver.start()
        self.started = True
        log.info(
            "node %s up: shards %s, cluster %s",
            self.id,
            sorted(group_name(s) for s in self.replicas),
            self.cluster_id,
        )

    async def stop(self) -> None:
        self.started = False
        await asyncio.to_thread(self.driver.stop)
        for p in self.peers.values():
            await p.close()

    # -- routing ---------------------------------------------------------------------------

    def shard_for(self, key: bytes) -> int:
        return self.ring.shard_for(key)

    def leader_of(self, shard_id: int) -> str:
        replica = self.replicas.get(shard_id)
        if replica is not None and replica.info.leader:
            return replica.info.leader
        cached = self._leader_cache.get(shard_id, "")
        return "" if cached == self.id else cached  # we led it once; we do not now

    def learn_leader(self, shard_id: int, leader: str) -> None:
        if leader and leader in self.endpoints:
            self._leader_cache[shard_id] = leader

    def unavailable(self, shard_id: int, why: str) -> Unavailable:
        leader = self.leader_of(shard_id)
        hint = f"; the last known leader is {leader}" if leader else "; no leader is known"
        return Unavailable(
            f"shard {shard_id}: {why}{hint}",
            shard_id=shard_id,
            leader=leader,
            leader_endpoint=self.endpoints.get(leader, ""),
        )

    def _next_target(self, shard_id: int, tried: set[str], patient: bool) -> str:
        """The node to forward to: the known leader, else any replica not tried lately."""
        now = time.monotonic()
        leader = self.leader_of(shard_id)
        peer = self.peers.get(leader)
        if peer is not None and now - peer.failed_at > PEER_BACKOFF_S:
            return leader
        replica = self.replicas.get(shard_id)
        if patient and replica is not None and not replica.joining:
            return ""  # we are a voter: our own group learns the leader within an election
        # A replica still joining hears from no leader until it has been added, and one whose
        # addition a new leader truncated hears from none at all (the leader does not know it):
        # ask the others, whose replies name the leader.
        for n in self.view.group(shard_id).replicas:
            peer = self.peers.get(n)
            if peer is not None and n not in tried and now - peer.failed_at > PEER_BACKOFF_S:
                return n
        return ""

    async def route(
        self,
        shard_id: int,
        local: Callable[[Replica], Awaitable[T]],
        remote: Callable[[Peer, float], Awaitable[T]],
        *,
        forwarded: bool,
        deadline: float,
    ) -> T:
        """Run a request at the shard's leader: here, or one hop away."""
        if not self.started:
            raise Unavailable(f"node {self.id} is starting or stopping", shard_id=shard_id)
        tried: set[str] = set()
        started = time.monotonic()
        delay = 0.01
        # A follower replica here can reach its leader over the Raft link (see
        # ShardReplica.via_leader): cheaper than a gRPC hop, and the reply is built here.
        # Once that fails (leader changed, or it refused), this request forwards over gRPC.
        # Not for the meta group: view updates run at its leader, one at a time.
        through_raft = not forwarded and shard_id != META_SHARD
        while True:
            replica = self.replicas.get(shard_id)
            if replica is not None and (replica.is_leader or (through_raft and replica.via_leader)):
                leading = replica.is_leader
                try:
                    result = await local(replica)
                except NotLeader:
                    # Lost leadership between the check and the proposal: route again.
                    through_raft = through_raft and leading
                else:
                    if not leading:
                        self.via_leader_requests += 1
                    return result
            elif forwarded:
                if replica is not None:
                    raise replica.not_leader()
                raise self.unavailable(shard_id, f"node {self.id} holds no replica")
            else:
                patient = time.monotonic() - started < VOTER_PATIENCE_S
                target = self._next_target(shard_id, tried, patient)
                if target:
                    tried.add(target)
                    peer = self.peers[target]
                    remaining = deadline - time.monotonic()
                    timeout = min(self.settings.forward_timeout_s, max(remaining, 0.05))
                    err: RaftKVError
                    try:
                        return await remote(peer, timeout)
                    except grpc.aio.AioRpcError as e:
                        err = rpc_error(e)
                    except Unavailable as e:  # a bulk part the peer could not serve
                        err = e
                    if not isinstance(err, Unavailable):
                        raise err from None
                    if err.epoch > self.view.epoch:
                        # Our view is older than the peer's: it may route this shard elsewhere.
                        await self.ensure_epoch(err.epoch)
                    if err.leader and err.leader != target:
                        self.learn_leader(shard_id, err.leader)
                    else:
                        peer.failed_at = time.monotonic()
                        self._leader_cache.pop(shard_id, None)
                    log.warning("forwarding shard %d to %s failed: %s", shard_id, target, err)
            if time.monotonic() + delay > deadline:
                raise self.unavailable(shard_id, "no leader could serve the request in time")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    # -- leader balance --------------------------------------------------------------------

    def rebalance_once(self) -> bool:
        """Hand one shard's leadership away if this node leads more than its share.

        Elections are random, so one node often wins most shards (the first to start, or the
        survivor of a failure) and then does most of the work. Like TiKV's PD leader balancing,
        but local: each node judges from its own replicas' view and gives away at most one
        leadership per call, to the replica leading the fewest shards.
        """
        shards = {s: r for s, r in self.replicas.items() if s != META_SHARD}
        leaders = {s: r.info.leader for s, r in shards.items() if r.info.leader}
        if len(leaders) < len(shards) or not shards:
            return False  # an election is in progress somewhere: leave it alone
        counts = {n: 0 for n in self.view.node_ids}
        for leader in leaders.values():
            counts[leader] = counts.get(leader, 0) + 1
        fair = -(-len(shards) // self.view.replicas)  # ceil(hosted / R)
        mine = [s for s, leader in leaders.items() if leader == self.id]
        if len(mine) <= fair:
            return False
        now = time.monotonic()
        transport = self.driver.transport
        for shard in mine:
            # Only to a peer we can reach: a node that is down leads nothing, so it always
            # looks like the best target, and pysyncobj declines every transfer to it.
            others = [
                n
                for n in shards[shard].members
                if n != self.id
                and n in counts
                and transport.is_connected(n)
                and self._transfer_backoff.get((shard, n), (0.0, 0.0))[0] <= now
            ]
            target = min(others, key=lambda n: counts[n], default="")
            if target and counts[target] + 1 < len(mine):
                # Should the transfer not happen (the target lags, or is slow), the next try
                # for this pair waits longer: 3 s, 6 s, ... up to a minute.
                _, delay = self._transfer_backoff.get((shard, target), (0.0, 1.5))
                delay = min(delay * 2, 60.0)
                self._transfer_backoff[(shard, target)] = (now + delay, delay)
                log.info(
                    "shard %d: moving leadership to %s (%s leads %d shards, fair share %d)",
                    shard,
                    target,
                    self.id,
                    len(mine),
                    fair,
                )
                self.replicas[shard].transfer_leadership(target)
                return True
        return False

    async def balance_leaders(self, interval_s: float = 3.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.rebalance_once()
            except Exception:
                log.exception("leader balancing failed")

    # -- status ----------------------------------------------------------------------------

    async def local_status(self, digest: bool = False) -> kv.StatusResponse:
        resp = self._status_skeleton()
        if digest:
            await self._digest_gate.acquire()
        try:
            for s, replica in sorted(self.replicas.items()):
                info = replica.info
                status = kv.ReplicaStatus(
                    node=self.id,
                    role=info.role,
                    term=info.term,
                    commit_index=info.commit_index,
                    last_applied=info.last_applied,
                    leader=info.leader,
                    keys=info.keys,
                    problem=info.problem,
                )
                if digest and s != META_SHARD:
                    # Copy on the Raft thread (cheap), hash on a worker thread: the Raft thread
                    # must keep ticking every group while a large map is walked.
                    status.last_applied, items = await replica.snapshot_items()
                    status.digest = await asyncio.to_thread(digest_of, items)
                _group_status(resp, s).replica_status.append(status)
        finally:
            if digest:
                self._digest_gate.release()
        self._summarize(resp)
        return resp

    def _status_skeleton(self) -> kv.StatusResponse:
        links = self.driver.transport.link_states()
        view = self.view
        load = {n: 0 for n in view.node_ids}
        for _, g in enumerate(view.placement):
            for n in g.hosts:
                load[n] = load.get(n, 0) + 1
        return kv.StatusResponse(
            node=self.id,
            stuck_moves=[f"{group_name(s)}: {why}" for s, why in sorted(self.stuck_moves.items())],
            forwarded_requests=self.forwarder.calls,
            forward_batches=self.forwarder.batches,
            via_leader_requests=self.via_leader_requests,
            requests_handled=self.requests_handled,
            version=__version__,
            shard_count=view.shards,
            vnodes=view.vnodes,
            cluster_fingerprint=self.cluster_id,
            epoch=view.epoch,
            moves=view.moves(),
            nodes=[
                kv.NodeInfo(
                    id=n.id,
                    grpc=n.grpc,
                    raft=n.raft,
                    raft_link=links.get(n.id, ""),
                    state=n.state,
                    meta=n.id in view.meta.hosts,
                    replicas=load.get(n.id, 0),
                )
                for n in view.nodes
            ],
            shards=[
                kv.ShardStatus(shard_id=s, replicas=list(g.hosts))
                for s, g in enumerate(view.placement)
            ],
            meta=kv.ShardStatus(shard_id=META_SHARD, replicas=list(view.meta.hosts)),
        )

    @staticmethod
    def _summarize(resp: kv.StatusResponse) -> None:
        """Fill each shard's leader/term/commit from its replicas' own views."""
        for shard in [*resp.shards, resp.meta]:
            leaders = [r for r in shard.replica_status if r.role == "leader"]
            best = max(leaders, key=lambda r: r.term) if leaders else None
            shard.leader = best.node if best else ""
            shard.term = max((r.term for r in shard.replica_status), default=0)
            shard.commit_index = (
                best.commit_index
                if best
                else max((r.commit_index for r in shard.replica_status), default=0)
            )

    async def cluster_status(
        self, timeout: float, digest: bool = False, metadata: tuple[tuple[str, str], ...] = ()
    ) -> kv.StatusResponse:
        """Every node's view merged: ask each peer for its local status, with a deadline.

        ``metadata`` carries the caller's credentials, so each peer checks them itself.
        """
        resp = self._status_skeleton()
        local = await self.local_status(digest)
        views: dict[str, kv.StatusResponse | None] = {self.id: local}

        async def ask(peer: Peer) -> None:
            try:
                view = await peer.cluster.Status(
                    kv.StatusRequest(local_only=True, digest=digest),
                    timeout=timeout,
                    metadata=metadata,
                )
            except grpc.aio.AioRpcError:
                views[peer.node_id] = None
                return
            if view.cluster_fingerprint != self.cluster_id:
                log.warning(
                    "node %s reports cluster fingerprint %s, ours is %s: ignoring its status",
                    peer.node_id,
                    view.cluster_fingerprint,
                    self.cluster_id,
                )
                views[peer.node_id] = None
                return
            views[peer.node_id] = view

        await asyncio.gather(*(ask(p) for p in self.peers.values()))
        for view in views.values():
            if view is not None and view is not local:
                resp.stuck_moves.extend(m for m in view.stuck_moves if m not in resp.stuck_moves)
        for n in resp.nodes:
            n.reachable = views.get(n.id) is not None
        for view in views.values():
            if view is None:
                continue
            for shard in [*view.shards, view.meta]:
                if shard.shard_id == META_SHARD or shard.shard_id < len(resp.shards):
                    target = _group_status(resp, shard.shard_id)
                    target.replica_status.extend(shard.replica_status)
        for shard in [*resp.shards, resp.meta]:
            order = {n: i for i, n in enumerate(shard.replicas)}
            ordered = sorted(shard.replica_status, key=lambda r: order.get(r.node, 99))
            del shard.replica_status[:]
            shard.replica_status.extend(ordered)
            for r in ordered:
                self.learn_leader(shard.shard_id, r.leader)
        self._summarize(resp)
        return resp


def load_saved_view(data_dir: Path) -> ClusterView | None:
    """The last cluster view this data dir's node saw, if it has run before."""
    path = data_dir / VIEW_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return ClusterView.decode(data)
    except (ValueError, KeyError) as e:
        raise StorageError(
            f"{path} is damaged ({e}); move it aside and start the node with --cluster (or "
            "--join): it then fetches the current view from the meta group"
        ) from None


def _group_status(resp: kv.StatusResponse, shard_id: int) -> kv.ShardStatus:
    return resp.meta if shard_id == META_SHARD else resp.shards[shard_id]


def leader_trailers(err: Unavailable) -> tuple[tuple[str, str], ...]:
    md: list[tuple[str, str]] = []
    if err.leader:
        md.append((LEADER_METADATA, err.leader))
    if err.leader_endpoint:
        md.append((LEADER_ENDPOINT_METADATA, err.leader_endpoint))
    if err.shard_id is not None:
        md.append((SHARD_METADATA, str(err.shard_id)))
    return tuple(md)
