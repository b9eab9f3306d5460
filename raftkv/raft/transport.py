"""One Raft port per node, multiplexing every shard group over one connection per peer.

pysyncobj's own ``TCPTransport`` gives every group its own port, poller and thread, and
pickles its messages. Here a :class:`MuxTransport` owns the node's single listening socket
and one authenticated :class:`~raftkv.raft.link.Link` per peer node; every frame is a
protobuf ``RaftFrame`` tagged with the shard id (:mod:`raftkv.raft.wire`). Each shard's
``SyncObj`` gets a thin :class:`ShardTransport` (a pysyncobj ``Transport``) that tags outgoing
and routes incoming messages.

Everything here runs on the node's single Raft thread (see ``driver.RaftDriver``): sockets are
driven by the shared poller, so no locks or cross-thread queues are needed.

Per pair of nodes the one with the larger id dials; the links authenticate as described in
:mod:`raftkv.raft.handshake`. A link that passed authentication replaces an older one from the
same peer (the peer restarted). Strangers are bounded: at most :data:`MAX_PENDING_LINKS`
unauthenticated connections at a time, :data:`MAX_PENDING_PER_HOST` from one address, each
with a handshake deadline and a byte cap. When either cap is reached the *oldest* pending
connection is closed, not the newest: a peer reconnecting always gets its turn, and idle
connections cannot lock the cluster out, nor run the node out of file descriptors. Nothing an
unauthenticated connection says changes a peer's state; log lines it can trigger are
throttled per source address.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pysyncobj.node import Node
from pysyncobj.poller import POLL_EVENT_TYPE, Poller
from pysyncobj.transport import Transport

from raftkv.config import split_hostport
from raftkv.raft import handshake as hs
from raftkv.raft import wire
from raftkv.raft.link import Link, LinkLimits, LinkSecurity, LinkState, tune_socket
from raftkv.throttle import Throttle

log = logging.getLogger("raftkv.transport")

RECONNECT_INTERVAL_S = 0.5
PING_INTERVAL_S = 0.5
# A peer that refused us (other cluster file, other secret) is retried this much less often.
REFUSED_BACKOFF_S = 5.0
MAX_PENDING_LINKS = 64
MAX_PENDING_PER_HOST = 16
LISTEN_BACKLOG = 64


class RaftBindError(RuntimeError):
    """The Raft port could not be bound (in use, or the address is not local)."""


@dataclass
class _Peer:
    """One peer node: its address, its authenticated link, and why it is down if it is."""

    node_id: str
    host: str
    port: int
    link: Link | None = None  # authenticated and up
    dialing: Link | None = None
    last_attempt: float = 0.0
    last_ping: float = 0.0
    problem: str = ""  # why the link is down, for status and logs
    logged_problem: str = ""
    unresolvable: bool = False
    terms: dict[int, int] = field(default_factory=dict)
    verified: bool = False  # its incarnation was accepted on the current link


def _host_port(address: str | None, node_id: str) -> tuple[str, int] | None:
    return split_hostport(address, f"nodes.{node_id}.raft") if address else None


_INTERCEPTED = frozenset({wire.READ_INDEX, wire.READ_INDEX_RESPONSE, "apply_command"})


class ShardTransport(Transport):  # type: ignore[misc]
    """The view of the mux that one shard's ``SyncObj`` sees."""

    def __init__(
        self,
        mux: MuxTransport,
        shard_id: int,
        peers: dict[str, Node],
        on_activity: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(None, None, list(peers.values()))
        self._mux = mux
        self.shard_id = shard_id
        self.peers = peers
        # Tells the Raft thread this group has news and needs a tick soon.
        self._on_activity = on_activity
        # fsync mode: may keep a reply back (True) until the entries it acknowledges are on
        # disk; the replica sends it later with send_held.
        self.hold: Callable[[Node, dict[str, Any]], bool] | None = None
        # ReadIndex (see ShardReplica): a leader stamps what it sends with its current read
        # round; a follower echoes, in its reply, the round of the last AppendEntries it got
        # from that peer; a leader keeps the highest round each peer has echoed.
        self.read_round = 0
        self.read_acks: dict[str, int] = {}
        self._echo: dict[str, int] = {}
        # Replica recovery: ``accept`` may drop a message before pysyncobj sees it;
        # ``delivered`` looks at it after pysyncobj has handled it.
        self.accept: Callable[[str, dict[str, Any]], bool] | None = None
        self.delivered: Callable[[str, dict[str, Any]], None] | None = None
        # Messages for the replica rather than pysyncobj: follower reads, and commands a
        # follower forwards, which the leader screens first. True: handled, pysyncobj never
        # sees it.
        self.intercept: Callable[[str, dict[str, Any]], bool] | None = None
        # Whatever handling a message raised (a failed journal write, most likely): it must
        # not escape into the poller and cut the other links' events short.
        self.on_error: Callable[[Exception], None] = lambda e: log.error(
            "shard %d: handling a Raft message failed: %r", shard_id, e
        )

    def send(self, node: Node, message: Any) -> bool:
        kind = message.get("type")
        if kind == "append_entries":
            message["read_round"] = self.read_round
        elif kind == "next_node_idx":
            message["read_round"] = self._echo.get(node.id, 0)
            if self.hold is not None and self.hold(node, message):
                return True
        return self._mux.send(node.id, self.shard_id, message)

    def send_held(self, node: Node, message: dict[str, Any]) -> bool:
        return self._mux.send(node.id, self.shard_id, message)

    # pysyncobj calls these when a membership change is appended (or undone): messages from a
    # node that is no longer a voter are ignored from then on.
    def addNode(self, node: Node) -> None:
        self.peers[node.id] = node
        if self._mux.is_connected(node.id):
            # The link came up before this group knew the node: pysyncobj sends entries only
            # to nodes it has seen connect.
            self._onNodeConnected(node)

    def announce_links(self) -> None:
        """Tell a group created at runtime about the links that are already up."""
        for peer_id, node in self.peers.items():
            if self._mux.is_connected(peer_id):
                self._onNodeConnected(node)

    def dropNode(self, node: Node) -> None:
        self.peers.pop(node.id, None)

    def deliver(self, peer_id: str, message: dict[str, Any]) -> None:
        node = self.peers.get(peer_id)
        if node is None:
            if message.get("type") != "append_entries":
                return
            # Raft (dissertation §4.1) has a follower accept entries from a leader its own
            # configuration does not name yet: its log lags behind the change that added that
            # leader (it installed an older snapshot, or restarted on an old log), and those
            # entries are how it learns. Dropping them left a new replica deaf to its leader,
            # campaigning forever. Votes from non-members stay ignored, so a removed replica
            # cannot disrupt the group.
            node = Node(peer_id)
        try:
            if self.accept is not None and not self.accept(peer_id, message):
                return
            kind = message.get("type")
            if kind in _INTERCEPTED and (
                self.intercept is None or self.intercept(peer_id, message)
            ):
                self._on_activity()
                return
            if kind == "append_entries":
                # pysyncobj answers it (if it accepts the sender's term) within this call
                self._echo[peer_id] = message.get("read_round", 0)
            elif kind == "next_node_idx":
                read_round = message.get("read_round", 0)
                if read_round > self.read_acks.get(peer_id, 0):
                    self.read_acks[peer_id] = read_round
            self._onMessageReceived(node, message)
            if self.delivered is not None:
                self.delivered(peer_id, message)
        except Exception as e:
            self.on_error(e)
        self._on_activity()

    def peer_connected(self, peer_id: str) -> None:
        node = self.peers.get(peer_id)
        if node is not None:
            self._onNodeConnected(node)

    def peer_disconnected(self, peer_id: str) -> None:
        node = self.peers.get(peer_id)
        if node is not None:
            self._onNodeDisconnected(node)

    @property
    def ready(self) -> bool:
        return True

    def tryGetReady(self) -> None:
        return None

    def waitReady(self) -> None:
        return None

    def destroy(self) -> None:
        self._mux.detach(self.shard_id)


class MuxTransport:
    """The node's Raft port: one listener, one link per peer, frames tagged by shard."""

    def __init__(
        self,
        nodes: Mapping[str, str],
        node_id: str,
        poller: Poller,
        *,
        security: LinkSecurity,
        limits: LinkLimits | None = None,
        shard_terms: Callable[[], dict[int, int]] = dict,
        on_peer_state: Callable[[str, dict[int, int]], None] = lambda _p, _t: None,
        incarnation: str = "",
        check_incarnation: Callable[[str, str], str] = lambda _p, _i: "",
    ) -> None:
        self._addresses = dict(nodes)
        self._node_id = node_id
        self._poller = poller
        self._security = security
        self._limits = limits or LinkLimits()
        self._shard_terms = shard_terms
        self._on_peer_state = on_peer_state
        # Ours, sent first on every link; a peer's is checked by check_incarnation, which
        # answers why the link must be refused ("" to accept it).
        self._incarnation = incarnation
        self._check_incarnation = check_incarnation
        self._shards: dict[int, ShardTransport] = {}
        self._peers: dict[str, _Peer] = {}
        self.set_peers(nodes)
        # Accepted, not yet authenticated, oldest first (a dict keeps insertion order).
        self._pending: dict[Link, str] = {}
        self._closing: set[Link] = set()  # closed, still draining a refusal
        self._to_flush: list[Link] = []  # links with frames queued this loop turn
        self._listen: socket.socket | None = None
        self._ip = "0.0.0.0"
        self._throttle = Throttle(interval_s=10.0)

    # -- lifecycle -------------------------------------------------------------------------

    def bind(self) -> None:
        host, port = split_hostport(self._addresses[self._node_id], "raft address")
        try:
            ip = str(socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((ip, port))
                sock.listen(LISTEN_BACKLOG)
            except OSError:
                sock.close()
                raise
        except OSError as e:
            raise RaftBindError(
                f"cannot bind the Raft port {host}:{port}: {e.strerror or e}"
            ) from e
        sock.setblocking(False)
        self._poller.subscribe(sock.fileno(), self._accept, POLL_EVENT_TYPE.READ)
        self._listen = sock
        self._ip = ip
        sec = self._security
        mode = " + ".join(
            m for m, on in (("peer TLS", sec.tls), ("cluster secret", sec.secret)) if on
        )
        log.info(
            "raft port listening on %s:%d (shards multiplexed; peers authenticate with %s)",
            ip,
            port,
            mode or "nothing: loopback only",
        )

    def set_peers(self, nodes: Mapping[str, str]) -> None:
        """Make the peers match the cluster view (node id → Raft address); on the Raft thread.

        A node that left is disconnected and can no longer authenticate; a new one can.
        """
        self._addresses = dict(nodes)
        for node_id in list(self._peers):
            peer = self._peers[node_id]
            if (peer.host, peer.port) != _host_port(nodes.get(node_id), node_id):
                del self._peers[node_id]
                for link in (peer.link, peer.dialing):
                    if link is not None:
                        link.close(f"{node_id} left the cluster or moved")
                if peer.link is not None:
                    log.info("raft peer %s removed (cluster view changed)", node_id)
                    self._notify_down(node_id)
        for node_id, address in nodes.items():
            if node_id != self._node_id and node_id not in self._peers:
                host, port = split_hostport(address, f"nodes.{node_id}.raft")
                self._peers[node_id] = _Peer(node_id, host, port)

    def attach(self, shard: ShardTransport) -> None:
        self._shards[shard.shard_id] = shard

    def detach(self, shard_id: int) -> None:
        self._shards.pop(shard_id, None)

    def close(self) -> None:
        for peer in self._peers.values():
            for link in (peer.link, peer.dialing):
                if link is not None:
                    link.close("node stopping")
        for link in [*self._pending, *self._closing]:
            link.close("node stopping")
        if self._listen is not None:
            with contextlib.suppress(OSError, KeyError, ValueError):
                self._poller.unsubscribe(self._listen.fileno())
            self._listen.close()

    def is_connected(self, peer_id: str) -> bool:
        peer = self._peers.get(peer_id)
        return peer is not None and peer.link is not None and peer.verified

    def connected_peers(self) -> list[str]:
        return sorted(p.node_id for p in self._peers.values() if p.link is not None)

    def link_states(self) -> dict[str, str]:
        """peer → "up", or why it is down ("down: ..."), as this node sees it."""
        return {
            p.node_id: "up" if p.link is not None else f"down: {p.problem or 'not connected'}"
            for p in self._peers.values()
        }

    def peer_terms(self, peer_id: str) -> dict[int, int]:
        peer = self._peers.get(peer_id)
        return dict(peer.terms) if peer is not None else {}

    # -- sending ---------------------------------------------------------------------------

    def send(self, peer_id: str, shard_id: int, message: Any) -> bool:
        peer = self._peers.get(peer_id)
        if peer is None or peer.link is None or not peer.verified:
            return False
        try:
            frame = wire.encode(shard_id, message)
        except (wire.UnencodableMessage, KeyError, TypeError, ValueError) as e:
            if self._throttle.allow(f"encode:{type(e).__name__}"):
                log.error("shard %d: not sending a message to %s: %s", shard_id, peer_id, e)
            return False
        if peer.link.send_frame(frame):
            return True
        if self._throttle.allow(f"backlog:{peer_id}"):
            log.warning(
                "raft link to %s: %d bytes queued (limit %d); dropping messages until it "
                "drains (the peer or the network is too slow)",
                peer_id,
                peer.link.buffered,
                self._limits.max_send_buffer_bytes,
            )
        return False

    def flush(self) -> None:
        """Send what this loop turn queued: one send per link, however many frames."""
        links, self._to_flush = self._to_flush, []
        for link in links:
            link.flush()

    # -- periodic work (called on every full Raft tick) -----------------------------------------

    def tick(self) -> None:
        now = time.monotonic()
        for pending in [*self._pending, *self._closing]:
            pending.check_timeouts(now)
        self._closing = {link for link in self._closing if not link.finished}
        for peer in self._peers.values():
            for link in (peer.link, peer.dialing):
                if link is not None:
                    link.check_timeouts(now)
            if peer.link is not None:
                if now - peer.last_ping > PING_INTERVAL_S:
                    peer.last_ping = now
                    peer.link.send_frame(wire.encode_ping())
                continue
            if self._node_id < peer.node_id or peer.dialing is not None:
                continue  # the peer with the larger id dials
            if now - peer.last_attempt < RECONNECT_INTERVAL_S:
                continue
            peer.last_attempt = now
            self._dial(peer)

    def _dial(self, peer: _Peer) -> None:
        try:
            info = socket.getaddrinfo(peer.host, peer.port, socket.AF_INET, socket.SOCK_STREAM)
            ip = str(info[0][4][0])
        except OSError as e:
            # Docker's DNS forgets a stopped container: say so once, not every retry.
            if not peer.unresolvable:
                log.warning("cannot resolve peer %s (%s): %s", peer.node_id, peer.host, e)
                peer.unresolvable = True
                peer.problem = f"cannot resolve {peer.host}"
            return
        if peer.unresolvable:
            log.info("peer %s (%s) resolves again: %s", peer.node_id, peer.host, ip)
            peer.unresolvable = False
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Bind to our own Raft address first, so every Raft packet of this node carries it
            # and a firewall rule on it cuts exactly this node (the fault tests rely on it).
            sock.bind((self._ip, 0))
            tune_socket(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            err = sock.connect_ex((ip, peer.port))
        except OSError as e:
            sock.close()
            peer.problem = f"cannot connect: {e.strerror or e}"
            return
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            sock.close()
            peer.problem = "cannot connect"
            return
        peer.dialing = Link(
            self._poller,
            sock,
            dialer=True,
            remote=f"{ip}:{peer.port}",
            security=self._security,
            limits=self._limits,
            listener=self,
            expected_peer=peer.node_id,
        )

    # -- accepting ---------------------------------------------------------------------------

    def _accept(self, _fd: int, _event: int) -> None:
        assert self._listen is not None
        while True:
            try:
                sock, addr = self._listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if self._throttle.allow("accept"):
                    log.warning("accept on the Raft port failed: %s", e.strerror or e)
                return
            host, remote = str(addr[0]), f"{addr[0]}:{addr[1]}"
            self._make_room(host)
            try:
                tune_socket(sock)
            except OSError:
                sock.close()
                continue
            link = Link(
                self._poller,
                sock,
                dialer=False,
                remote=remote,
                security=self._security,
                limits=self._limits,
                listener=self,
            )
            if not link.closed:
                self._pending[link] = host

    def _make_room(self, host: str) -> None:
        """Evict the oldest pending connection if a cap is reached (see the module docstring)."""
        same_host = [link for link, h in self._pending.items() if h == host]
        if len(same_host) >= MAX_PENDING_PER_HOST:
            victim = same_host[0]
        elif len(self._pending) >= MAX_PENDING_LINKS:
            victim = next(iter(self._pending))
        else:
            return
        victim.close("closed to make room: too many connections are still authenticating")
        if self._throttle.allow(f"evict:{host}"):
            log.warning(
                "Raft port: %d connections are authenticating (%d from %s); closing the oldest "
                "to make room. Is something other than the cluster connecting?",
                len(self._pending),
                len(same_host),
                host,
            )

    # -- LinkListener ------------------------------------------------------------------------

    def check_hello(self, link: Link, hello: hs.Hello) -> None:
        peer = self._peers.get(hello.node_id)
        if peer is None:
            raise hs.HandshakeError(
                hs.RefuseCode.UNKNOWN_NODE,
                f"node {hello.node_id!r} is not a member of cluster {self._security.fingerprint}",
            )
        if link.dialer and hello.node_id != link.expected_peer:
            raise hs.HandshakeError(
                hs.RefuseCode.UNKNOWN_NODE,
                f"dialed {link.expected_peer} at {link.remote} but {hello.node_id} answered",
            )
        ours = self._security.secret is not None
        if hello.has_secret != ours:
            raise hs.HandshakeError(
                hs.RefuseCode.SECRET_MISMATCH,
                f"{'we have' if ours else 'we have no'} cluster secret and "
                f"{hello.node_id} {'has none' if ours else 'has one'}: set the same secret "
                "on every node",
            )
        if self._security.tls and link.cert_node_id != hello.node_id:
            raise hs.HandshakeError(
                hs.RefuseCode.CERTIFICATE,
                f"the TLS certificate names node {link.cert_node_id!r}, the hello claims "
                f"{hello.node_id!r} (issue node certificates with `raftkv certs node`)",
            )

    def admit(self, link: Link, hello: hs.Hello) -> None:
        if hello.fingerprint != self._security.fingerprint:
            raise hs.HandshakeError(
                hs.RefuseCode.FINGERPRINT,
                f"{hello.node_id} runs cluster {hello.fingerprint}, this node runs "
                f"{self._security.fingerprint} (the nodes were started from different "
                "cluster files)",
            )

    def flush_later(self, link: Link) -> None:
        self._to_flush.append(link)

    def link_up(self, link: Link) -> None:
        peer = self._peers.get(link.peer_id)
        if peer is None:
            link.close(f"{link.peer_id} left the cluster")
            return
        self._pending.pop(link, None)
        if peer.dialing is link:
            peer.dialing = None
        if peer.link is not None and peer.link is not link:
            old, peer.link = peer.link, None
            old.close(f"replaced by a new authenticated link from {peer.node_id}")
            self._notify_down(peer.node_id)
        peer.link = link
        peer.problem = peer.logged_problem = ""
        peer.last_ping = time.monotonic()
        log.info("raft link to %s up (%s)", peer.node_id, link.remote)
        # The shards hear of this peer, and may send it Raft messages, only once its
        # incarnation has been checked (its first frame; see _verified).
        peer.verified = False
        if self._incarnation:
            link.send_frame(wire.encode_incarnation(self._incarnation))
        link.send_frame(wire.encode_peer_state(self._shard_terms()))

    def _verified(self, link: Link, kind: str, body: Any) -> bool:
        """Check a new link's first frame: the peer's incarnation. False: refused, closed."""
        peer = self._peers.get(link.peer_id)
        if peer is None or peer.link is not link:
            return False
        if peer.verified:
            return True
        if kind == "incarnation":
            refusal = self._check_incarnation(link.peer_id, body)
            if refusal:
                peer.problem = refusal
                peer.last_attempt = time.monotonic() + REFUSED_BACKOFF_S
                if self._throttle.allow(f"incarnation:{link.peer_id}"):
                    log.error("refusing the Raft link from %s: %s", link.peer_id, refusal)
                link.close(refusal)
                return False
        # (A peer that sends no incarnation predates it: nothing to check.)
        peer.verified = True
        for shard in list(self._shards.values()):
            shard.peer_connected(peer.node_id)
        return True

    def frame_received(self, link: Link, payload: bytes) -> None:
        try:
            kind, shard_id, body = wire.decode(payload)
        except wire.MalformedFrame as e:
            if payload[:1] == bytes([hs.FrameType.REFUSE]) and self._security.secret is None:
                # Without a secret a link goes up on the peer's hello, before the peer has
                # checked ours: its refusal (say, we are not a member in its view) may arrive
                # after that. It is not a Raft frame; take it for what it is.
                code, reason = hs.parse_refuse(payload[1:])
                self.refused_by_peer(link, code, reason)
                link.close(f"refused by the peer: {reason}")
                return
            link.close(f"malformed frame from {link.peer_id}: {e}")
            log.error("dropping the Raft link to %s: %s", link.peer_id, e)
            return
        try:
            if not self._verified(link, kind, body):
                return
            if kind == "raft":
                shard = self._shards.get(shard_id)
                if shard is not None:
                    shard.deliver(link.peer_id, body)
            elif kind == "peer_state":
                peer = self._peers.get(link.peer_id)
                if peer is None:
                    return
                peer.terms = body
                self._on_peer_state(peer.node_id, body)
        except Exception:
            # Handling belongs to a shard (which reports its own storage errors); whatever
            # else escapes must not cut the poller's other events short.
            if self._throttle.allow(f"frame:{kind}"):
                log.exception("handling a %s frame from %s failed", kind, link.peer_id)

    def refused_by_peer(self, link: Link, code: int, reason: str) -> None:
        if not link.dialer:
            # Whoever connected to us can say anything before authenticating: a "refusal" on
            # a connection we accepted changes nothing (it must not postpone our dialling of
            # the peer it names, nor put its words into status) and is only logged, throttled.
            if self._throttle.allow(f"refused-in:{link.remote.rsplit(':', 1)[0]}"):
                log.warning(
                    "raft port: a connection from %s claiming to be %s said it refuses us: %s",
                    link.remote,
                    link.peer_id or "nobody",
                    reason,
                )
            return
        # A refusal on a connection we dialled comes from the address of that peer.
        peer = self._peers.get(link.expected_peer)
        problem = f"refused by {link.expected_peer}: {reason}"
        if peer is not None:
            peer.problem = problem
            peer.last_attempt = time.monotonic() + REFUSED_BACKOFF_S
        if self._throttle.allow(f"refused:{link.expected_peer}:{code}"):
            if code == hs.RefuseCode.UNKNOWN_NODE:
                # Normal for a moment after a join (the peer has not applied the view that
                # adds us yet) and for good after a removal: not a configuration error.
                log.warning(
                    "raft link to %s (%s) %s (it has not seen a view with this node yet, or "
                    "this node was removed)",
                    link.expected_peer,
                    link.remote,
                    problem,
                )
            else:
                log.error("raft link to %s (%s) %s", link.expected_peer, link.remote, problem)

    def link_closed(self, link: Link, reason: str) -> None:
        host = self._pending.pop(link, None)
        if link.state is LinkState.CLOSING:
            self._closing.add(link)  # its drain deadline is still checked on every tick
        for peer in self._peers.values():
            if peer.link is link:
                peer.link = None
                refused = peer.problem == reason  # we refused it, and said so (throttled)
                peer.problem = reason
                if not refused:
                    log.warning("raft link to %s down: %s", peer.node_id, reason)
                self._notify_down(peer.node_id)
                return
            if peer.dialing is link:
                peer.dialing = None
        if link.dialer:
            dialled = self._peers.get(link.expected_peer)
            if dialled is not None and dialled.link is None:
                dialled.problem = reason  # why our last attempt failed, for status
        elif (
            link.peer_id in self._peers
            and self._peers[link.peer_id].link is None
            and not reason.startswith("refused by the peer")
        ):
            # Our own words about a connection that only claimed to be this peer (never the
            # text it sent us: it had not authenticated).
            self._peers[
                link.peer_id
            ].problem = f"a connection claiming to be {link.peer_id} failed: {reason}"
        if reason not in ("node stopping", "the peer closed the connection") and not (
            reason.startswith("connect to") or reason.startswith("refused by the peer")
        ):
            # A connection that never authenticated: say why (a stranger, a misconfigured
            # node, a certificate problem), throttled per source address because strangers
            # choose how often and what they claim.
            who = link.peer_id or link.expected_peer or "an unauthenticated peer"
            direction = "to" if link.dialer else "from"
            if self._throttle.allow(f"reject:{host or link.remote}"):
                log.warning(
                    "raft port: closed the connection %s %s (%s): %s",
                    direction,
                    who,
                    link.remote,
                    reason,
                )

    def _notify_down(self, peer_id: str) -> None:
        for shard in list(self._shards.values()):
            shard.peer_disconnected(peer_id)
