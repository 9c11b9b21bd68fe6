"""Sending sealed batches over one ProduceStream: ordering, pipelining, idempotence,
retries and the delivery timeout (the engine under ``producer.AsyncProducer``, as
Kafka's ``Sender``).

**Idempotent** (the default): the sender gets a producer id from the broker
(``InitProducer``) and numbers each partition's records 0, 1, 2, ...; a batch is
numbered when it is sealed (``enqueue``). Per partition it keeps every unsettled
batch in order (``_PartitionQueue.pending``); the first ``written`` of them are on
the current stream, unanswered. The broker answers a partition's requests in order,
so an answer is always for the partition's first pending batch (the *head*).

Every batch has a **deadline**: ``delivery_timeout_ms`` after its first record was
sent (Kafka's ``delivery.timeout.ms``). Until then nothing that may have stored it
fails it:

- the stream breaks, the broker answers an error that does not say whether the batch
  was stored (UNAVAILABLE, INTERNAL, ...), or no answer comes within
  ``request_timeout_ms`` (a stopped broker): the stream is dropped, every written
  batch is marked *maybe stored* and goes back to unsent, and after a backoff
  (``retry_backoff_ms`` doubling up to ``retry_backoff_max_ms``, +-20% jitter) they
  are written again, in order, with the same numbers: the broker answers a batch it
  already has with its first answer (``RecordMetadata.duplicate``);
- the deadline passes: a batch never written, or proven not stored, fails with
  ``DEADLINE_EXCEEDED`` / ``DELIVERY_TIMEOUT`` (nothing stored); a batch that may
  have been stored fails with ``OutcomeUnknown``. A written one is taken off the
  stream first (the stream is dropped, as above).

A batch the broker **refuses** (RECORD_TOO_LARGE, DISK_FULL, TOO_MANY_PRODUCERS, ...)
was not appended, so its numbers are unused: it fails alone and the partition's
later batches are renumbered to close the gap (as Kafka's producer does). Those
already written are refused as out of order by the broker (they come after a batch
it lacks); their answers are ignored and they are written again. A refusal of a
batch that may have been stored on an earlier attempt proves nothing when the broker
decides it before looking at sequence numbers (a quota, a permission): that batch
fails with ``OutcomeUnknown`` and the numbers stay (if it was not stored after all,
the next batch is refused as out of order, below). DISK_FULL and TOO_MANY_PRODUCERS
are decided after the sequence check, so they prove it either way.

**OUT_OF_ORDER_SEQUENCE / UNKNOWN_PRODUCER** (the broker's numbering and ours
differ: it forgot the producer, or a batch that timed out with its outcome unknown
was not stored after all) refuse the batch: nothing of it, nor of the partition's
later batches, was stored. The partition takes a new producer id and its pending
batches are numbered from 0 under it and sent again; nothing fails (Kafka's
idempotent producer bumps its epoch the same way). (UNKNOWN_PRODUCER proves it for
a batch an earlier attempt may have stored too: the broker forgets a producer only
after it was idle for ``PRODUCER_MIN_IDLE_MS``, 15 min, far longer than the delivery
timeout; or with the partition, deleted or lost in a crash.)
DATA_LOSS / RETRY_ANSWER_UNKNOWN (a retry the broker recognised, so stored, but whose
answer it no longer knows) fails that batch alone and leaves the numbering as it is.

Why resending with the same numbers is always safe and renumbering is safe when
done: the broker remembers a producer's last ``PER_PARTITION_IN_FLIGHT`` (5) batches
per partition and at most that many are ever written beyond the head, so any retry
of a stored batch is recognised; it appends a partition's batches only in sequence
order, so nothing after a batch it lacks is stored; and the sender renumbers only
batches proven not stored. *Maybe stored* is always a prefix of ``pending``.

Not idempotent: at most once. A written batch whose answer is lost (the stream
breaks, or no answer within ``request_timeout_ms``) or is an error that does not say
fails with ``OutcomeUnknown``; it is never sent again.

Ordering: batches of one partition are written in the order they were sealed, and a
retry writes them again in that order before anything newer. One write at a time
(grpc.aio refuses overlapping writes on a stream; asyncio.Lock is FIFO).

Not thread-safe: one event loop owns a Sender.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc

from streamd.v1 import streamd_pb2 as pb
from streamd.v1 import streamd_pb2_grpc as rpc

from ._channel import Calls, stub
from ._futures import BatchOutcome
from .errors import OutcomeUnknown, ProduceError, StreamdError

DEFAULT_DELIVERY_TIMEOUT_MS = 120_000
DEFAULT_REQUEST_TIMEOUT_MS = 30_000
DEFAULT_RETRY_BACKOFF_MS = 100
DEFAULT_RETRY_BACKOFF_MAX_MS = 1000
#: The broker remembers an idempotent producer's last 5 batches per partition
#: (streamd.broker.producer_state.REMEMBERED_BATCHES); more unanswered ones could
#: not all be recognised as retries.
PER_PARTITION_IN_FLIGHT = 5
_SEQUENCE_REASONS = {"OUT_OF_ORDER_SEQUENCE", "UNKNOWN_PRODUCER"}
#: Refusals the broker makes only for the batch it expects next (after the sequence
#: check): the batch is not stored, whatever happened to earlier attempts.
_PROVEN_NOT_STORED = {"DISK_FULL", "TOO_MANY_PRODUCERS"}
#: The batch is stored (its numbers are used), but the answer is unknown.
_STORED_REASONS = {"RETRY_ANSWER_UNKNOWN"}
#: Answers that refuse a request before anything of it is appended.
_REFUSED_CODES = {
    grpc.StatusCode[name].value[0]
    for name in ("INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "OUT_OF_RANGE",
                 "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAUTHENTICATED")
}
#: A whole stream ending with one of these will not do better on a new one; its
#: unanswered requests were not processed (the broker answers what it appended). The
#: same codes are not retried for InitProducer nor for a topic lookup (producer.py).
FATAL_CODES = {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "OUT_OF_RANGE",
               "PERMISSION_DENIED", "UNAUTHENTICATED", "UNIMPLEMENTED", "RESOURCE_EXHAUSTED"}

log = logging.getLogger("streamd.client")


class _Batch:
    """A sealed batch until it is settled (answered, or failed for good)."""

    __slots__ = ("queue", "batch", "outcome", "record_count", "deadline", "written_at", "maybe_stored")

    def __init__(self, queue: _PartitionQueue, batch: pb.RecordBatch, outcome: BatchOutcome, count: int,
                 deadline: float) -> None:
        self.queue = queue
        self.batch = batch
        self.outcome = outcome  # its records' futures point at it
        self.record_count = count
        self.deadline = deadline  # loop time
        self.written_at = 0.0
        self.maybe_stored = False  # written on an attempt whose outcome is unknown


class _PartitionQueue:
    """One partition's unsettled batches, in order; the first ``written`` are on the
    current stream. ``producer_id``/``next_sequence``: the numbering of its batches
    (producer_id None: waiting for a new id)."""

    __slots__ = ("topic", "partition", "pending", "written", "ready", "producer_id", "next_sequence", "renewing")

    def __init__(self, topic: str, partition: int, producer_id: int | None) -> None:
        self.topic = topic
        self.partition = partition
        self.pending: deque[_Batch] = deque()
        self.written = 0
        self.ready = False  # listed in Sender._ready
        self.producer_id = producer_id
        self.next_sequence = 0
        self.renewing = False

    def renumber(self, start: int) -> None:
        """Number the pending batches from ``start`` on (none may be written; without
        a producer id, the renewal numbers them)."""
        if self.producer_id is None:
            return
        sequence = start
        for item in self.pending:
            item.batch.producer_id = self.producer_id
            item.batch.base_sequence = sequence
            sequence += item.record_count
        self.next_sequence = sequence


class _Stream:
    """One ProduceStream call and the batches written to it, by request id.
    ``writing``: the bound of the write in progress, if any (``Sender._write``)."""

    __slots__ = ("call", "reader", "waiting", "broken", "watchdog", "writing")

    def __init__(self, call: Any) -> None:
        self.call = call  # a grpc.aio StreamStreamCall
        self.reader: asyncio.Task[None] | None = None
        self.waiting: dict[int, _Batch] = {}
        self.broken = False
        self.watchdog: asyncio.TimerHandle | None = None
        self.writing: asyncio.Timeout | None = None


class Sender:
    """Writes sealed batches to one ProduceStream and settles their futures (see
    module docstring). Lives on one event loop."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        idempotent: bool,
        max_in_flight: int,
        delivery_timeout_ms: float = DEFAULT_DELIVERY_TIMEOUT_MS,
        request_timeout_ms: float = DEFAULT_REQUEST_TIMEOUT_MS,
        retry_backoff_ms: float = DEFAULT_RETRY_BACKOFF_MS,
        retry_backoff_max_ms: float = DEFAULT_RETRY_BACKOFF_MAX_MS,
        server: str = "the broker",
        rng: random.Random | None = None,
    ) -> None:
        for name, value in (("delivery_timeout_ms", delivery_timeout_ms), ("request_timeout_ms", request_timeout_ms)):
            if not value > 0:
                raise ValueError(f"{name} must be positive")
        if retry_backoff_ms < 0 or retry_backoff_max_ms < 0:
            raise ValueError("retry_backoff_ms and retry_backoff_max_ms must not be negative")
        self._channel = channel
        self._log = stub(rpc.LogServiceStub, channel)
        self._calls = Calls(server, request_timeout_ms / 1000)
        self.idempotent = idempotent
        self.delivery_timeout_s = delivery_timeout_ms / 1000
        self.request_timeout_s = request_timeout_ms / 1000
        self.retry_backoff_ms = retry_backoff_ms
        self.retry_backoff_max_ms = max(retry_backoff_max_ms, retry_backoff_ms)
        self._random = rng or random.Random()
        self._running_loop: asyncio.AbstractEventLoop | None = None
        self._window = PER_PARTITION_IN_FLIGHT if idempotent else max_in_flight
        self._free_slots = max_in_flight  # batches that may be sealed before one settles
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._seal_lock = asyncio.Lock()
        self._waiting_to_seal = 0  # enqueue() calls queued on (or holding) _seal_lock
        self._write_lock = asyncio.Lock()
        self._queues: dict[tuple[str, int], _PartitionQueue] = {}
        self._ready: deque[_PartitionQueue] = deque()
        self._ids = itertools.count(1)
        self._producer_id: int | None = None
        self._stream: _Stream | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()  # producer-id renewals
        self._unsettled = 0  # sealed batches not yet answered or failed for good
        self._idle: asyncio.Future[None] | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._reconnecting = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._attempt = 0
        self._last_error: BaseException | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = 0.0
        self._closed = False

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        loop = self._running_loop
        if loop is None:
            loop = self._running_loop = asyncio.get_running_loop()
        return loop

    @property
    def producer_id(self) -> int | None:
        """The producer id new partitions are numbered under (a partition whose
        numbering had to start over has a newer one, which this then is too)."""
        return self._producer_id

    def deadline(self) -> float:
        """The delivery deadline of a batch whose first record is sent now."""
        return self._loop.time() + self.delivery_timeout_s

    async def wait_settled(self) -> None:
        """Return once every batch sealed so far is answered or failed for good
        (within the delivery timeout)."""
        while self._unsettled or self._waiting_to_seal:
            if self._idle is None or self._idle.done():
                self._idle = self._loop.create_future()
            await asyncio.shield(self._idle)

    async def close(self) -> None:
        """End the stream and wait (boundedly) for its reader; fail whatever is still
        unsettled (only after ``wait_settled`` was cut short)."""
        self._closed = True
        tasks = [t for t in (self._reconnect_task, self._drainer, *self._tasks) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        stream = self._stream
        if self._unsettled:  # flush() was cut short
            closed = StreamdError("CANCELLED", "PRODUCER_CLOSED", "the producer was closed before an answer came")
            if stream is not None:
                stream.waiting.clear()
            for queue in self._queues.values():
                self._fail_all(queue, closed)
        grace = min(self.request_timeout_s, 1.0)  # a broker that answers ends the stream at once
        if stream is not None and not stream.broken:
            try:
                await asyncio.wait_for(stream.call.done_writing(), grace)
            except (grpc.RpcError, asyncio.InvalidStateError, TimeoutError):
                pass
        if self._readers:
            _, late = await asyncio.wait(list(self._readers), timeout=grace)
            if late:  # a stopped broker never ends the stream
                if stream is not None:
                    stream.call.cancel()
                await asyncio.wait(late, timeout=grace)
        if stream is not None:
            self._cancel_watchdog(stream)

    def submit(self, topic: str, partition: int, batch: pb.RecordBatch, outcome: BatchOutcome, count: int,
               deadline: float) -> None:
        """``enqueue`` without waiting: sealed now when nothing waits to be sealed,
        else queued behind what does (in call order, as ``enqueue``)."""
        if self._must_wait():
            self._waiting_to_seal += 1
            task = asyncio.ensure_future(self._seal_in_turn(topic, partition, batch, outcome, count, deadline))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._free_slots -= 1
        self._seal(topic, partition, batch, outcome, count, deadline)
        self._kick()

    async def enqueue(self, topic: str, partition: int, batch: pb.RecordBatch, outcome: BatchOutcome, count: int,
                      deadline: float) -> None:
        """Seal a batch (its sequence number is fixed here) and queue it for writing.
        ``outcome`` resolves (per record, or once for a whole ``send_batch``) once the
        batch is answered. ``deadline``: loop time by which it is settled (see
        ``deadline()``)."""
        if self._must_wait():
            self._waiting_to_seal += 1
            await self._seal_in_turn(topic, partition, batch, outcome, count, deadline)
        else:
            self._free_slots -= 1
            self._seal(topic, partition, batch, outcome, count, deadline)
        await self._drain()

    def _must_wait(self) -> bool:
        # FIFO: batches are sealed, and so numbered and written, in the order shipped.
        # While any batch waits to be sealed (for a slot or the producer id) every
        # later one queues behind it on the lock; only with nobody waiting may a batch
        # be sealed at once. (Not lock.locked(): between a release and the next
        # waiter's turn the lock reads as free, and a newcomer would overtake.)
        return bool(self._waiting_to_seal or self._free_slots <= 0 or (self.idempotent and self._producer_id is None))

    async def _seal_in_turn(self, topic: str, partition: int, batch: pb.RecordBatch, outcome: BatchOutcome,
                            count: int, deadline: float) -> None:
        """Seal once the batches queued before are sealed (``_waiting_to_seal`` was
        counted by the caller)."""
        try:
            async with self._seal_lock:
                # Bounded: the batches holding the slots are older, and expire first.
                await self._acquire_slot(outcome)
                if self.idempotent and self._producer_id is None:
                    try:
                        self._producer_id = await self._init_producer(deadline)
                    except BaseException as exc:
                        self._release_slot()
                        outcome.fail(exc if isinstance(exc, Exception) else closed_error())
                        if isinstance(exc, Exception):
                            return
                        raise
                self._seal(topic, partition, batch, outcome, count, deadline)
        except asyncio.CancelledError:
            outcome.fail(closed_error())  # close() gave up on it (or its caller was cancelled)
            raise
        finally:
            self._waiting_to_seal -= 1
            self._check_idle()
        self._kick()

    async def _acquire_slot(self, outcome: BatchOutcome) -> None:
        if self._free_slots > 0 and not self._slot_waiters:
            self._free_slots -= 1
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # handed over just as it was cancelled
            raise

    def _release_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to it
                return
        self._free_slots += 1

    def _seal(self, topic: str, partition: int, batch: pb.RecordBatch, outcome: BatchOutcome, count: int,
              deadline: float) -> None:
        key = (topic, partition)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _PartitionQueue(topic, partition, self._producer_id)
        if self.idempotent:
            if queue.producer_id is not None:
                batch.producer_id = queue.producer_id
                batch.base_sequence = queue.next_sequence
            queue.next_sequence += count
        self._unsettled += 1
        queue.pending.append(_Batch(queue, batch, outcome, count, deadline))
        if self._expiry is None or deadline < self._expiry_at:
            self._arm_expiry(deadline)
        if self.idempotent and queue.producer_id is None:
            self._renew(queue)
        else:
            self._mark_ready(queue)

    async def _init_producer(self, deadline: float) -> int:
        """A new producer id, asked again (with backoff) until ``deadline``; a plain
        StreamdError when none came (nothing was sent under it)."""
        try:
            reply: pb.InitProducerResponse = await self.call_retrying(self._log.InitProducer, pb.InitProducerRequest(), deadline=deadline,
                                             failed=self._remember)
        except TimeoutError:
            raise StreamdError("DEADLINE_EXCEEDED", "DELIVERY_TIMEOUT",
                               f"no producer id from {self._calls.server} within delivery_timeout_ms="
                               f"{self.delivery_timeout_s * 1000:g} (last error: {self._last_error}); "
                               "nothing was sent") from None
        return reply.producer_id

    async def call_retrying(self, method: Any, request: Any, *, failed: Callable[[StreamdError], object],
                            deadline: float | None = None) -> Any:
        """``method(request)`` (unary) until it answers: each attempt bounded by the
        request timeout (and ``deadline``, loop time; TimeoutError once it passed),
        backoff between attempts. ``FATAL_CODES`` are raised at once; ``failed`` is
        told every other error. wait_for_ready: a channel still reconnecting (a broker
        restart) is waited for, within the attempt."""
        attempt = 0
        while True:
            timeout = self.request_timeout_s if deadline is None else min(self.request_timeout_s,
                                                                          deadline - self._loop.time())
            if timeout <= 0:
                raise TimeoutError
            try:
                return await self._calls.acall(method, request, timeout_s=timeout, wait_for_ready=True)
            except StreamdError as exc:
                if exc.code in FATAL_CODES:
                    raise
                failed(exc)
            attempt += 1
            pause = self.backoff_s(attempt)
            await asyncio.sleep(pause if deadline is None else min(pause, max(deadline - self._loop.time(), 0.0)))

    def _remember(self, exc: StreamdError) -> None:
        self._last_error = exc

    def _renew(self, queue: _PartitionQueue) -> None:
        """Give ``queue`` a new producer id (in the background) and number its pending
        batches from 0 under it."""
        queue.producer_id = None
        if queue.renewing or self._closed:
            return
        queue.renewing = True
        task = asyncio.ensure_future(self._renewal(queue))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _renewal(self, queue: _PartitionQueue) -> None:
        try:
            while True:
                deadline = min((item.deadline for item in queue.pending), default=self.deadline())
                try:
                    producer_id = await self._init_producer(deadline)
                    break
                except StreamdError as exc:
                    self._last_error = exc
                    if not queue.pending:  # expired meanwhile: the next batch asks again
                        return
                    await asyncio.sleep(self.backoff_s(1))  # refused (say, PERMISSION_DENIED): retry
        finally:
            queue.renewing = False
        self._producer_id = queue.producer_id = producer_id
        queue.renumber(0)
        self._mark_ready(queue)
        self._kick()

    # -- writing -------------------------------------------------------------
    def _mark_ready(self, queue: _PartitionQueue) -> None:
        if (not queue.ready and queue.written < len(queue.pending) and queue.written < self._window
                and (queue.producer_id is not None or not self.idempotent)):
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
                while (queue.written < len(queue.pending) and queue.written < self._window
                       and not self._reconnecting and (queue.producer_id is not None or not self.idempotent)):
                    await self._write(queue)
                self._mark_ready(queue)

    async def drain(self) -> None:
        """Write what is ready now (``submit`` leaves it to a task)."""
        await self._drain()

    def _kick(self) -> None:
        if self._ready and not self._reconnecting and (self._drainer is None or self._drainer.done()):
            self._drainer = asyncio.ensure_future(self._drain())

    async def _write(self, queue: _PartitionQueue) -> None:
        stream = self._stream
        if stream is None or stream.broken:
            if self._channel.get_state(try_to_connect=True) != grpc.ChannelConnectivity.READY:
                # Not connected (a broker down, or not reached yet): write nothing, so
                # that nothing is "maybe stored" that never left; wait for the channel.
                self._start_reconnect(backoff=False)
                return
            stream = self._stream = _Stream(self._log.ProduceStream())
            stream.reader = asyncio.ensure_future(self._read_answers(stream))
            self._readers.add(stream.reader)
            stream.reader.add_done_callback(self._readers.discard)
        item = queue.pending[queue.written]
        queue.written += 1
        request_id = next(self._ids)
        stream.waiting[request_id] = item
        item.written_at = self._loop.time()
        if stream.watchdog is None:
            stream.watchdog = self._loop.call_at(item.written_at + self.request_timeout_s, self._watch, stream)
        # Built in place: nesting finished messages would copy the batch each time.
        message = pb.ProduceStreamRequest(request_id=request_id)
        message.request.topic = queue.topic
        message.request.partitions.add(partition=queue.partition).batches.append(item.batch)
        # Bounded: a write waits for HTTP/2 flow control, which a stopped broker never
        # opens, and grpc.aio does not always end a pending write when its call is
        # cancelled. Unbounded, it would hold the write lock (and so every later
        # batch, flush() and close()) for ever. It ends at the request timeout, or at
        # once when the stream fails meanwhile (``_stream_failed``).
        try:
            try:
                async with asyncio.timeout_at(item.written_at + self.request_timeout_s) as stream.writing:
                    await stream.call.write(message)
            finally:
                stream.writing = None  # before the handlers below fail the stream
        except TimeoutError:
            self._stream_failed(stream, StreamdError(
                "DEADLINE_EXCEEDED", "TIMED_OUT",
                f"a write to {self._calls.server} did not complete within request_timeout_ms="
                f"{self.request_timeout_s * 1000:g}"))
        except grpc.RpcError as err:
            self._stream_failed(stream, err)
        except asyncio.InvalidStateError:  # the call ended before its reader noticed
            self._stream_failed(stream, _stream_ended())

    def _watch(self, stream: _Stream) -> None:
        """The request timeout: the oldest unanswered request of ``stream`` waited
        ``request_timeout_ms`` (a stopped broker, a dead connection): drop the stream."""
        stream.watchdog = None
        if stream.broken or not stream.waiting:
            return
        oldest = next(iter(stream.waiting.values()))
        due = oldest.written_at + self.request_timeout_s
        if due > self._loop.time():
            stream.watchdog = self._loop.call_at(due, self._watch, stream)
            return
        self._stream_failed(stream, StreamdError(
            "DEADLINE_EXCEEDED", "TIMED_OUT",
            f"no answer from {self._calls.server} within request_timeout_ms={self.request_timeout_s * 1000:g}"))

    @staticmethod
    def _cancel_watchdog(stream: _Stream) -> None:
        if stream.watchdog is not None:
            stream.watchdog.cancel()
            stream.watchdog = None

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
            self._cancel_watchdog(stream)

    def _answer(self, stream: _Stream, answer: pb.ProduceStreamResponse) -> None:
        item = stream.waiting.pop(answer.request_id, None)
        if item is None:
            return  # for a stream or a write given up on
        queue = item.queue
        if not answer.HasField("error"):
            self._attempt = 0
            self._take(item)
            item.outcome.resolve(answer.response.results[0])
            self._settle(item)
        else:
            e = answer.error
            exc = ProduceError(_code_name(e.code), e.reason, e.message, dict(e.metadata))
            if not self.idempotent:
                self._take(item)
                self._settle(item, exc if e.code in _REFUSED_CODES else self._unknown(item, exc, "the answer does not say"))
            elif e.reason in _SEQUENCE_REASONS:
                self._sequence_refused(stream, item, exc)
            elif e.reason in _STORED_REASONS:
                self._take(item)
                self._settle(item, exc)
            elif e.code in _REFUSED_CODES:
                self._refused(stream, item, exc)
            else:  # the outcome is unknown (the broker stops, a disk failed): retry
                self._stream_failed(stream, exc)
                return
        self._mark_ready(queue)
        self._kick()

    def _take(self, item: _Batch) -> None:
        """Remove an answered batch (written: the partition's head) from its queue."""
        queue = item.queue
        queue.written -= 1
        if queue.pending[0] is item:
            queue.pending.popleft()
        else:  # cannot happen: the broker answers a partition's requests in order
            log.error("produce answer for %s/%d out of order", queue.topic, queue.partition)
            queue.pending.remove(item)

    def _unwrite(self, stream: _Stream, queue: _PartitionQueue) -> None:
        """Forget the requests of ``queue`` on ``stream`` (their answers are ignored);
        its batches are written again."""
        if queue.written:
            for rid in [rid for rid, item in stream.waiting.items() if item.queue is queue]:
                del stream.waiting[rid]
            queue.written = 0

    def _refused(self, stream: _Stream, item: _Batch, exc: ProduceError) -> None:
        """The head ``item`` was refused: nothing of it appended. Close the gap its
        numbers leave, unless an earlier attempt may have stored it (see module
        docstring)."""
        queue = item.queue
        self._take(item)
        self._unwrite(stream, queue)
        if item.maybe_stored and exc.reason not in _PROVEN_NOT_STORED:
            self._settle(item, self._unknown(item, exc, "a retry was refused after an earlier attempt's answer "
                                                       "was lost"))
            return
        self._settle(item, exc)
        for later in queue.pending:
            later.maybe_stored = False  # nothing after a batch the broker lacks is stored
        queue.renumber(item.batch.base_sequence)

    def _sequence_refused(self, stream: _Stream, item: _Batch, exc: ProduceError) -> None:
        """The broker's numbering differs from ours at the head ``item``: nothing of the
        partition's pending batches is stored; number them anew under a new producer
        id (see module docstring)."""
        queue = item.queue
        self._unwrite(stream, queue)
        for later in queue.pending:
            later.maybe_stored = False
        log.info("%s/%d: %s %s; numbering its batches anew under a new producer id", queue.topic, queue.partition,
                 exc.code, exc.reason)
        self._renew(queue)

    def _settle(self, item: _Batch, exc: BaseException | None = None) -> None:
        if exc is not None:
            item.outcome.fail(exc)
        self._release_slot()
        self._unsettled -= 1
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._unsettled and not self._waiting_to_seal and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def _fail_all(self, queue: _PartitionQueue, exc: BaseException) -> None:
        while queue.pending:
            item = queue.pending.popleft()
            self._settle(item, self._unknown(item, exc, "no answer came") if item.maybe_stored or queue.written
                         else exc)
            queue.written = max(queue.written - 1, 0)

    # -- failures and retries -------------------------------------------------
    def _stream_failed(self, stream: _Stream, err: BaseException, *, remember: bool = True) -> None:
        """The stream is unusable: its unanswered batches are retried (idempotent) or
        failed (at most once). ``remember``: the error is the one to report later."""
        if stream.writing is not None and not stream.writing.expired():
            stream.writing.reschedule(-1.0)  # end the write in progress now (see _write)
        if stream is not self._stream:  # given up on already: nothing of ours is on it
            stream.waiting.clear()
            return
        stream.waiting.clear()
        self._cancel_watchdog(stream)
        if not stream.broken:
            stream.broken = True
            stream.call.cancel()
        if stream is self._stream:
            self._stream = None
        exc = StreamdError.from_rpc_error(err) if isinstance(err, grpc.RpcError) else err
        if remember:
            self._last_error = exc
        fatal = getattr(exc, "code", "") in FATAL_CODES
        for queue in self._queues.values():
            if not queue.written:
                continue
            written, queue.written = queue.written, 0
            if self.idempotent and not fatal:
                for i in range(written):
                    queue.pending[i].maybe_stored = True
                self._mark_ready(queue)
                continue
            # Given up: fail them. Not processed (fatal) unless a retry may have been.
            start = None
            for _ in range(written):
                item = queue.pending.popleft()
                if item.maybe_stored or not fatal:
                    self._settle(item, self._unknown(item, exc, "the answer was lost"))
                else:
                    start = item.batch.base_sequence if start is None else start
                    self._settle(item, exc)
            if self.idempotent and start is not None:
                queue.renumber(start)
            self._mark_ready(queue)
        if self.idempotent and not fatal:
            self._start_reconnect(backoff=True)
        else:
            self._kick()

    def _start_reconnect(self, *, backoff: bool) -> None:
        self._reconnecting = True  # at once: nothing may be written before the backoff
        if (self._reconnect_task is None or self._reconnect_task.done()) and not self._closed:
            self._reconnect_task = asyncio.ensure_future(self._reconnect(backoff=backoff))

    async def _reconnect(self, *, backoff: bool) -> None:
        """Back off (unless the channel was just not connected yet), wait for the
        channel (it reconnects by itself, with its own backoff) within the request
        timeout, then write again; repeated while the writing fails again."""
        while True:
            try:
                if not self._unsettled:  # all given up on meanwhile
                    self._attempt = 0
                    return
                if backoff:
                    self._attempt += 1
                    await asyncio.sleep(self.backoff_s(self._attempt))
                backoff = True
                try:
                    await asyncio.wait_for(self._channel.channel_ready(), self.request_timeout_s)
                except TimeoutError:
                    pass  # write anyway: the failure comes back as a failed stream
            finally:
                self._reconnecting = False
            await self._drain()
            if not self._reconnecting:
                return
            # The stream failed again while this task wrote: _stream_failed saw it
            # running and left the next round to it.

    def backoff_s(self, attempt: int) -> float:
        """Exponential, capped, with +-20% jitter (Kafka's retry.backoff.max.ms)."""
        delay = min(self.retry_backoff_ms * 2 ** min(attempt - 1, 30), self.retry_backoff_max_ms)
        return float(delay * self._random.uniform(0.8, 1.2) / 1000)

    # -- the delivery timeout -------------------------------------------------
    def _arm_expiry(self, when: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = when
        self._expiry = self._loop.call_at(when, self._expire_due)

    def _expire_due(self) -> None:
        """Fail the batches whose delivery deadline passed (a partition's in order,
        from its head); arm the timer for the next deadline."""
        self._expiry = None
        now = self._loop.time()
        soonest = None
        for queue in list(self._queues.values()):
            self._expire(queue, now)
            if queue.pending:
                head = queue.pending[0].deadline
                soonest = head if soonest is None else min(soonest, head)
        if soonest is not None and not self._closed:
            self._arm_expiry(soonest)
        self._kick()

    def _expire(self, queue: _PartitionQueue, now: float) -> None:
        while queue.pending and queue.pending[0].deadline <= now:
            if queue.written and self._stream is not None:
                # Written and unanswered: take it off the wire first (its answer, if
                # it ever comes, could no longer be told apart).
                self._stream_failed(self._stream, StreamdError(
                    "DEADLINE_EXCEEDED", "DELIVERY_TIMEOUT",
                    f"no answer within delivery_timeout_ms={self.delivery_timeout_s * 1000:g}"), remember=False)
                continue
            for i in range(queue.written):  # cannot happen: written ones are on the stream
                queue.pending[i].maybe_stored = True
            queue.written = 0
            head = queue.pending.popleft()
            if head.maybe_stored:
                self._settle(head, self._unknown(
                    head, self._last_error, f"no answer within delivery_timeout_ms={self.delivery_timeout_s * 1000:g}",
                    code="DEADLINE_EXCEEDED"))
                continue
            self._settle(head, self._not_sent(queue.topic, queue.partition, head.record_count))
            if self.idempotent and queue.producer_id is not None:
                queue.renumber(head.batch.base_sequence)  # never written: its numbers are free

    # -- errors ---------------------------------------------------------------
    def _not_sent(self, topic: str, partition: int, count: int) -> StreamdError:
        last = f" (last error: {self._last_error})" if self._last_error is not None else ""
        return StreamdError("DEADLINE_EXCEEDED", "DELIVERY_TIMEOUT",
                            f"{count} record(s) for {topic}/{partition} not stored: not delivered within "
                            f"delivery_timeout_ms={self.delivery_timeout_s * 1000:g}{last}")

    def _unknown(self, item: _Batch, cause: BaseException | None, why: str, *, code: str | None = None) -> OutcomeUnknown:
        queue = item.queue
        last = "" if cause is None else f" (last error: {cause})"
        return OutcomeUnknown(
            code or _code_of(cause),
            f"{item.record_count} record(s) for {queue.topic}/{queue.partition} may or may not have been stored: "
            f"{why}{last}",
            cause=cause, metadata={"topic": queue.topic, "partition": str(queue.partition)})


def _stream_ended() -> StreamdError:
    return StreamdError("UNAVAILABLE", "STREAM_CLOSED", "produce stream ended")


def _code_of(cause: BaseException | None) -> str:
    """The code name a StreamdError cause carries ("UNKNOWN" for any other)."""
    code = getattr(cause, "code", None)
    return code if isinstance(code, str) else "UNKNOWN"


def closed_error() -> StreamdError:
    return StreamdError("CANCELLED", "PRODUCER_CLOSED", "the producer was closed before the record was sent")


def _code_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return str(code)
