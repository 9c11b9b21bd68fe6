"""The streamd Python SDK.

    from streamd.client import Admin, Producer, Consumer

``Producer``/``AsyncProducer`` batch records per partition (linger_ms,
batch_max_bytes), route them with the documented partitioner, optionally compress
with lz4, and resolve a future per record. ``Consumer``/``AsyncConsumer`` read by
offset or time, pull (Fetch) or push (Subscribe).
"""

from .admin import Admin
from .consumer import AsyncConsumer, Consumer
from .errors import ProduceError, StreamdError
from .producer import AsyncProducer, Producer
from .records import ConsumerRecord, RecordMetadata

__all__ = [
    "Admin",
    "AsyncConsumer",
    "AsyncProducer",
    "Consumer",
    "ConsumerRecord",
    "ProduceError",
    "Producer",
    "RecordMetadata",
    "StreamdError",
]
