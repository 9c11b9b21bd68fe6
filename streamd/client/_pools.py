"""The worker pool of the queue receivers: ONE pool (``Pool``) runs ``process`` for
both, on the receiver engine's event loop (``_queue_async``). It owns the receive loop,
the messages received but not started, the lease extender, the count of messages
handled, and the stop. What differs is only how a handler is called (``_runners``:
tasks for ``AsyncQueueReceiver.process``, threads for ``QueueReceiver.process``).

A handler's return acks its message (queued, ``_queue_async``), an exception nacks it
with the exception as the reason. A message whose lease ended while it waited its turn
is skipped (another worker may have it already). The leases of the messages received
are extended while they wait and run (``auto_extend``), when a third of the lease is
left, by the lease's length (deadlines by this process's monotonic clock).

Stopping (``stop()``, the ``stop`` event, ``max_messages``, or a signal: see
``_stopping``), in this order:

1. no new receive; those in flight are let answer (at most their half-second long
   poll): cancelling one could lose records the broker leased for an answer never
   read, until their leases end;
2. once no receive is in flight, the messages received but not started are nacked
   with no delay, once, in one Settle of ranges, so another worker has them at once.
   Waiting for every receive first is what keeps that at one delivery: a record
   handed back while another receive waits would be leased (and counted) again by
   this stopping pool. The lease they were received with counts as a delivery, as SQS
   and Kafka share groups count it; the stop adds none;
3. the handlers running finish, for up to the grace period, or until a second signal;
   then the pool stops waiting: a thread cannot be cancelled, so its record stays
   leased until the lease ends (it is no longer extended); a task is cancelled and its
   message nacked with no delay;
4. the acks are flushed, and ``process`` returns how many messages were handled.

An at-most-once group acks a record as it hands it out, so nothing can be handed
back: the pool receives no more than its handlers run in a second (or a quarter of the
grace period; one per handler until the handlers were timed), starts what it received
even when stopping (within the grace period), and logs at WARNING, with their offsets,
the records no handler finished (``_settle.log_unhandled``). Whether a group is
at-most-once is asked once (``describe``), or learnt from its first records (lease id 0).

Threads: the deque of messages not started is shared by the loop and the worker
threads; both take with ``popleft`` (atomic), so each message is handled or handed
back, never both. Counters the threads change are under ``_lock``; ``watched`` (the
extender's messages) is a dict whose single operations are atomic under the GIL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from ._message import Message, Settler
from ._settle import extend_ranges, log_release, log_unhandled, places_text, release_ranges
from ._stopping import signal_name
from .errors import StreamdError

if TYPE_CHECKING:
    from ._queue_async import AsyncQueueReceiver
    from ._runners import Runner

log = logging.getLogger("streamd.client.queue")

T = TypeVar("T")

#: The reason given with the nacks of messages handed back by a stopping pool.
STOPPING = "worker stopping"
#: The longest a pool's receive waits for records (so a stop is seen soon).
RECEIVE_WAIT_MS = 500
#: At most how long (or a quarter of the stop grace) the at-most-once records a pool
#: holds take its handlers: what a stop still has to run.
AT_MOST_ONCE_HOLD_S = 1.0
#: How much longer than its long poll a pool that gives up waits for a receive in flight.
GIVE_UP_SLACK_S = 1.0
#: How often the extender looks for leases to extend.
EXTEND_EVERY_S = 0.05
#: The longest a receive waits for room before it looks again (a missed wake-up costs no more).
ROOM_POLL_S = 0.1

class Pool:
    """One ``process`` run (see the module docstring)."""

    def __init__(self, receiver: AsyncQueueReceiver, runner: Runner, *, loop: asyncio.AbstractEventLoop,
                 owner: Settler, stop: asyncio.Event | None, auto_extend: bool, max_messages: int | None) -> None:
        self.r, self.runner, self.loop, self.owner = receiver, runner, loop, owner
        self.stop, self.abandon = stop or asyncio.Event(), asyncio.Event()
        self.limit, self.done = max_messages, 0
        self.auto_extend = auto_extend
        self.loop_thread = 0  # the loop's thread, once running
        #: Plain flags, so a thread sees a stop (or give-up) at its next message.
        self.stopping = self.gave_up = False
        self.receiving_done = False
        self.at_most_once = False
        self.hold_s = AT_MOST_ONCE_HOLD_S
        self.per_record_s: float | None = None  # handler time per record (a running mean)
        self.waiting: deque[Message] = deque()  # received, not started
        self.running: dict[int, Message] = {}  # slot -> the message its handler runs
        self.watched: dict[int, Message] = {}  # id -> message whose lease the extender keeps
        self.asked = 0  # records the receives in flight asked for
        self.signals = 0
        self._lock = threading.Lock()
        # Pulsed (set, then cleared: the waiters woken stay woken) on the loop:
        self._idle: deque[asyncio.Future[None]] = deque()  # idle workers, each waiting for its wake-up
        self._room_opened = asyncio.Event()  # for receives waiting for room: messages were taken or finished
        self._room_wanted = False  # a receive waits for room (a thread then wakes it when room opens)

    # -- running -------------------------------------------------------------------
    async def run(self, grace_s: float) -> int:
        """Handle messages until stopped; how many were handled."""
        self.loop_thread = threading.get_ident()
        self.hold_s = min(AT_MOST_ONCE_HOLD_S, grace_s / 4)
        if self.stop.is_set():
            self.stopping = True
        if not self.stopping:
            self.at_most_once = await self.r._at_most_once()
        watcher: asyncio.Future[None] = asyncio.ensure_future(self._watch_stop())
        extender = asyncio.ensure_future(self._extend_leases()) if self.auto_extend else None
        workers = self.runner.start(self)
        receiving = asyncio.ensure_future(self._receive_loop())
        try:
            # Every worker ended without a stop only when each handler raised what is
            # not an Exception (a worker dies with it, as a thread or task would).
            ended: asyncio.Future[Any] = asyncio.ensure_future(asyncio.wait(workers))
            await asyncio.wait([watcher, ended], return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
            self.request_stop()
            until = self.loop.time() + grace_s
            await self._until([receiving], until)
            if receiving.done() and not self.at_most_once:
                await self.release(_drain(self.waiting), "received but not started")
            await self._until(workers, until)
            running = [w for w in workers if not w.done()]
            if running and not self.abandon.is_set():
                log.warning("queue %s/%s: %d handler(s) still running after %.0f s: %s", self.r.group, self.r.topic,
                            len(running), grace_s, self.runner.abandon(self))
        finally:
            await self._give_up(receiving, workers)
            for task in (watcher, extender):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (watcher, extender) if t is not None), return_exceptions=True)
            _log_deaths(workers)
            await self.r.flush()
        return self.done

    async def _watch_stop(self) -> None:
        await self.stop.wait()
        self.stopping = True
        self._wake()
        self._pulse_room()

    def request_stop(self) -> None:
        """Stop the run (see the module docstring). Safe from any thread and from a
        signal handler (no lock is taken)."""
        self.stopping = True
        self.on_loop(self.stop.set)

    def signalled(self, signum: int) -> None:
        """(On the loop) a stop signal: the first stops the pool, a second stops waiting."""
        self.signals += 1
        where = f"queue {self.r.group}/{self.r.topic}: {signal_name(signum)}"
        if self.signals == 1:
            log.info("%s: stopping (again to stop waiting for the handlers)", where)
            self.request_stop()
        else:
            log.warning("%s again: %s", where, self.runner.abandon(self))
            self.abandon.set()

    async def _until(self, futures: list[asyncio.Future[Any]], until: float) -> None:
        """Wait for ``futures`` until loop time ``until`` or a second signal."""
        abandon: asyncio.Future[Any] = asyncio.ensure_future(self.abandon.wait())
        try:
            while not self.abandon.is_set():
                pending = [f for f in futures if not f.done()]
                left = until - self.loop.time()
                if not pending or left <= 0:
                    return
                await asyncio.wait([*pending, abandon], timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abandon.cancel()
            await asyncio.gather(abandon, return_exceptions=True)

    async def _give_up(self, receiving: asyncio.Future[None], workers: list[asyncio.Future[None]]) -> None:
        """Stop waiting: a receive still in flight gets a little longer (then is
        cancelled), what was received but not started is handed back, the runner
        gives up on the handlers still running."""
        self.stopping = self.gave_up = True
        self._wake()
        if not receiving.done():
            await asyncio.wait([receiving], timeout=RECEIVE_WAIT_MS / 1000 + GIVE_UP_SLACK_S)
            receiving.cancel()
        await asyncio.gather(receiving, return_exceptions=True)
        unstarted = _drain(self.waiting)
        if unstarted:
            await self.release(unstarted, "received but never started (the pool stopped waiting)")
        await self.runner.give_up(self, [w for w in workers if not w.done()])

    # -- receiving -------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        try:
            await asyncio.gather(*(self._receiving() for _ in range(max(1, self.runner.receives))))
        finally:
            self.receiving_done = True
            self._wake()

    async def _receiving(self) -> None:
        """Receive while the pool runs and has room; each receive's messages held
        (and watched by the extender) before it counts as ended."""
        r = self.r
        while True:
            count = self._room()
            if count is None:
                return
            if not count:
                await self._wait_for_room()
                continue
            self.asked += count
            try:
                messages = await r._receive(count, max_wait_ms=min(r.max_wait_ms, RECEIVE_WAIT_MS), owner=self.owner)
            except StreamdError as err:
                if self.stopping:
                    return  # cut short by the stop: not a failure
                log.warning("queue %s/%s: receive failed: %s", r.group, r.topic, err)
                await self._nap(0.5)
                continue
            finally:
                self.asked -= count
            self._hold(messages)

    def _room(self) -> int | None:
        """How many records the next receive asks for (0: none now); None once the
        pool stops.

        - Threads (and any at-most-once pool): a batch for each handler with nothing
          to do (at-most-once: what it runs in ``hold_s``); what is held or asked for
          counts as work for as many handlers as it fills batches. So a busy or stuck
          handler leases no more than its own batch, as a thread receiving for
          itself did.
        - Tasks: one receive's worth (up to ``concurrency``) held ahead of the
          handlers, busy or not.
        - While any handler has work, a receive waits until half a receive's worth
          fits, so a busy pool does not receive a record at a time.
        - No more than ``max_messages`` still needs beside what is held, asked for
          and running: a run of 2 must not lease a whole batch that its stop then
          hands back, a delivery the poorer each."""
        if self.stopping:
            return None
        max_records, slots = self.r.max_records, self.runner.slots
        with self._lock:
            held, running = len(self.waiting) + self.asked, len(self.running)
        if self.at_most_once or not self.runner.ahead:
            per_slot = self._per_slot() if self.at_most_once else max_records
            busy = running + -(-held // per_slot)  # what is held keeps handlers busy: a batch each
            room = min((slots - busy) * per_slot, max_records)
        else:  # one receive's worth ahead of the handlers, whether they are free or not
            per_slot = 1
            room = min(max_records, slots) - held
        if (held or running) and room < max(1, min(max_records, slots * per_slot) // 2):
            room = 0
        if self.limit is not None:
            room = min(room, self.limit - self.done - held - running)
        return max(room, 0)

    def _per_slot(self) -> int:
        """At-most-once: how many records one handler runs in ``hold_s`` (one until
        timed, then up to ``max_records``), so a stop can run every record received
        within the grace while a quick handler still gets whole batches."""
        if self.per_record_s is None:
            return 1
        return max(1, min(self.r.max_records, int(self.hold_s / max(self.per_record_s, 1e-6))))

    async def _wait_for_room(self) -> None:
        self._room_wanted = True
        await _pulsed(self._room_opened, ROOM_POLL_S)

    async def _nap(self, seconds: float) -> None:
        """Sleep, unless the pool stops first."""
        try:
            async with asyncio.timeout(seconds):
                await self.stop.wait()
        except TimeoutError:
            pass

    def _hold(self, messages: list[Message]) -> None:
        if messages and not messages[0].lease_id:
            self.at_most_once = True  # learnt here if the group could not be described
        if self.auto_extend:
            for msg in messages:  # the whole batch: those waiting their turn keep their lease
                if msg.lease_id:
                    self.watched[id(msg)] = msg
        self.waiting.extend(messages)
        if messages:
            self._wake(-(-len(messages) // self.runner.batch(self.r.max_records)))

    def _wake(self, count: int | None = None) -> None:
        """(On the loop) wake ``count`` idle workers (None: all, the pool's state
        changed). Messages wake one worker per batch they fill (a thread per receive,
        as if it received them itself; a task per message), so idle threads do not
        all run at once for one small batch."""
        while self._idle and (count is None or count > 0):
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if count is not None:
                    count -= 1

    def _pulse_room(self) -> None:
        self._room_wanted = False
        self._room_opened.set()
        self._room_opened.clear()

    def _progress(self) -> None:
        """(Any thread) a message was taken or finished: wake a receive waiting for
        room when it may go now (one hop to the loop, not one per message)."""
        if self._room_wanted and self._room():
            self._room_wanted = False
            self.on_loop(self._pulse_room)

    # -- the workers' side -------------------------------------------------------------
    def take(self, slot: int) -> Message | None:
        """(Any thread) the next message for ``slot`` to handle (counted as running
        from here), or None (none waiting, or the pool stops: at-most-once records are
        still taken until the pool gives up). A lease that ended while its message
        waited is skipped."""
        while not self.gave_up and (self.at_most_once or not self.stopping):
            with self._lock:  # taken and running in one step, as _room counts them
                try:
                    msg = self.waiting.popleft()
                except IndexError:
                    return None
                fresh = not msg.lease_id or time.monotonic() < msg.deadline
                if fresh:
                    self.running[slot] = msg
            self._progress()
            if fresh:
                return msg
            log.info("queue %s/%s: lease of %d/%d expired before its turn; skipped",
                     self.r.group, self.r.topic, msg.partition, msg.offset)
            self.watched.pop(id(msg), None)
        return None

    async def next_message(self, slot: int) -> Message | None:
        """(On the loop) the next message for ``slot``, waiting for one; None when the
        worker is done."""
        while True:
            msg = self.take(slot)
            if msg is not None:
                return msg
            if self.gave_up or (self.stopping and (not self.at_most_once or self.receiving_done)):
                return None
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._idle.append(waiter)
            self._pulse_room()  # an idle worker: room for a receive
            await waiter

    def ack(self, msg: Message) -> None:
        try:
            self.r.ack(msg)
        except StreamdError as err:  # closed: the pool gave up on this handler
            log.info("queue %s/%s: %s", self.r.group, self.r.topic, err)

    async def nack(self, msg: Message, exc: Exception) -> None:
        try:
            await self.r.settle(msg, "nack", reason=f"{type(exc).__name__}: {exc}"[:1000])
        except StreamdError as err:
            log.info("queue %s/%s: nack failed: %s", self.r.group, self.r.topic, err)

    def finished(self, slot: int, msg: Message, began: float) -> None:
        """(Any thread) ``msg``'s handler returned or raised and it was settled."""
        took = time.monotonic() - began
        with self._lock:
            self.running.pop(slot, None)
            self.done += 1
            self.per_record_s = took if self.per_record_s is None else (self.per_record_s + took) / 2
            limit_hit = self.limit is not None and self.done >= self.limit
        self.watched.pop(id(msg), None)
        if limit_hit:
            self.request_stop()
        self._progress()

    def on_loop(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` on the loop (at once when called there)."""
        if threading.get_ident() == self.loop_thread:
            callback()
            return
        try:
            self.loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: the pool is long gone
            pass

    def wait_on_loop(self, coro: Coroutine[Any, Any, T]) -> T | None:
        """(A worker thread) run ``coro`` on the loop and wait for it; None when the
        loop is gone (a thread the pool gave up on, after the receiver closed)."""
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:
            coro.close()
            return None
        while True:
            try:
                return future.result(0.5)
            except concurrent.futures.TimeoutError:
                if self.loop.is_closed() or not self.loop.is_running():
                    future.cancel()
                    return None

    # -- handing back, extending -----------------------------------------------------------
    async def release(self, messages: list[Message], why: str) -> None:
        """Nack ``messages`` (not handled) with no delay, in one Settle of ranges; log
        the at-most-once ones (acked already: lost)."""
        for msg in messages:
            self.watched.pop(id(msg), None)
        log_unhandled(self.r.group, self.r.topic, messages, why)
        ranges = release_ranges(messages, STOPPING)
        if not ranges:
            return
        try:
            results: list[Any] | StreamdError = await self.r._send([], ranges)
        except StreamdError as err:
            results = err
        log_release(self.r.group, self.r.topic, len(messages), results)

    def abandoned(self) -> str:
        """What becomes of the records of the handlers the pool stops waiting for."""
        running = list(self.running.values())
        if running and self.at_most_once:
            return (f"their {len(running)} at-most-once record(s) will not come again if the handlers do not "
                    f"finish: {places_text(running)}")
        return "their records come again when their leases end"

    async def _extend_leases(self) -> None:
        while True:
            await asyncio.sleep(EXTEND_EVERY_S)
            now = time.monotonic()
            due = [m for m in list(self.watched.values()) if m.deadline - now < m.lease_s / 3]
            if due:
                await self._extend(due)

    async def _extend(self, due: list[Message]) -> None:
        """One Settle of extension ranges; a range with refused offsets is retried
        message by message, so exactly the lost leases are forgotten."""
        ranges = extend_ranges(due)
        sent = time.monotonic()
        try:
            results = await self.r._send([], [r for r, _ in ranges])
        except StreamdError as err:
            log.info("%d lease(s) not extended: %s", len(due), err)
            return  # tried again on the next round while their leases last
        for (_, messages), result in zip(ranges, results, strict=False):
            if not result.refused and not result.HasField("error"):
                for msg in messages:
                    msg.lease_expires_ms = result.lease_expires_ms
                    msg.deadline = sent + msg.lease_s
                continue
            for msg in messages:
                try:
                    await self.r.extend(msg, int(msg.lease_s * 1000))
                except StreamdError as err:
                    log.info("lease of %s/%d@%d not extended: %s", msg.topic, msg.partition, msg.offset, err)
                    self.watched.pop(id(msg), None)


async def _pulsed(event: asyncio.Event, timeout_s: float | None) -> None:
    """Wait for the next pulse of ``event``, for at most ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        pass


def _log_deaths(workers: list[asyncio.Future[None]]) -> None:
    """Log the worker tasks a handler's BaseException ended (a thread's is printed
    by ``threading.excepthook``)."""
    for worker in workers:
        if worker.done() and not worker.cancelled() and worker.exception() is not None:
            log.error("queue worker ended by its handler", exc_info=worker.exception())


def _drain(waiting: deque[Message]) -> list[Message]:
    out = []
    while True:
        try:
            out.append(waiting.popleft())
        except IndexError:
            return out
