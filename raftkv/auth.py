"""Who is calling, and may they: bearer tokens to identities, identities to roles.

The gRPC server interceptor reads ``authorization: Bearer <token>``, and asks this module two
questions: :meth:`Authenticator.authenticate` (which identity does this token prove?) and
:func:`require` with :func:`role_for` (is that identity's role enough for the method?). Keeping
both answers here, away from grpc, makes them plain functions that unit tests can drive.

A token is accepted from either of two sources, which may be used together:

* **A token file** (TOML) of static tokens, each held as the token itself or only its
  SHA-256, so the file need not contain secrets::

      [tokens.alice]
      token = "plaintext-token"
      role = "readwrite"
      [tokens.backup]
      sha256 = "<hex sha256 of the token>"
      role = "read"

  The table is indexed by the token's digest: lookup is O(1) and the final comparison is
  :func:`hmac.compare_digest` over digests, never over the secret itself.

* **Signed tokens** that raftkv mints with a key file (32 random bytes as hex, mode 0o600)::

      rkv1.<b64url(payload JSON)>.<b64url(HMAC-SHA256(key, "rkv1." + payload_b64))>

  with payload ``{"sub": name, "role": role, "iat": seconds, "exp": seconds or 0}``. The
  signature is checked, in constant time, before the payload is parsed, so attacker-chosen
  bytes never reach the JSON parser unless they were signed with our key.

Roles are ordered (read < readwrite < admin): a higher role may do all a lower one may. Methods
missing from :data:`METHOD_ROLES` need admin, so a new RPC is closed until someone opens it.
Failure messages never echo the token: they end up in logs and in replies.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import math
import re
import secrets
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType

from raftkv.config import ConfigError
from raftkv.durable import PRIVATE, write_file
from raftkv.errors import PermissionDenied, Unauthenticated

TOKEN_PREFIX = "rkv1."
MAX_TOKEN_CHARS = 4096
KEY_BYTES = 32
MIN_KEY_BYTES = 16

SOURCE_TOKEN_FILE = "token-file"
SOURCE_SIGNED_TOKEN = "signed-token"

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
# What a token may contain to travel in a gRPC metadata value after "Bearer ": printable
# ASCII without spaces. A token outside this set could never be presented, so refuse it early.
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")
_BEARER_SCHEME = "bearer "
_ENTRY_KEYS = frozenset({"token", "sha256", "role"})
_PAYLOAD_KEYS = frozenset({"sub", "role", "iat", "exp"})


class Role(enum.IntEnum):
    """What a caller may do; ordered, so ``role >= needed`` is the whole permission check."""

    READ = 1
    READWRITE = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        """``"read"``, ``"readwrite"`` or ``"admin"``, in any case."""
        try:
            return cls[text.upper()]
        except KeyError:
            allowed = ", ".join(_role_name(r) for r in cls)
            raise ValueError(f"unknown role {text!r}; expected one of {allowed}") from None


def _role_name(role: Role) -> str:
    return role.name.lower()


@dataclass(frozen=True)
class Identity:
    """A caller this node recognised: its name, role, and which source vouched for it."""

    name: str
    role: Role
    source: str


_READ, _WRITE = Role.READ, Role.READWRITE
METHOD_ROLES: Mapping[str, Role] = MappingProxyType(
    {
        "/raftkv.v1.KV/Get": _READ,
        "/raftkv.v1.Admin/GetView": _READ,
        "/raftkv.v1.KV/GetMany": _READ,
        "/raftkv.v1.KV/Put": _WRITE,
        "/raftkv.v1.KV/Delete": _WRITE,
        "/raftkv.v1.KV/CompareAndSwap": _WRITE,
        "/raftkv.v1.KV/PutMany": _WRITE,
        "/raftkv.v1.Cluster/Status": _READ,
    }
)


def role_for(method: str) -> Role:
    """The role a full gRPC method name needs; anything not listed needs admin (fail closed)."""
    return METHOD_ROLES.get(method, Role.ADMIN)


def require(identity: Identity, needed: Role, what: str) -> None:
    """Raise :class:`PermissionDenied` unless ``identity`` may do ``what``."""
    if identity.role < needed:
        raise PermissionDenied(
            f"{identity.name} has role {_role_name(identity.role)}; "
            f"{what} needs {_role_name(needed)}"
        )


def parse_bearer(metadata_value: str) -> str:
    """The token of an ``authorization`` value ``Bearer <token>`` (scheme in any case)."""
    scheme, token = metadata_value[: len(_BEARER_SCHEME)], metadata_value[len(_BEARER_SCHEME) :]
    if scheme.lower() != _BEARER_SCHEME:
        raise Unauthenticated("authorization must be 'Bearer <token>'")
    if not token:
        raise Unauthenticated("empty bearer token")
    if not _TOKEN_CHARS.fullmatch(token):
        raise Unauthenticated("malformed bearer token")
    return token


# -- key files ---------------------------------------------------------------------------------


def generate_key() -> bytes:
    """A fresh signing key: 32 bytes from the OS's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def _check_key(key: bytes) -> None:
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"signing key is {len(key)} bytes; it needs at least {MIN_KEY_BYTES}")


