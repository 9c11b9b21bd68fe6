"""Producers: batching, the documented partitioner, lz4, pipelined acknowledgements,
idempotence and retries.

``AsyncProducer`` (asyncio) is the engine; ``Producer`` runs one on a private event
loop thread for blocking code. Records are accumulated per partition and shipped as
one RecordBatch when the batch reaches ``batch_max_bytes`` or when ``linger_ms`` has
passed since its first record. Requests go over one ProduceStream (a bidirectional
stream), up to ``max_in_flight`` at once; answers come back in order and resolve each
record's future with its offset.

**Idempotent** by default (``idempotent=True``): each partition's batches carry
the producer's id and sequence numbers, and batches left unanswered when the stream
breaks or the broker restarts are sent again (backoff from ``retry_backoff_ms`` up
to ``retry_backoff_max_ms``, each attempt bounded by ``request_timeout_ms``) until
they are answered or ``delivery_timeout_ms`` (120 s) after their first record was
sent; the broker recognises retries, so each record is written once. A record whose
time runs out fails with ``OutcomeUnknown`` if it may have been stored, else with
``DEADLINE_EXCEEDED``/``DELIVERY_TIMEOUT``. ``_sender`` describes sending, ordering,
retries and errors. With ``idempotent=False`` a record is written at most once
(never retried).

The first send to a topic without a ``partition`` looks the topic's partition count
up (``DescribeTopic``, once per topic, shared by the sends waiting for it, kept once
known). The lookup is retried like a produce (backoff, each attempt bounded by
``request_timeout_ms``) within each waiting record's delivery deadline: a record whose
deadline passes first fails with ``DEADLINE_EXCEEDED``/``DELIVERY_TIMEOUT`` (not
stored); NOT_FOUND, PERMISSION_DENIED and the other ``FATAL_CODES`` fail at once. A
failed lookup is not kept: the next send looks again.

Every future resolves within ``delivery_timeout_ms``, whatever the broker does, and
every write to the stream is bounded (``_sender``); ``flush()`` and ``close()``
return within ``delivery_timeout_ms + request_timeout_ms`` (close: plus up to 3 s to
end the stream).

``send(..., idempotency_key=...)``: on topics with a dedup window, a record whose key
the partition already saw within the window is not appended again, and its future
resolves to the first record's offset with ``duplicate=True``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import grpc
import lz4.frame

from streamd.v1 import streamd_pb2 as pb
from streamd.v1 import streamd_pb2_grpc as rpc

from ._accumulator import DEFERRED, OPENED, SEALED, Accumulator, OpenBatch, encode
from ._channel import AsyncClient, Security, server_label, stub
from ._futures import AsyncRecordFuture, BatchOutcome, RecordFuture
from ._lookups import TopicLookups
from ._loop import LoopThread
from ._sender import (
    DEFAULT_DELIVERY_TIMEOUT_MS,
    DEFAULT_REQUEST_TIMEOUT_MS,
    DEFAULT_RETRY_BACKOFF_MAX_MS,
    DEFAULT_RETRY_BACKOFF_MS,
    Sender,
    closed_error,
)
from ._wire_records import (
    _PLAIN,
    MAX_TRANSPORT_RECORD_BYTES,
    as_bytes,
    check_fields,
    encode_record,
    entry,
    plain_prefix,
    too_large,
)
from .errors import StreamdError
from .records import Headers, RecordMetadata, values_record_set

DEFAULT_LINGER_MS = 5
DEFAULT_BATCH_MAX_BYTES = 512 * 1024
DEFAULT_MAX_IN_FLIGHT = 64
#: Reconnect quickly after a broker restart (grpc's default waits 1 s, then longer).
_RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
F = TypeVar("F", RecordFuture, AsyncRecordFuture)


class AsyncProducer(AsyncClient):
    def __init__(
        self,
        server: str | None = None,
        *,
        linger_ms: float = DEFAULT_LINGER_MS,
        batch_max_bytes: int = DEFAULT_BATCH_MAX_BYTES,
        compression: str = "none",
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        idempotent: bool = True,
        delivery_timeout_ms: float = DEFAULT_DELIVERY_TIMEOUT_MS,
        request_timeout_ms: float = DEFAULT_REQUEST_TIMEOUT_MS,
        retry_backoff_ms: float = DEFAULT_RETRY_BACKOFF_MS,
        retry_backoff_max_ms: float = DEFAULT_RETRY_BACKOFF_MAX_MS,
        channel: grpc.aio.Channel | None = None,
        security: Security | None = None,
    ) -> None:
        """``delivery_timeout_ms``: how long after a record is sent its future may
        stay unresolved (retries included; Kafka's ``delivery.timeout.ms``);
        ``request_timeout_ms``: how long one attempt waits for its answer (and a topic
        lookup for its reply). Made on the event loop it is used on."""
        if compression not in ("none", "lz4"):
            raise ValueError("compression must be 'none' or 'lz4'")
        if not linger_ms >= 0:
            raise ValueError("linger_ms must not be negative")
        if not 0 < batch_max_bytes <= MAX_TRANSPORT_RECORD_BYTES:
            raise ValueError(f"batch_max_bytes must be between 1 and {MAX_TRANSPORT_RECORD_BYTES}")
        super().__init__(server, channel=channel, security=security, timeout_s=request_timeout_ms / 1000,
                         extra_options=_RECONNECT_OPTIONS)
        label = server_label(server, channel)
        self._sender = Sender(self._channel, idempotent=idempotent, max_in_flight=max_in_flight,
                              delivery_timeout_ms=delivery_timeout_ms, request_timeout_ms=request_timeout_ms,
                              retry_backoff_ms=retry_backoff_ms, retry_backoff_max_ms=retry_backoff_max_ms,
                              server=label)
        self.linger_ms = linger_ms
        self.batch_max_bytes = batch_max_bytes
        self.compression = compression
        self._loop = asyncio.get_running_loop()
        self._acc = Accumulator(self._loop, batch_max_bytes=batch_max_bytes,
                                delivery_timeout_s=delivery_timeout_ms / 1000)
        self._acc.loop_thread = threading.get_ident()
        self._lookups = TopicLookups(stub(rpc.TopicServiceStub, self._channel).DescribeTopic, self._sender,
                                     self._acc, label, request_timeout_ms / 1000)
        self._placer: asyncio.Task[None] | None = None  # places deferred records
        self._closed = False

    @property
    def producer_id(self) -> int | None:
        """The broker-issued id of an idempotent producer (None before the first send)."""
        return self._sender.producer_id

    # -- public API ----------------------------------------------------------
    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: Headers | None = None,
        timestamp_ms: int = 0,
        idempotency_key: str | None = None,
        delay_ms: int = 0,
        deliver_at_ms: int = 0,
    ) -> AsyncRecordFuture:
        """Queue one record; the returned future (an asyncio future: ``await`` it)
        resolves once it is acknowledged. Wrong arguments raise here (TypeError,
        ValueError; a record over the topic's ``max_record_bytes`` or a partition
        past its count, once the topic was looked up: ``StreamdError``).

        ``idempotency_key``: on a topic with a dedup window, a record whose key the
        partition saw within the window is not appended again; its metadata then says
        ``duplicate=True`` with the first record's offset. ``delay_ms`` /
        ``deliver_at_ms`` (ms since the epoch; one or the other): queue groups hand
        the record out no earlier (stream readers see it at once).
        """
        future, flags, batch = self._add(topic, value, key, partition, headers, timestamp_ms, idempotency_key,
                                         delay_ms, deliver_at_ms, AsyncRecordFuture)
        if flags:
            self._on_loop(flags, batch)
        if batch is None:
            await self._placed()
        return future

    async def _placed(self) -> None:
        """Wait until the deferred records are placed: an asyncio sender's next
        record then goes straight into its batch (as the first send to a topic always
        waited for its lookup)."""
        placer = self._placer
        if placer is not None and not placer.done():
            await asyncio.wait([placer])

    async def send_and_wait(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: Headers | None = None,
        timestamp_ms: int = 0,
        idempotency_key: str | None = None,
        delay_ms: int = 0,
        deliver_at_ms: int = 0,
    ) -> RecordMetadata:
        """Send one record now (no linger: with the records sent before it to its
        partition) and wait for its acknowledgement."""
        future, flags, batch = self._add(topic, value, key, partition, headers, timestamp_ms, idempotency_key,
                                         delay_ms, deliver_at_ms, AsyncRecordFuture)
        self._ship_now(flags, batch)
        await self._sender.drain()  # written now, not on the loop's next turn
        return await future

    async def send_batch(
        self, topic: str, partition: int, values: Iterable[bytes] | pb.RecordSet
    ) -> AsyncRecordFuture:
        """Ship one batch now (no linger); resolves with the batch's first offset.

        The bulk fast path: ``values`` are keyless record values, or a prepared RecordSet.
        """
        if self._closed:
            raise RuntimeError("producer is closed")
        record_set = values if isinstance(values, pb.RecordSet) else values_record_set(values)
        count = len(record_set.records)
        batch = self._batch(record_set.SerializeToString())
        if batch.ByteSize() > MAX_TRANSPORT_RECORD_BYTES:
            raise too_large(topic, batch.ByteSize(), MAX_TRANSPORT_RECORD_BYTES, "the transport's limit")
        outcome = BatchOutcome(topic, partition, self._loop, self._acc.loop_thread, 1)
        await self._sender.enqueue(topic, partition, batch, outcome, count, self._sender.deadline())
        return AsyncRecordFuture(outcome, 0)

    async def flush(self) -> None:
        """Ship everything queued and wait for every answer."""
        placer = self._placer
        if placer is not None and not placer.done():
            await asyncio.wait([placer])
        self._acc.seal_all()
        self._pump()
        await self._sender.wait_settled()

    async def close(self) -> None:
        if self._closed:
            return
        try:
            await self.flush()
        finally:
            self._closed = True
            self._lookups.cancel()
            if self._placer is not None and not self._placer.done():
                self._placer.cancel()
                await asyncio.wait([self._placer])
            await self._sender.close()
            await self._close_channel()

    async def partition_count(self, topic: str) -> int:
        """The topic's partition count (looked up once, then kept). Waits at most
        ``request_timeout_ms`` (retrying meanwhile), then fails with
        ``DEADLINE_EXCEEDED``/``TIMED_OUT``."""
        return await self._lookups.partition_count(topic)

    # -- adding records (any thread) ------------------------------------------
    def _add(self, topic: str, value: bytes, key: bytes | None, partition: int | None, headers: Headers | None,
             timestamp_ms: int, idempotency_key: str | None, delay_ms: int, deliver_at_ms: int,
             future_type: type[F]) -> tuple[F, int, OpenBatch | None]:
        """Check one record and add it to the accumulator (see ``Accumulator.add``)."""
        if self._closed:
            raise RuntimeError("producer is closed")
        if value.__class__ is not bytes:
            value = as_bytes(value, "value")
        if (key is None and headers is None and not timestamp_ms and idempotency_key is None and not delay_ms
                and not deliver_at_ms and (partition is None or partition.__class__ is int and partition >= 0)):
            got = _PLAIN.get(len(value))
            if got is None:
                if len(value) > MAX_TRANSPORT_RECORD_BYTES:
                    raise too_large(topic, len(value), MAX_TRANSPORT_RECORD_BYTES, "the transport's limit")
                got = plain_prefix(len(value))
            return self._acc.add(topic, got[0], value, got[1], None, partition, future_type)
        check_fields(key, partition, headers, timestamp_ms, idempotency_key, delay_ms, deliver_at_ms)
        if key is not None:
            key = as_bytes(key, "key")
        record = encode_record(value, key, headers, timestamp_ms, idempotency_key, delay_ms, deliver_at_ms)
        if len(record) > MAX_TRANSPORT_RECORD_BYTES:
            raise too_large(topic, len(record), MAX_TRANSPORT_RECORD_BYTES, "the transport's limit")
        return self._acc.add(topic, entry(record), None, len(record), key, partition, future_type)

    # -- on the loop -----------------------------------------------------------
    def _on_loop(self, flags: int, batch: OpenBatch | None) -> None:
        """What ``Accumulator.add``'s ``flags`` ask of the loop (once per batch)."""
        if flags & OPENED and batch is not None and batch.timer is None and batch.outcome.count == 0:
            batch.timer = self._loop.call_later(self.linger_ms / 1000, self._linger_expired, batch)
        if flags & SEALED:
            self._pump()
        if flags & DEFERRED and (self._placer is None or self._placer.done()):
            self._placer = asyncio.ensure_future(self._place_deferred())

    def _ship_now(self, flags: int, batch: OpenBatch | None) -> None:
        self._on_loop(flags & ~OPENED, batch)
        if batch is not None and self._acc.linger_expired(batch):
            self._pump()

    def _linger_expired(self, batch: OpenBatch) -> None:
        if self._acc.linger_expired(batch):
            self._pump()

    def _pump(self) -> None:
        """Hand the sealed batches to the sender, oldest first."""
        while (batch := self._acc.take_sealed()) is not None:
            if batch.timer is not None:
                batch.timer.cancel()
                batch.timer = None
            self._sender.submit(batch.topic, batch.partition, self._batch(encode(batch)), batch.outcome, batch.count,
                                batch.deadline)

    def _batch(self, payload: bytes) -> pb.RecordBatch:
        if self.compression == "lz4":
            return pb.RecordBatch(compression=pb.COMPRESSION_LZ4, records=lz4.frame.compress(payload))
        return pb.RecordBatch(compression=pb.COMPRESSION_NONE, records=payload)

    async def _place_deferred(self) -> None:
        """Place the deferred records, oldest first, each once its topic is looked up
        (or fail it, alone, when the lookup fails for it)."""
        try:
            while (record := self._acc.head_deferred()) is not None:
                error: StreamdError | None = None
                try:
                    info = await self._lookups.info_for(record.topic, record.deadline,
                                                        pinned=record.partition is not None)
                except StreamdError as exc:
                    info, error = None, exc
                woken = self._acc.place(record, info)
                if error is not None:
                    record.outcome.fail(error)
                for flags, batch in woken:
                    self._on_loop(flags & ~DEFERRED, batch)
        except asyncio.CancelledError:
            self._acc.fail_deferred(closed_error())
            raise


class Producer:
    """A blocking producer: an AsyncProducer on a private event-loop thread
    (``_loop``). ``send`` adds the record to its partition's batch on the calling
    thread (no hop to the loop thread per record) and returns a ``RecordFuture`` (a
    ``concurrent.futures.Future`` resolving to RecordMetadata; ``_futures``).
    Thread-safe: any number of threads may send at once."""

    def __init__(self, server: str | None = None, **options: Any) -> None:
        self._loop = LoopThread("streamd-producer")
        self._producer: AsyncProducer = self._loop.run(self._make(server, options))

    async def _make(self, server: str | None, options: dict[str, Any]) -> AsyncProducer:
        return AsyncProducer(server, **options)

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: Headers | None = None,
        timestamp_ms: int = 0,
        idempotency_key: str | None = None,
        delay_ms: int = 0,
        deliver_at_ms: int = 0,
    ) -> RecordFuture:
        """As ``AsyncProducer.send``; returns a ``concurrent.futures.Future``."""
        future, flags, batch = self._producer._add(topic, value, key, partition, headers, timestamp_ms,
                                                   idempotency_key, delay_ms, deliver_at_ms, RecordFuture)
        if flags:
            self._producer._loop.call_soon_threadsafe(self._producer._on_loop, flags, batch)
        return future

    def send_and_wait(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: Headers | None = None,
        timestamp_ms: int = 0,
        idempotency_key: str | None = None,
        delay_ms: int = 0,
        deliver_at_ms: int = 0,
    ) -> RecordMetadata:
        """Send one record now (no linger) and wait for its acknowledgement (at most
        the delivery timeout)."""
        producer = self._producer
        future, flags, batch = producer._add(topic, value, key, partition, headers, timestamp_ms, idempotency_key,
                                             delay_ms, deliver_at_ms, RecordFuture)
        try:
            producer._loop.call_soon_threadsafe(producer._ship_now, flags, batch)
        except RuntimeError:
            raise RuntimeError("the client is closed") from None
        return future.result()

    def send_batch(self, topic: str, partition: int, values: Sequence[bytes] | pb.RecordSet) -> RecordMetadata:
        async def go() -> RecordMetadata:
            return await (await self._producer.send_batch(topic, partition, values))

        return self._loop.run(go())

    def flush(self) -> None:
        self._loop.run(self._producer.flush())

    def partition_count(self, topic: str) -> int:
        return self._loop.run(self._producer.partition_count(topic))

    def close(self) -> None:
        if self._loop.closed:
            return
        try:
            self._loop.run(self._producer.close())
        finally:
            self._loop.close()
