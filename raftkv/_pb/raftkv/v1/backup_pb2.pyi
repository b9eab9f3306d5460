from raftkv._pb.raftkv.v1 import command_pb2 as _command_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BackupShardPart(_message.Message):
    __slots__ = ("shard_id", "entries")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    entries: _containers.RepeatedCompositeFieldContainer[_command_pb2.SnapshotEntry]
    def __init__(self, shard_id: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[_command_pb2.SnapshotEntry, _Mapping]]] = ...) -> None: ...

class BackupShard(_message.Message):
    __slots__ = ("shard_id", "read_index", "applied_index", "keys", "digest")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    READ_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    read_index: int
    applied_index: int
    keys: int
    digest: str
    def __init__(self, shard_id: _Optional[int] = ..., read_index: _Optional[int] = ..., applied_index: _Optional[int] = ..., keys: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class BackupManifest(_message.Message):
    __slots__ = ("format", "cluster_fingerprint", "epoch", "shard_count", "vnodes", "started_unix_ms", "raftkv_version", "shards", "body_sha256")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    VNODES_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RAFTKV_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    BODY_SHA256_FIELD_NUMBER: _ClassVar[int]
    format: int
    cluster_fingerprint: str
    epoch: int
    shard_count: int
    vnodes: int
    started_unix_ms: int
    raftkv_version: str
    shards: _containers.RepeatedCompositeFieldContainer[BackupShard]
    body_sha256: bytes
    def __init__(self, format: _Optional[int] = ..., cluster_fingerprint: _Optional[str] = ..., epoch: _Optional[int] = ..., shard_count: _Optional[int] = ..., vnodes: _Optional[int] = ..., started_unix_ms: _Optional[int] = ..., raftkv_version: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[BackupShard, _Mapping]]] = ..., body_sha256: _Optional[bytes] = ...) -> None: ...

class BackupRecord(_message.Message):
    __slots__ = ("part", "manifest")
    PART_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    part: BackupShardPart
    manifest: BackupManifest
    def __init__(self, part: _Optional[_Union[BackupShardPart, _Mapping]] = ..., manifest: _Optional[_Union[BackupManifest, _Mapping]] = ...) -> None: ...
