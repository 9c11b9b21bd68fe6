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
import concurrent.futures
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

from streamd.partitioner import key_partition
from streamd.v1 import streamd_pb2 as pb
from streamd.v1 import streamd_pb2_grpc as rpc

from ._channel import AsyncClient, Security, server_label, stub
from ._loop import LoopThread
from ._sender import (
    DEFAULT_DELIVERY_TIMEOUT_MS,
    DEFAULT_REQUEST_TIMEOUT_MS,
    DEFAULT_RETRY_BACKOFF_MAX_MS,
    DEFAULT_RETRY_BACKOFF_MS,
    Sender,
)
from .errors import StreamdError
from .records import Headers, RecordMetadata, add_record, encode_batch, values_record_set

DEFAULT_LINGER_MS = 5
DEFAULT_BATCH_MAX_BYTES = 512 * 1024
DEFAULT_MAX_IN_FLIGHT = 64
_RECORD_OVERHEAD = 16  # tags, lengths, timestamp
#: Reconnect quickly after a broker restart (grpc's default waits 1 s, then longer).
_RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]


class _Accumulator:
    """Records waiting to be shipped to one partition."""

    __slots__ = ("topic", "partition", "record_set", "futures", "size", "timer", "deadline")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.record_set = pb.RecordSet()
        self.futures: list[asyncio.Future[RecordMetadata]] = []
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0  # delivery deadline of the first record (loop time)


