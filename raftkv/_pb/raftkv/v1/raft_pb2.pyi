from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RaftFrame(_message.Message):
    __slots__ = ("shard_id", "ping", "peer_state", "incarnation", "request_vote", "response_vote", "append_entries", "install_snapshot", "next_index", "apply_command", "apply_command_response", "timeout_now", "read_index_request", "read_index_response")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    PEER_STATE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_VOTE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_VOTE_FIELD_NUMBER: _ClassVar[int]
    APPEND_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    INSTALL_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    NEXT_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLY_COMMAND_FIELD_NUMBER: _ClassVar[int]
    APPLY_COMMAND_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_NOW_FIELD_NUMBER: _ClassVar[int]
    READ_INDEX_REQUEST_FIELD_NUMBER: _ClassVar[int]
    READ_INDEX_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    ping: Ping
    peer_state: PeerState
    incarnation: Incarnation
    request_vote: RequestVote
    response_vote: ResponseVote
    append_entries: AppendEntries
    install_snapshot: InstallSnapshot
    next_index: NextIndex
    apply_command: ApplyCommand
    apply_command_response: ApplyCommandResponse
    timeout_now: TimeoutNow
    read_index_request: ReadIndexRequest
    read_index_response: ReadIndexResponse
    def __init__(self, shard_id: _Optional[int] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., peer_state: _Optional[_Union[PeerState, _Mapping]] = ..., incarnation: _Optional[_Union[Incarnation, _Mapping]] = ..., request_vote: _Optional[_Union[RequestVote, _Mapping]] = ..., response_vote: _Optional[_Union[ResponseVote, _Mapping]] = ..., append_entries: _Optional[_Union[AppendEntries, _Mapping]] = ..., install_snapshot: _Optional[_Union[InstallSnapshot, _Mapping]] = ..., next_index: _Optional[_Union[NextIndex, _Mapping]] = ..., apply_command: _Optional[_Union[ApplyCommand, _Mapping]] = ..., apply_command_response: _Optional[_Union[ApplyCommandResponse, _Mapping]] = ..., timeout_now: _Optional[_Union[TimeoutNow, _Mapping]] = ..., read_index_request: _Optional[_Union[ReadIndexRequest, _Mapping]] = ..., read_index_response: _Optional[_Union[ReadIndexResponse, _Mapping]] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerState(_message.Message):
    __slots__ = ("shard_terms",)
    class ShardTermsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    SHARD_TERMS_FIELD_NUMBER: _ClassVar[int]
    shard_terms: _containers.ScalarMap[int, int]
    def __init__(self, shard_terms: _Optional[_Mapping[int, int]] = ...) -> None: ...

class Incarnation(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RequestVote(_message.Message):
    __slots__ = ("term", "last_log_index", "last_log_term")
    TERM_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_TERM_FIELD_NUMBER: _ClassVar[int]
    term: int
    last_log_index: int
    last_log_term: int
    def __init__(self, term: _Optional[int] = ..., last_log_index: _Optional[int] = ..., last_log_term: _Optional[int] = ...) -> None: ...

class ResponseVote(_message.Message):
    __slots__ = ("term",)
    TERM_FIELD_NUMBER: _ClassVar[int]
    term: int
    def __init__(self, term: _Optional[int] = ...) -> None: ...

class AppendEntries(_message.Message):
    __slots__ = ("term", "commit_index", "prev_log_index", "prev_log_term", "first_index", "terms", "commands", "read_round")
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    PREV_LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    PREV_LOG_TERM_FIELD_NUMBER: _ClassVar[int]
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    READ_ROUND_FIELD_NUMBER: _ClassVar[int]
    term: int
    commit_index: int
    prev_log_index: int
    prev_log_term: int
    first_index: int
    terms: _containers.RepeatedScalarFieldContainer[int]
    commands: _containers.RepeatedScalarFieldContainer[bytes]
    read_round: int
    def __init__(self, term: _Optional[int] = ..., commit_index: _Optional[int] = ..., prev_log_index: _Optional[int] = ..., prev_log_term: _Optional[int] = ..., first_index: _Optional[int] = ..., terms: _Optional[_Iterable[int]] = ..., commands: _Optional[_Iterable[bytes]] = ..., read_round: _Optional[int] = ...) -> None: ...

class InstallSnapshot(_message.Message):
    __slots__ = ("term", "commit_index", "chunk", "read_round")
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    READ_ROUND_FIELD_NUMBER: _ClassVar[int]
    term: int
    commit_index: int
    chunk: SnapshotChunk
    read_round: int
    def __init__(self, term: _Optional[int] = ..., commit_index: _Optional[int] = ..., chunk: _Optional[_Union[SnapshotChunk, _Mapping]] = ..., read_round: _Optional[int] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("data", "first", "last")
    DATA_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    first: bool
    last: bool
    def __init__(self, data: _Optional[bytes] = ..., first: _Optional[bool] = ..., last: _Optional[bool] = ...) -> None: ...

class NextIndex(_message.Message):
    __slots__ = ("next_index", "reset", "success", "read_round")
    NEXT_INDEX_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    READ_ROUND_FIELD_NUMBER: _ClassVar[int]
    next_index: int
    reset: bool
    success: bool
    read_round: int
    def __init__(self, next_index: _Optional[int] = ..., reset: _Optional[bool] = ..., success: _Optional[bool] = ..., read_round: _Optional[int] = ...) -> None: ...

class ApplyCommand(_message.Message):
    __slots__ = ("command", "request_id")
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    command: bytes
    request_id: int
    def __init__(self, command: _Optional[bytes] = ..., request_id: _Optional[int] = ...) -> None: ...

class ApplyCommandResponse(_message.Message):
    __slots__ = ("request_id", "error", "log_index", "log_term")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    LOG_TERM_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    error: int
    log_index: int
    log_term: int
    def __init__(self, request_id: _Optional[int] = ..., error: _Optional[int] = ..., log_index: _Optional[int] = ..., log_term: _Optional[int] = ...) -> None: ...

class ReadIndexRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    def __init__(self, request_id: _Optional[int] = ...) -> None: ...

class ReadIndexResponse(_message.Message):
    __slots__ = ("request_id", "outcome", "index")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[ReadIndexResponse.Outcome]
        NOT_LEADER: _ClassVar[ReadIndexResponse.Outcome]
        FORWARD: _ClassVar[ReadIndexResponse.Outcome]
    OK: ReadIndexResponse.Outcome
    NOT_LEADER: ReadIndexResponse.Outcome
    FORWARD: ReadIndexResponse.Outcome
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    outcome: ReadIndexResponse.Outcome
    index: int
    def __init__(self, request_id: _Optional[int] = ..., outcome: _Optional[_Union[ReadIndexResponse.Outcome, str]] = ..., index: _Optional[int] = ...) -> None: ...

class TimeoutNow(_message.Message):
    __slots__ = ("term",)
    TERM_FIELD_NUMBER: _ClassVar[int]
    term: int
    def __init__(self, term: _Optional[int] = ...) -> None: ...