def write_key_file(path: Path, key: bytes, *, overwrite: bool = False) -> None:
    """Store ``key`` as hex in a file that is mode 0o600 from the moment it exists.

    Refuses to replace an existing file unless ``overwrite``: losing a key invalidates every
    token minted with it. An overwrite goes through a new file and a rename, so the old key is
    never truncated in place and no reader sees a half-written key.
    """
    _check_key(key)
    try:
        write_file(path, (key.hex() + "\n").encode("ascii"), mode=PRIVATE, overwrite=overwrite)
    except FileExistsError:
        raise ConfigError(f"key file {path} already exists; refusing to overwrite it") from None


def read_key_file(path: Path) -> bytes:
    """The signing key stored by :func:`write_key_file`; ConfigError naming the file if bad."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ConfigError(f"key file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"key file {path} cannot be read: {e}") from None
    if not _HEX.fullmatch(text):
        raise ConfigError(f"key file {path} does not hold a hex-encoded key")
    key = bytes.fromhex(text)
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"key file {path} holds a {len(key)}-byte key; it needs at least {MIN_KEY_BYTES}"
        )
    return key


# -- signed tokens -----------------------------------------------------------------------------


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(key: bytes, payload_b64: str) -> str:
    mac = hmac.new(key, (TOKEN_PREFIX + payload_b64).encode("ascii"), hashlib.sha256)
    return _b64encode(mac.digest())


def mint_token(
    key: bytes, name: str, role: Role, *, ttl_s: float | None = None, now: float | None = None
) -> str:
    """A signed token for ``name`` with ``role``; it never expires unless ``ttl_s`` is given.

    ``exp`` is rounded up to a whole second, so a token is never shorter-lived than asked.
    """
    _check_key(key)
    if not name:
        raise ValueError("a token needs a non-empty name")
    if ttl_s is not None and not (ttl_s > 0 and math.isfinite(ttl_s)):
        raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s}")
    issued = time.time() if now is None else now
    payload = {
        "sub": name,
        "role": _role_name(Role(role)),
        "iat": int(issued),
        "exp": 0 if ttl_s is None else math.ceil(issued + ttl_s),
    }
    payload_b64 = _b64encode(json.dumps(payload, separators=(",", ":")).encode("utf-8"))
    token = f"{TOKEN_PREFIX}{payload_b64}.{_signature(key, payload_b64)}"
    if len(token) > MAX_TOKEN_CHARS:
        raise ValueError(
            f"the token would be {len(token)} characters; the limit is {MAX_TOKEN_CHARS}"
        )
    return token


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _verify_signed(key: bytes, token: str, now: float) -> Identity:
    """Check a ``rkv1.`` token: format, then signature, and only then the payload."""
    malformed = Unauthenticated("malformed token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] + "." != TOKEN_PREFIX:
        raise malformed
    payload_b64, sig_b64 = parts[1], parts[2]
    if not (_B64URL.fullmatch(payload_b64) and _B64URL.fullmatch(sig_b64)):
        raise malformed
    # Compare the encodings, not the decoded bytes: only the canonical spelling of the
    # signature is accepted, so a token has exactly one valid form.
    if not hmac.compare_digest(_signature(key, payload_b64).encode(), sig_b64.encode()):
        raise Unauthenticated("bad token signature")
    try:
        payload = json.loads(
            _b64decode(payload_b64).decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise malformed from None
    if not isinstance(payload, dict) or set(payload) != _PAYLOAD_KEYS:
        raise malformed
    sub, role_text, iat, exp = (payload[k] for k in ("sub", "role", "iat", "exp"))
    # bool is an int in Python; true/false in a timestamp is a malformed token, not 1/0.
    if not (isinstance(sub, str) and sub and isinstance(role_text, str)):
        raise malformed
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in (iat, exp)):
        raise malformed
    try:
        role = Role.parse(role_text)
    except ValueError:
        raise malformed from None
    if exp and now >= exp:
        when = datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        raise Unauthenticated(f"token expired at {when}")
    return Identity(sub, role, SOURCE_SIGNED_TOKEN)


# -- token files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    identity: Identity


def _load_token_file(path: Path) -> dict[bytes, _Entry]:
    """Parse and validate a token file into a table keyed by each token's SHA-256."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"token file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"token file {path} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"token file {path} is not valid TOML: {e}") from None
    if set(raw) - {"tokens"}:
        raise ConfigError(f"token file {path}: unknown keys {sorted(set(raw) - {'tokens'})}")
    tokens = raw.get("tokens", {})
    if not isinstance(tokens, dict):
        raise ConfigError(f"token file {path}: tokens must be [tokens.<name>] tables")
    table: dict[bytes, _Entry] = {}
    owners: dict[bytes, str] = {}
    for name, spec in tokens.items():
        where = f"token file {path}: [tokens.{name}]"
        if not name:
            raise ConfigError(f"{where} needs a non-empty name")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a table with role and token or sha256")
        if set(spec) - _ENTRY_KEYS:
            raise ConfigError(f"{where} has unknown keys {sorted(set(spec) - _ENTRY_KEYS)}")
        if "role" not in spec:
            raise ConfigError(f"{where} needs a role")
        if not isinstance(spec["role"], str):
            raise ConfigError(f"{where}: role must be a string")
        try:
            role = Role.parse(spec["role"])
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if ("token" in spec) == ("sha256" in spec):
            raise ConfigError(f"{where} needs exactly one of token and sha256")
        if "token" in spec:
            token = spec["token"]
            if not isinstance(token, str) or not token:
                raise ConfigError(f"{where}: token must be a non-empty string")
            if len(token) > MAX_TOKEN_CHARS or not _TOKEN_CHARS.fullmatch(token):
                raise ConfigError(
                    f"{where}: token must be at most {MAX_TOKEN_CHARS} printable ASCII "
                    "characters without spaces"
                )
            digest = hashlib.sha256(token.encode("ascii")).digest()
        else:
            hex_digest = spec["sha256"]
            if not isinstance(hex_digest, str) or not _SHA256_HEX.fullmatch(hex_digest):
                raise ConfigError(f"{where}: sha256 must be 64 hex digits")
            digest = bytes.fromhex(hex_digest)
        if digest in owners:
            raise ConfigError(f"{where} has the same token as [tokens.{owners[digest]}]")
        owners[digest] = name
        table[digest] = _Entry(digest, Identity(name, role, SOURCE_TOKEN_FILE))
    return table


