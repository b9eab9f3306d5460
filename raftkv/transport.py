"""One Raft port per node, multiplexing every shard group over one connection per peer.

pysyncobj's own ``TCPTransport`` gives every group its own port, poller and thread. A node
hosting eight shards would then listen on eight Raft ports. Here a :class:`MuxTransport` owns
the node's single listening socket and one TCP connection per peer node, and every frame is
tagged with the shard id: ``(shard_id, message)``. Each shard's ``SyncObj`` gets a thin
:class:`ShardTransport` (a pysyncobj ``Transport``) that tags outgoing and routes incoming
messages.

Everything here runs on the node's single Raft thread (see ``shard.RaftDriver``): sockets are
driven by the shared poller, so no locks or cross-thread queues are needed.

Connection set-up, per pair of nodes (the node with the larger id dials):

1. with a shared secret, the pysyncobj random-key exchange (Fernet encryption and replay
   protection, the same scheme as ``TCPTransport``);
2. a hello frame each way carrying the node id and the cluster fingerprint. A peer with a
   different fingerprint (started from another cluster file) is refused with a log line that
   says so, and is not retried more often than the reconnect interval.

Security note: frames are pickled (pysyncobj's messages are Python dicts). Bind the Raft port to a
private address only, and set a cluster ``secret`` when that network is shared.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import os
import pickle
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from pysyncobj.encryptor import getEncryptor
from pysyncobj.node import Node
from pysyncobj.poller import POLL_EVENT_TYPE, Poller
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.transport import Transport

from raftkv.config import ClusterConfig, split_hostport

log = logging.getLogger("raftkv.transport")

HELLO = "hello"
PING = "ping"
BUFFER_BYTES = 2**20
RECONNECT_INTERVAL_S = 0.5
PING_INTERVAL_S = 0.5
# A peer that refused us (other cluster file) is retried this much less often.
REFUSED_BACKOFF_S = 5.0
_LENGTH = struct.Struct("<I")


class RaftBindError(RuntimeError):
    """The Raft port could not be bound (in use, or the address is not local)."""


class _Peer:
    """One peer node: its address and the connection to it, once the handshake is done."""

    def __init__(self, node_id: str, host: str, port: int) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port
        self.conn: TcpConnection | None = None
        self.ready = False
        self.last_attempt = 0.0
        self.last_ping = 0.0
        self.refused_reason = ""
        self.unresolvable = False


class _SendBuffer:
    """Outgoing bytes as a queue of chunks: appending and partial sends cost O(chunk).

    pysyncobj keeps one ``bytes`` and re-copies all of it on every append and every partial
    send, which turns a large backlog (a follower catching up) quadratic.
    """

    COALESCE = 256 * 1024

    def __init__(self) -> None:
        self._chunks: collections.deque[memoryview] = collections.deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        if data:
            self._chunks.append(memoryview(data))
            self._size += len(data)

    def head(self) -> memoryview:
        """The next bytes to send; small frames are joined so one send() carries many."""
        first = self._chunks[0]
        if len(first) >= self.COALESCE or len(self._chunks) == 1:
            return first
        parts, total = [], 0
        while self._chunks and total < self.COALESCE:
            chunk = self._chunks.popleft()
            parts.append(chunk)
            total += len(chunk)
        joined = memoryview(b"".join(parts))
        self._chunks.appendleft(joined)
        return joined

    def consume(self, n: int) -> None:
        self._size -= n
        while n:
            first = self._chunks[0]
            if len(first) <= n:
                self._chunks.popleft()
                n -= len(first)
            else:
                self._chunks[0] = first[n:]
                n = 0


class _RaftConnection(TcpConnection):  # type: ignore[misc]
    """pysyncobj's TcpConnection with our framing, and outgoing sockets bound to our Raft IP.

    * No zlib: pysyncobj compresses every frame at level 3, which costs more CPU than it saves
      on a LAN. Frames here are ``len | pickle(protocol 5)`` (Fernet-encrypted with a secret).
    * ``connect`` binds to our own Raft address first, so every Raft packet of a node carries
      that address and a firewall rule on it cuts exactly that node (the fault tests rely on
      it); a multi-homed host sends Raft traffic from the configured interface.

    Both ends of every Raft connection are ours, so the framing only has to match itself.
    The overrides reach pysyncobj's name-mangled fields; pysyncobj is pinned to 0.3.17.
    """

    _TcpConnection__readBuffer: bytes
    _TcpConnection__writeBuffer: _SendBuffer | bytes
    recvLastTimestamp: int

    def __init__(self, source_ip: str | None = None, **kwargs: Any) -> None:
        self._read_offset = 0
        super().__init__(**kwargs)
        self._source_ip = source_ip

    def send(self, message: Any) -> None:
        if self.sendRandKey:
            message = (self.sendRandKey, message)
        data = pickle.dumps(message, protocol=5)
        if self.encryptor:
            data = self.encryptor.encrypt_at_time(data, int(time.monotonic()))
        self._send_buffer().append(_LENGTH.pack(len(data)) + data)
        self._TcpConnection__trySendBuffer()
        # pysyncobj only asks the poller for writability while handling a write event, so
        # bytes left over by a send made elsewhere would wait for the next read event.
        fileno = self._TcpConnection__fileno
        if (
            len(self._send_buffer())
            and fileno is not None
            and self.state == CONNECTION_STATE.CONNECTED
        ):
            self._TcpConnection__poller.subscribe(
                fileno,
                self._TcpConnection__processConnection,
                POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE | POLL_EVENT_TYPE.ERROR,
            )

    def _send_buffer(self) -> _SendBuffer:
        buf = self._TcpConnection__writeBuffer
        if not isinstance(buf, _SendBuffer):  # pysyncobj resets it to b"" on disconnect
            fresh = _SendBuffer()
            fresh.append(bytes(buf))
            self._TcpConnection__writeBuffer = buf = fresh
        return buf

    def _TcpConnection__processSend(self) -> bool:
        buf = self._send_buffer()
        if not buf:
            return False
        try:
            sent = self._TcpConnection__socket.send(buf.head())
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if sent <= 0:
            return False
        buf.consume(sent)
        return True

    def _TcpConnection__processParseMessage(self) -> Any:
        # Parse from an offset instead of slicing the whole buffer after every frame: a
        # backlog of many frames (a follower catching up) was copied once per frame.
        buf = self._TcpConnection__readBuffer
        off = self._read_offset if self._read_offset <= len(buf) else 0
        if len(buf) - off >= 4:
            (size,) = _LENGTH.unpack_from(buf, off)
            if len(buf) - off - 4 >= size:
                self._read_offset = off + 4 + size
                return self._decode(buf[off + 4 : off + 4 + size])
        if off:
            self._TcpConnection__readBuffer = buf[off:]
            self._read_offset = 0
        return None

    def _decode(self, data: bytes) -> Any:
        try:
            if self.encryptor:
                stamp = self.encryptor.extract_timestamp(data)
                if stamp < self.recvLastTimestamp:
                    raise ValueError("replayed frame")
                self.recvLastTimestamp = stamp
                data = self.encryptor.decrypt(data)
            message = pickle.loads(data)
            if self.recvRandKey:
                rand_key, message = message
                if rand_key != self.recvRandKey:
                    raise ValueError("frame from another session")
        except Exception as e:
            log.warning("dropping a Raft connection: undecodable frame (%s)", e)
            self.disconnect()
            return None
        return message

    def disconnect(self) -> None:
        self._read_offset = 0
        super().disconnect()

    def connect(self, host: str, port: int) -> bool:
        # pysyncobj 0.3.17's TcpConnection.connect, plus the bind().
        self._TcpConnection__state = CONNECTION_STATE.DISCONNECTED
        self._TcpConnection__fileno = None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if self._source_ip:
                sock.bind((self._source_ip, 0))
        except OSError:
            sock.close()
            return False
        _tune(sock)
        self._TcpConnection__socket = sock
        self.setSockoptKeepalive()
        self._TcpConnection__readBuffer = b""
        self._TcpConnection__writeBuffer = _SendBuffer()
        self._read_offset = 0
        self._TcpConnection__lastReadTime = time.monotonic()
        try:
            sock.connect((host, port))
        except OSError as e:
            if e.errno not in (errno.EINPROGRESS, errno.EWOULDBLOCK):
                return False
        self._TcpConnection__fileno = sock.fileno()
        self._TcpConnection__state = CONNECTION_STATE.CONNECTING
        self._TcpConnection__poller.subscribe(
            self._TcpConnection__fileno,
            self._TcpConnection__processConnection,
            POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE | POLL_EVENT_TYPE.ERROR,
        )
        return True


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER_BYTES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)


class _Listener:
    """The Raft port's listening socket, accepting into :class:`_RaftConnection`."""

    def __init__(
        self,
        poller: Poller,
        ip: str,
        port: int,
        on_connection: Callable[[_RaftConnection], None],
        timeout: float,
    ) -> None:
        self._poller = poller
        self._on_connection = on_connection
        self._timeout = timeout
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((ip, port))
            self._sock.listen(64)
        except OSError:
            self._sock.close()
            raise
        self._sock.setblocking(False)
        poller.subscribe(self._sock.fileno(), self._accept, POLL_EVENT_TYPE.READ)

    def _accept(self, _fd: int, _event: int) -> None:
        while True:
            try:
                sock, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept on the Raft port failed: %s", e)
                return
            _tune(sock)
            conn = _RaftConnection(
                poller=self._poller,
                socket=sock,
                timeout=self._timeout,
                sendBufferSize=BUFFER_BYTES,
                recvBufferSize=BUFFER_BYTES,
            )
            self._on_connection(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._poller.unsubscribe(self._sock.fileno())
        self._sock.close()


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
        # Runs before any message leaves (the fsync mode makes appends durable there).
        self.before_send: Callable[[Any], None] | None = None

    def send(self, node: Node, message: Any) -> bool:
        if self.before_send is not None:
            self.before_send(message)
        return self._mux.send(node.id, self.shard_id, message)

    def deliver(self, peer_id: str, message: Any) -> None:
        node = self.peers.get(peer_id)
        if node is not None:
            self._onMessageReceived(node, message)
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
    """The node's Raft port: one listener, one connection per peer, frames tagged by shard."""

    def __init__(
        self,
        cluster: ClusterConfig,
        node_id: str,
        poller: Poller,
        *,
        connection_timeout_s: float = 3.0,
    ) -> None:
        self._cluster = cluster
        self._node_id = node_id
        self._poller = poller
        self._fingerprint = cluster.fingerprint
        self._timeout = connection_timeout_s
        self._encryptor = getEncryptor(cluster.secret) if cluster.secret else None
        self._shards: dict[int, ShardTransport] = {}
        self._peers: dict[str, _Peer] = {}
        for n in cluster.nodes:
            if n.id != node_id:
                host, port = split_hostport(n.raft, f"nodes.{n.id}.raft")
                self._peers[n.id] = _Peer(n.id, host, port)
        self._unknown: set[TcpConnection] = set()
        self._server: _Listener | None = None
        self._ip = "0.0.0.0"

    # -- lifecycle -------------------------------------------------------------------------

    def bind(self) -> None:
        host, port = split_hostport(self._cluster.node(self._node_id).raft, "raft address")
        try:
            ip = str(socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
            self._server = _Listener(self._poller, ip, port, self._on_incoming, self._timeout)
            self._ip = ip
        except OSError as e:
            raise RaftBindError(
                f"cannot bind the Raft port {host}:{port}: {e.strerror or e}"
            ) from e
        log.info("raft port listening on %s:%d (shards multiplexed)", ip, port)

    def attach(self, shard: ShardTransport) -> None:
        self._shards[shard.shard_id] = shard

    def detach(self, shard_id: int) -> None:
        self._shards.pop(shard_id, None)

    def close(self) -> None:
        for peer in self._peers.values():
            if peer.conn is not None:
                conn, peer.conn = peer.conn, None
                conn.disconnect()
        for conn in list(self._unknown):
            conn.disconnect()
        if self._server is not None:
            self._server.close()

    def connected_peers(self) -> list[str]:
        return sorted(p.node_id for p in self._peers.values() if p.ready)

    # -- sending ---------------------------------------------------------------------------

    def send(self, peer_id: str, shard_id: int, message: Any) -> bool:
        peer = self._peers.get(peer_id)
        if peer is None or not peer.ready or peer.conn is None:
            return False
        peer.conn.send((shard_id, message))
        return bool(peer.conn.state == CONNECTION_STATE.CONNECTED)

    # -- periodic work (called on every Raft tick) --------------------------------------------

    def tick(self) -> None:
        now = time.monotonic()
        for peer in self._peers.values():
            if peer.ready and peer.conn is not None:
                if now - peer.last_ping > PING_INTERVAL_S:
                    peer.last_ping = now
                    peer.conn.send((PING, None))
                continue
            if self._node_id < peer.node_id:
                continue  # the peer with the larger id dials
            if peer.conn is not None and peer.conn.state != CONNECTION_STATE.DISCONNECTED:
                continue
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
            return
        if peer.unresolvable:
            log.info("peer %s (%s) resolves again: %s", peer.node_id, peer.host, ip)
            peer.unresolvable = False
        conn = _RaftConnection(
            self._ip,
            poller=self._poller,
            timeout=self._timeout,
            sendBufferSize=BUFFER_BYTES,
            recvBufferSize=BUFFER_BYTES,
            keepalive=(16, 3, 5),
        )
        conn.encryptor = self._encryptor
        conn.setOnConnectedCallback(functools.partial(self._on_dialed, peer, conn))
        conn.setOnMessageReceivedCallback(functools.partial(self._on_handshake, conn, peer))
        conn.setOnDisconnectedCallback(functools.partial(self._on_disconnected, conn))
        peer.conn = conn
        conn.connect(ip, peer.port)

    def _on_dialed(self, peer: _Peer, conn: TcpConnection) -> None:
        if self._encryptor is not None:
            conn.recvRandKey = os.urandom(32)
            conn.send(conn.recvRandKey)
        else:
            conn.send(self._hello())

    def _hello(self) -> tuple[str, dict[str, str]]:
        return (HELLO, {"node": self._node_id, "fingerprint": self._fingerprint})

    # -- receiving -------------------------------------------------------------------------

    def _on_incoming(self, conn: TcpConnection) -> None:
        self._unknown.add(conn)
        conn.encryptor = self._encryptor
        conn.setOnMessageReceivedCallback(functools.partial(self._on_handshake, conn, None))
        conn.setOnDisconnectedCallback(functools.partial(self._on_disconnected, conn))

    def _on_handshake(self, conn: TcpConnection, dialed: _Peer | None, message: Any) -> None:
        """First frames of a connection: key exchange (with a secret), then hello."""
        if self._encryptor is not None and not conn.sendRandKey:
            conn.sendRandKey = message
            if dialed is None:  # we accepted: answer with our own key
                conn.recvRandKey = os.urandom(32)
                conn.send(conn.recvRandKey)
            else:
                conn.send(self._hello())
            return
        if not (isinstance(message, tuple) and len(message) == 2 and message[0] == HELLO):
            log.warning("dropping a Raft connection that did not start with a hello")
            conn.disconnect()
            return
        info = message[1]
        peer_id = str(info.get("node", ""))
        peer = self._peers.get(peer_id)
        if peer is None or (dialed is not None and dialed is not peer):
            log.error("refusing Raft peer %r: not a node of this cluster file", peer_id)
            conn.disconnect()
            return
        if info.get("fingerprint") != self._fingerprint:
            reason = (
                f"refusing Raft peer {peer_id}: its cluster fingerprint "
                f"{info.get('fingerprint')} differs from ours {self._fingerprint} "
                "(the nodes were started from different cluster files)"
            )
            if reason != peer.refused_reason:
                log.error("%s", reason)
                peer.refused_reason = reason
            if dialed is None:
                # Answer with our hello so the dialer sees the mismatch and logs it too; it
                # hangs up, or the connection times out. Closing first could lose the hello.
                conn.setOnMessageReceivedCallback(lambda _message: None)
                conn.send(self._hello())
            else:
                peer.last_attempt = time.monotonic() + REFUSED_BACKOFF_S
                conn.disconnect()
            return
        if dialed is None:
            self._unknown.discard(conn)
            if peer.conn is not None and peer.conn is not conn:
                old, peer.conn = peer.conn, None
                old.disconnect()
            conn.send(self._hello())
        peer.conn = conn
        peer.refused_reason = ""
        conn.setOnMessageReceivedCallback(functools.partial(self._on_message, peer))
        peer.ready = True
        peer.last_ping = time.monotonic()
        log.info("raft link to %s up", peer_id)
        for shard in list(self._shards.values()):
            shard.peer_connected(peer_id)

    def _on_message(self, peer: _Peer, message: Any) -> None:
        try:
            shard_id, payload = message
        except (TypeError, ValueError):
            log.warning("malformed Raft frame from %s", peer.node_id)
            return
        if shard_id == PING:
            return
        shard = self._shards.get(shard_id)
        if shard is not None:
            shard.deliver(peer.node_id, payload)

    def _on_disconnected(self, conn: TcpConnection) -> None:
        self._unknown.discard(conn)
        for peer in self._peers.values():
            if peer.conn is conn:
                peer.conn = None
                if peer.ready:
                    peer.ready = False
                    log.warning("raft link to %s down", peer.node_id)
                    for shard in list(self._shards.values()):
                        shard.peer_disconnected(peer.node_id)
