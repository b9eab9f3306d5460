import base64
import hashlib
import hmac
import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from raftkv.auth import (
    METHOD_ROLES,
    TOKEN_PREFIX,
    Authenticator,
    Identity,
    Role,
    generate_key,
    mint_token,
    parse_bearer,
    read_key_file,
    require,
    role_for,
    write_key_file,
)
from raftkv.config import ConfigError
from raftkv.errors import PermissionDenied, Unauthenticated

NOW = 1_800_000_000.0
BACKUP_TOKEN = "backup-secret-token"
TOKENS = f"""
[tokens.alice]
token = "alice-secret-token"
role = "readwrite"
[tokens.backup]
sha256 = "{hashlib.sha256(BACKUP_TOKEN.encode()).hexdigest()}"
role = "READ"
"""


def write(tmp_path: Path, text: str, name: str = "tokens.toml") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    f = tmp_path / "auth.key"
    write_key_file(f, generate_key())
    return f


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(key: bytes, payload: object) -> str:
    """A correctly signed token over any payload, to reach the checks after the signature."""
    body = b64(json.dumps(payload).encode())
    mac = hmac.new(key, (TOKEN_PREFIX + body).encode(), hashlib.sha256).digest()
    return f"{TOKEN_PREFIX}{body}.{b64(mac)}"


# -- roles ------------------------------------------------------------------------------------


def test_roles_are_ordered_and_parse_in_any_case() -> None:
    assert Role.READ < Role.READWRITE < Role.ADMIN
    assert Role.parse("ReadWrite") is Role.READWRITE
    assert Role.parse("admin") is Role.ADMIN
    with pytest.raises(ValueError, match="read, readwrite, admin"):
        Role.parse("root")


def test_require_allows_equal_or_higher_roles_and_names_both_roles() -> None:
    require(Identity("a", Role.ADMIN, "token-file"), Role.READWRITE, "Put")
    require(Identity("a", Role.READ, "token-file"), Role.READ, "Get")
    with pytest.raises(PermissionDenied) as e:
        require(Identity("bob", Role.READ, "signed-token"), Role.READWRITE, "Put")
    assert str(e.value) == "bob has role read; Put needs readwrite"


def test_role_for_known_methods_and_fails_closed_on_unknown_ones() -> None:
    assert role_for("/raftkv.v1.KV/Get") is Role.READ
    assert role_for("/raftkv.v1.KV/CompareAndSwap") is Role.READWRITE
    assert role_for("/raftkv.v1.Cluster/Status") is Role.READ
    assert role_for("/raftkv.v1.KV/DropEverything") is Role.ADMIN
    assert role_for("/raftkv.v1.Cluster/RemoveNode") is Role.ADMIN
    assert role_for("") is Role.ADMIN
    with pytest.raises(TypeError):
        METHOD_ROLES["/raftkv.v1.KV/Get"] = Role.ADMIN  # type: ignore[index]


# -- bearer -----------------------------------------------------------------------------------


def test_parse_bearer_accepts_the_scheme_in_any_case() -> None:
    assert parse_bearer("Bearer abc.def") == "abc.def"
    assert parse_bearer("bEARER xyz") == "xyz"


@pytest.mark.parametrize(
    "value",
    ["", "Bearer", "Bearer ", "Basic abc", "Bearer  abc", "Bearer abc def", "abc", " Bearer abc"],
)
def test_parse_bearer_rejects_everything_else(value: str) -> None:
    with pytest.raises(Unauthenticated):
        parse_bearer(value)


def test_parse_bearer_does_not_echo_the_value() -> None:
    with pytest.raises(Unauthenticated) as e:
        parse_bearer("Token s3cr3t-value")
    assert "s3cr3t" not in str(e.value)


# -- token file -------------------------------------------------------------------------------


def test_token_file_plain_and_sha256_entries(tmp_path: Path) -> None:
    a = Authenticator(token_file=write(tmp_path, TOKENS))
    assert a.enabled
    assert a.authenticate("alice-secret-token") == Identity("alice", Role.READWRITE, "token-file")
    assert a.authenticate(BACKUP_TOKEN) == Identity("backup", Role.READ, "token-file")


