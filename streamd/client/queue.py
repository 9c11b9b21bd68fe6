"""Queue receivers: competing workers on a queue group (see QueueService in the proto).

    from streamd.client.queue import QueueReceiver

    with QueueReceiver("mailers", "orders", create=True) as receiver:
        receiver.process(send_email, workers=4)      # ack on return, nack on exception

- ``receive()`` leases up to N records (``Message``); each is settled with
  ``ack()``, ``nack(delay_ms=, reason=)``, ``extend(lease_ms)`` or ``reject(reason)``.
  Records come in the batched form (the stored batches and the leased offset ranges,
  decoded here). Acks are batched: they go out in one Settle call per
  ``ack_interval_ms`` (or per ``ack_batch`` acks) as offset ranges, and ``flush()`` /
  ``close()`` send what is pending; an ack of an expired lease is then logged (the
  record will come again), as SQS does.
- ``process(handler, workers=N)`` runs a pool of threads; each message's lease is
  extended automatically while its handler runs (at two thirds of the lease), so a
  slow handler does not lose its record to another worker. ``stop()`` (from any
  thread or a handler), or SIGINT / SIGTERM when it runs on the main thread, stops it
  cleanly: the handlers running finish, the messages not started are handed back at
  once, the acks are flushed (see ``_pools``).
- ``AsyncQueueReceiver`` is the asyncio flavour, with ``process(handler,
  concurrency=N)`` for coroutine handlers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

import grpc

from streamd.v1 import streamd_pb2 as pb
from streamd.v1 import streamd_pb2_grpc as rpc

from ._channel import DEFAULT_TIMEOUT_S, Calls, Security, SyncClient, aio_channel, server_label
from ._pools import AsyncPool, ThreadPool
from ._settle import ack_ranges, extend_ranges
from ._stopping import DEFAULT_STOP_GRACE_S, STOP_SIGNALS
from .errors import StreamdError
from .records import RecordFields, record_runs

log = logging.getLogger("streamd.client.queue")

ACTIONS = {"ack": pb.SETTLE_ACTION_ACK, "nack": pb.SETTLE_ACTION_NACK, "extend": pb.SETTLE_ACTION_EXTEND,
           "reject": pb.SETTLE_ACTION_REJECT}


class Message(RecordFields):
    """A leased record. Settle it exactly once (extend as often as needed). Key,
    value, headers and timestamp are read from the decoded record when asked for
    (``RecordFields``)."""

    __slots__ = ("topic", "partition", "offset", "_record", "_append_time_ms", "delivery_count", "lease_id",
                 "lease_expires_ms", "_receiver", "deadline", "lease_s")

    def __init__(self, topic: str, partition: int, offset: int, record: pb.Record, append_time_ms: int,
                 delivery_count: int, lease_id: int, lease_expires_ms: int, receiver=None, deadline: float = 0.0,
                 lease_s: float = 0.0) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset
        self._record, self._append_time_ms = record, append_time_ms
        self.delivery_count, self.lease_id, self.lease_expires_ms = delivery_count, lease_id, lease_expires_ms
        self._receiver = receiver
        #: The lease's end by this process's monotonic clock (the broker's clock may differ).
        self.deadline, self.lease_s = deadline, lease_s

    def __repr__(self) -> str:
        return (f"Message(topic={self.topic!r}, partition={self.partition}, offset={self.offset}, "
                f"delivery_count={self.delivery_count}, key={self.key!r}, value={self.value[:64]!r})")

    # Settling goes through the receiver that handed the message out. A message of an
    # AsyncQueueReceiver gets coroutines back from nack/extend/reject: ``await msg.nack()``
    # (its ack is queued, as with the blocking receiver, and needs no await).
    def ack(self) -> None:
        self._receiver.ack(self)

    def nack(self, *, delay_ms: int | None = None, reason: str = ""):
        return self._receiver.nack(self, delay_ms=delay_ms, reason=reason)

    def extend(self, lease_ms: int):
        return self._receiver.extend(self, lease_ms)

    def reject(self, reason: str = ""):
        return self._receiver.reject(self, reason=reason)

    @property
    def lease(self) -> pb.LeaseRef:
        return pb.LeaseRef(partition=self.partition, offset=self.offset, lease_id=self.lease_id)


def _messages(topic: str, reply, receiver, lease_s: float, received: float) -> list[Message]:
    """Messages of a Receive answer: the batched form (``partitions``: stored batches
    and leased ranges, cut by ``record_runs``: only the leased offsets, each once, in
    offset order per partition) and the per-record form (``records``)."""
    out = []
    deadline = received + lease_s
    for part in reply.partitions:
        p = part.partition
        ranges = [(r.first_offset, r.last_offset, r) for r in part.leased]
        for leased, first, append_time, records in record_runs(part.batches, ranges):
            d, lease_id, expires = leased.delivery_count, leased.lease_id, leased.lease_expires_ms
            out += [Message(topic, p, offset, rec, append_time, d, lease_id, expires, receiver, deadline, lease_s)
                    for offset, rec in enumerate(records, first)]
    for r in reply.records:
        out.append(Message(topic, r.partition, r.offset, r.record, r.append_time_ms, r.delivery_count, r.lease_id,
                           r.lease_expires_ms, receiver, deadline, lease_s))
    return out


def _log_acks(group: str, topic: str, count: int, results: list | StreamdError) -> None:
    """Log what became of a batch of ``count`` acks: the Settle failed (``results`` is
    the error), or it refused some (those records will come again)."""
    if isinstance(results, StreamdError):
        log.warning("queue %s/%s: %d ack(s) not delivered: %s", group, topic, count, results)
        return
    refused, reason = 0, ""
    for r in results:
        if r.HasField("error"):
            refused += r.refused or 1
            reason = reason or r.error.reason
    if refused:
        log.info("queue %s/%s: %d ack(s) refused (%s); those records will come again", group, topic, refused, reason)


def queue_config(**kw) -> pb.QueueGroupConfig:
    """``pb.QueueGroupConfig`` from keywords: lease_ms, max_deliveries, dead_letter_topic,
    ordered_by_key, at_most_once, max_in_flight, start ("earliest"/"latest"),
    initial_delay_ms, multiplier, max_delay_ms, jitter ("none"/"full"/"equal")."""
    retry = {k: kw.pop(k) for k in ("initial_delay_ms", "multiplier", "max_delay_ms") if k in kw}
    jitter = kw.pop("jitter", None)
    if jitter is not None:
        retry["jitter"] = {"none": pb.JITTER_NONE, "full": pb.JITTER_FULL, "equal": pb.JITTER_EQUAL}[jitter]
    start = kw.pop("start", None)
    if start is not None:
        kw["start"] = pb.OFFSET_SPEC_LATEST if start == "latest" else pb.OFFSET_SPEC_EARLIEST
    return pb.QueueGroupConfig(retry=pb.RetryPolicy(**retry), **kw)


class QueueReceiver(SyncClient):
    def __init__(
        self,
        group: str,
        topic: str,
        server: str | None = None,
        *,
        channel: grpc.Channel | None = None,
        security: Security | None = None,
        create: bool | dict = False,
        max_records: int = 100,
        max_wait_ms: int = 1000,
        lease_ms: int | None = None,
        ack_interval_ms: int = 5,
        ack_batch: int = 1000,
        worker_id: str = "",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        """``create``: create the queue group if it does not exist (a dict: with this
        config, see ``queue_config``). ``timeout_s``: the deadline of each call (a
        receive: plus its ``max_wait_ms``)."""
        super().__init__(server, channel=channel, security=security, timeout_s=timeout_s)
        self._queues = rpc.QueueServiceStub(self._channel)
        self.group, self.topic = group, topic
        self.max_records, self.max_wait_ms, self.lease_ms = max_records, max_wait_ms, lease_ms
        self.worker_id = worker_id
        self._ack_interval_s, self._ack_batch = ack_interval_ms / 1000, ack_batch
        self._pending: list[tuple[int, int, int]] = []  # acks: (partition, offset, lease_id)
        self._lock = threading.Lock()
        self._flushed = threading.Condition(self._lock)
        self._closed = False
        self._send_lock = threading.Lock()
        self._group_config: pb.QueueGroupConfig | None = None  # asked once, when first needed
        self._halt: threading.Event | None = None  # the stop event of the process() running
        self._stop_requested = False
        self._flusher = threading.Thread(target=self._flush_loop, name="streamd-acks", daemon=True)
        self._flusher.start()
        if create:
            try:
                self.create(**(create if isinstance(create, dict) else {}), exist_ok=True)
            except BaseException:
                self.close()
                raise

    # -- groups ------------------------------------------------------------------
    def create(self, *, exist_ok: bool = False, timeout_s: float | None = None,
               **config) -> pb.QueueGroupDescription | None:
        request = pb.CreateQueueGroupRequest(group=self.group, topic=self.topic, config=queue_config(**config))
        try:
            return self._call(self._queues.CreateQueueGroup, request, timeout_s=timeout_s).group
        except StreamdError as err:
            if exist_ok and err.reason == "QUEUE_GROUP_EXISTS":
                return None
            raise

    def describe(self, *, timeout_s: float | None = None) -> pb.QueueGroupDescription:
        request = pb.DescribeQueueGroupRequest(group=self.group, topic=self.topic)
        return self._call(self._queues.DescribeQueueGroup, request, timeout_s=timeout_s).group

    # -- receiving ---------------------------------------------------------------
    def receive(self, max_records: int | None = None, *, max_wait_ms: int | None = None,
                timeout_s: float | None = None) -> list[Message]:
        request = pb.ReceiveRequest(
            group=self.group, topic=self.topic, max_records=max_records or self.max_records,
            max_wait_ms=self.max_wait_ms if max_wait_ms is None else max_wait_ms, worker_id=self.worker_id,
            lease_ms=self.lease_ms, batched=True,
        )
        sent = time.monotonic()
        reply = self._call(self._queues.Receive, request, timeout_s=timeout_s, wait_s=request.max_wait_ms / 1000)
        lease_s = self._lease_s()
        return _messages(self.topic, reply, self, lease_s, sent)

    def _lease_s(self) -> float:
        if self.lease_ms is not None:
            return self.lease_ms / 1000
        return self._config().lease_ms / 1000

    def _config(self) -> pb.QueueGroupConfig:
        if self._group_config is None:
            self._group_config = self.describe().config
        return self._group_config

    def _at_most_once(self) -> bool:
        """Whether the group acks its records as it hands them out (a pool then
        receives no more than it can start). False when it cannot be asked: the pool
        then learns it from the first records it receives."""
        try:
            return self._config().at_most_once
        except StreamdError as err:
            log.debug("queue %s/%s: group not described: %s", self.group, self.topic, err)
            return False

    def __iter__(self) -> Iterator[Message]:
        while not self._closed:
            yield from self.receive()

    # -- settling --------------------------------------------------------------------
    def ack(self, msg: Message) -> None:
        """Queued; sent with the next batch (``flush()`` to wait for it). A no-op for
        an at-most-once group's records (lease id 0: acked when handed out)."""
        if msg.lease_id:
            self._queue((msg.partition, msg.offset, msg.lease_id))

    def nack(self, msg: Message, *, delay_ms: int | None = None, reason: str = "") -> None:
        self._settle_now(msg, "nack", delay_ms, reason)

    def extend(self, msg: Message, lease_ms: int) -> int:
        sent = time.monotonic()
        [result] = self._settle_now(msg, "extend", lease_ms, "")
        msg.lease_expires_ms = result.lease_expires_ms
        msg.deadline, msg.lease_s = sent + lease_ms / 1000, lease_ms / 1000
        return result.lease_expires_ms

    def reject(self, msg: Message, *, reason: str = "") -> None:
        self._settle_now(msg, "reject", None, reason)

    def _settle_now(self, msg: Message, action: str, delay_ms: int | None, reason: str):
        s = pb.Settlement(lease=msg.lease, action=ACTIONS[action], delay_ms=delay_ms, reason=reason)
        results = self._send([s])
        if results[0].HasField("error"):
            e = results[0].error
            raise StreamdError(grpc.StatusCode(_code(e.code)).name, e.reason, e.message, dict(e.metadata))
        return results

    def _send(self, settlements: list[pb.Settlement], ranges=()) -> list[pb.SettleResult]:
        request = pb.SettleRequest(group=self.group, topic=self.topic, settlements=settlements, ranges=ranges)
        return list(self._call(self._queues.Settle, request).results)

    def _queue(self, ack: tuple[int, int, int]) -> None:
        with self._lock:
            if self._closed:
                raise StreamdError("CANCELLED", "CLOSED", "the receiver is closed")
            self._pending.append(ack)
            if len(self._pending) == self._ack_batch:  # once, when the batch fills
                self._flushed.notify_all()

    def flush(self) -> None:
        """Send the queued acks now and wait for the answer (and for a batch the
        background thread is sending)."""
        with self._lock:
            batch, self._pending = self._pending, []
        self._deliver(batch)
        with self._send_lock:
            pass

    def _flush_loop(self) -> None:
        while True:
            with self._lock:
                self._flushed.wait(self._ack_interval_s)
                if self._closed and not self._pending:
                    return
                batch, self._pending = self._pending, []
            self._deliver(batch)

    def _deliver(self, batch: list[tuple[int, int, int]]) -> None:
        if not batch:
            return
        with self._send_lock:
            self._deliver_now(batch)

    def _deliver_now(self, batch: list[tuple[int, int, int]]) -> None:
        try:
            results = self._send([], ack_ranges(batch))
        except StreamdError as err:  # the leases will expire and the records come again
            results = err
        _log_acks(self.group, self.topic, len(batch), results)

    # -- worker pool -------------------------------------------------------------------
    def process(
        self,
        handler: Callable[[Message], object],
        *,
        workers: int = 4,
        auto_extend: bool = True,
        stop: threading.Event | None = None,
        max_messages: int | None = None,
        stop_grace_s: float = DEFAULT_STOP_GRACE_S,
        stop_signals: Sequence[int] = STOP_SIGNALS,
    ) -> int:
        """Run ``handler`` on every message with ``workers`` threads until stopped:
        by ``stop()``, by the ``stop`` event, after ``max_messages`` handled, or (when
        called on the main thread) by one of ``stop_signals`` (``()``: leave signals
        alone). Return: ack; exception: nack with the exception as the reason.

        Stopping: no more receives (those in flight answer within half a second),
        then the messages received but not started are nacked with no delay, once
        (they go to another worker at once, at the cost of the one delivery they were
        received with), the handlers running finish, for up to ``stop_grace_s`` (a
        second signal stops waiting; their leases then lapse and the records come
        again after them), the acks are flushed. An at-most-once group's records
        (acked when handed out) are received no faster than the workers run them (about
        a second's worth each) and all run, within the grace; any not finished is
        logged at WARNING. Returns how many messages were
        handled."""
        halt = stop or threading.Event()
        self._halt = halt
        if self._stop_requested:
            halt.set()
        try:
            pool = ThreadPool(self, handler, workers=workers, auto_extend=auto_extend, halt=halt,
                              max_messages=max_messages)
            return pool.run(stop_grace_s, stop_signals)
        finally:
            self._halt, self._stop_requested = None, False

    def stop(self) -> None:
        """Make ``process`` return (the one running, or else the next one), as a
        signal does: see ``process``. Thread-safe: call it from a handler, another
        thread or a signal handler."""
        self._stop_requested = True
        halt = self._halt
        # On the main thread this may be a signal handler, which must not take the
        # event's lock (the thread it interrupted may hold it): the pool's wait loop
        # sees the flag within a tenth of a second.
        if halt is not None and threading.current_thread() is not threading.main_thread():
            halt.set()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._flushed.notify_all()
        self._flusher.join(30)
        super().close()


