from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RawPartitionBatches(_message.Message):
    __slots__ = ("partition", "batches")
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    partition: int
    batches: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, partition: _Optional[int] = ..., batches: _Optional[_Iterable[bytes]] = ...) -> None: ...

class RawProduceRequest(_message.Message):
    __slots__ = ("topic", "partitions", "records")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    topic: str
    partitions: _containers.RepeatedCompositeFieldContainer[RawPartitionBatches]
    records: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, topic: _Optional[str] = ..., partitions: _Optional[_Iterable[_Union[RawPartitionBatches, _Mapping]]] = ..., records: _Optional[_Iterable[bytes]] = ...) -> None: ...

class RawProduceStreamRequest(_message.Message):
    __slots__ = ("request_id", "request")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    request: RawProduceRequest
    def __init__(self, request_id: _Optional[int] = ..., request: _Optional[_Union[RawProduceRequest, _Mapping]] = ...) -> None: ...

class RawRecordSet(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, records: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DeliveryTimes(_message.Message):
    __slots__ = ("deliver_at_ms", "delay_ms")
    DELIVER_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    deliver_at_ms: int
    delay_ms: int
    def __init__(self, deliver_at_ms: _Optional[int] = ..., delay_ms: _Optional[int] = ...) -> None: ...

class DeliveryTimesSet(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[DeliveryTimes]
    def __init__(self, records: _Optional[_Iterable[_Union[DeliveryTimes, _Mapping]]] = ...) -> None: ...
