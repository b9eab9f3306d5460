"""One TCP connection of the Raft port: framing, optional TLS, the handshake, hard limits.

A :class:`Link` runs on the node's Raft thread, driven by pysyncobj's poller, and owns its
socket from ``accept``/``connect`` to ``close``. It knows nothing about shards: it turns bytes
into frames and hands authenticated frames to its :class:`LinkListener` (the mux transport).

What it enforces, so that a stranger on the network cannot hurt the node:

* **Nothing is decoded before authentication** (see :mod:`raftkv.raft.handshake`). Until the
  peer has proved itself, frames larger than :data:`~raftkv.raft.handshake.MAX_PREAUTH_FRAME`
  close the link, at most ``max_preauth_bytes`` are read in all, and the handshake must finish
  within ``handshake_timeout_s``.
* **Every frame length is checked before anything is buffered**, against ``max_frame_bytes``.
* **Buffers grow linearly**: received bytes are appended to one ``bytearray`` and consumed
  frames are cut off once per read, never re-copied per frame; outgoing bytes are a queue of
  chunks (:class:`SendBuffer`).
* **Backpressure, not growth**: :meth:`Link.send_frame` refuses (returns False) once
  ``max_send_buffer_bytes`` are queued for a slow peer. Raft tolerates lost messages; the
  leader re-sends from the follower's next index.
* **Idle links close** after ``idle_timeout_s`` without a byte (peers ping every half second).

TLS runs over memory BIOs (``ssl.SSLObject``), so the same non-blocking socket code serves
plain and TLS links and the poller never sees TLS's want-read/want-write dance.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import os
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from pysyncobj.poller import POLL_EVENT_TYPE, Poller

from raftkv.certs import node_id_from_cert
from raftkv.raft import handshake as hs

log = logging.getLogger("raftkv.transport")

_LENGTH = struct.Struct(">I")
SOCKET_BUFFER_BYTES = 2**20
_READ_CHUNK = 256 * 1024
# Bytes read per poll event, so one busy link cannot starve the other links and groups.
_READ_BUDGET = 4 * 1024 * 1024


@dataclass(frozen=True)
class LinkLimits:
    handshake_timeout_s: float = 5.0
    idle_timeout_s: float = 5.0
    # After authentication. Must exceed the largest AppendEntries the node sends: one
    # batch of entries (group.APPEND_BATCH_BYTES) plus the largest command it accepts.
    max_frame_bytes: int = 48 * 1024 * 1024
    max_send_buffer_bytes: int = 64 * 1024 * 1024
    # Raw bytes accepted before authentication, TLS handshake included.
    max_preauth_bytes: int = 256 * 1024


class LinkState(enum.Enum):
    CONNECTING = "connecting"
    TLS = "tls-handshake"
    HELLO = "hello"
    PROOF = "proof"
    UP = "up"
    CLOSING = "closing"
    CLOSED = "closed"


class LinkListener(Protocol):
    """What a link reports to its owner (the mux transport), all on the Raft thread."""

    def check_hello(self, link: Link, hello: hs.Hello) -> None:
        """Before any proof: may the claimed node talk to us? Raise HandshakeError if not."""

    def admit(self, link: Link, hello: hs.Hello) -> None:
        """The peer is authenticated; last chance to refuse (raise HandshakeError)."""

    def link_up(self, link: Link) -> None: ...

    def flush_later(self, link: Link) -> None:
        """``link`` has queued frames: call its :meth:`Link.flush` before the thread sleeps."""

    def frame_received(self, link: Link, payload: bytes) -> None: ...

    def refused_by_peer(self, link: Link, code: int, reason: str) -> None: ...

    def link_closed(self, link: Link, reason: str) -> None: ...


@dataclass(frozen=True)
class LinkSecurity:
    """How this node authenticates Raft links: a secret, peer TLS, both, or (loopback) none."""

    node_id: str
    fingerprint: str
    secret: hs.Secret | None = None
    tls_server: ssl.SSLContext | None = None
    tls_client: ssl.SSLContext | None = None

    @property
    def tls(self) -> bool:
        return self.tls_server is not None


class SendBuffer:
    """Outgoing bytes as a queue of chunks: appending and partial sends cost O(chunk).

    A single ``bytes`` re-copied on every append and every partial send (pysyncobj's way)
    turns a large backlog, a follower catching up, quadratic.
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


def tune_socket(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)


class Link:
    """One Raft connection; see the module docstring for what it guarantees."""

    def __init__(
        self,
        poller: Poller,
        sock: socket.socket,
        *,
        dialer: bool,
        remote: str,
        security: LinkSecurity,
        limits: LinkLimits,
        listener: LinkListener,
        expected_peer: str = "",
    ) -> None:
        self._poller = poller
        self._sock = sock
        self._fd = sock.fileno()
        self.dialer = dialer
        self.remote = remote  # "host:port", for log lines
        self.expected_peer = expected_peer  # the node a dialer meant to reach
        self._security = security
        self._limits = limits
        self._listener = listener
        self.state = LinkState.CONNECTING if dialer else LinkState.HELLO
        self.peer_id = ""  # set once the peer's hello passed check_hello
        self.cert_node_id: str | None = None
        now = time.monotonic()
        self._deadline = now + limits.handshake_timeout_s
        self.last_received = now
        self._preauth_bytes = 0
        self._recv = bytearray()
        self._send = SendBuffer()
        self._writable_wanted = False
        self._queued: list[bytes] = []  # frames waiting for flush()
        self._queued_bytes = 0
        self._flush_requested = False
        self._own_hello: hs.Hello | None = None
        self._peer_hello: hs.Hello | None = None
        self._sealer: hs.FrameSealer | None = None
        self._opener: hs.FrameOpener | None = None
        self._tls: ssl.SSLObject | None = None
        self._tls_in: ssl.MemoryBIO | None = None
        self._tls_out: ssl.MemoryBIO | None = None
        self.close_reason = ""
        poller.subscribe(self._fd, self._on_event, self._events())
        if not dialer:
            self._start()

    # -- public ------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self.state is LinkState.UP

    @property
    def closed(self) -> bool:
        return self.state in (LinkState.CLOSING, LinkState.CLOSED)

    @property
    def finished(self) -> bool:
        """Fully closed: the socket is gone."""
        return self.state is LinkState.CLOSED

    @property
    def buffered(self) -> int:
        return len(self._send) + self._queued_bytes

    def send_frame(self, payload: bytes) -> bool:
        """Queue one post-authentication frame; False if the link is down or backed up.

        The frame goes out at the next :meth:`flush` (the Raft thread flushes every link once
        per loop turn): the frames of one turn share one send, and one TLS record.
        """
        if self.state is not LinkState.UP:
            return False
        if len(self._send) + self._queued_bytes > self._limits.max_send_buffer_bytes:
            return False
        if self._sealer is not None:
            payload = self._sealer.seal(payload)
        self._queued.append(_LENGTH.pack(len(payload)))
        self._queued.append(payload)
        self._queued_bytes += 4 + len(payload)
        if not self._flush_requested:
            self._flush_requested = True
            self._listener.flush_later(self)
        return True

    def flush(self) -> None:
        """Hand the frames queued since the last flush to the socket (through TLS, if on)."""
        self._flush_requested = False
        if not self._queued or self.state is not LinkState.UP:
            self._queued, self._queued_bytes = [], 0
            return
        queued, self._queued, self._queued_bytes = self._queued, [], 0
        if self._tls is not None:
            try:
                self._tls.write(b"".join(queued))
            except ssl.SSLError as e:
                self.close(f"TLS error while sending: {e.reason or e}")
                return
            self._pull_tls_output()
            return
        for chunk in queued:
            self._send.append(chunk)
        self._flush()

    def check_timeouts(self, now: float) -> None:
        if self.state is LinkState.CLOSED:
            return
        if self.state is LinkState.CLOSING:
            if now > self._deadline:
                self._close_now()
            return
        if self.state is not LinkState.UP:
            if now > self._deadline:
                self.close(
                    f"handshake not completed within {self._limits.handshake_timeout_s:.0f}s "
                    f"(stuck in {self.state.value})"
                )
        elif now - self.last_received > self._limits.idle_timeout_s:
            self.close(f"nothing received for {self._limits.idle_timeout_s:.0f}s")

    def close(self, reason: str, *, refuse: hs.HandshakeError | None = None) -> None:
        """Close the link. With ``refuse``, tell the peer why first (best effort, 1 s)."""
        if self.closed:
            return
        self.close_reason = reason
        if refuse is not None and self.state is not LinkState.CONNECTING:
            with contextlib.suppress(OSError, ssl.SSLError):
                self._write_preauth(hs.FrameType.REFUSE, hs.refuse_body(refuse.code, refuse.reason))
        if len(self._send) and self.state not in (LinkState.CONNECTING,):
            # Let the refusal (or last frames) drain, reading nothing more.
            self.state = LinkState.CLOSING
            self._deadline = time.monotonic() + 1.0
            self._subscribe()
            self._listener.link_closed(self, reason)
            return
        self._listener.link_closed(self, reason)
        self._close_now()

    # -- set-up ------------------------------------------------------------------------------

    def _start(self) -> None:
        """The TCP connection exists: TLS first if configured, then our hello."""
        context = self._security.tls_client if self.dialer else self._security.tls_server
        if context is not None:
            self._tls_in, self._tls_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._tls = context.wrap_bio(self._tls_in, self._tls_out, server_side=not self.dialer)
            self.state = LinkState.TLS
            self._tls_step()
        else:
            self._send_hello()

    def _send_hello(self) -> None:
        sec = self._security
        self._own_hello = hs.parse_hello(
            hs.hello_body(sec.node_id, sec.fingerprint, hs.new_nonce(), sec.secret is not None)
        )
        self.state = LinkState.HELLO
        self._write_preauth(hs.FrameType.HELLO, self._own_hello.raw)

    def _tls_step(self) -> None:
        assert self._tls is not None
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._pull_tls_output()
            return
        except ssl.SSLError as e:
            self._pull_tls_output()
            self.close(f"TLS handshake failed: {e.reason or e}")
            return
        self._pull_tls_output()
        der = self._tls.getpeercert(binary_form=True)
        self.cert_node_id = node_id_from_cert(der) if der else None
        self._send_hello()

    # -- events ------------------------------------------------------------------------------

    def _events(self) -> int:
        events: int = POLL_EVENT_TYPE.ERROR
        if self.state is LinkState.CONNECTING or self._writable_wanted:
            events |= POLL_EVENT_TYPE.WRITE
        if self.state is not LinkState.CLOSING:
            events |= POLL_EVENT_TYPE.READ
        return events

    def _subscribe(self) -> None:
        if self.state is not LinkState.CLOSED:
            self._poller.subscribe(self._fd, self._on_event, self._events())

    def _on_event(self, _fd: int, event: int) -> None:
        if self.state is LinkState.CLOSED:
            return
        if self.state is LinkState.CONNECTING:
            if not event & (POLL_EVENT_TYPE.WRITE | POLL_EVENT_TYPE.ERROR):
                return
            err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.close(f"connect to {self.remote} failed: {os.strerror(err)}")
                return
            self.state = LinkState.HELLO  # connected: stop asking for writability
            self._subscribe()
            self._start()
            if self.closed:
                return
        if event & POLL_EVENT_TYPE.READ and self.state is not LinkState.CLOSING:
            self._read()
        if self.state is LinkState.CLOSED:
            return
        if event & POLL_EVENT_TYPE.WRITE or self.state is LinkState.CLOSING:
            self._flush()
        if event & POLL_EVENT_TYPE.ERROR and not event & POLL_EVENT_TYPE.READ:
            if self.state is LinkState.CLOSING:
                self._close_now()
            else:
                self.close("socket error")

    def _read(self) -> None:
        budget = _READ_BUDGET
        while budget > 0 and self.state is not LinkState.CLOSED:
            try:
                data = self._sock.recv(_READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.close(f"receive failed: {e.strerror or e}")
                return
            if not data:
                self.close("the peer closed the connection")
                return
            budget -= len(data)
            self.last_received = time.monotonic()
            if self.state is not LinkState.UP:
                self._preauth_bytes += len(data)
                if self._preauth_bytes > self._limits.max_preauth_bytes:
                    self.close(
                        f"{self._preauth_bytes} bytes before authentication "
                        f"(limit {self._limits.max_preauth_bytes})"
                    )
                    return
            if self._tls is not None:
                self._tls_received(data)
            else:
                self._received(data)

    def _tls_received(self, data: bytes) -> None:
        assert self._tls is not None and self._tls_in is not None
        self._tls_in.write(data)
        if self.state is LinkState.TLS:
            self._tls_step()
            if self.state is LinkState.TLS or self.closed:
                return
        while not self.closed:
            try:
                plain = self._tls.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.close("the peer closed the TLS session")
                return
            except ssl.SSLError as e:
                self.close(f"TLS error: {e.reason or e}")
                return
            if not plain:
                break
            self._received(plain)
        self._pull_tls_output()

    def _received(self, data: bytes) -> None:
        """Append to the receive buffer and handle every complete frame in it."""
        buf = self._recv
        buf += data
        off = 0
        try:
            while len(buf) - off >= 4 and not self.closed:
                (size,) = _LENGTH.unpack_from(buf, off)
                up = self.state is LinkState.UP
                limit = self._limits.max_frame_bytes if up else hs.MAX_PREAUTH_FRAME
                if size > limit:
                    what = "frame" if up else "frame before authentication"
                    self.close(f"{what} of {size} bytes exceeds the limit of {limit}")
                    return
                if len(buf) - off - 4 < size:
                    break
                payload = bytes(buf[off + 4 : off + 4 + size])
                off += 4 + size
                self._frame(payload)
        finally:
            # Consumed frames go, even if handling one raised: never handle a frame twice.
            if off and buf is self._recv:
                del buf[:off]

    def _frame(self, payload: bytes) -> None:
        if self.state is LinkState.UP:
            if self._opener is not None:
                try:
                    payload = self._opener.open(payload)
                except InvalidTag:
                    self.close("a frame failed authentication (forged, replayed or corrupted)")
                    return
            self._listener.frame_received(self, payload)
            return
        if not payload:
            self.close("empty frame before authentication")
            return
        kind, body = payload[0], payload[1:]
        try:
            if kind == hs.FrameType.REFUSE:
                code, reason = hs.parse_refuse(body)
                self._listener.refused_by_peer(self, code, reason)
                self.close(f"refused by the peer: {reason}")
            elif kind == hs.FrameType.HELLO and self._peer_hello is None:
                self._on_hello(hs.parse_hello(body))
            elif kind == hs.FrameType.PROOF and self.state is LinkState.PROOF:
                self._on_proof(body)
            else:
                raise hs.HandshakeError(hs.RefuseCode.PROTOCOL, "unexpected handshake frame")
        except hs.HandshakeError as e:
            self.close(f"handshake refused: {e.reason}", refuse=e)

    def _on_hello(self, hello: hs.Hello) -> None:
        if self._own_hello is None:  # a hello before our TLS handshake finished
            raise hs.HandshakeError(hs.RefuseCode.PROTOCOL, "hello before TLS")
        self._peer_hello = hello
        self._listener.check_hello(self, hello)
        self.peer_id = hello.node_id
        secret = self._security.secret
        if secret is None:
            self._become_up()
            return
        self.state = LinkState.PROOF
        self._write_preauth(hs.FrameType.PROOF, secret.proof(self.dialer, self._own_hello, hello))

    def _on_proof(self, proof: bytes) -> None:
        secret = self._security.secret
        assert secret is not None and self._own_hello and self._peer_hello
        if not secret.verify(self.dialer, self._own_hello, self._peer_hello, proof):
            raise hs.HandshakeError(
                hs.RefuseCode.BAD_PROOF,
                f"authentication failed: {self.peer_id}'s proof does not match our cluster "
                "secret (is the secret the same on every node?)",
            )
        if not self._security.tls:
            self._sealer, self._opener = secret.session(
                self.dialer, self._own_hello, self._peer_hello
            )
        self._become_up()

    def _become_up(self) -> None:
        assert self._peer_hello is not None
        self._listener.admit(self, self._peer_hello)
        self.state = LinkState.UP
        self._listener.link_up(self)

    # -- writing -----------------------------------------------------------------------------

    def _write_preauth(self, kind: hs.FrameType, body: bytes) -> None:
        self._write_frame(bytes([kind]) + body)

    def _write_frame(self, payload: bytes) -> None:
        header = _LENGTH.pack(len(payload))
        if self._tls is not None:
            try:
                self._tls.write(header + payload)
            except ssl.SSLError as e:
                self.close(f"TLS error while sending: {e.reason or e}")
                return
            self._pull_tls_output()
        else:
            self._send.append(header)
            self._send.append(payload)
        self._flush()

    def _pull_tls_output(self) -> None:
        assert self._tls_out is not None
        data = self._tls_out.read()
        if data:
            self._send.append(data)
            self._flush()

    def _flush(self) -> None:
        buf = self._send
        while len(buf):
            try:
                sent = self._sock.send(buf.head())
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if self.state is LinkState.CLOSING:
                    self._close_now()
                else:
                    self.close(f"send failed: {e.strerror or e}")
                return
            if sent <= 0:
                break
            buf.consume(sent)
        if self.state is LinkState.CLOSING and not len(buf):
            self._close_now()
            return
        wanted = bool(len(buf))
        if wanted != self._writable_wanted and self.state is not LinkState.CONNECTING:
            self._writable_wanted = wanted
            self._subscribe()

    def _close_now(self) -> None:
        if self.state is LinkState.CLOSED:
            return
        self.state = LinkState.CLOSED
        with contextlib.suppress(OSError, KeyError, ValueError):
            self._poller.unsubscribe(self._fd)
        with contextlib.suppress(OSError):
            self._sock.close()
        self._recv = bytearray()
        self._send = SendBuffer()
        self._queued = []
        self._queued_bytes = 0
