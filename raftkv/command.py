"""The Raft log format we own: protobuf ``Command`` messages in and out of bytes.

pysyncobj would pickle Python objects into its log; we hand it these bytes instead, so the
on-disk and on-wire format is versioned by protobuf field numbers, readable from any language,
and never executes code when decoded.
"""

from __future__ import annotations

from raftkv._pb.raftkv.v1 import command_pb2 as pb

Command = pb.Command
CommandResult = pb.CommandResult

BARRIER = pb.Command(barrier=pb.BarrierOp()).SerializeToString()


def put(key: bytes, value: bytes, client_id: bytes = b"", seq: int = 0) -> bytes:
    return pb.Command(
        client_id=client_id, seq=seq, put=pb.PutOp(key=key, value=value)
    ).SerializeToString()


def put_batch_encoded(batch: bytes, client_id: bytes = b"", seq: int = 0) -> bytes:
    """A batch of puts given as an encoded ``BatchOp`` (or anything wire-identical to one)."""
    cmd = pb.Command(client_id=client_id, seq=seq)
    cmd.batch.MergeFromString(batch)
    return cmd.SerializeToString()


def delete(key: bytes, client_id: bytes = b"", seq: int = 0) -> bytes:
    return pb.Command(client_id=client_id, seq=seq, delete=pb.DeleteOp(key=key)).SerializeToString()


def cas(
    key: bytes,
    value: bytes,
    *,
    expected_value: bytes | None = None,
    expected_version: int | None = None,
    client_id: bytes = b"",
    seq: int = 0,
) -> bytes:
    if (expected_value is None) == (expected_version is None):
        raise ValueError("compare-and-swap needs exactly one of expected_value, expected_version")
    op = pb.CasOp(key=key, value=value)
    if expected_value is not None:
        op.expected_value = expected_value
    else:
        op.expected_version = expected_version or 0
    return pb.Command(client_id=client_id, seq=seq, cas=op).SerializeToString()


def decode(data: bytes) -> pb.Command:
    cmd = pb.Command()
    cmd.ParseFromString(data)
    return cmd
