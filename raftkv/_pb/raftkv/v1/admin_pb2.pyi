from raftkv._pb.raftkv.v1 import command_pb2 as _command_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SnapshotShardRequest(_message.Message):
    __slots__ = ("shard_id",)
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    def __init__(self, shard_id: _Optional[int] = ...) -> None: ...

class SnapshotShardChunk(_message.Message):
    __slots__ = ("read_index", "applied_index", "entries", "done", "keys", "digest")
    READ_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    read_index: int
    applied_index: int
    entries: _containers.RepeatedCompositeFieldContainer[_command_pb2.SnapshotEntry]
    done: bool
    keys: int
    digest: str
    def __init__(self, read_index: _Optional[int] = ..., applied_index: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[_command_pb2.SnapshotEntry, _Mapping]]] = ..., done: _Optional[bool] = ..., keys: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class NodeEntry(_message.Message):
    __slots__ = ("id", "grpc", "raft", "state")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTIVE: _ClassVar[NodeEntry.State]
        LEAVING: _ClassVar[NodeEntry.State]
        DEAD: _ClassVar[NodeEntry.State]
    ACTIVE: NodeEntry.State
    LEAVING: NodeEntry.State
    DEAD: NodeEntry.State
    ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_FIELD_NUMBER: _ClassVar[int]
    RAFT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    id: str
    grpc: str
    raft: str
    state: NodeEntry.State
    def __init__(self, id: _Optional[str] = ..., grpc: _Optional[str] = ..., raft: _Optional[str] = ..., state: _Optional[_Union[NodeEntry.State, str]] = ...) -> None: ...

class ShardPlacement(_message.Message):
    __slots__ = ("replicas", "target")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedScalarFieldContainer[str]
    target: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, replicas: _Optional[_Iterable[str]] = ..., target: _Optional[_Iterable[str]] = ...) -> None: ...

class ClusterView(_message.Message):
    __slots__ = ("cluster_id", "epoch", "shards", "replicas", "vnodes", "nodes", "placement", "meta")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    VNODES_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    epoch: int
    shards: int
    replicas: int
    vnodes: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeEntry]
    placement: _containers.RepeatedCompositeFieldContainer[ShardPlacement]
    meta: ShardPlacement
    def __init__(self, cluster_id: _Optional[str] = ..., epoch: _Optional[int] = ..., shards: _Optional[int] = ..., replicas: _Optional[int] = ..., vnodes: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeEntry, _Mapping]]] = ..., placement: _Optional[_Iterable[_Union[ShardPlacement, _Mapping]]] = ..., meta: _Optional[_Union[ShardPlacement, _Mapping]] = ...) -> None: ...

class GetViewRequest(_message.Message):
    __slots__ = ("linearizable",)
    LINEARIZABLE_FIELD_NUMBER: _ClassVar[int]
    linearizable: bool
    def __init__(self, linearizable: _Optional[bool] = ...) -> None: ...

class MemberAddRequest(_message.Message):
    __slots__ = ("id", "grpc", "raft")
    ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_FIELD_NUMBER: _ClassVar[int]
    RAFT_FIELD_NUMBER: _ClassVar[int]
    id: str
    grpc: str
    raft: str
    def __init__(self, id: _Optional[str] = ..., grpc: _Optional[str] = ..., raft: _Optional[str] = ...) -> None: ...

class MemberRemoveRequest(_message.Message):
    __slots__ = ("id", "dead")
    ID_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    id: str
    dead: bool
    def __init__(self, id: _Optional[str] = ..., dead: _Optional[bool] = ...) -> None: ...

class MemberChangeResponse(_message.Message):
    __slots__ = ("view", "moves")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    view: ClusterView
    moves: int
    def __init__(self, view: _Optional[_Union[ClusterView, _Mapping]] = ..., moves: _Optional[int] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: _Optional[bool] = ...) -> None: ...

class ReplicaMove(_message.Message):
    __slots__ = ("shard_id", "from_replicas", "to_replicas")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    TO_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    from_replicas: _containers.RepeatedScalarFieldContainer[str]
    to_replicas: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shard_id: _Optional[int] = ..., from_replicas: _Optional[_Iterable[str]] = ..., to_replicas: _Optional[_Iterable[str]] = ...) -> None: ...

class RebalanceResponse(_message.Message):
    __slots__ = ("moves", "view")
    MOVES_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    moves: _containers.RepeatedCompositeFieldContainer[ReplicaMove]
    view: ClusterView
    def __init__(self, moves: _Optional[_Iterable[_Union[ReplicaMove, _Mapping]]] = ..., view: _Optional[_Union[ClusterView, _Mapping]] = ...) -> None: ...

class PrepareReplicaRequest(_message.Message):
    __slots__ = ("shard_id", "epoch")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    epoch: int
    def __init__(self, shard_id: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class PrepareReplicaResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChangeReplicasRequest(_message.Message):
    __slots__ = ("shard_id", "remove", "node_id", "epoch")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    remove: bool
    node_id: str
    epoch: int
    def __init__(self, shard_id: _Optional[int] = ..., remove: _Optional[bool] = ..., node_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class ChangeReplicasResponse(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, members: _Optional[_Iterable[str]] = ...) -> None: ...