def _code(number: int) -> tuple:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.value
    return grpc.StatusCode.UNKNOWN.value


class AsyncQueueReceiver:
    """asyncio flavour: receive, settle (acks batched per call of ``flush`` or per
    ``process`` round), and ``process`` with a concurrency limit."""

    def __init__(self, group: str, topic: str, server: str | None = None, *, channel=None,
                 security: Security | None = None, max_records: int = 100, max_wait_ms: int = 1000,
                 lease_ms: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._calls = Calls(server_label(server, channel), timeout_s)
        self._own_channel = channel is None
        self._channel = channel or aio_channel(server, security=security)
        self._queues = rpc.QueueServiceStub(self._channel)
        self.group, self.topic = group, topic
        self.max_records, self.max_wait_ms, self.lease_ms = max_records, max_wait_ms, lease_ms
        self._pending: list[tuple[int, int, int]] = []  # acks: (partition, offset, lease_id)
        self._group_config: pb.QueueGroupConfig | None = None  # asked once, when first needed
        self._pool: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None  # process() running
        self._stop_requested = False

    async def __aenter__(self) -> AsyncQueueReceiver:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def create(self, *, exist_ok: bool = False, timeout_s: float | None = None, **config) -> None:
        request = pb.CreateQueueGroupRequest(group=self.group, topic=self.topic, config=queue_config(**config))
        try:
            await self._calls.acall(self._queues.CreateQueueGroup, request, timeout_s=timeout_s)
        except StreamdError as error:
            if not (exist_ok and error.reason == "QUEUE_GROUP_EXISTS"):
                raise

    async def receive(self, max_records: int | None = None, *, max_wait_ms: int | None = None,
                      timeout_s: float | None = None) -> list[Message]:
        request = pb.ReceiveRequest(
            group=self.group, topic=self.topic, max_records=max_records or self.max_records,
            max_wait_ms=self.max_wait_ms if max_wait_ms is None else max_wait_ms, lease_ms=self.lease_ms,
            batched=True,
        )
        sent = time.monotonic()
        reply = await self._calls.acall(self._queues.Receive, request, timeout_s=timeout_s,
                                        wait_s=request.max_wait_ms / 1000)
        lease_s = await self._lease_s()
        return _messages(self.topic, reply, self, lease_s, sent)

    async def _lease_s(self) -> float:
        if self.lease_ms is not None:
            return self.lease_ms / 1000
        return (await self._config()).lease_ms / 1000

    async def _config(self) -> pb.QueueGroupConfig:
        if self._group_config is None:
            request = pb.DescribeQueueGroupRequest(group=self.group, topic=self.topic)
            reply = await self._calls.acall(self._queues.DescribeQueueGroup, request)
            self._group_config = reply.group.config
        return self._group_config

    async def _at_most_once(self) -> bool:
        """As ``QueueReceiver._at_most_once``."""
        try:
            return (await self._config()).at_most_once
        except StreamdError as err:
            log.debug("queue %s/%s: group not described: %s", self.group, self.topic, err)
            return False

    def ack(self, msg: Message) -> None:
        if msg.lease_id:
            self._pending.append((msg.partition, msg.offset, msg.lease_id))

    async def settle(self, msg: Message, action: str, *, delay_ms: int | None = None,
                     reason: str = "") -> pb.SettleResult:
        s = pb.Settlement(lease=msg.lease, action=ACTIONS[action], delay_ms=delay_ms, reason=reason)
        [result] = await self._send([s])
        if result.HasField("error"):
            e = result.error
            raise StreamdError(grpc.StatusCode(_code(e.code)).name, e.reason, e.message, dict(e.metadata))
        return result

    async def nack(self, msg: Message, *, delay_ms: int | None = None, reason: str = "") -> None:
        await self.settle(msg, "nack", delay_ms=delay_ms, reason=reason)

    async def extend(self, msg: Message, lease_ms: int) -> int:
        """The lease now ends ``lease_ms`` from now; returns its end (broker clock, ms)."""
        sent = time.monotonic()
        result = await self.settle(msg, "extend", delay_ms=lease_ms)
        msg.lease_expires_ms = result.lease_expires_ms
        msg.deadline, msg.lease_s = sent + lease_ms / 1000, lease_ms / 1000
        return result.lease_expires_ms

    async def reject(self, msg: Message, *, reason: str = "") -> None:
        await self.settle(msg, "reject", reason=reason)

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            results = await self._send([], ack_ranges(batch))
        except StreamdError as err:  # the leases expire and the records come again
            results = err
        _log_acks(self.group, self.topic, len(batch), results)

    async def _send(self, settlements, ranges=()) -> list[pb.SettleResult]:
        request = pb.SettleRequest(group=self.group, topic=self.topic, settlements=settlements, ranges=ranges)
        return list((await self._calls.acall(self._queues.Settle, request)).results)

    async def _extend(self, due: list[Message]) -> list[Message]:
        """Extend the leases of ``due`` in one Settle of ranges (a range with refused
        offsets is retried message by message); returns the messages whose lease is lost."""
        ranges = extend_ranges(due)
        sent = time.monotonic()
        try:
            results = await self._send([], [r for r, _ in ranges])
        except StreamdError as err:
            log.info("%d lease(s) not extended: %s", len(due), err)
            return []  # tried again on the next round while their leases last
        lost = []
        for (_, messages), result in zip(ranges, results):
            for msg in messages:
                if result.refused or result.HasField("error"):
                    try:
                        await self.settle(msg, "extend", delay_ms=int(msg.lease_s * 1000))
                    except StreamdError as err:
                        log.info("lease of %s/%d@%d not extended: %s", msg.topic, msg.partition, msg.offset, err)
                        lost.append(msg)
                        continue
                msg.deadline = sent + msg.lease_s
        return lost

    async def process(
        self, handler: Callable[[Message], Awaitable[object]], *, concurrency: int = 16,
        stop: asyncio.Event | None = None, max_messages: int | None = None,
        stop_grace_s: float = DEFAULT_STOP_GRACE_S, stop_signals: Sequence[int] = STOP_SIGNALS,
    ) -> int:
        """Handle messages with up to ``concurrency`` handlers at once: ack on return,
        nack on exception, until stopped: by ``stop()``, the ``stop`` event, after
        ``max_messages``, or (on a loop running on the main thread) by one of
        ``stop_signals``. Stopping is as for ``QueueReceiver.process``, except that
        handlers still running when the wait ends are cancelled and their messages
        nacked with no delay. Returns how many were handled."""
        loop = asyncio.get_running_loop()
        pool = AsyncPool(self, handler, concurrency=concurrency, stop=stop or asyncio.Event(),
                         max_messages=max_messages)
        self._pool = (loop, pool.stop)
        if self._stop_requested:
            pool.stop.set()
        try:
            return await pool.run(stop_grace_s, stop_signals)
        finally:
            self._pool, self._stop_requested = None, False

    def stop(self) -> None:
        """Make ``process`` return (the one running, or else the next one). Safe from
        any thread, a handler or a signal handler."""
        self._stop_requested = True
        pool = self._pool
        if pool is not None:
            loop, event = pool
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: nothing runs any more
                pass

    async def close(self) -> None:
        await self.flush()
        if self._own_channel:
            await self._channel.close()