def test_unknown_and_near_miss_tokens_are_unauthenticated(tmp_path: Path) -> None:
    a = Authenticator(token_file=write(tmp_path, TOKENS))
    for token in ["nope", "alice-secret-tokeN", "alice-secret-token ", ""]:
        with pytest.raises(Unauthenticated, match=r"^unknown token$"):
            a.authenticate(token)


def test_token_file_match_goes_through_compare_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[bytes, bytes]] = []
    real: Callable[[bytes, bytes], bool] = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    a = Authenticator(token_file=write(tmp_path, TOKENS))
    assert a.authenticate(BACKUP_TOKEN).name == "backup"
    digest = hashlib.sha256(BACKUP_TOKEN.encode()).digest()
    assert seen == [(digest, digest)]


def test_without_sources_authentication_is_disabled_and_fails_closed() -> None:
    a = Authenticator()
    assert not a.enabled
    with pytest.raises(Unauthenticated):
        a.authenticate("anything")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('[tokens.x]\ntoken = "t"\nrole = "read"\nextra = 1\n', "unknown keys ['extra']"),
        ('[tokens.x]\ntoken = "t"\n', "needs a role"),
        ('[tokens.x]\ntoken = "t"\nrole = "root"\n', "unknown role 'root'"),
        ('[tokens.x]\ntoken = "t"\nrole = 3\n', "role must be a string"),
        ('[tokens.x]\nrole = "read"\n', "exactly one of token and sha256"),
        (
            f'[tokens.x]\ntoken = "t"\nsha256 = "{"0" * 64}"\nrole = "read"\n',
            "exactly one of token and sha256",
        ),
        ('[tokens.x]\ntoken = ""\nrole = "read"\n', "non-empty"),
        ('[tokens.x]\ntoken = "a b"\nrole = "read"\n', "without spaces"),
        ('[tokens.x]\nsha256 = "abc"\nrole = "read"\n', "64 hex digits"),
        (f'[tokens.x]\nsha256 = "{"g" * 64}"\nrole = "read"\n', "64 hex digits"),
    ],
)
def test_token_file_errors_name_the_file_and_the_entry(
    tmp_path: Path, body: str, fragment: str
) -> None:
    f = write(tmp_path, body)
    with pytest.raises(ConfigError) as e:
        Authenticator(token_file=f)
    message = str(e.value)
    assert str(f) in message and "[tokens.x]" in message and fragment in message
    assert "\n" not in message


def test_duplicate_tokens_name_both_entries_even_across_plain_and_sha256(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"shared").hexdigest()
    f = write(
        tmp_path,
        f'[tokens.a]\ntoken = "shared"\nrole = "read"\n[tokens.b]\nsha256 = "{digest}"\n'
        'role = "admin"\n',
    )
    with pytest.raises(ConfigError) as e:
        Authenticator(token_file=f)
    assert str(f) in str(e.value) and "[tokens.b]" in str(e.value) and "[tokens.a]" in str(e.value)


def test_token_file_level_errors_name_the_file(tmp_path: Path) -> None:
    for body, fragment in [
        ("tokens = 1\n", "[tokens.<name>]"),
        ("[token.x]\n", "unknown keys ['token']"),
        ("[tokens.x\n", "not valid TOML"),
    ]:
        f = write(tmp_path, body)
        with pytest.raises(ConfigError, match="token file") as e:
            Authenticator(token_file=f)
        assert str(f) in str(e.value) and fragment in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        Authenticator(token_file=tmp_path / "missing.toml")


def test_reload_picks_up_changes_and_keeps_the_old_table_on_a_bad_file(tmp_path: Path) -> None:
    f = write(tmp_path, TOKENS)
    a = Authenticator(token_file=f)
    f.write_text('[tokens.carol]\ntoken = "carol-token"\nrole = "admin"\n')
    a.reload()
    assert a.authenticate("carol-token").name == "carol"
    with pytest.raises(Unauthenticated):
        a.authenticate("alice-secret-token")

    f.write_text('[tokens.dave]\ntoken = "dave-token"\nrole = "superuser"\n')
    with pytest.raises(ConfigError, match="superuser"):
        a.reload()
    assert a.authenticate("carol-token").role is Role.ADMIN
    with pytest.raises(Unauthenticated):
        a.authenticate("dave-token")


