"""The streamd Python SDK: every public client, value and error, from one place.

    from streamd.client import Admin, Producer, Consumer, GroupConsumer, QueueReceiver

Each client comes in two flavours with one engine: the asyncio class does the work
and the blocking class runs it on a private event-loop thread (``Producer`` over
``AsyncProducer``, ``Admin`` over ``AsyncAdmin``, ``GroupConsumer`` over
``AsyncGroupConsumer``, ``QueueReceiver`` over ``AsyncQueueReceiver``).

- ``Producer``/``AsyncProducer`` batch records per partition (linger_ms,
  batch_max_bytes), route them with the documented partitioner, optionally compress
  with lz4, and resolve a future per record (``RecordMetadata``).
- ``Consumer``/``AsyncConsumer`` read by offset or time, pull (Fetch) or push
  (Subscribe); records are ``ConsumerRecord``.
- ``GroupConsumer``/``AsyncGroupConsumer``: one member of a consumer group; the
  broker assigns partitions, commits are checked against the member's generation.
- ``QueueReceiver``/``AsyncQueueReceiver``: a worker of a queue group; each
  ``Message`` is leased, then acked, nacked or rejected.
- ``Admin``/``AsyncAdmin``: topics, groups, offsets and resets.

Errors (``StreamdError`` and its subclasses) are drawn in ``streamd.client.errors``.

Every client takes ``security=Security(tls=True, ca_file=..., cert_file=...,
key_file=..., token=...)``; without it, ``STREAMD_TLS_CA``/``_CERT``/``_KEY``/
``_SERVER_NAME`` and ``STREAMD_TOKEN`` from the environment apply.

The submodules are the SDK's internals; what is not exported here may change.
"""

from ._channel import Security
from .admin import Admin, AsyncAdmin
from .consumer import AsyncConsumer, Consumer
from .errors import CorruptRecordsError, OutcomeUnknown, ProduceError, StreamdError
from .group import AsyncGroupConsumer, GroupConsumer, TopicPartition
from .producer import AsyncProducer, Producer
from .queue import AsyncQueueReceiver, Message, QueueReceiver
from .records import ConsumerRecord, RecordMetadata

__all__ = [
    "Admin",
    "AsyncAdmin",
    "AsyncConsumer",
    "AsyncGroupConsumer",
    "AsyncProducer",
    "AsyncQueueReceiver",
    "Consumer",
    "ConsumerRecord",
    "CorruptRecordsError",
    "GroupConsumer",
    "Message",
    "OutcomeUnknown",
    "ProduceError",
    "Producer",
    "QueueReceiver",
    "RecordMetadata",
    "Security",
    "StreamdError",
    "TopicPartition",
]
