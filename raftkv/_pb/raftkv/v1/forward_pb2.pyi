from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ForwardedMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FORWARDED_METHOD_UNSPECIFIED: _ClassVar[ForwardedMethod]
    FORWARDED_PUT: _ClassVar[ForwardedMethod]
    FORWARDED_GET: _ClassVar[ForwardedMethod]
    FORWARDED_DELETE: _ClassVar[ForwardedMethod]
    FORWARDED_COMPARE_AND_SWAP: _ClassVar[ForwardedMethod]
FORWARDED_METHOD_UNSPECIFIED: ForwardedMethod
FORWARDED_PUT: ForwardedMethod
FORWARDED_GET: ForwardedMethod
FORWARDED_DELETE: ForwardedMethod
FORWARDED_COMPARE_AND_SWAP: ForwardedMethod

class ForwardedCall(_message.Message):
    __slots__ = ("method", "request", "timeout_ms", "authorization")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZATION_FIELD_NUMBER: _ClassVar[int]
    method: ForwardedMethod
    request: bytes
    timeout_ms: int
    authorization: str
    def __init__(self, method: _Optional[_Union[ForwardedMethod, str]] = ..., request: _Optional[bytes] = ..., timeout_ms: _Optional[int] = ..., authorization: _Optional[str] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[ForwardedCall]
    def __init__(self, calls: _Optional[_Iterable[_Union[ForwardedCall, _Mapping]]] = ...) -> None: ...

class Trailer(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class ForwardedReply(_message.Message):
    __slots__ = ("code", "response", "message", "trailers")
    CODE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRAILERS_FIELD_NUMBER: _ClassVar[int]
    code: int
    response: bytes
    message: str
    trailers: _containers.RepeatedCompositeFieldContainer[Trailer]
    def __init__(self, code: _Optional[int] = ..., response: _Optional[bytes] = ..., message: _Optional[str] = ..., trailers: _Optional[_Iterable[_Union[Trailer, _Mapping]]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("replies",)
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    replies: _containers.RepeatedCompositeFieldContainer[ForwardedReply]
    def __init__(self, replies: _Optional[_Iterable[_Union[ForwardedReply, _Mapping]]] = ...) -> None: ...
