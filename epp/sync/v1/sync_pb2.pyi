from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SyncBatch(_message.Message):
    __slots__ = ("origin", "epoch", "seq", "snapshot", "sent_at", "hops", "goodbye", "inflight", "prefix", "queues", "transit", "prefill_charges", "precise")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    TRANSIT_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHARGES_FIELD_NUMBER: _ClassVar[int]
    PRECISE_FIELD_NUMBER: _ClassVar[int]
    origin: str
    epoch: int
    seq: int
    snapshot: bool
    sent_at: float
    hops: int
    goodbye: bool
    inflight: _containers.RepeatedCompositeFieldContainer[EndpointLoad]
    prefix: _containers.RepeatedCompositeFieldContainer[PrefixInsert]
    queues: _containers.RepeatedCompositeFieldContainer[QueueDepth]
    transit: _containers.RepeatedCompositeFieldContainer[Transfer]
    prefill_charges: _containers.RepeatedCompositeFieldContainer[PrefillCharge]
    precise: _containers.RepeatedCompositeFieldContainer[PrefixInsert]
    def __init__(self, origin: _Optional[str] = ..., epoch: _Optional[int] = ..., seq: _Optional[int] = ..., snapshot: _Optional[bool] = ..., sent_at: _Optional[float] = ..., hops: _Optional[int] = ..., goodbye: _Optional[bool] = ..., inflight: _Optional[_Iterable[_Union[EndpointLoad, _Mapping]]] = ..., prefix: _Optional[_Iterable[_Union[PrefixInsert, _Mapping]]] = ..., queues: _Optional[_Iterable[_Union[QueueDepth, _Mapping]]] = ..., transit: _Optional[_Iterable[_Union[Transfer, _Mapping]]] = ..., prefill_charges: _Optional[_Iterable[_Union[PrefillCharge, _Mapping]]] = ..., precise: _Optional[_Iterable[_Union[PrefixInsert, _Mapping]]] = ...) -> None: ...

class EndpointLoad(_message.Message):
    __slots__ = ("endpoint", "requests", "tokens", "prefill_requests", "prefill_tokens", "pending_requests", "pending_prefill_tokens")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PENDING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PENDING_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    requests: int
    tokens: int
    prefill_requests: int
    prefill_tokens: int
    pending_requests: int
    pending_prefill_tokens: int
    def __init__(self, endpoint: _Optional[str] = ..., requests: _Optional[int] = ..., tokens: _Optional[int] = ..., prefill_requests: _Optional[int] = ..., prefill_tokens: _Optional[int] = ..., pending_requests: _Optional[int] = ..., pending_prefill_tokens: _Optional[int] = ...) -> None: ...

class PrefixInsert(_message.Message):
    __slots__ = ("endpoint", "hashes")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, endpoint: _Optional[str] = ..., hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class PrefillCharge(_message.Message):
    __slots__ = ("endpoint", "tokens")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    tokens: int
    def __init__(self, endpoint: _Optional[str] = ..., tokens: _Optional[int] = ...) -> None: ...

class Transfer(_message.Message):
    __slots__ = ("endpoint", "first", "requests")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    first: int
    requests: int
    def __init__(self, endpoint: _Optional[str] = ..., first: _Optional[int] = ..., requests: _Optional[int] = ...) -> None: ...

class QueueDepth(_message.Message):
    __slots__ = ("band", "flow", "requests", "bytes")
    BAND_FIELD_NUMBER: _ClassVar[int]
    FLOW_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    band: int
    flow: str
    requests: int
    bytes: int
    def __init__(self, band: _Optional[int] = ..., flow: _Optional[str] = ..., requests: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("receiver", "batches")
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    receiver: str
    batches: int
    def __init__(self, receiver: _Optional[str] = ..., batches: _Optional[int] = ...) -> None: ...