# -- key file ---------------------------------------------------------------------------------


def test_key_file_is_0600_hex_and_round_trips(tmp_path: Path) -> None:
    key = generate_key()
    assert len(key) == 32 and key != generate_key()
    f = tmp_path / "auth.key"
    write_key_file(f, key)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert f.read_text().strip() == key.hex()
    assert read_key_file(f) == key


def test_key_file_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    f = tmp_path / "auth.key"
    first, second = generate_key(), generate_key()
    write_key_file(f, first)
    with pytest.raises(ConfigError, match="already exists"):
        write_key_file(f, second)
    assert read_key_file(f) == first
    f.chmod(0o644)
    write_key_file(f, second, overwrite=True)
    assert read_key_file(f) == second
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["auth.key"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("zz" * 32, "hex"), ("abc", "hex"), ("", "hex"), ("00" * 15, "at least 16")],
)
def test_bad_key_files_name_the_path(tmp_path: Path, content: str, fragment: str) -> None:
    f = write(tmp_path, content, "auth.key")
    with pytest.raises(ConfigError) as e:
        read_key_file(f)
    assert str(f) in str(e.value) and fragment in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        read_key_file(tmp_path / "missing.key")


def test_a_bad_key_file_fails_the_authenticator(tmp_path: Path) -> None:
    f = write(tmp_path, "not hex", "auth.key")
    with pytest.raises(ValueError, match=str(f)):
        Authenticator(key_file=f)


# -- signed tokens ----------------------------------------------------------------------------


def test_minted_token_round_trips(key_file: Path) -> None:
    a = Authenticator(key_file=key_file)
    assert a.enabled
    token = mint_token(read_key_file(key_file), "ci", Role.ADMIN, now=NOW)
    assert token.startswith(TOKEN_PREFIX) and "=" not in token
    assert a.authenticate(token, now=NOW + 10 * 365 * 86400) == Identity(
        "ci", Role.ADMIN, "signed-token"
    )


def test_token_expires_at_exp_and_says_when(key_file: Path) -> None:
    a = Authenticator(key_file=key_file)
    token = mint_token(read_key_file(key_file), "ci", Role.READ, ttl_s=60, now=NOW)
    assert a.authenticate(token, now=NOW + 59).name == "ci"
    with pytest.raises(Unauthenticated) as e:
        a.authenticate(token, now=NOW + 60)
    assert str(e.value) == "token expired at 2027-01-15T08:01:00Z"


def test_mint_rejects_bad_arguments() -> None:
    key = generate_key()
    for ttl in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="ttl_s"):
            mint_token(key, "ci", Role.READ, ttl_s=ttl)
    with pytest.raises(ValueError, match="name"):
        mint_token(key, "", Role.READ)
    with pytest.raises(ValueError, match="at least 16"):
        mint_token(b"short", "ci", Role.READ)


def test_tampered_payload_fails_the_signature_check(key_file: Path) -> None:
    key = read_key_file(key_file)
    a = Authenticator(key_file=key_file)
    prefix, _, sig = mint_token(key, "ci", Role.READ, now=NOW).split(".")
    forged = b64(json.dumps({"sub": "ci", "role": "admin", "iat": 0, "exp": 0}).encode())
    with pytest.raises(Unauthenticated, match=r"^bad token signature$"):
        a.authenticate(f"{prefix}.{forged}.{sig}", now=NOW)


def test_signature_is_checked_before_the_payload_is_parsed(key_file: Path) -> None:
    # An unsigned payload that is not even JSON must fail on the signature: the parser never
    # sees bytes that were not signed with our key.
    a = Authenticator(key_file=key_file)
    with pytest.raises(Unauthenticated, match=r"^bad token signature$"):
        a.authenticate(f"{TOKEN_PREFIX}{b64(b'{{{{not json')}.{b64(bytes(32))}", now=NOW)


def test_tampered_signature_fails(key_file: Path) -> None:
    a = Authenticator(key_file=key_file)
    token = mint_token(read_key_file(key_file), "ci", Role.READ, now=NOW)
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(Unauthenticated, match=r"^bad token signature$"):
        a.authenticate(flipped, now=NOW)


