"""Everything a secure cluster needs, in one directory, and the flags that use it.

``raftkv certs init`` makes the TLS part (a CA, a certificate per node, an ``admin`` client
certificate) and ``raftkv auth init`` the rest (the cluster secret for the Raft port, the key
that signs tokens, an admin token). ``raftkv local up --secure``, the compose cluster and the
tests make all of it at once with :func:`create`, and turn it into ``serve`` flags and client
settings with :class:`Credentials`, so the secure set-up that is tested is the documented one.

Layout of the directory::

    ca.crt ca.key                 the CA (keep ca.key offline in production)
    node-<id>.crt node-<id>.key   one per node: gRPC server, gRPC client and Raft peer cert
    client-admin.crt/.key         a client certificate
    raft.secret                   the cluster secret (--secret-file)
    auth.key                      verifies minted tokens (--auth-key-file)
    admin.token                   a minted token with the admin role (--token-file)
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from raftkv import auth, certs
from raftkv.config import ClusterConfig, split_hostport
from raftkv.durable import PRIVATE, write_file
from raftkv.network import ClientTLS

SECRET = "raft.secret"
AUTH_KEY = "auth.key"
ADMIN_TOKEN = "admin.token"


def write_private(path: Path, text: str, *, overwrite: bool = False) -> None:
    """Write a secret file readable by its owner only, from the moment it exists."""
    write_file(path, text.encode(), mode=PRIVATE, overwrite=overwrite)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Credentials:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / certs.CA_CERT

    def node_cert(self, node_id: str) -> tuple[Path, Path]:
        return self.directory / f"node-{node_id}.crt", self.directory / f"node-{node_id}.key"

    @property
    def token(self) -> str:
        return (self.directory / ADMIN_TOKEN).read_text().strip()

    def serve_args(self, node_id: str) -> list[str]:
        """``raftkv serve`` flags for a node: TLS on both ports, tokens, the secret."""
        cert, key = self.node_cert(node_id)
        return [
            "--cert-file",
            str(cert),
            "--key-file",
            str(key),
            "--trusted-ca-file",
            str(self.ca),
            "--peer-cert-file",
            str(cert),
            "--peer-key-file",
            str(key),
            "--peer-trusted-ca-file",
            str(self.ca),
            "--secret-file",
            str(self.directory / SECRET),
            "--auth-key-file",
            str(self.directory / AUTH_KEY),
        ]

    def client_tls(self) -> ClientTLS:
        return ClientTLS(cacert=self.ca)

    def client_env(self) -> dict[str, str]:
        """Environment for ``raftkv client``: trust the CA, send the admin token."""
        return {
            "RAFTKV_CACERT": str(self.ca),
            "RAFTKV_TOKEN_FILE": str(self.directory / ADMIN_TOKEN),
        }


def create_certs(directory: Path, cluster: ClusterConfig, *, overwrite: bool = False) -> None:
    """A CA, a certificate per node (its gRPC and Raft hosts as SANs), a client cert."""
    certs.create_ca(directory, overwrite=overwrite)
    for node in cluster.nodes:
        hosts = sorted({split_hostport(a, node.id)[0] for a in (node.grpc, node.raft)})
        certs.create_node_cert(directory, node.id, [*hosts, node.id], overwrite=overwrite)
    certs.create_client_cert(directory, "admin", overwrite=overwrite)


def create_auth(directory: Path, *, overwrite: bool = False) -> None:
    """The cluster secret, the token key and an admin token."""
    directory.mkdir(parents=True, exist_ok=True)
    write_private(directory / SECRET, new_secret() + "\n", overwrite=overwrite)
    key = auth.generate_key()
    auth.write_key_file(directory / AUTH_KEY, key, overwrite=overwrite)
    token = auth.mint_token(key, "admin", auth.Role.ADMIN)
    write_private(directory / ADMIN_TOKEN, token + "\n", overwrite=overwrite)


def create(directory: Path, cluster: ClusterConfig) -> Credentials:
    create_certs(directory, cluster)
    create_auth(directory)
    return Credentials(directory)
