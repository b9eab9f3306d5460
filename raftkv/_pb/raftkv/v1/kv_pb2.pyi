from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Consistency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSISTENCY_UNSPECIFIED: _ClassVar[Consistency]
    LINEARIZABLE: _ClassVar[Consistency]
    STALE: _ClassVar[Consistency]
CONSISTENCY_UNSPECIFIED: Consistency
LINEARIZABLE: Consistency
STALE: Consistency

class RequestId(_message.Message):
    __slots__ = ("client_id", "seq")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    client_id: bytes
    seq: int
    def __init__(self, client_id: _Optional[bytes] = ..., seq: _Optional[int] = ...) -> None: ...

class ResponseHeader(_message.Message):
    __slots__ = ("shard_id", "leader", "term", "index", "leader_endpoint", "epoch")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LEADER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    leader: str
    term: int
    index: int
    leader_endpoint: str
    epoch: int
    def __init__(self, shard_id: _Optional[int] = ..., leader: _Optional[str] = ..., term: _Optional[int] = ..., index: _Optional[int] = ..., leader_endpoint: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("key", "value", "request_id", "shard_id")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    request_id: RequestId
    shard_id: int
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., request_id: _Optional[_Union[RequestId, _Mapping]] = ..., shard_id: _Optional[int] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("header", "version")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    version: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key", "consistency", "shard_id")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    consistency: Consistency
    shard_id: int
    def __init__(self, key: _Optional[bytes] = ..., consistency: _Optional[_Union[Consistency, str]] = ..., shard_id: _Optional[int] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("value", "version", "header")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    value: bytes
    version: int
    header: ResponseHeader
    def __init__(self, value: _Optional[bytes] = ..., version: _Optional[int] = ..., header: _Optional[_Union[ResponseHeader, _Mapping]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("key", "request_id", "shard_id")
    KEY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    request_id: RequestId
    shard_id: int
    def __init__(self, key: _Optional[bytes] = ..., request_id: _Optional[_Union[RequestId, _Mapping]] = ..., shard_id: _Optional[int] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("header", "existed")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    existed: bool
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., existed: _Optional[bool] = ...) -> None: ...

class CompareAndSwapRequest(_message.Message):
    __slots__ = ("key", "value", "expected_value", "expected_version", "request_id", "shard_id")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    expected_value: bytes
    expected_version: int
    request_id: RequestId
    shard_id: int
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., expected_value: _Optional[bytes] = ..., expected_version: _Optional[int] = ..., request_id: _Optional[_Union[RequestId, _Mapping]] = ..., shard_id: _Optional[int] = ...) -> None: ...

class CompareAndSwapResponse(_message.Message):
    __slots__ = ("header", "version")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    version: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class KeyValue(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ...) -> None: ...

class KeyError(_message.Message):
    __slots__ = ("code", "message", "leader", "leader_endpoint")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    leader: str
    leader_endpoint: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., leader: _Optional[str] = ..., leader_endpoint: _Optional[str] = ...) -> None: ...

class PutManyRequest(_message.Message):
    __slots__ = ("items", "request_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[KeyValue]
    request_id: RequestId
    def __init__(self, items: _Optional[_Iterable[_Union[KeyValue, _Mapping]]] = ..., request_id: _Optional[_Union[RequestId, _Mapping]] = ...) -> None: ...

class PutResult(_message.Message):
    __slots__ = ("shard_id", "version", "error")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    version: int
    error: KeyError
    def __init__(self, shard_id: _Optional[int] = ..., version: _Optional[int] = ..., error: _Optional[_Union[KeyError, _Mapping]] = ...) -> None: ...

class PutManyResponse(_message.Message):
    __slots__ = ("results", "headers")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PutResult]
    headers: _containers.RepeatedCompositeFieldContainer[ResponseHeader]
    def __init__(self, results: _Optional[_Iterable[_Union[PutResult, _Mapping]]] = ..., headers: _Optional[_Iterable[_Union[ResponseHeader, _Mapping]]] = ...) -> None: ...

class GetManyRequest(_message.Message):
    __slots__ = ("keys", "consistency")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    consistency: Consistency
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., consistency: _Optional[_Union[Consistency, str]] = ...) -> None: ...

class GetResult(_message.Message):
    __slots__ = ("shard_id", "found", "value", "version", "error")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    found: bool
    value: bytes
    version: int
    error: KeyError
    def __init__(self, shard_id: _Optional[int] = ..., found: _Optional[bool] = ..., value: _Optional[bytes] = ..., version: _Optional[int] = ..., error: _Optional[_Union[KeyError, _Mapping]] = ...) -> None: ...

class GetManyResponse(_message.Message):
    __slots__ = ("results", "headers")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[GetResult]
    headers: _containers.RepeatedCompositeFieldContainer[ResponseHeader]
    def __init__(self, results: _Optional[_Iterable[_Union[GetResult, _Mapping]]] = ..., headers: _Optional[_Iterable[_Union[ResponseHeader, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("local_only", "digest")
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    local_only: bool
    digest: bool
    def __init__(self, local_only: _Optional[bool] = ..., digest: _Optional[bool] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("id", "grpc", "raft", "reachable", "raft_link", "state", "meta", "replicas")
    ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_FIELD_NUMBER: _ClassVar[int]
    RAFT_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    RAFT_LINK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    id: str
    grpc: str
    raft: str
    reachable: bool
    raft_link: str
    state: str
    meta: bool
    replicas: int
    def __init__(self, id: _Optional[str] = ..., grpc: _Optional[str] = ..., raft: _Optional[str] = ..., reachable: _Optional[bool] = ..., raft_link: _Optional[str] = ..., state: _Optional[str] = ..., meta: _Optional[bool] = ..., replicas: _Optional[int] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("node", "role", "term", "commit_index", "last_applied", "leader", "keys", "digest", "problem")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_APPLIED_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    node: str
    role: str
    term: int
    commit_index: int
    last_applied: int
    leader: str
    keys: int
    digest: str
    problem: str
    def __init__(self, node: _Optional[str] = ..., role: _Optional[str] = ..., term: _Optional[int] = ..., commit_index: _Optional[int] = ..., last_applied: _Optional[int] = ..., leader: _Optional[str] = ..., keys: _Optional[int] = ..., digest: _Optional[str] = ..., problem: _Optional[str] = ...) -> None: ...

class ShardStatus(_message.Message):
    __slots__ = ("shard_id", "replicas", "leader", "term", "commit_index", "replica_status")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    REPLICA_STATUS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    replicas: _containers.RepeatedScalarFieldContainer[str]
    leader: str
    term: int
    commit_index: int
    replica_status: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    def __init__(self, shard_id: _Optional[int] = ..., replicas: _Optional[_Iterable[str]] = ..., leader: _Optional[str] = ..., term: _Optional[int] = ..., commit_index: _Optional[int] = ..., replica_status: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("nodes", "shards", "node", "shard_count", "vnodes", "cluster_fingerprint", "epoch", "moves", "meta", "stuck_moves", "forwarded_requests", "forward_batches", "via_leader_requests", "requests_handled", "version")
    NODES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    VNODES_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    STUCK_MOVES_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_BATCHES_FIELD_NUMBER: _ClassVar[int]
    VIA_LEADER_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_HANDLED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    shards: _containers.RepeatedCompositeFieldContainer[ShardStatus]
    node: str
    shard_count: int
    vnodes: int
    cluster_fingerprint: str
    epoch: int
    moves: _containers.RepeatedScalarFieldContainer[str]
    meta: ShardStatus
    stuck_moves: _containers.RepeatedScalarFieldContainer[str]
    forwarded_requests: int
    forward_batches: int
    via_leader_requests: int
    requests_handled: int
    version: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., shards: _Optional[_Iterable[_Union[ShardStatus, _Mapping]]] = ..., node: _Optional[str] = ..., shard_count: _Optional[int] = ..., vnodes: _Optional[int] = ..., cluster_fingerprint: _Optional[str] = ..., epoch: _Optional[int] = ..., moves: _Optional[_Iterable[str]] = ..., meta: _Optional[_Union[ShardStatus, _Mapping]] = ..., stuck_moves: _Optional[_Iterable[str]] = ..., forwarded_requests: _Optional[int] = ..., forward_batches: _Optional[int] = ..., via_leader_requests: _Optional[int] = ..., requests_handled: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...
