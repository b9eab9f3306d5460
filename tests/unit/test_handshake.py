"""Peer authentication on the Raft port: proofs, hellos, refusals, session sealing."""

import pytest
from cryptography.exceptions import InvalidTag

from raftkv.raft import handshake as hs


def hello(node: str, secret: bool = True, fingerprint: str = "fp1") -> hs.Hello:
    return hs.parse_hello(hs.hello_body(node, fingerprint, hs.new_nonce(), secret))


def test_hello_round_trips() -> None:
    h = hello("n2")
    assert (h.node_id, h.fingerprint, h.has_secret, len(h.nonce)) == ("n2", "fp1", True, 32)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"RKVRAFT2",
        b"NOTRAFT!" + b"\x00" * 60,
        hs.hello_body("n1", "fp", b"\x00" * 32, False)[:-1],  # cut short
        hs.hello_body("n1", "fp", b"\x00" * 32, False) + b"x",  # trailing bytes
        b"RKVRAFT2\x00\x09\x00" + b"\x00" * 32 + b"\x02n1\x02fp",  # other version
        b"RKVRAFT2\x00\x01\x00" + b"\x00" * 32 + b"\xffn1",  # length past the end
        b"RKVRAFT2\x00\x01\x00" + b"\x00" * 32 + b"\x02\xff\xfe\x02fp",  # not UTF-8
    ],
)
def test_bad_hellos_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(hs.HandshakeError) as e:
        hs.parse_hello(body)
    assert e.value.code == hs.RefuseCode.PROTOCOL


def test_proofs_verify_only_with_the_same_secret_and_role() -> None:
    a, b = hs.Secret("correct horse battery"), hs.Secret("correct horse battery")
    dialer, acceptor = hello("n3"), hello("n1")
    proof = a.proof(True, dialer, acceptor)  # n3 dialed n1
    assert b.verify(False, acceptor, dialer, proof)
    # reflected back to its sender, or checked in the wrong role: no
    assert not a.verify(True, dialer, acceptor, proof)
    assert not hs.Secret("wrong").verify(False, acceptor, dialer, proof)
    # a proof is bound to both hellos (so to both nonces): replaying it on a new link fails
    assert not b.verify(False, hello("n1"), dialer, proof)


def test_sessions_seal_in_order_and_reject_replays_and_forgeries() -> None:
    secret = hs.Secret("s" * 20)
    d, a = hello("n3"), hello("n1")
    d_send, d_recv = secret.session(True, d, a)
    a_send, a_recv = secret.session(False, a, d)
    frames = [d_send.seal(f"frame {i}".encode()) for i in range(3)]
    assert a_recv.open(frames[0]) == b"frame 0"
    with pytest.raises(InvalidTag):
        a_recv.open(frames[0])  # replayed
    with pytest.raises(InvalidTag):
        a_recv.open(frames[2])  # frame 1 dropped
    assert d_recv.open(a_send.seal(b"back")) == b"back"
    forged = bytearray(d_send.seal(b"x"))
    forged[0] ^= 1
    fresh_recv = secret.session(False, a, d)[1]
    with pytest.raises(InvalidTag):
        fresh_recv.open(bytes(forged))


def test_refusal_text_from_a_stranger_is_made_printable_and_short() -> None:
    code, text = hs.parse_refuse(bytes([3]) + b"bad\x1b[31m\nproof" + b"x" * 1000)
    assert code == 3
    assert "\x1b" not in text and "\n" not in text and len(text) <= 400
