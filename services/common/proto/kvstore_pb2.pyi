from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_TIER_DEVICE: _ClassVar[KVTier]
    KV_TIER_HOST: _ClassVar[KVTier]
    KV_TIER_STORE: _ClassVar[KVTier]

class KVEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_EVENT_STORED: _ClassVar[KVEventKind]
    KV_EVENT_REMOVED: _ClassVar[KVEventKind]
KV_TIER_DEVICE: KVTier
KV_TIER_HOST: KVTier
KV_TIER_STORE: KVTier
KV_EVENT_STORED: KVEventKind
KV_EVENT_REMOVED: KVEventKind

class KVEvent(_message.Message):
    __slots__ = ("kind", "tier", "block_hashes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    kind: KVEventKind
    tier: KVTier
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kind: _Optional[_Union[KVEventKind, str]] = ..., tier: _Optional[_Union[KVTier, str]] = ..., block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class KVEventBatch(_message.Message):
    __slots__ = ("instance_id", "incarnation", "model", "layout_key", "seq", "reset", "events")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_KEY_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    incarnation: str
    model: str
    layout_key: str
    seq: int
    reset: bool
    events: _containers.RepeatedCompositeFieldContainer[KVEvent]
    def __init__(self, instance_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., model: _Optional[str] = ..., layout_key: _Optional[str] = ..., seq: _Optional[int] = ..., reset: _Optional[bool] = ..., events: _Optional[_Iterable[_Union[KVEvent, _Mapping]]] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("resync", "store_epoch")
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    STORE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    resync: bool
    store_epoch: str
    def __init__(self, resync: _Optional[bool] = ..., store_epoch: _Optional[str] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("model", "layout_key", "block_hashes", "instance_ids")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_KEY_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_IDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    layout_key: str
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    instance_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., layout_key: _Optional[str] = ..., block_hashes: _Optional[_Iterable[int]] = ..., instance_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class InstanceMatch(_message.Message):
    __slots__ = ("instance_id", "device_blocks", "host_blocks", "total_blocks")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    device_blocks: int
    host_blocks: int
    total_blocks: int
    def __init__(self, instance_id: _Optional[str] = ..., device_blocks: _Optional[int] = ..., host_blocks: _Optional[int] = ..., total_blocks: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("matches", "store_blocks", "num_blocks")
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    STORE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[InstanceMatch]
    store_blocks: int
    num_blocks: int
    def __init__(self, matches: _Optional[_Iterable[_Union[InstanceMatch, _Mapping]]] = ..., store_blocks: _Optional[int] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class ForgetRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class ForgetResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class StoreLostRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StoreLostResponse(_message.Message):
    __slots__ = ("removed", "store_epoch")
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    STORE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    removed: int
    store_epoch: str
    def __init__(self, removed: _Optional[int] = ..., store_epoch: _Optional[str] = ...) -> None: ...

class KVStoreStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVStoreStatsResponse(_message.Message):
    __slots__ = ("num_blocks", "capacity_blocks", "num_instances", "store_blocks", "lookups", "lookup_blocks", "hit_blocks", "hit_rate", "evictions", "master_restarts", "master_alive", "store_epoch")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    STORE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    MASTER_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    MASTER_ALIVE_FIELD_NUMBER: _ClassVar[int]
    STORE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    capacity_blocks: int
    num_instances: int
    store_blocks: int
    lookups: int
    lookup_blocks: int
    hit_blocks: int
    hit_rate: float
    evictions: int
    master_restarts: int
    master_alive: bool
    store_epoch: str
    def __init__(self, num_blocks: _Optional[int] = ..., capacity_blocks: _Optional[int] = ..., num_instances: _Optional[int] = ..., store_blocks: _Optional[int] = ..., lookups: _Optional[int] = ..., lookup_blocks: _Optional[int] = ..., hit_blocks: _Optional[int] = ..., hit_rate: _Optional[float] = ..., evictions: _Optional[int] = ..., master_restarts: _Optional[int] = ..., master_alive: _Optional[bool] = ..., store_epoch: _Optional[str] = ...) -> None: ...

class KVStoreHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVStoreHealthResponse(_message.Message):
    __slots__ = ("status", "instance_id", "master_rpc_address", "metadata_url", "store_epoch")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[KVStoreHealthResponse.Status]
        SERVING: _ClassVar[KVStoreHealthResponse.Status]
        MASTER_DOWN: _ClassVar[KVStoreHealthResponse.Status]
    STATUS_UNSPECIFIED: KVStoreHealthResponse.Status
    SERVING: KVStoreHealthResponse.Status
    MASTER_DOWN: KVStoreHealthResponse.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MASTER_RPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METADATA_URL_FIELD_NUMBER: _ClassVar[int]
    STORE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    status: KVStoreHealthResponse.Status
    instance_id: str
    master_rpc_address: str
    metadata_url: str
    store_epoch: str
    def __init__(self, status: _Optional[_Union[KVStoreHealthResponse.Status, str]] = ..., instance_id: _Optional[str] = ..., master_rpc_address: _Optional[str] = ..., metadata_url: _Optional[str] = ..., store_epoch: _Optional[str] = ...) -> None: ...
