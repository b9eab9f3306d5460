"""One place for networking: gRPC channels, credentials and TLS contexts.

Every gRPC channel raftkv opens (the client library, a node forwarding to another node, the
test helpers, the CLI) comes from a :class:`Dialer`, and every server credential and Raft TLS
context from the functions here, so TLS settings, tokens and message-size limits cannot drift
apart between the places that talk to a node.

Flag names follow etcd: ``--cert-file/--key-file/--trusted-ca-file/--client-cert-auth`` on the
server, ``--peer-cert-file/--peer-key-file/--peer-trusted-ca-file`` for the Raft port, and
``--cacert/--cert/--key`` on clients.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from raftkv.config import ConfigError, PeerTLS, ServerTLS

GRPC_MAX_MESSAGE = 8 * 1024 * 1024
# Options every raftkv channel and server shares.
GRPC_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
    # Fail fast against a dead address instead of waiting out the default 20 s backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
AUTHORIZATION = "authorization"


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None


@dataclass(frozen=True)
class ClientTLS:
    """What a client needs for a TLS connection (etcdctl's --cacert, --cert, --key)."""

    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("--cert and --key go together: give both or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.cacert, "CA certificate") if self.cacert else None,
            private_key=_read(self.key, "private key") if self.key else None,
            certificate_chain=_read(self.cert, "certificate") if self.cert else None,
        )


class Dialer:
    """Opens (and caches) channels to nodes: plaintext or TLS, with an optional token."""

    def __init__(
        self,
        tls: ClientTLS | None = None,
        token: str | None = None,
        *,
        options: Sequence[tuple[str, int | str]] = (),
    ) -> None:
        self.tls = tls
        self._credentials = tls.credentials() if tls is not None else None
        self._options = [*GRPC_OPTIONS, *options]
        self.metadata: tuple[tuple[str, str], ...] = (
            ((AUTHORIZATION, f"Bearer {token}"),) if token else ()
        )

    def channel(self, endpoint: str) -> grpc.aio.Channel:
        if self._credentials is not None:
            return grpc.aio.secure_channel(endpoint, self._credentials, options=self._options)
        return grpc.aio.insecure_channel(endpoint, options=self._options)

    def sync_channel(self, endpoint: str) -> grpc.Channel:
        """A blocking channel (test helpers and health probes)."""
        if self._credentials is not None:
            return grpc.secure_channel(endpoint, self._credentials, options=self._options)
        return grpc.insecure_channel(endpoint, options=self._options)


def server_credentials(tls: ServerTLS) -> grpc.ServerCredentials:
    if tls.client_cert_auth and tls.trusted_ca_file is None:
        raise ConfigError("--client-cert-auth needs --trusted-ca-file to verify client certs")
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file, "private key"), _read(tls.cert_file, "certificate"))],
        root_certificates=(
            _read(tls.trusted_ca_file, "CA certificate") if tls.trusted_ca_file else None
        ),
        require_client_auth=tls.client_cert_auth,
    )


def node_dialer(tls: ServerTLS | None, peer_tls: PeerTLS | None) -> Dialer:
    """How a node dials other nodes' gRPC ports (forwarding, status fan-out).

    With TLS on the gRPC port, a node verifies the other nodes' server certificates with the
    trusted CA (or the peer CA) and presents its own certificate, so forwarding works when
    client certificates are required too.
    """
    if tls is None:
        return Dialer()
    ca = tls.trusted_ca_file or (peer_tls.trusted_ca_file if peer_tls else None)
    if ca is None:
        raise ConfigError(
            "TLS on the gRPC port needs --trusted-ca-file (or --peer-trusted-ca-file): "
            "nodes verify each other with it when they forward requests"
        )
    return Dialer(ClientTLS(cacert=ca, cert=tls.cert_file, key=tls.key_file))


def peer_contexts(tls: PeerTLS) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for mutual TLS on the Raft port.

    Both sides require a certificate signed by the peer CA. Host names are not checked: the
    certificate must instead name the node id the peer claims (``raftkv://node/<id>``), which
    the transport checks after the handshake.
    """
    contexts = []
    for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
            ctx.load_verify_locations(cafile=str(tls.trusted_ca_file))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"peer TLS files: {e}") from None
        contexts.append(ctx)
    return contexts[0], contexts[1]
