"""The Raft connection's outgoing buffer: chunks in, exact bytes out, in order."""

import random

from raftkv.raft.link import SendBuffer as _SendBuffer


def test_partial_sends_return_every_byte_in_order() -> None:
    rng = random.Random(3)
    frames = [rng.randbytes(rng.randrange(1, 70_000)) for _ in range(200)]
    buf = _SendBuffer()
    sent = bytearray()
    pending = list(frames)
    while pending or len(buf):
        # interleave appends with partial sends of random sizes
        for _ in range(rng.randrange(0, 4)):
            if pending:
                buf.append(pending.pop(0))
        if len(buf):
            head = buf.head()
            n = rng.randrange(1, len(head) + 1)
            sent += head[:n]
            buf.consume(n)
    assert bytes(sent) == b"".join(frames)
    assert len(buf) == 0 and not buf


def test_small_frames_are_joined_into_one_send() -> None:
    buf = _SendBuffer()
    for _ in range(100):
        buf.append(b"x" * 100)
    assert len(buf.head()) == 100 * 100
    assert len(buf) == 100 * 100
