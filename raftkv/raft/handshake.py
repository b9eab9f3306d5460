"""How two nodes prove who they are on the Raft port, before a single Raft byte is decoded.

A Raft connection is trusted with everything: a peer can vote, append entries and move terms
for every shard. So a connection is *anonymous* until the peer has proved it is the node it
claims to be, and until then only three fixed-layout frames of at most
:data:`MAX_PREAUTH_FRAME` bytes are accepted (``hello``, ``proof``, ``refuse``), parsed with
bounds-checked slicing, never a general decoder.

The exchange, symmetric after TLS (if peer TLS is on)::

    dialer   → hello(version, node id, cluster fingerprint, nonce_d, has-secret flag)
    acceptor → hello(version, node id, cluster fingerprint, nonce_a, has-secret flag)
    each     → proof = HMAC-SHA256(K_auth, label | sender role | sender hello | receiver hello)
    each     : verify the other's proof in constant time → the link is up

``K_auth`` is derived (HKDF-SHA256) from the cluster secret, so only holders of the secret can
answer the other side's fresh nonce. The cluster fingerprint is no credential (``Status``
publishes it); it only tells two clusters apart. With peer TLS, the certificate (signed by the
peer CA, naming the node in its ``raftkv://node/<id>`` SAN) proves identity instead, or as well.

With a secret and no TLS, every later frame is sealed with AES-256-GCM under per-direction
session keys derived from the secret and both nonces, with a frame counter as the nonce: frames
cannot be read, forged, replayed, reordered or dropped unnoticed. Under TLS the TLS session
does that job.

A side that rejects the other sends ``refuse(code, reason)`` first, so a node started with the
wrong secret learns why its peers hang up and can say so in its own log.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"RKVRAFT2"
PROTOCOL_VERSION = 1
MAX_PREAUTH_FRAME = 4096
NONCE_BYTES = 32
MAX_ID_BYTES = 64
_PROOF_LABEL = b"raftkv raft peer proof v1"
_SESSION_LABEL = b"raftkv raft session keys v1"
_TAG_LABEL = b"raftkv node tags v1"


class FrameType(enum.IntEnum):
    HELLO = ord("H")
    PROOF = ord("P")
    REFUSE = ord("R")


class RefuseCode(enum.IntEnum):
    PROTOCOL = 1  # not a raftkv peer of this version
    UNKNOWN_NODE = 2  # the claimed node id is not a member of our cluster
    BAD_PROOF = 3  # the proof did not verify: a different cluster secret
    SECRET_MISMATCH = 4  # one side has a cluster secret and the other has none
    FINGERPRINT = 5  # authenticated, but started from a different cluster file
    CERTIFICATE = 6  # the TLS certificate does not name the node id claimed
    DUPLICATE = 7  # a node with this id is already connected (another process?)


class HandshakeError(Exception):
    """The peer broke the handshake; ``code`` says how, for the refusal we send back."""

    def __init__(self, code: RefuseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Hello:
    node_id: str
    fingerprint: str
    nonce: bytes
    has_secret: bool
    raw: bytes  # the exact body, bound into both proofs


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def _short(text: str, what: str) -> bytes:
    data = text.encode()
    if not 0 < len(data) <= MAX_ID_BYTES:
        raise ValueError(f"{what} must be 1..{MAX_ID_BYTES} bytes")
    return data


def hello_body(node_id: str, fingerprint: str, nonce: bytes, has_secret: bool) -> bytes:
    ident = _short(node_id, "node id")
    fp = _short(fingerprint, "fingerprint")
    return (
        MAGIC
        + struct.pack(">HB", PROTOCOL_VERSION, 1 if has_secret else 0)
        + nonce
        + bytes([len(ident)])
        + ident
        + bytes([len(fp)])
        + fp
    )


def parse_hello(body: bytes) -> Hello:
    """Parse a hello body with explicit bounds; anything unexpected is a protocol error."""
    fixed = len(MAGIC) + 3 + NONCE_BYTES
    if len(body) < fixed + 2 or body[: len(MAGIC)] != MAGIC:
        raise HandshakeError(RefuseCode.PROTOCOL, "not a raftkv Raft hello")
    version, flags = struct.unpack_from(">HB", body, len(MAGIC))
    if version != PROTOCOL_VERSION:
        raise HandshakeError(
            RefuseCode.PROTOCOL,
            f"Raft protocol version {version}, this node speaks {PROTOCOL_VERSION}",
        )
    nonce = body[len(MAGIC) + 3 : fixed]
    pos = fixed
    fields: list[str] = []
    for what in ("node id", "fingerprint"):
        if pos >= len(body):
            raise HandshakeError(RefuseCode.PROTOCOL, f"hello cut short before its {what}")
        size = body[pos]
        data = body[pos + 1 : pos + 1 + size]
        if not 0 < size <= MAX_ID_BYTES or len(data) != size:
            raise HandshakeError(RefuseCode.PROTOCOL, f"hello with a bad {what} length")
        try:
            fields.append(data.decode())
        except UnicodeDecodeError:
            raise HandshakeError(RefuseCode.PROTOCOL, f"hello {what} is not UTF-8") from None
        pos += 1 + size
    if pos != len(body):
        raise HandshakeError(RefuseCode.PROTOCOL, "hello has trailing bytes")
    return Hello(fields[0], fields[1], bytes(nonce), bool(flags & 1), bytes(body))


def refuse_body(code: RefuseCode, reason: str) -> bytes:
    return bytes([code]) + reason.encode()[:400]


def parse_refuse(body: bytes) -> tuple[int, str]:
    if not body:
        return 0, "no reason given"
    # The text comes from an unauthenticated peer: keep it printable and short for the log.
    text = body[1:401].decode("utf-8", "replace")
    return body[0], "".join(ch if ch.isprintable() else "?" for ch in text)


class Secret:
    """Keys derived from the cluster secret; the secret itself is not kept."""

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode() if isinstance(secret, str) else secret
        if not raw:
            raise ValueError("the cluster secret must not be empty")
        self._auth_key = _hkdf(raw, salt=b"", info=_PROOF_LABEL, length=32)
        self._session_ikm = _hkdf(raw, salt=b"", info=_SESSION_LABEL, length=32)
        self._tag_key = _hkdf(raw, salt=b"", info=_TAG_LABEL, length=32)

    def tag(self, purpose: bytes, data: bytes) -> str:
        """A hex MAC only secret holders can make (e.g. a node vouching for a forward)."""
        return hmac.new(self._tag_key, purpose + b"|" + data, hashlib.sha256).hexdigest()

    def proof(self, dialer: bool, own: Hello, peer: Hello) -> bytes:
        role = b"dialer" if dialer else b"acceptor"
        msg = b"|".join((_PROOF_LABEL, role, own.raw, peer.raw))
        return hmac.digest(self._auth_key, msg, hashlib.sha256)

    def verify(self, dialer: bool, own: Hello, peer: Hello, proof: bytes) -> bool:
        """``dialer`` is *our* role; the peer computed its proof in the other role."""
        expected = self.proof(not dialer, peer, own)
        return hmac.compare_digest(expected, proof)

    def session(self, dialer: bool, own: Hello, peer: Hello) -> tuple[FrameSealer, FrameOpener]:
        """Per-direction AES-GCM keys for this connection, bound to both hellos."""
        d_hello, a_hello = (own, peer) if dialer else (peer, own)
        keys = _hkdf(
            self._session_ikm,
            salt=d_hello.nonce + a_hello.nonce,
            info=_SESSION_LABEL + d_hello.raw + a_hello.raw,
            length=64,
        )
        d_to_a, a_to_d = keys[:32], keys[32:]
        send, recv = (d_to_a, a_to_d) if dialer else (a_to_d, d_to_a)
        return FrameSealer(send), FrameOpener(recv)


def _hkdf(ikm: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info).derive(ikm)


class FrameSealer:
    """Seals outgoing frames: AES-256-GCM, the frame counter as the nonce (never reused)."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._counter = 0

    def seal(self, data: bytes) -> bytes:
        nonce = struct.pack(">IQ", 0, self._counter)
        self._counter += 1
        return self._aead.encrypt(nonce, data, None)


class FrameOpener:
    """Opens incoming frames in order; a forged, replayed or missing frame fails to open."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._counter = 0

    def open(self, data: bytes | bytearray | memoryview) -> bytes:
        nonce = struct.pack(">IQ", 0, self._counter)
        plain = self._aead.decrypt(nonce, bytes(data), None)  # raises InvalidTag
        self._counter += 1
        return plain
