"""Certificates for a TLS cluster: one private CA, node certificates and client certificates.

Running a cluster with TLS should take a minute, not an afternoon with ``openssl``. Like
``cockroach cert``, ``raftkv certs init|node|client`` (see ``cli.py``) calls this module to
keep everything in one directory::

    DIR/ca.crt  ca.key                   self-signed root, pathlen 0: it signs leaves only
    DIR/node-<id>.crt  node-<id>.key     serverAuth + clientAuth, SAN raftkv://node/<id>
    DIR/client-<name>.crt  client-<name>.key      clientAuth only

A node certificate is both a server and a client certificate because one node serves gRPC,
dials its peers' gRPC ports when it forwards to a leader, and authenticates on the Raft port.
Its node id travels in a URI SAN (:data:`NODE_URI_PREFIX`), so a peer learns *which* node
dialled it from the verified certificate (:func:`node_id_from_cert`) instead of trusting a
claim inside the stream; a client certificate has no such SAN and can never pass for a node.

Keys are ECDSA P-256 (cheap handshakes) and unencrypted: a node has to start unattended, and
the file mode (0o600 from the moment the file exists) is the protection. Files are published
atomically, so a crash never leaves a half-written key or a certificate without its key.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from raftkv.durable import fsync_dir, write_temp

CA_CERT: Final = "ca.crt"
CA_KEY: Final = "ca.key"
NODE_URI_PREFIX: Final = "raftkv://node/"
ORGANIZATION: Final = "raftkv"

# Peers' clocks disagree a little; a certificate made a second ago must already be valid there.
_CLOCK_SKEW = timedelta(minutes=5)
# Ids and names become file names, so they must not carry "/" or start a path of their own.
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_KEY_MODE: Final = 0o600
_CERT_MODE: Final = 0o644
_DIR_MODE: Final = 0o700


@dataclass(frozen=True)
class Issued:
    """Where a certificate and its private key were written."""

    cert: Path  # PEM certificate
    key: Path  # PEM private key (PKCS#8, unencrypted, mode 0o600)


class CertError(Exception):
    """A certificate cannot be made or read; the message says what to do about it."""


def create_ca(
    directory: Path,
    *,
    common_name: str = "raftkv CA",
    days: int = 3650,
    overwrite: bool = False,
) -> Issued:
    """Create ``ca.crt`` and ``ca.key`` in ``directory`` (made, mode 0o700, if missing)."""
    _check_days(days)
    if not 1 <= len(common_name) <= 64:
        raise CertError(f"CA common name must be 1..64 characters, got {common_name!r}")
    issued = Issued(cert=directory / CA_CERT, key=directory / CA_KEY)
    _refuse_existing(issued, overwrite)
    _ensure_directory(directory)

    key = ec.generate_private_key(ec.SECP256R1())
    name = _subject(common_name)
    now = datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        # pathlen 0: the CA signs leaves only; a leaked node key cannot mint more nodes.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    cert = _sign(builder, key)
    _publish(issued, cert, key)
    return issued


def load_ca(directory: Path) -> tuple[x509.Certificate, PrivateKeyTypes]:
    """The CA certificate and key of ``directory``; :class:`CertError` if either is unusable."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise CertError(f"{path.name} not found in {directory}: run `raftkv certs init` first")
    cert = _read_cert(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise CertError(f"cannot read {key_path}: {exc.strerror or exc}") from exc
    except TypeError as exc:
        # cryptography raises TypeError for a key that wants a passphrase.
        raise CertError(f"{key_path} is passphrase-protected, which raftkv cannot use") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertError(f"{key_path} is not a PEM private key: {exc}") from exc
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise CertError(f"{key_path} does not belong to {cert_path}: re-run `raftkv certs init`")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertError(f"{cert_path} is not a CA certificate: re-run `raftkv certs init`")
    return cert, key


def create_node_cert(
    directory: Path,
    node_id: str,
    hosts: Sequence[str],
    *,
    days: int = 825,
    overwrite: bool = False,
) -> Issued:
    """Create ``node-<id>.crt/.key``, signed by the CA in ``directory``, for ``hosts``.

    ``hosts`` are the names and addresses peers and clients dial, as written in the cluster
    file: a ``:port`` suffix and ``[]`` around IPv6 are stripped. ``localhost`` and 127.0.0.1
    are always added, so a node can be reached locally by either.
    """
    _check_name(node_id, "node id")
    _check_days(days)
    sans: list[x509.GeneralName] = []
    for host in [*hosts, "localhost", "127.0.0.1"]:
        san = _host_san(host)
        if san not in sans:
            sans.append(san)
    sans.append(x509.UniformResourceIdentifier(f"{NODE_URI_PREFIX}{node_id}"))
    return _issue_leaf(
        directory,
        f"node-{node_id}",
        node_id,
        sans,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        days,
        overwrite,
    )


def create_client_cert(
    directory: Path, name: str, *, days: int = 825, overwrite: bool = False
) -> Issued:
    """Create ``client-<name>.crt/.key``, signed by the CA in ``directory``: clientAuth only."""
    _check_name(name, "client name")
    _check_days(days)
    return _issue_leaf(
        directory, f"client-{name}", name, [], [ExtendedKeyUsageOID.CLIENT_AUTH], days, overwrite
    )


def node_id_from_cert(der: bytes) -> str | None:
    """The node id in the ``raftkv://node/<id>`` URI SAN of a DER certificate, else ``None``.

    Meant for the certificate a peer presented (already verified by the TLS layer). Never
    raises: garbage, no SAN, an invalid id or two different ids all mean "not a node".
    """
    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    # Peer input: any parse failure (ValueError, DuplicateExtension, ...) means "no identity".
    except Exception:
        return None
    ids = {uri[len(NODE_URI_PREFIX) :] for uri in uris if uri.startswith(NODE_URI_PREFIX)}
    if len(ids) != 1:
        return None
    (node_id,) = ids
    return node_id if _NAME.fullmatch(node_id) else None


def describe(path: Path) -> str:
    """One line for ``raftkv certs list``: file, subject CN, SANs and not-after date."""
    cert = _read_cert(path)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = _text(cns[0].value) if cns else "-"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = ",".join(_san_text(general) for general in san) or "none"
    except x509.ExtensionNotFound:
        names = "none"
    not_after = cert.not_valid_after_utc
    expired = " (EXPIRED)" if not_after <= datetime.now(UTC) else ""
    return f"{path.name}: CN={cn} SANs={names} not after {not_after:%Y-%m-%d %H:%M} UTC{expired}"


def _issue_leaf(
    directory: Path,
    stem: str,
    common_name: str,
    sans: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    days: int,
    overwrite: bool,
) -> Issued:
    ca_cert, ca_key = load_ca(directory)
    issued = Issued(cert=directory / f"{stem}.crt", key=directory / f"{stem}.key")
    _refuse_existing(issued, overwrite)

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    # A leaf that outlives its CA would only fail later with a more confusing error.
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(_issuer_key(ca_key).public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = _sign(builder, _issuer_key(ca_key))
    _publish(issued, cert, key)
    return issued


def _subject(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    # A CA only signs certificates (and CRLs); an ECDSA leaf only signs handshakes.
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _issuer_key(key: PrivateKeyTypes) -> CertificateIssuerPrivateKeyTypes:
    signing = (
        ec.EllipticCurvePrivateKey,
        rsa.RSAPrivateKey,
        ed25519.Ed25519PrivateKey,
        ed448.Ed448PrivateKey,
        dsa.DSAPrivateKey,
    )
    if not isinstance(key, signing):
        raise CertError(f"the CA key is a {type(key).__name__}, which cannot sign certificates")
    return key


def _sign(
    builder: x509.CertificateBuilder, key: CertificateIssuerPrivateKeyTypes
) -> x509.Certificate:
    # Ed25519/Ed448 hash internally and refuse an explicit digest; a user-supplied CA may use them.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return builder.sign(key, None)
    return builder.sign(key, hashes.SHA256())


def _host_san(host: str) -> x509.GeneralName:
    """The SAN for one ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    text = host.strip()
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not _is_port_suffix(rest)):
            raise CertError(f"bad host {host!r}: expected [IPv6] or [IPv6]:port")
        text = inner
    elif text.count(":") == 1:
        # Exactly one colon is host:port; more is a bare IPv6 address, handled below.
        name, _, port = text.partition(":")
        if not port.isdigit():
            raise CertError(f"bad host {host!r}: the part after ':' must be a port number")
        text = name
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise CertError(f"bad host {host!r}: a %zone cannot go into a certificate")
        return x509.IPAddress(address)
    labels = text.rstrip(".").split(".")
    if not text or len(text) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise CertError(f"bad host {host!r}: not an IP address or an ASCII DNS name")
    # DNS names compare case-insensitively; lowercase so "N1.example" and "n1.example" dedupe.
    return x509.DNSName(text.rstrip(".").lower())


def _is_port_suffix(rest: str) -> bool:
    return rest.startswith(":") and rest[1:].isdigit()


def _check_name(name: str, what: str) -> None:
    if not _NAME.fullmatch(name):
        raise CertError(f"bad {what} {name!r}: use 1..64 characters of A-Z a-z 0-9 _ . -")


def _check_days(days: int) -> None:
    if days < 1:
        raise CertError(f"days must be at least 1, got {days}")


def _refuse_existing(issued: Issued, overwrite: bool) -> None:
    if overwrite:
        return
    for path in (issued.cert, issued.key):
        if path.exists():
            raise CertError(f"{path} exists: pass overwrite=True (--overwrite) to replace it")


def _ensure_directory(directory: Path) -> None:
    if directory.is_dir():
        return
    try:
        directory.mkdir(parents=True, mode=_DIR_MODE)
        # mkdir's mode is filtered by the umask; the CA key's directory should be exactly 0o700.
        directory.chmod(_DIR_MODE)
    except OSError as exc:
        raise CertError(f"cannot create {directory}: {exc.strerror or exc}") from exc


def _read_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertError(f"{path} is not a PEM certificate: {exc}") from exc


def _publish(issued: Issued, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """Write the key and certificate so that neither is ever seen half-written.

    Both temporary files are complete and fsynced before either is renamed into place, so a
    failure leaves either nothing new or (between two renames) a new key beside the old cert.
    """
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    staged: list[tuple[Path, Path]] = []
    try:
        for final, data, mode in (
            (issued.key, key_pem, _KEY_MODE),
            (issued.cert, cert_pem, _CERT_MODE),
        ):
            staged.append((write_temp(final, data, mode), final))
        for temp, final in staged:
            os.replace(temp, final)
        fsync_dir(issued.cert.parent)
    except OSError as exc:
        raise CertError(f"cannot write {issued.cert.parent}: {exc.strerror or exc}") from exc
    finally:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _san_text(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    return str(name.value)
