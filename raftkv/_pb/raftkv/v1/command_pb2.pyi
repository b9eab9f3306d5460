from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Command(_message.Message):
    __slots__ = ("client_id", "seq", "put", "delete", "cas", "barrier", "batch")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PUT_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    CAS_FIELD_NUMBER: _ClassVar[int]
    BARRIER_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    client_id: bytes
    seq: int
    put: PutOp
    delete: DeleteOp
    cas: CasOp
    barrier: BarrierOp
    batch: BatchOp
    def __init__(self, client_id: _Optional[bytes] = ..., seq: _Optional[int] = ..., put: _Optional[_Union[PutOp, _Mapping]] = ..., delete: _Optional[_Union[DeleteOp, _Mapping]] = ..., cas: _Optional[_Union[CasOp, _Mapping]] = ..., barrier: _Optional[_Union[BarrierOp, _Mapping]] = ..., batch: _Optional[_Union[BatchOp, _Mapping]] = ...) -> None: ...

class PutOp(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ...) -> None: ...

class DeleteOp(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    def __init__(self, key: _Optional[bytes] = ...) -> None: ...

class CasOp(_message.Message):
    __slots__ = ("key", "value", "expected_value", "expected_version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    expected_value: bytes
    expected_version: int
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., expected_value: _Optional[bytes] = ..., expected_version: _Optional[int] = ...) -> None: ...

class BatchOp(_message.Message):
    __slots__ = ("puts",)
    PUTS_FIELD_NUMBER: _ClassVar[int]
    puts: _containers.RepeatedCompositeFieldContainer[PutOp]
    def __init__(self, puts: _Optional[_Iterable[_Union[PutOp, _Mapping]]] = ...) -> None: ...

class BarrierOp(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CommandResult(_message.Message):
    __slots__ = ("code", "version", "existed", "current_version")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[CommandResult.Code]
        PRECONDITION_FAILED: _ClassVar[CommandResult.Code]
        REQUEST_ID_REUSED: _ClassVar[CommandResult.Code]
    OK: CommandResult.Code
    PRECONDITION_FAILED: CommandResult.Code
    REQUEST_ID_REUSED: CommandResult.Code
    CODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    code: CommandResult.Code
    version: int
    existed: bool
    current_version: int
    def __init__(self, code: _Optional[_Union[CommandResult.Code, str]] = ..., version: _Optional[int] = ..., existed: _Optional[bool] = ..., current_version: _Optional[int] = ...) -> None: ...

class SnapshotEntry(_message.Message):
    __slots__ = ("key", "value", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    version: int
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., version: _Optional[int] = ...) -> None: ...

class DedupEntry(_message.Message):
    __slots__ = ("client_id", "seq", "result", "command_hash")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_HASH_FIELD_NUMBER: _ClassVar[int]
    client_id: bytes
    seq: int
    result: CommandResult
    command_hash: bytes
    def __init__(self, client_id: _Optional[bytes] = ..., seq: _Optional[int] = ..., result: _Optional[_Union[CommandResult, _Mapping]] = ..., command_hash: _Optional[bytes] = ...) -> None: ...

class LogEntry(_message.Message):
    __slots__ = ("command", "index", "term")
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    command: bytes
    index: int
    term: int
    def __init__(self, command: _Optional[bytes] = ..., index: _Optional[int] = ..., term: _Optional[int] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("entries", "dedup", "last_applied", "before_last_applied", "applied_index", "members")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    DEDUP_FIELD_NUMBER: _ClassVar[int]
    LAST_APPLIED_FIELD_NUMBER: _ClassVar[int]
    BEFORE_LAST_APPLIED_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[SnapshotEntry]
    dedup: _containers.RepeatedCompositeFieldContainer[DedupEntry]
    last_applied: LogEntry
    before_last_applied: LogEntry
    applied_index: int
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, entries: _Optional[_Iterable[_Union[SnapshotEntry, _Mapping]]] = ..., dedup: _Optional[_Iterable[_Union[DedupEntry, _Mapping]]] = ..., last_applied: _Optional[_Union[LogEntry, _Mapping]] = ..., before_last_applied: _Optional[_Union[LogEntry, _Mapping]] = ..., applied_index: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class ConfChange(_message.Message):
    __slots__ = ("type", "node_id")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ADD: _ClassVar[ConfChange.Type]
        REMOVE: _ClassVar[ConfChange.Type]
    ADD: ConfChange.Type
    REMOVE: ConfChange.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    type: ConfChange.Type
    node_id: str
    def __init__(self, type: _Optional[_Union[ConfChange.Type, str]] = ..., node_id: _Optional[str] = ...) -> None: ...
