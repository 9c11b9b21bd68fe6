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
  extended automatically while it waits and its handler runs (at two thirds of the
  lease), so a slow handler does not lose its record to another worker. ``stop()``
  (from any thread or a handler), or SIGINT / SIGTERM when it runs on the main
  thread, stops it cleanly: the handlers running finish, the messages not started are
  handed back at once, the acks are flushed (see ``_pools``).
- ``AsyncQueueReceiver`` is the asyncio flavour, with ``process(handler,
  concurrency=N)`` for coroutine handlers.

``AsyncQueueReceiver`` (``_queue_async``) is the engine; ``QueueReceiver`` runs one
on a private event-loop thread, as ``Producer`` runs ``AsyncProducer``: one receive,
one settle and ack batching path, one worker pool and lease extender for both (the
blocking pool calls its handlers in threads, ``_pools.ThreadRunner``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from streamd._malloc import tune_malloc
from streamd.v1 import streamd_pb2 as pb

from ._channel import DEFAULT_TIMEOUT_S, Security
from ._message import ACTIONS, Message, _messages, queue_config
from ._pools import Pool
from ._queue_async import DEFAULT_ACK_BATCH, DEFAULT_ACK_INTERVAL_MS, AsyncQueueReceiver
from ._runners import ThreadRunner
from ._settle import ack_ranges, extend_ranges
from ._stopping import DEFAULT_STOP_GRACE_S, STOP_SIGNALS, caught_signals
from .errors import StreamdError

__all__ = ["ACTIONS", "AsyncQueueReceiver", "Message", "QueueReceiver", "_messages", "ack_ranges",
           "extend_ranges", "queue_config"]

T = TypeVar("T")

#: How often a blocking ``process`` looks at its ``stop`` event and the signals caught.
_POLL_S = 0.1
#: How much longer than a call's deadline ``close`` waits for the last acks.
_CLOSE_SLACK_S = 5.0


class QueueReceiver:
    """A blocking queue receiver: an ``AsyncQueueReceiver`` on a private event-loop
    thread (see the module docstring)."""

    def __init__(
        self,
        group: str,
        topic: str,
        server: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        security: Security | None = None,
        create: bool | dict[str, Any] = False,
        max_records: int = 100,
        max_wait_ms: int = 1000,
        lease_ms: int | None = None,
        ack_interval_ms: float = DEFAULT_ACK_INTERVAL_MS,
        ack_batch: int = DEFAULT_ACK_BATCH,
        worker_id: str = "",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        """``create``: create the queue group if it does not exist (a dict: with this
        config, see ``queue_config``). ``timeout_s``: the deadline of each call (a
        receive: plus its ``max_wait_ms``). ``channel``: a ``grpc.aio`` channel (as
        for ``Producer``), used on this receiver's loop thread."""
        tune_malloc()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="streamd-queue", daemon=True)
        self._thread.start()
        self._closed = False
        self._engine: AsyncQueueReceiver | None = None
        options = dict(channel=channel, security=security, max_records=max_records, max_wait_ms=max_wait_ms,
                       lease_ms=lease_ms, ack_interval_ms=ack_interval_ms, ack_batch=ack_batch,
                       worker_id=worker_id, timeout_s=timeout_s)
        try:
            self._engine = self._run(_make(group, topic, server, options))
            self._ack = self._engine.ack  # the per-message path: one call less
            if create:
                self.create(**(create if isinstance(create, dict) else {}), exist_ok=True)
        except BaseException:
            self.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        if self._loop.is_closed():
            coro.close()
            raise StreamdError("CANCELLED", "CLOSED", "the receiver is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout_s)
        except BaseException:
            # Interrupted (KeyboardInterrupt) or out of time: the call must not go on
            # without its caller (a receive would lease records no one reads).
            future.cancel()
            raise

    @property
    def _r(self) -> AsyncQueueReceiver:
        if self._engine is None:
            raise StreamdError("CANCELLED", "CLOSED", "the receiver is closed")
        return self._engine

    def __enter__(self) -> QueueReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The engine's settings, as attributes of the blocking receiver.
    group = property(lambda self: self._r.group)
    topic = property(lambda self: self._r.topic)
    max_records = property(lambda self: self._r.max_records)
    max_wait_ms = property(lambda self: self._r.max_wait_ms)
    lease_ms = property(lambda self: self._r.lease_ms)
    worker_id = property(lambda self: self._r.worker_id)

    @property
    def timeout_s(self) -> float:
        """The default deadline of this receiver's calls, in seconds."""
        return self._r.timeout_s

    # -- groups ------------------------------------------------------------------
    def create(self, *, exist_ok: bool = False, timeout_s: float | None = None,
               **config: Any) -> pb.QueueGroupDescription | None:
        return self._run(self._r.create(exist_ok=exist_ok, timeout_s=timeout_s, **config))

    def describe(self, *, timeout_s: float | None = None) -> pb.QueueGroupDescription:
        return self._run(self._r.describe(timeout_s=timeout_s))

    # -- receiving ---------------------------------------------------------------
    def receive(self, max_records: int | None = None, *, max_wait_ms: int | None = None,
                timeout_s: float | None = None) -> list[Message]:
        return self._run(self._r._receive(max_records, max_wait_ms=max_wait_ms, timeout_s=timeout_s, owner=self))

    def __iter__(self) -> Iterator[Message]:
        while not self._closed:
            yield from self.receive()

    # -- settling --------------------------------------------------------------------
    def ack(self, msg: Message) -> None:
        """Queued; sent with the next batch (``flush()`` to wait for it). A no-op for
        an at-most-once group's records (lease id 0: acked when handed out)."""
        self._ack(msg)

    def nack(self, msg: Message, *, delay_ms: int | None = None, reason: str = "") -> None:
        self._run(self._r.nack(msg, delay_ms=delay_ms, reason=reason))

    def extend(self, msg: Message, lease_ms: int) -> int:
        return self._run(self._r.extend(msg, lease_ms))

    def reject(self, msg: Message, *, reason: str = "") -> None:
        self._run(self._r.reject(msg, reason=reason))

    def flush(self) -> None:
        """Send the queued acks now and wait for the answer (and for a batch already
        being sent)."""
        self._run(self._r.flush())

    # For streamd.cli (it lists, seeks, deletes and redrives with this receiver's
    # channel): a unary call with the receiver's deadline, and a Settle.
    @property
    def _channel(self) -> grpc.aio.Channel:
        return self._r._channel

    @property
    def _queues(self) -> Any:
        return self._r._queues

    def _call(self, method: Any, request: Any, *, timeout_s: float | None = None, wait_s: float = 0.0) -> Any:
        return self._run(self._r._call(method, request, timeout_s=timeout_s, wait_s=wait_s))

    def _send(self, settlements: Sequence[pb.Settlement],
              ranges: Sequence[pb.SettleRange] = ()) -> list[pb.SettleResult]:
        return self._run(self._r._send(settlements, ranges))

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
        logged at WARNING. Returns how many messages were handled (and sets ``stop``)."""
        engine = self._r
        if self._closed or self._loop.is_closed():
            raise StreamdError("CANCELLED", "CLOSED", "the receiver is closed")
        halt = stop or threading.Event()
        pool = Pool(engine, ThreadRunner(handler, workers), loop=self._loop, owner=self, stop=None,
                    auto_extend=auto_extend, max_messages=max_messages)
        try:
            with caught_signals(stop_signals) as caught:
                if halt.is_set():
                    pool.request_stop()
                run = asyncio.run_coroutine_threadsafe(engine._run_pool(pool, stop_grace_s), self._loop)
                try:
                    return self._wait_pool(run, pool, halt, caught)
                except BaseException:
                    # Interrupted (KeyboardInterrupt, the signals left alone): the pool
                    # stops as on a second signal (what was not started is handed back,
                    # the handlers running are not waited for, the acks are flushed),
                    # then the interrupt goes on up; no pool runs on without its caller.
                    self._loop.call_soon_threadsafe(_give_up, pool)
                    with contextlib.suppress(Exception):
                        run.result(_CLOSE_SLACK_S)
                    raise
        finally:
            halt.set()

    def _wait_pool(self, run: concurrent.futures.Future[int], pool: Pool, halt: threading.Event,
                   signals: list[int]) -> int:
        """Wait for the pool's run, passing on the ``stop`` event and the signals
        caught (a signal handler only appends to ``signals``: see ``_stopping``)."""
        seen, stopped = 0, False
        while True:
            try:
                return run.result(_POLL_S)
            except concurrent.futures.TimeoutError:
                pass
            if halt.is_set() and not stopped:
                stopped = True
                pool.request_stop()
            while len(signals) > seen:
                signum = signals[seen]
                seen += 1
                self._loop.call_soon_threadsafe(pool.signalled, signum)

    def stop(self) -> None:
        """Make ``process`` return (the one running, or else the next one), as a
        signal does: see ``process``. Thread-safe: call it from a handler, another
        thread or a signal handler (it takes no lock)."""
        self._r.stop()

    def close(self) -> None:
        """Flush the acks (within a call's deadline) and stop the loop thread."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._engine is not None:
                self._run(self._engine.close(), self._engine.timeout_s + _CLOSE_SLACK_S)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():
                self._loop.close()


def _give_up(pool: Pool) -> None:
    """(On the loop) stop ``pool`` and stop waiting for its handlers."""
    pool.request_stop()
    pool.abandon.set()


async def _make(group: str, topic: str, server: str | None, options: dict[str, Any]) -> AsyncQueueReceiver:
    """The engine, made on the loop it runs on (its channel belongs to that loop)."""
    return AsyncQueueReceiver(group, topic, server, **options)
