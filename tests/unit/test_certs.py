"""raftkv.certs: the files it writes verify, carry the right names, and work in a TLS handshake."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from raftkv.certs import (
    CA_CERT,
    CA_KEY,
    NODE_URI_PREFIX,
    CertError,
    Issued,
    create_ca,
    create_client_cert,
    create_node_cert,
    describe,
    load_ca,
    node_id_from_cert,
)

TIMEOUT = 5.0


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    create_ca(directory)
    return directory


def test_ca_node_and_client_certs_verify_with_the_ca(ca_dir: Path) -> None:
    ca = _load(ca_dir / CA_CERT)
    node = _load(create_node_cert(ca_dir, "n1", ["10.0.0.5:7001"]).cert)
    client = _load(create_client_cert(ca_dir, "alice").cert)

    ca.verify_directly_issued_by(ca)
    node.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)

    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert not node.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = node.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert (_cn(node), _cn(client)) == ("n1", "alice")
    # Backdated for clock skew, and not valid past the CA.
    assert node.not_valid_before_utc <= datetime.now(UTC) - timedelta(minutes=4)
    assert node.not_valid_after_utc <= ca.not_valid_after_utc
    assert node.serial_number != client.serial_number


def test_node_cert_has_both_usages_the_node_uri_and_host_sans(ca_dir: Path) -> None:
    issued = create_node_cert(ca_dir, "n1", ["10.0.0.5:7001", "n1.example", "[::1]:7001"])
    cert = _load(issued.cert)

    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"{NODE_URI_PREFIX}n1"]
    assert set(san.get_values_for_type(x509.DNSName)) == {"n1.example", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("127.0.0.1"),
    }


def test_node_cert_dedupes_hosts(ca_dir: Path) -> None:
    issued = create_node_cert(ca_dir, "n1", ["127.0.0.1:7001", "LOCALHOST", "localhost:7101"])
    san = _load(issued.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert len(san.value) == 3  # localhost, 127.0.0.1, the node URI


@pytest.mark.parametrize("host", ["", "a:b", "[::1", "[::1]x", "bad_name", "fe80::1%eth0"])
def test_bad_hosts_are_refused(ca_dir: Path, host: str) -> None:
    with pytest.raises(CertError, match="bad host"):
        create_node_cert(ca_dir, "n1", [host])
    assert not (ca_dir / "node-n1.crt").exists()


def test_client_cert_is_client_auth_only(ca_dir: Path) -> None:
    cert = _load(create_client_cert(ca_dir, "alice").cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_key_files_are_private_and_no_temp_files_remain(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "certs"
    issued = [
        create_ca(directory),
        create_node_cert(directory, "n1", []),
        create_client_cert(directory, "alice"),
    ]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for item in issued:
        assert stat.S_IMODE(item.key.stat().st_mode) == 0o600
    names = sorted(path.name for path in directory.iterdir())
    assert names == sorted(n for i in issued for n in (i.cert.name, i.key.name))


def test_existing_files_are_not_overwritten_unless_asked(ca_dir: Path) -> None:
    first = create_node_cert(ca_dir, "n1", [])
    before = first.cert.read_bytes()
    with pytest.raises(CertError, match="overwrite") as info:
        create_node_cert(ca_dir, "n1", [])
    assert str(first.cert) in str(info.value)
    assert first.cert.read_bytes() == before

    with pytest.raises(CertError, match=str(ca_dir / CA_CERT)):
        create_ca(ca_dir)

    again = create_node_cert(ca_dir, "n1", [], overwrite=True)
    assert again == first
    assert again.cert.read_bytes() != before
    assert stat.S_IMODE(again.key.stat().st_mode) == 0o600


def test_node_id_from_cert(ca_dir: Path) -> None:
    node = _load(create_node_cert(ca_dir, "n-1.a_b", []).cert)
    client = _load(create_client_cert(ca_dir, "alice").cert)
    ca = _load(ca_dir / CA_CERT)
    assert node_id_from_cert(node.public_bytes(Encoding.DER)) == "n-1.a_b"
    assert node_id_from_cert(client.public_bytes(Encoding.DER)) is None
    assert node_id_from_cert(ca.public_bytes(Encoding.DER)) is None
    assert node_id_from_cert(b"garbage") is None
    assert node_id_from_cert(b"") is None


def test_missing_ca_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="raftkv certs init"):
        create_node_cert(tmp_path, "n1", [])
    with pytest.raises(CertError, match="raftkv certs init"):
        create_client_cert(tmp_path, "alice")
    with pytest.raises(CertError, match="raftkv certs init"):
        load_ca(tmp_path)


def test_ca_key_that_does_not_match_is_refused(tmp_path: Path) -> None:
    create_ca(tmp_path / "a")
    create_ca(tmp_path / "b")
    (tmp_path / "a" / CA_KEY).write_bytes((tmp_path / "b" / CA_KEY).read_bytes())
    with pytest.raises(CertError, match="does not belong"):
        create_node_cert(tmp_path / "a", "n1", [])


@pytest.mark.parametrize("name", ["", "a/b", "../x", "x" * 65, "n 1", "n1\n"])
def test_bad_names_are_refused(ca_dir: Path, name: str) -> None:
    with pytest.raises(CertError, match="bad"):
        create_node_cert(ca_dir, name, [])
    with pytest.raises(CertError, match="bad"):
        create_client_cert(ca_dir, name)
    assert sorted(p.name for p in ca_dir.iterdir()) == [CA_CERT, CA_KEY]


def test_describe(ca_dir: Path) -> None:
    issued = create_node_cert(ca_dir, "n1", ["10.0.0.5"])
    line = describe(issued.cert)
    assert "\n" not in line
    assert "CN=n1" in line
    assert "IP:10.0.0.5" in line and f"URI:{NODE_URI_PREFIX}n1" in line
    date = _load(issued.cert).not_valid_after_utc.strftime("%Y-%m-%d")
    assert date in line
    with pytest.raises(CertError):
        describe(issued.key)


# A real TLS handshake with Python's ssl module: the files must work, not just parse.


@dataclass
class _Accepted:
    peer_cn: str | None = None
    peer_der: bytes | None = None
    error: OSError | None = None


@dataclass
class _Server:
    port: int
    thread: threading.Thread
    accepted: _Accepted = field(default_factory=_Accepted)

    def join(self) -> _Accepted:
        self.thread.join(TIMEOUT * 2)
        assert not self.thread.is_alive(), "TLS server thread did not finish"
        return self.accepted


def _peer_cn(peer: dict[str, object] | None) -> str | None:
    subject = peer.get("subject", ()) if peer else ()
    assert isinstance(subject, tuple)
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _server_context(issued: Issued, ca_dir: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert, issued.key)
    context.load_verify_locations(ca_dir / CA_CERT)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _client_context(issued: Issued, ca_dir: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
    context.load_cert_chain(issued.cert, issued.key)
    context.load_verify_locations(ca_dir / CA_CERT)
    return context


def _serve_once(context: ssl.SSLContext) -> _Server:
    """Accept one TLS connection on 127.0.0.1 in a thread; record the peer or the error."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    accepted = _Accepted()

    def run() -> None:
        with listener:
            try:
                conn, _ = listener.accept()
                conn.settimeout(TIMEOUT)
                with context.wrap_socket(conn, server_side=True) as tls:
                    accepted.peer_cn = _peer_cn(tls.getpeercert())  # type: ignore[arg-type]
                    accepted.peer_der = tls.getpeercert(binary_form=True)
                    tls.sendall(b"hello")
            except OSError as exc:  # ssl.SSLError is an OSError
                accepted.error = exc

    thread = threading.Thread(target=run, name="tls-server", daemon=True)
    thread.start()
    return _Server(listener.getsockname()[1], thread, accepted)


