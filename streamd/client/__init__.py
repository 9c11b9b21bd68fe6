"""The streamd Python SDK.

    from streamd.client import Admin, Producer, Consumer

``Producer``/``AsyncProducer`` batch records per partition (linger_ms,
batch_max_bytes), route them with the documented partitioner, optionally compress
with lz4, and resolve a future per record. ``Consumer``/``AsyncConsumer`` read by
offset or time, pull (Fetch) or push (Subscribe).

Every client takes ``security=Security(tls=True, ca_file=..., cert_file=...,
key_file=..., token=...)``; without it, ``STREAMD_TLS_CA``/``_CERT``/``_KEY``/
``_SERVER_NAME`` and ``STREAMD_TOKEN`` from the environment apply.
"""

from ._channel import Security
from .admin import Admin
from .consumer import AsyncConsumer, Consumer
from .errors import CorruptRecordsError, OutcomeUnknown, ProduceError, StreamdError
from .producer import AsyncProducer, Producer
from .records import ConsumerRecord, RecordMetadata

__all__ = [
    "Admin",
    "AsyncConsumer",
    "AsyncProducer",
    "Consumer",
    "ConsumerRecord",
    "CorruptRecordsError",
    "OutcomeUnknown",
    "ProduceError",
    "Producer",
    "RecordMetadata",
    "Security",
    "StreamdError",
]