class _Lookup:
    """One topic's partition-count lookup in progress, shared by the calls waiting
    for it (``waiters``); ``last_error``: its last failed attempt."""

    __slots__ = ("task", "waiters", "last_error")

    def __init__(self) -> None:
        self.task: asyncio.Task[int] | None = None
        self.waiters = 0
        self.last_error: StreamdError | None = None


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
        lookup for its reply)."""
        if compression not in ("none", "lz4"):
            raise ValueError("compression must be 'none' or 'lz4'")
        super().__init__(server, channel=channel, security=security, timeout_s=request_timeout_ms / 1000,
                         extra_options=_RECONNECT_OPTIONS)
        self._topics = stub(rpc.TopicServiceStub, self._channel)
        label = server_label(server, channel)
        self._sender = Sender(self._channel, idempotent=idempotent, max_in_flight=max_in_flight,
                              delivery_timeout_ms=delivery_timeout_ms, request_timeout_ms=request_timeout_ms,
                              retry_backoff_ms=retry_backoff_ms, retry_backoff_max_ms=retry_backoff_max_ms,
                              server=label)
        self.linger_ms = linger_ms
        self.batch_max_bytes = batch_max_bytes
        self.compression = compression
        self._order = asyncio.Lock()
        self._acc: dict[tuple[str, int], _Accumulator] = {}
        self._partition_counts: dict[str, int] = {}  # known: kept
        self._lookups: dict[str, _Lookup] = {}  # in progress
        self._sticky: dict[str, int] = {}
        self._shipping: set[asyncio.Future[None]] = set()  # linger-expired batches being sealed
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
    ) -> asyncio.Future[RecordMetadata]:
        """Queue one record; the returned future resolves once it is acknowledged.

        ``idempotency_key``: on a topic with a dedup window, a record whose key the
        partition saw within the window is not appended again; its metadata then says
        ``duplicate=True`` with the first record's offset.
        """
        if self._closed:
            raise RuntimeError("producer is closed")
        deadline = self._sender.deadline()  # from now: a topic lookup counts against it
        # Records enter their batches in call order. The first sends to a topic wait
        # for its partition count; a later send must not overtake them when it starts
        # just after the lookup ends, hence the FIFO lock (free when uncontended).
        async with self._order:
            if partition is None:
                partition = await self._choose_partition(topic, key, deadline)
            acc = self._acc.get((topic, partition))
            if acc is None:
                acc = self._acc[(topic, partition)] = _Accumulator(topic, partition)
            add_record(acc.record_set, value, key, headers, timestamp_ms, idempotency_key)
            future = asyncio.get_running_loop().create_future()
            if not acc.futures:
                acc.deadline = deadline
            acc.futures.append(future)
            acc.size += len(value) + (len(key) if key else 0) + _RECORD_OVERHEAD
            if idempotency_key:
                acc.size += len(idempotency_key)
        if acc.size >= self.batch_max_bytes:
            await self._ship(acc)
        elif acc.timer is None:
            acc.timer = asyncio.get_running_loop().call_later(self.linger_ms / 1000, self._linger_expired, acc)
        return future

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
    ) -> RecordMetadata:
        """Send one record now (no linger) and wait for its acknowledgement."""
        if self._closed:
            raise RuntimeError("producer is closed")
        record_set = pb.RecordSet()
        add_record(record_set, value, key, headers, timestamp_ms, idempotency_key)
        future: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        deadline = self._sender.deadline()
        async with self._order:
            if partition is None:
                partition = await self._choose_partition(topic, key, deadline)
            acc = self._acc.get((topic, partition))
            if acc is not None and acc.futures:
                await self._ship(acc)  # records sent earlier go first
            await self._sender.enqueue(topic, partition, encode_batch(record_set, self.compression), [future], False, 1,
                                       deadline)
        return await future

    async def send_batch(
        self, topic: str, partition: int, values: Iterable[bytes] | pb.RecordSet
    ) -> asyncio.Future[RecordMetadata]:
        """Ship one batch now (no linger); resolves with the batch's first offset.

        The bulk fast path: ``values`` are keyless record values, or a prepared RecordSet.
        """
        record_set = values if isinstance(values, pb.RecordSet) else values_record_set(values)
        future = asyncio.get_running_loop().create_future()
        deadline = self._sender.deadline()
        batch = encode_batch(record_set, self.compression)
        await self._sender.enqueue(topic, partition, batch, [future], True, len(record_set.records), deadline)
        return future

    async def flush(self) -> None:
        """Ship everything queued and wait for every answer."""
        for acc in list(self._acc.values()):
            await self._ship(acc)
        if self._shipping:
            await asyncio.gather(*list(self._shipping), return_exceptions=True)
        await self._sender.wait_settled()

    async def close(self) -> None:
        if self._closed:
            return
        try:
            await self.flush()
        finally:
            self._closed = True
            for lookup in list(self._lookups.values()):
                if lookup.task is not None:
                    lookup.task.cancel()  # its waiters fail with PRODUCER_CLOSED
            await self._sender.close()
            await self._close_channel()

    async def partition_count(self, topic: str) -> int:
        """The topic's partition count (looked up once, then kept). Waits at most
        ``request_timeout_ms`` (retrying meanwhile), then fails with
        ``DEADLINE_EXCEEDED``/``TIMED_OUT``."""
        count = self._partition_counts.get(topic)
        if count is not None:
            return count
        timeout_s = self._calls.timeout_s
        return await self._wait_lookup(topic, asyncio.get_running_loop().time() + timeout_s, lambda last: StreamdError(
            "DEADLINE_EXCEEDED", "TIMED_OUT",
            f"no answer to DescribeTopic from {self._calls.server} within {timeout_s:g} s{_last(last)}"))

    async def _count_for(self, topic: str, deadline: float) -> int:
        """The partition count a record sent with delivery ``deadline`` needs."""
        count = self._partition_counts.get(topic)
        if count is not None:
            return count
        return await self._wait_lookup(topic, deadline, lambda last: StreamdError(
            "DEADLINE_EXCEEDED", "DELIVERY_TIMEOUT",
            f"record(s) for {topic} not stored: its partition count was not known within delivery_timeout_ms="
            f"{self._sender.delivery_timeout_s * 1000:g}{_last(last)}"))

    async def _wait_lookup(self, topic: str, deadline: float,
                           timed_out: Callable[[StreamdError | None], StreamdError]) -> int:
        """Wait for the topic's shared lookup until ``deadline`` (loop time), then
        raise ``timed_out(last error)``; the lookup goes on for the other waiters and
        is given up when none is left. Concurrent waiters resume in the order they
        came (a future wakes its waiters FIFO), so record order is kept."""
        lookup = self._lookups.get(topic)
        if lookup is None:
            lookup = self._lookups[topic] = _Lookup()
            lookup.task = asyncio.ensure_future(self._look_up(topic, lookup))
        task = lookup.task
        assert task is not None
        lookup.waiters += 1
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(task)
        except TimeoutError:
            raise timed_out(lookup.last_error) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current is not None and current.cancelling()):
                raise StreamdError("CANCELLED", "PRODUCER_CLOSED",
                                   f"the producer was closed before the partition count of {topic} was known") from None
            raise
        finally:
            lookup.waiters -= 1
            if not lookup.waiters and not task.done():
                # Nobody waits for it: give it up now (not when the task gets to
                # it), so that the next send starts a lookup of its own.
                task.cancel()
                if self._lookups.get(topic) is lookup:
                    del self._lookups[topic]

    async def _look_up(self, topic: str, lookup: _Lookup) -> int:
        """DescribeTopic until it answers or fails for good (FATAL_CODES); each attempt
        bounded by the request timeout, backoff between them. Keeps the count; a
        failure is not kept (the lookup leaves ``_lookups`` either way)."""
        try:
            reply: pb.DescribeTopicResponse = await self._sender.call_retrying(
                self._topics.DescribeTopic, pb.DescribeTopicRequest(topic=topic),
                failed=lambda exc: setattr(lookup, "last_error", exc))
            count: int = reply.topic.partition_count
            self._partition_counts[topic] = count
            return count
        finally:
            if self._lookups.get(topic) is lookup:
                del self._lookups[topic]

    # -- batching ------------------------------------------------------------
    async def _choose_partition(self, topic: str, key: bytes | None, deadline: float) -> int:
        count = await self._count_for(topic, deadline)
        if key is not None:
            return key_partition(key, count)
        # Sticky round-robin: keyless records fill one partition's batch at a time.
        return self._sticky.setdefault(topic, 0) % count

    def _linger_expired(self, acc: _Accumulator) -> None:
        acc.timer = None
        if acc.futures:
            task = asyncio.ensure_future(self._ship(acc))
            self._shipping.add(task)
            task.add_done_callback(self._shipping.discard)

    async def _ship(self, acc: _Accumulator) -> None:
        if acc.timer is not None:
            acc.timer.cancel()
            acc.timer = None
        if not acc.futures:
            return
        record_set, futures = acc.record_set, acc.futures
        acc.record_set, acc.futures, acc.size = pb.RecordSet(), [], 0
        if acc.topic in self._sticky:
            self._sticky[acc.topic] += 1
        batch = encode_batch(record_set, self.compression)
        await self._sender.enqueue(acc.topic, acc.partition, batch, futures, False, len(futures), acc.deadline)


def _last(error: StreamdError | None) -> str:
    return "" if error is None else f" (last error: {error})"


class Producer:
    """A blocking producer: an AsyncProducer on a private event-loop thread
    (``_loop``).

    ``send`` returns a ``concurrent.futures.Future`` resolving to RecordMetadata.
    """

    def __init__(self, server: str | None = None, **options: Any) -> None:
        self._loop = LoopThread("streamd-producer")
        self._enqueued: list[concurrent.futures.Future[None]] = []
        self._producer: AsyncProducer = self._loop.run(self._make(server, options))

    async def _make(self, server: str | None, options: dict[str, Any]) -> AsyncProducer:
        return AsyncProducer(server, **options)

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, topic: str, value: bytes, **kwargs: Any) -> concurrent.futures.Future[RecordMetadata]:
        result: concurrent.futures.Future[RecordMetadata] = concurrent.futures.Future()

        def copy(done: asyncio.Future[RecordMetadata]) -> None:
            error = done.exception()
            if error is not None:
                result.set_exception(error)
            else:
                result.set_result(done.result())

        async def enqueue() -> None:
            try:
                record = await self._producer.send(topic, value, **kwargs)
            except BaseException as exc:
                result.set_exception(exc)
            else:
                record.add_done_callback(copy)

        # flush() waits for these, so a flush covers every send made before it.
        self._enqueued.append(self._loop.submit(enqueue()))
        if len(self._enqueued) > 10_000:
            self._enqueued = [f for f in self._enqueued if not f.done()]
        return result

    def send_and_wait(self, topic: str, value: bytes, **kwargs: Any) -> RecordMetadata:
        return self._loop.run(self._producer.send_and_wait(topic, value, **kwargs))

    def send_batch(self, topic: str, partition: int, values: Sequence[bytes] | pb.RecordSet) -> RecordMetadata:
        async def go() -> RecordMetadata:
            return await (await self._producer.send_batch(topic, partition, values))

        return self._loop.run(go())

    def flush(self) -> None:
        enqueued, self._enqueued = self._enqueued, []
        for future in enqueued:
            future.result()
        self._loop.run(self._producer.flush())

    def partition_count(self, topic: str) -> int:
        return self._loop.run(self._producer.partition_count(topic))

    def close(self) -> None:
        if self._loop.closed:
            return
        try:
            for future in self._enqueued:
                future.result()
            self._loop.run(self._producer.close())
        finally:
            self._loop.close()
