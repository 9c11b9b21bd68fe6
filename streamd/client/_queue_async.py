"""The queue receiver engine: ``AsyncQueueReceiver`` (asyncio), which the blocking
``QueueReceiver`` runs on a private event-loop thread, as ``Producer`` runs
``AsyncProducer``. Everything a receiver does happens here once: Receive, Settle,
the batching of acks, lease extensions, and ``process`` (the worker pool, ``_pools``).

- ``receive()`` leases up to N records (``Message``); each is settled with ``ack()``,
  ``nack(delay_ms=, reason=)``, ``extend(lease_ms)`` or ``reject(reason)``.
- **Acks are batched**: ``ack()`` only queues (it is thread-safe: the blocking
  receiver's handlers call it from their threads); the queue goes out as offset ranges
  in one Settle every ``ack_interval_ms`` while acks come, or at once when it reaches
  ``ack_batch``; ``flush()`` sends what is queued and waits for it (and for a batch
  already on its way), ``close()`` flushes once more. An ack the broker refuses (its
  lease ended) is logged once per batch: the record will come again, as with SQS.
- ``process(handler, concurrency=N)`` runs coroutine handlers (``_pools``).

Threads: ``ack`` may be called from any thread; everything else runs on the loop the
receiver is first used on (``_loop``), where its channel lives.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from streamd.v1 import streamd_pb2 as pb
from streamd.v1 import streamd_pb2_grpc as rpc

from ._channel import DEFAULT_TIMEOUT_S, AsyncClient, Security
from ._message import ACTIONS, Message, Settler, _messages, log_acks, queue_config, settle_error
from ._pools import Pool
from ._runners import TaskRunner
from ._settle import ack_ranges
from ._stopping import DEFAULT_STOP_GRACE_S, STOP_SIGNALS, loop_signals
from .errors import StreamdError

log = logging.getLogger("streamd.client.queue")

DEFAULT_ACK_INTERVAL_MS = 5
DEFAULT_ACK_BATCH = 1000
#: Ticks of the ack timer with no ack before it stops (``_tick``).
IDLE_TICKS = 20

Ack = tuple[int, int, int]  # (partition, offset, lease_id)


class AsyncQueueReceiver(AsyncClient):
    """asyncio queue receiver: receive, settle (acks batched, see the module
    docstring), and ``process`` with a concurrency limit."""

    def __init__(self, group: str, topic: str, server: str | None = None, *, channel: grpc.aio.Channel | None = None,
                 security: Security | None = None, max_records: int = 100, max_wait_ms: int = 1000,
                 lease_ms: int | None = None, ack_interval_ms: float = DEFAULT_ACK_INTERVAL_MS,
                 ack_batch: int = DEFAULT_ACK_BATCH, worker_id: str = "",
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """``timeout_s``: the deadline of each call (a receive: plus its ``max_wait_ms``)."""
        super().__init__(server, channel=channel, security=security, timeout_s=timeout_s)
        stub: Any = rpc.QueueServiceStub  # generated, untyped
        self._queues = stub(self._channel)
        self.group, self.topic = group, topic
        self.max_records, self.max_wait_ms, self.lease_ms = max_records, max_wait_ms, lease_ms
        self.worker_id = worker_id
        self._ack_interval_s, self._ack_batch = ack_interval_ms / 1000, ack_batch
        self._pending: list[Ack] = []  # under _ack_lock: ack() is called from any thread
        self._ack_lock = threading.Lock()
        self._closed = False  # no more acks
        self._channel_closed = False  # no more calls
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the channel, once used
        self._loop_thread = 0
        self._ack_timer: asyncio.TimerHandle | None = None
        self._ticking = False  # under _ack_lock: the ack timer runs (or is being started)
        self._idle_ticks = 0
        self._sending = asyncio.Lock()  # one batch of acks on its way at a time
        self._background: set[asyncio.Task[None]] = set()
        self._group_config: pb.QueueGroupConfig | None = None  # asked once, when first needed
        self._pool: Pool | None = None  # the process() running
        self._stop_requested = False

    def _bind(self) -> None:
        """Remember the loop this receiver runs on (where ``ack`` sends its batches)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()

    async def _call(self, method: Any, request: Any, *, timeout_s: float | None = None, wait_s: float = 0.0) -> Any:
        if self._channel_closed:
            raise StreamdError("CANCELLED", "CLOSED", "the receiver is closed")
        self._bind()
        return await self._calls.acall(method, request, timeout_s=timeout_s, wait_s=wait_s)

    # -- groups ------------------------------------------------------------------
    async def create(self, *, exist_ok: bool = False, timeout_s: float | None = None,
                     **config: Any) -> pb.QueueGroupDescription | None:
        """Create the queue group (``config``: see ``queue_config``); None when it
        exists and ``exist_ok``."""
        request = pb.CreateQueueGroupRequest(group=self.group, topic=self.topic, config=queue_config(**config))
        try:
            reply: pb.CreateQueueGroupResponse = await self._call(self._queues.CreateQueueGroup, request,
                                                                  timeout_s=timeout_s)
        except StreamdError as error:
            if exist_ok and error.reason == "QUEUE_GROUP_EXISTS":
                return None
            raise
        return reply.group

    async def describe(self, *, timeout_s: float | None = None) -> pb.QueueGroupDescription:
        request = pb.DescribeQueueGroupRequest(group=self.group, topic=self.topic)
        reply: pb.DescribeQueueGroupResponse = await self._call(self._queues.DescribeQueueGroup, request,
                                                                timeout_s=timeout_s)
        return reply.group

    # -- receiving ---------------------------------------------------------------
    async def receive(self, max_records: int | None = None, *, max_wait_ms: int | None = None,
                      timeout_s: float | None = None) -> list[Message]:
        return await self._receive(max_records, max_wait_ms=max_wait_ms, timeout_s=timeout_s, owner=self)

    async def _receive(self, max_records: int | None, *, max_wait_ms: int | None = None,
                       timeout_s: float | None = None, owner: Settler) -> list[Message]:
        """Messages that settle themselves through ``owner`` (the receiver the user holds)."""
        request = pb.ReceiveRequest(
            group=self.group, topic=self.topic, max_records=max_records or self.max_records,
            max_wait_ms=self.max_wait_ms if max_wait_ms is None else max_wait_ms, worker_id=self.worker_id,
            lease_ms=self.lease_ms, batched=True,
        )
        sent = time.monotonic()
        reply = await self._call(self._queues.Receive, request, timeout_s=timeout_s,
                                 wait_s=request.max_wait_ms / 1000)
        lease_s = await self._lease_s()
        return _messages(self.topic, reply, owner, lease_s, sent)

    async def _lease_s(self) -> float:
        if self.lease_ms is not None:
            return self.lease_ms / 1000
        return (await self._config()).lease_ms / 1000

    async def _config(self) -> pb.QueueGroupConfig:
        if self._group_config is None:
            self._group_config = (await self.describe()).config
        return self._group_config

    async def _at_most_once(self) -> bool:
        """Whether the group acks its records as it hands them out (a pool then
        receives no more than it can start). False when it cannot be asked: the pool
        then learns it from the first records it receives."""
        try:
            return (await self._config()).at_most_once
        except StreamdError as err:
            log.debug("queue %s/%s: group not described: %s", self.group, self.topic, err)
            return False

    # -- settling --------------------------------------------------------------------
    def ack(self, msg: Message) -> None:
        """Queued; sent with the next batch (``flush()`` to wait for it). A no-op for
        an at-most-once group's records (lease id 0: acked when handed out).
        Thread-safe."""
        if not msg.lease_id:
            return
        with self._ack_lock:
            if self._closed:
                raise StreamdError("CANCELLED", "CLOSED", "the receiver is closed")
            self._pending.append((msg.partition, msg.offset, msg.lease_id))
            queued = len(self._pending)
            start_ticking = not self._ticking
            self._ticking = True
        if queued == self._ack_batch:  # once, when the batch fills
            self._on_loop(self._send_acks)
        if start_ticking:  # acks come after a pause: they go within ack_interval_ms
            self._on_loop(self._start_ticks)

    def _on_loop(self, callback: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:  # never used on a loop: flush() or close() sends the acks
            return
        if threading.get_ident() == self._loop_thread:
            callback()
            return
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: close() has flushed what it could
            pass

    # The ack timer ticks every ack_interval_ms while acks keep coming, and stops
    # after IDLE_TICKS ticks that found none: so acks from another thread (the
    # blocking receiver's) do not wake the loop per batch, even across the pauses of
    # a receive, and an idle receiver has no timer.
    def _start_ticks(self) -> None:
        if self._ack_timer is None and self._loop is not None and not self._closed:
            self._idle_ticks = 0
            self._ack_timer = self._loop.call_later(self._ack_interval_s, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        with self._ack_lock:
            pending = bool(self._pending)
            self._idle_ticks = 0 if pending else self._idle_ticks + 1
            if self._idle_ticks >= IDLE_TICKS:
                self._ticking = False  # the next ack starts the timer again
                self._ack_timer = None
                return
        self._ack_timer = self._loop.call_later(self._ack_interval_s, self._tick)
        if pending:
            self._send_acks()

    def _send_acks(self) -> None:
        """(On the loop) send the queued acks in the background."""
        task = asyncio.ensure_future(self.flush())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def flush(self) -> None:
        """Send the queued acks now and wait for the answer (and for a batch already
        being sent)."""
        self._bind()
        async with self._sending:
            with self._ack_lock:
                batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                results: list[pb.SettleResult] | StreamdError = await self._send([], ack_ranges(batch))
            except StreamdError as err:  # the leases will expire and the records come again
                results = err
            log_acks(self.group, self.topic, len(batch), results)

    async def settle(self, msg: Message, action: str, *, delay_ms: int | None = None,
                     reason: str = "") -> pb.SettleResult:
        """One settlement now (``action``: ack, nack, extend or reject); StreamdError
        when the broker refuses it."""
        s = pb.Settlement(lease=msg.lease, action=ACTIONS[action], delay_ms=delay_ms, reason=reason)
        [result] = await self._send([s])
        if result.HasField("error"):
            raise settle_error(result)
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

    async def _send(self, settlements: Sequence[pb.Settlement],
                    ranges: Sequence[pb.SettleRange] = ()) -> list[pb.SettleResult]:
        request = pb.SettleRequest(group=self.group, topic=self.topic, settlements=settlements, ranges=ranges)
        reply: pb.SettleResponse = await self._call(self._queues.Settle, request)
        return list(reply.results)

    # -- worker pool -------------------------------------------------------------------
    async def process(
        self, handler: Callable[[Message], Awaitable[object]], *, concurrency: int = 16, auto_extend: bool = True,
        stop: asyncio.Event | None = None, max_messages: int | None = None,
        stop_grace_s: float = DEFAULT_STOP_GRACE_S, stop_signals: Sequence[int] = STOP_SIGNALS,
    ) -> int:
        """Handle messages with up to ``concurrency`` handlers at once: ack on return,
        nack on exception (with the exception as the reason), until stopped: by
        ``stop()``, the ``stop`` event, after ``max_messages``, or (on a loop running on
        the main thread) by one of ``stop_signals`` (``()``: leave signals alone).
        Leases are extended while their messages wait and run (``auto_extend``).

        Stopping (``_pools``): no more receives (those in flight answer), the messages
        received but not started are nacked with no delay, once; the handlers running
        finish, for up to ``stop_grace_s`` (a second signal stops waiting): those still
        running are then cancelled and their messages nacked with no delay; the acks
        are flushed. Returns how many messages were handled."""
        loop = asyncio.get_running_loop()
        pool = Pool(self, TaskRunner(handler, concurrency), loop=loop, owner=self, stop=stop,
                    auto_extend=auto_extend, max_messages=max_messages)
        with loop_signals(loop, stop_signals, pool.signalled):
            return await self._run_pool(pool, stop_grace_s)

    async def _run_pool(self, pool: Pool, grace_s: float) -> int:
        """Run the worker pool of either receiver (tasks or threads: ``pool.runner``)."""
        self._bind()
        self._pool = pool
        if self._stop_requested:
            pool.request_stop()
        try:
            return await pool.run(grace_s)
        finally:
            self._pool, self._stop_requested = None, False

    def stop(self) -> None:
        """Make ``process`` return (the one running, or else the next one). Safe from
        any thread, a handler or a signal handler (it takes no lock)."""
        self._stop_requested = True
        pool = self._pool
        if pool is not None:
            pool.request_stop()

    async def close(self) -> None:
        """Flush the acks (each call within its deadline) and close the channel."""
        with self._ack_lock:
            if self._closed:
                return
            self._closed = True
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        try:
            await self.flush()
            if self._background:
                await asyncio.gather(*list(self._background), return_exceptions=True)
        finally:
            self._channel_closed = True
            await self._close_channel()
