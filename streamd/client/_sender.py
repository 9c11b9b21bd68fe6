"""Sending sealed batches over one ProduceStream: ordering, pipelining, idempotence
and retries (the engine under ``producer.AsyncProducer``, as Kafka's ``Sender``).

**Idempotent** (the default): the sender gets a producer id from the broker
(``InitProducer``) once and numbers each partition's records 0, 1, 2, ...; a batch
is given the number of its first record when it is sealed (``enqueue``) and keeps it
for good. When the stream breaks or the broker answers UNAVAILABLE, every
unanswered batch goes back to the front of its partition's queue and is written
again, in order, on a new stream once the channel is connected again (backoff
``retry_backoff_ms`` doubling up to 2 s, at most ``retries`` rounds: about 6 s with
the defaults); the broker answers a batch it already has with its original offsets
(``RecordMetadata.duplicate``), so each record is written once. At most
``PER_PARTITION_IN_FLIGHT`` (5) batches per partition are unanswered at a time: the
broker remembers a producer's last 5 batches per partition, so every retry is
recognised.

A batch the broker refuses (RECORD_TOO_LARGE, TOO_MANY_PRODUCERS, ...) fails alone:
the partition's later batches are renumbered to close the gap it leaves (those
already written are refused as out of order; their answers are ignored and they are
written again). TOO_MANY_PRODUCERS refuses a producer's first batch for a partition
whose producer table is full; the renumbered batches behind it start at 0 again and
are refused too until the partition has room.
OUT_OF_ORDER_SEQUENCE / UNKNOWN_PRODUCER (the broker no longer knows the producer:
idle a week, evicted, or a crash lost data of an fsync=never topic) fail that
batch's records with a ``ProduceError``, and the sender starts over with a new id.
Any other error fails the batch alone and leaves the numbering as it is: e.g.
DATA_LOSS / RETRY_ANSWER_UNKNOWN, a retry the broker recognised (its sequence
numbers are used) but whose answer (which records its dedup window dropped) it no
longer knows.
When the retries run out, every queued batch fails with the last error and the
sender also starts over.

Not idempotent: at most once. A batch whose request fails in transit is reported,
never retried.

Ordering: batches of one partition are written in the order they were sealed, and a
retry writes them again in that order before anything newer. One write at a time
(grpc.aio refuses overlapping writes on a stream; asyncio.Lock is FIFO).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque

import grpc

from streamd.v1 import streamd_pb2 as pb
from streamd.v1 import streamd_pb2_grpc as rpc

from .errors import ProduceError, StreamdError
from .records import RecordMetadata

DEFAULT_RETRIES = 5
DEFAULT_RETRY_BACKOFF_MS = 100
MAX_RETRY_BACKOFF_MS = 2000
#: The broker remembers an idempotent producer's last 5 batches per partition
#: (streamd.broker.producer_state.REMEMBERED_BATCHES); more unanswered ones could
#: not all be recognised as retries.
PER_PARTITION_IN_FLIGHT = 5
#: Failures of the whole stream worth a retry (the broker died, restarted, or stopped).
_TRANSPORT_CODES = {"UNAVAILABLE", "CANCELLED", "UNKNOWN", "INTERNAL", "DEADLINE_EXCEEDED"}
_SEQUENCE_REASONS = {"OUT_OF_ORDER_SEQUENCE", "UNKNOWN_PRODUCER"}
#: Answers that refuse a request before anything of it is appended.
_REFUSED_CODES = {
    grpc.StatusCode[name].value[0]
    for name in ("INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "OUT_OF_RANGE",
                 "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAUTHENTICATED")
}
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]

log = logging.getLogger("streamd.client")


class _Batch:
    """A sealed batch until it is settled (answered, or failed for good)."""

    __slots__ = ("queue", "batch", "futures", "whole", "record_count")

    def __init__(self, queue: "_PartitionQueue", batch: pb.RecordBatch, futures: list, whole: bool,
                 count: int) -> None:
        self.queue = queue
        self.batch = batch
        self.futures = futures
        self.whole = whole  # one future for the whole batch (send_batch)
        self.record_count = count


class _PartitionQueue:
    """One partition's sealed batches: not yet written (in order), and how many are
    written and unanswered."""

    __slots__ = ("topic", "partition", "unsent", "in_flight", "ready")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.unsent: deque[_Batch] = deque()
        self.in_flight = 0
        self.ready = False  # listed in Sender._ready


class _Stream:
    """One ProduceStream call and the batches written to it, by request id."""

    __slots__ = ("call", "reader", "waiting", "broken")

    def __init__(self, call) -> None:
        self.call = call
        self.reader: asyncio.Task | None = None
        self.waiting: dict[int, _Batch] = {}
        self.broken = False


class Sender:
    """Writes sealed batches to one ProduceStream and settles their futures (see
    module docstring). Lives on one event loop."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        idempotent: bool,
        retries: int,
        retry_backoff_ms: float,
        max_in_flight: int,
    ) -> None:
        if retries < 0 or retry_backoff_ms < 0:
            raise ValueError("retries and retry_backoff_ms must not be negative")
        self._channel = channel
        self._log = rpc.LogServiceStub(channel)
        self.idempotent = idempotent
        self.retries = retries if idempotent else 0
        self.retry_backoff_ms = retry_backoff_ms
        self._window = PER_PARTITION_IN_FLIGHT if idempotent else max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight)
        self._seal_lock = asyncio.Lock()
        self._waiting_to_seal = 0  # enqueue() calls queued on (or holding) _seal_lock
        self._write_lock = asyncio.Lock()
        self._queues: dict[tuple[str, int], _PartitionQueue] = {}
        self._ready: deque[_PartitionQueue] = deque()
        self._ids = itertools.count(1)
        self._producer_id: int | None = None
        self._sequences: dict[tuple[str, int], int] = {}
        self._stream: _Stream | None = None
        self._readers: set[asyncio.Task] = set()
        self._unsettled = 0  # sealed batches not yet answered or failed for good
        self._idle: asyncio.Future[None] | None = None
        self._drainer: asyncio.Task | None = None
        self._reconnecting = False
        self._reconnect_task: asyncio.Task | None = None
        self._attempt = 0
        self._last_error: BaseException | None = None

    @property
    def producer_id(self) -> int | None:
        return self._producer_id

    async def wait_settled(self) -> None:
        """Return once every batch sealed so far is answered or failed for good."""
        while self._unsettled:
            if self._idle is None or self._idle.done():
                self._idle = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._idle)

    async def close(self) -> None:
        """End the stream (after ``wait_settled``) and wait for its reader."""
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        stream = self._stream
        if stream is not None and not stream.broken:
            try:
                await stream.call.done_writing()
            except (grpc.RpcError, asyncio.InvalidStateError):
                pass
        if self._readers:
            await asyncio.gather(*list(self._readers), return_exceptions=True)

    async def enqueue(self, topic: str, partition: int, batch: pb.RecordBatch, futures: list, whole: bool,
                      count: int) -> None:
        """Seal a batch (its sequence number is fixed here) and queue it for writing.
        ``futures``: one per record, or one for the whole batch (``whole``); each
        resolves to its RecordMetadata once the batch is answered."""
        # FIFO: batches are sealed, and so numbered and written, in the order shipped.
        # While any batch waits to be sealed (for a slot or the producer id) every
        # later one queues behind it on the lock; only with nobody waiting may a batch
        # be sealed at once. (Not lock.locked(): between a release and the next
        # waiter's turn the lock reads as free, and a newcomer would overtake.)
        if self._waiting_to_seal or self._slots.locked() or (self.idempotent and self._producer_id is None):
            self._waiting_to_seal += 1
            try:
                async with self._seal_lock:
                    await self._slots.acquire()
                    if self.idempotent and self._producer_id is None:
                        try:
                            await self._init_producer()
                        except BaseException as exc:
                            self._slots.release()
                            _fail_futures(futures, exc)
                            if isinstance(exc, Exception):
                                return
                            raise
                    self._seal(topic, partition, batch, futures, whole, count)
            finally:
                self._waiting_to_seal -= 1
        else:
            await self._slots.acquire()  # free: returns at once, without yielding
            self._seal(topic, partition, batch, futures, whole, count)
        await self._drain()

    def _seal(self, topic: str, partition: int, batch: pb.RecordBatch, futures: list, whole: bool,
              count: int) -> None:
        key = (topic, partition)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _PartitionQueue(topic, partition)
        if self.idempotent:
            sequence = self._sequences.get(key, 0)
            self._sequences[key] = sequence + count
            batch.producer_id = self._producer_id
            batch.base_sequence = sequence
        self._unsettled += 1
        queue.unsent.append(_Batch(queue, batch, futures, whole, count))
        self._mark_ready(queue)

    async def _init_producer(self) -> None:
        # wait_for_ready: a channel still reconnecting (a broker restart) is waited
        # for, as long as a retried batch would be.
        try:
            reply = await self._log.InitProducer(
                pb.InitProducerRequest(), wait_for_ready=True, timeout=self._retry_budget_s()
            )
        except grpc.RpcError as err:
            raise StreamdError.from_rpc_error(err) from None
        self._producer_id = reply.producer_id
        self._sequences.clear()

    def _restart_producer(self) -> None:
        """Forget the producer id: batches sealed from now on start at sequence 0 under
        a new one (those sealed before keep theirs)."""
        self._producer_id = None
        self._sequences.clear()

    # -- writing -------------------------------------------------------------
    def _mark_ready(self, queue: _PartitionQueue) -> None:
        if not queue.ready and queue.unsent and queue.in_flight < self._window:
            queue.ready = True
            self._ready.append(queue)

    async def _drain(self) -> None:
        """Write what the partition windows allow, one writer at a time (grpc.aio
        refuses overlapping writes on a stream; asyncio.Lock is FIFO)."""
        if self._reconnecting or not self._ready:
            return
        async with self._write_lock:
            ready = self._ready
            while ready and not self._reconnecting:
                queue = ready.popleft()
                queue.ready = False
                while queue.unsent and queue.in_flight < self._window and not self._reconnecting:
                    await self._write(queue.unsent.popleft())
                self._mark_ready(queue)

    def _kick(self) -> None:
        if self._ready and not self._reconnecting and (self._drainer is None or self._drainer.done()):
            self._drainer = asyncio.ensure_future(self._drain())

    async def _write(self, item: _Batch) -> None:
        stream = self._stream
        if stream is None or stream.broken:
            stream = self._stream = _Stream(self._log.ProduceStream())
            stream.reader = asyncio.ensure_future(self._read_answers(stream))
            self._readers.add(stream.reader)
            stream.reader.add_done_callback(self._readers.discard)
        request_id = next(self._ids)
        stream.waiting[request_id] = item
        queue = item.queue
        queue.in_flight += 1
        # Built in place: nesting finished messages would copy the batch each time.
        message = pb.ProduceStreamRequest(request_id=request_id)
        message.request.topic = queue.topic
        message.request.partitions.add(partition=queue.partition).batches.append(item.batch)
        try:
            await stream.call.write(message)
        except grpc.RpcError as err:
            self._stream_failed(stream, err)
        except asyncio.InvalidStateError:  # the call ended before its reader noticed
            self._stream_failed(stream, _stream_ended())

    # -- answers -------------------------------------------------------------
    async def _read_answers(self, stream: _Stream) -> None:
        err: BaseException | None = None
        try:
            async for answer in stream.call:
                self._answer(stream, answer)
        except grpc.RpcError as exc:
            err = exc
        except asyncio.CancelledError:
            err = StreamdError("CANCELLED", "STREAM_CLOSED", "produce stream cancelled")
        except Exception as exc:  # a bug here: fail what waits rather than hang it
            log.exception("handling a produce answer failed")
            err = exc
        finally:
            if stream.waiting:
                self._stream_failed(stream, err or _stream_ended())
            stream.broken = True

    def _answer(self, stream: _Stream, answer: pb.ProduceStreamResponse) -> None:
        item = stream.waiting.pop(answer.request_id, None)
        if item is None:
            return
        queue = item.queue
        queue.in_flight -= 1
        if answer.HasField("error"):
            e = answer.error
            exc = ProduceError(_code_name(e.code), e.reason, e.message, dict(e.metadata))
            if e.code == _UNAVAILABLE and self.retries:
                self._stream_failed(stream, exc, first=item)  # the broker stops or a disk failed
                return
            if e.reason in _SEQUENCE_REASONS:
                if item.batch.producer_id == self._producer_id:
                    self._restart_producer()
            elif item.batch.producer_id and e.code in _REFUSED_CODES:
                self._close_gap(stream, item)
            self._settle(item, exc)
        else:
            self._attempt = 0
            self._resolve(item, answer.response.results[0])
            self._settle(item)
        if queue.unsent:
            self._mark_ready(queue)
            self._kick()

    def _resolve(self, item: _Batch, result: pb.PartitionProduceResult) -> None:
        topic, partition = item.queue.topic, result.partition
        base, append_time, durable, duplicate = result.base_offset, result.append_time_ms, result.durable, result.duplicate
        futures = item.futures
        if result.deduplicated:
            seen = {d.index: d.offset for d in result.deduplicated}
            metas, offset = [], base
            for i in range(1 if item.whole else len(futures)):
                if i in seen:
                    metas.append(RecordMetadata(topic, partition, seen[i], append_time, durable, True))
                else:
                    metas.append(RecordMetadata(topic, partition, offset, append_time, durable, duplicate))
                    offset += 1
            for f, meta in zip(futures, metas):
                if not f.done():
                    f.set_result(meta)
            return
        for i, f in enumerate(futures):
            if not f.done():
                f.set_result(RecordMetadata(topic, partition, base + i, append_time, durable, duplicate))

    def _close_gap(self, stream: _Stream, refused: _Batch) -> None:
        """``refused`` was not appended, so its sequence numbers must not be used:
        renumber the partition's later batches down (as Kafka's producer does). Those
        already written will be refused by the broker (a gap); their answers are
        ignored and they are written again, in order, with their new numbers."""
        queue, producer_id = refused.queue, refused.batch.producer_id
        start, shift = refused.batch.base_sequence, refused.record_count
        moved = [(rid, item) for rid, item in stream.waiting.items() if item.queue is queue]
        for rid, item in moved:
            del stream.waiting[rid]
            queue.in_flight -= 1
        for _, item in reversed(moved):
            queue.unsent.appendleft(item)
        for item in queue.unsent:
            batch = item.batch
            if batch.producer_id == producer_id and batch.base_sequence > start:
                batch.base_sequence -= shift
        key = (queue.topic, queue.partition)
        if producer_id == self._producer_id and key in self._sequences:
            self._sequences[key] -= shift

    def _settle(self, item: _Batch, exc: BaseException | None = None) -> None:
        if exc is not None:
            _fail_futures(item.futures, exc)
        self._slots.release()
        self._unsettled -= 1
        if not self._unsettled and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    # -- failures and retries -------------------------------------------------
    def _stream_failed(self, stream: _Stream, err: BaseException, *, first: _Batch | None = None) -> None:
        """The stream is unusable: its unanswered batches are retried (idempotent) or
        failed (at most once)."""
        items = list(stream.waiting.values())
        stream.waiting.clear()
        for item in items:
            item.queue.in_flight -= 1
        if first is not None:
            items.insert(0, first)
        if not stream.broken:
            stream.broken = True
            stream.call.cancel()
        if stream is self._stream:
            self._stream = None
        exc = StreamdError.from_rpc_error(err) if isinstance(err, grpc.RpcError) else err
        if not items:
            return
        if self.retries and (first is not None or getattr(exc, "code", "") in _TRANSPORT_CODES):
            for item in reversed(items):  # back to the front, in their order
                item.queue.unsent.appendleft(item)
            for item in items:
                self._mark_ready(item.queue)
            self._last_error = exc
            self._reconnecting = True  # at once: nothing may be written before the backoff
            if self._reconnect_task is None or self._reconnect_task.done():
                self._reconnect_task = asyncio.ensure_future(self._reconnect())
        else:
            for item in items:
                self._settle(item, exc)

    async def _reconnect(self) -> None:
        try:
            while True:
                self._attempt += 1
                if self._attempt > self.retries:
                    self._give_up()
                    return
                delay = self._backoff_s(self._attempt)
                await asyncio.sleep(delay)
                try:
                    await asyncio.wait_for(self._channel.channel_ready(), delay)
                except (TimeoutError, asyncio.TimeoutError):
                    continue
                break
        finally:
            self._reconnecting = False
        await self._drain()

    def _give_up(self) -> None:
        """Retries exhausted: fail every queued batch; start over with a new id."""
        exc = self._last_error or _stream_ended()
        self._attempt = 0
        self._restart_producer()
        for queue in self._queues.values():
            while queue.unsent:
                self._settle(queue.unsent.popleft(), exc)
        self._ready.clear()
        for queue in self._queues.values():
            queue.ready = False

    def _backoff_s(self, attempt: int) -> float:
        return min(self.retry_backoff_ms * 2 ** (attempt - 1), MAX_RETRY_BACKOFF_MS) / 1000

    def _retry_budget_s(self) -> float:
        """About the longest the retries of one batch take (backoff + waiting for the
        channel, each round), and at least a few seconds."""
        return max(5.0, sum(2 * self._backoff_s(a) for a in range(1, self.retries + 1)))


def _stream_ended() -> StreamdError:
    return StreamdError("UNAVAILABLE", "STREAM_CLOSED", "produce stream ended")


def _fail_futures(futures: list, exc: BaseException) -> None:
    for f in futures:
        if not f.done():
            f.set_exception(exc)


def _code_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return str(code)