def test_token_minted_with_another_key_fails(key_file: Path) -> None:
    a = Authenticator(key_file=key_file)
    with pytest.raises(Unauthenticated, match=r"^bad token signature$"):
        a.authenticate(mint_token(generate_key(), "ci", Role.READ, now=NOW), now=NOW)


def test_over_long_token_is_rejected_without_echo(key_file: Path, tmp_path: Path) -> None:
    a = Authenticator(token_file=write(tmp_path, TOKENS), key_file=key_file)
    token = TOKEN_PREFIX + "x" * 4096
    with pytest.raises(Unauthenticated, match="longer than 4096") as e:
        a.authenticate(token)
    assert "xxxx" not in str(e.value)


@pytest.mark.parametrize(
    "payload",
    [
        {"sub": "ci", "role": "read", "iat": 0, "exp": 0, "admin": True},
        {"sub": "ci", "role": "read", "iat": 0},
        {"sub": 7, "role": "read", "iat": 0, "exp": 0},
        {"sub": "", "role": "read", "iat": 0, "exp": 0},
        {"sub": "ci", "role": "root", "iat": 0, "exp": 0},
        {"sub": "ci", "role": 1, "iat": 0, "exp": 0},
        {"sub": "ci", "role": "read", "iat": "0", "exp": 0},
        {"sub": "ci", "role": "read", "iat": 0, "exp": 1.5e12},
        {"sub": "ci", "role": "read", "iat": 0, "exp": False},
        {"sub": "ci", "role": "read", "iat": 0, "exp": -1},
        ["ci", "read", 0, 0],
        "ci",
    ],
)
def test_signed_but_malformed_payloads_are_rejected(key_file: Path, payload: object) -> None:
    a = Authenticator(key_file=key_file)
    token = signed(read_key_file(key_file), payload)
    with pytest.raises(Unauthenticated, match=r"^malformed token$"):
        a.authenticate(token, now=NOW)


def test_the_test_signer_matches_mint_token(key_file: Path) -> None:
    # Guards the test above: its tokens must fail on the payload, not on the signature.
    a = Authenticator(key_file=key_file)
    good = signed(read_key_file(key_file), {"sub": "ci", "role": "read", "iat": 0, "exp": 0})
    assert a.authenticate(good, now=NOW) == Identity("ci", Role.READ, "signed-token")


def test_duplicate_json_keys_are_malformed(key_file: Path) -> None:
    key = read_key_file(key_file)
    body = b64(b'{"sub":"ci","role":"read","role":"admin","iat":0,"exp":0}')
    mac = hmac.new(key, (TOKEN_PREFIX + body).encode(), hashlib.sha256).digest()
    with pytest.raises(Unauthenticated, match=r"^malformed token$"):
        Authenticator(key_file=key_file).authenticate(f"{TOKEN_PREFIX}{body}.{b64(mac)}", now=NOW)


@pytest.mark.parametrize(
    "token",
    ["rkv1.", "rkv1.abc", "rkv1.a.b.c", "rkv1..sig", "rkv1.pay+load.sig", "rkv1.payload.sig="],
)
def test_badly_shaped_signed_tokens_are_malformed(key_file: Path, token: str) -> None:
    with pytest.raises(Unauthenticated, match=r"^malformed token$"):
        Authenticator(key_file=key_file).authenticate(token, now=NOW)


def test_both_sources_work_together(key_file: Path, tmp_path: Path) -> None:
    a = Authenticator(token_file=write(tmp_path, TOKENS), key_file=key_file)
    assert a.authenticate("alice-secret-token").source == "token-file"
    token = mint_token(read_key_file(key_file), "ci", Role.READ, now=NOW)
    assert a.authenticate(token, now=NOW).source == "signed-token"


def test_signed_tokens_are_unknown_without_a_key_file(tmp_path: Path) -> None:
    a = Authenticator(token_file=write(tmp_path, TOKENS))
    with pytest.raises(Unauthenticated, match=r"^unknown token$"):
        a.authenticate(mint_token(generate_key(), "ci", Role.ADMIN, now=NOW), now=NOW)