def _dial(port: int, context: ssl.SSLContext) -> tuple[str | None, bytes]:
    """Connect, verify the server as 127.0.0.1, and read its greeting."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return _peer_cn(tls.getpeercert()), tls.recv(16)  # type: ignore[arg-type]


def test_tls_handshake_between_node_and_client(ca_dir: Path) -> None:
    node = create_node_cert(ca_dir, "n1", ["127.0.0.1:7001"])
    client = create_client_cert(ca_dir, "alice")

    server = _serve_once(_server_context(node, ca_dir))
    server_cn, greeting = _dial(server.port, _client_context(client, ca_dir))
    accepted = server.join()

    assert accepted.error is None
    assert (server_cn, greeting) == ("n1", b"hello")
    assert accepted.peer_cn == "alice"
    assert accepted.peer_der is not None
    assert node_id_from_cert(accepted.peer_der) is None  # a client is not a node


def test_tls_node_dials_node_and_is_identified(ca_dir: Path) -> None:
    n1 = create_node_cert(ca_dir, "n1", [])
    n2 = create_node_cert(ca_dir, "n2", [])

    server = _serve_once(_server_context(n1, ca_dir))
    server_cn, _ = _dial(server.port, _client_context(n2, ca_dir))
    accepted = server.join()

    assert server_cn == "n1"
    assert accepted.peer_der is not None
    assert node_id_from_cert(accepted.peer_der) == "n2"


def test_tls_refuses_a_client_cert_from_another_ca(ca_dir: Path, tmp_path: Path) -> None:
    node = create_node_cert(ca_dir, "n1", [])
    other_dir = tmp_path / "other"
    create_ca(other_dir, common_name="someone else's CA")
    stranger = create_client_cert(other_dir, "mallory")
    # The stranger trusts our CA, so only the server's check of its certificate can stop it.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_cert_chain(stranger.cert, stranger.key)
    context.load_verify_locations(ca_dir / CA_CERT)

    server = _serve_once(_server_context(node, ca_dir))
    try:
        # With TLS 1.3 the client finishes first and learns of the refusal on its first read.
        _, greeting = _dial(server.port, context)
    except (ssl.SSLError, ConnectionError):
        greeting = b""
    accepted = server.join()

    assert greeting == b""
    assert isinstance(accepted.error, ssl.SSLError)
    assert "certificate verify failed" in str(accepted.error)
    assert accepted.peer_cn is None


def test_tls_client_cert_cannot_serve(ca_dir: Path) -> None:
    # clientAuth-only EKU: a stolen client key cannot impersonate a node to other nodes.
    client = create_client_cert(ca_dir, "alice")
    node = create_node_cert(ca_dir, "n1", [])

    server = _serve_once(_server_context(client, ca_dir))
    context = _client_context(node, ca_dir)
    context.check_hostname = False  # the client cert has no SAN; test the purpose check alone
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate purpose"):
        _dial(server.port, context)
    assert isinstance(server.join().error, OSError)