class Authenticator:
    """Turns bearer tokens into identities, from a token file, a signing key, or both."""

    def __init__(self, token_file: Path | None = None, key_file: Path | None = None) -> None:
        self._token_file = token_file
        self._key = read_key_file(key_file) if key_file is not None else None
        self._table: dict[bytes, _Entry] = {}
        if token_file is not None:
            self._table = _load_token_file(token_file)

    @property
    def enabled(self) -> bool:
        """Whether any source is configured; if not, the server runs without authentication."""
        return self._token_file is not None or self._key is not None

    def authenticate(self, token: str, *, now: float | None = None) -> Identity:
        """The identity ``token`` proves, or :class:`Unauthenticated` with a short reason."""
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated(f"token longer than {MAX_TOKEN_CHARS} characters")
        # The token file is tried first, so a static token may look like anything, even rkv1.
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        # The dict probe's timing can only reveal the digest, which does not reveal the token;
        # the final comparison is constant-time all the same.
        entry = self._table.get(digest)
        if entry is not None and hmac.compare_digest(entry.digest, digest):
            return entry.identity
        if self._key is not None and token.startswith(TOKEN_PREFIX):
            return _verify_signed(self._key, token, time.time() if now is None else now)
        raise Unauthenticated("unknown token")

    def reload(self) -> None:
        """Re-read the token file (on SIGHUP); if the new file is bad, keep the old table.

        The table is swapped in one assignment, so a concurrent :meth:`authenticate` sees
        either the whole old table or the whole new one.
        """
        if self._token_file is not None:
            self._table = _load_token_file(self._token_file)
