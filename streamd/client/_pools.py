"""Worker pools of the queue receivers: ``QueueReceiver.process`` (``ThreadPool``: N
threads, each receiving and handling a batch at a time) and
``AsyncQueueReceiver.process`` (``AsyncPool``: one receive loop feeding up to N handler
tasks). A handler's return acks its message, an exception nacks it; the leases of the
messages received are extended while they wait and run (``Extender``).

Stopping (``stop()``, the ``stop`` event, ``max_messages``, or a signal: see
``_stopping``), in this order:

1. no new receive; those in flight are let answer (at most their half-second long
   poll): cancelling one could lose records the broker leased for an answer never
   read, until their leases end;
2. once no receive is in flight, the messages received but not started are nacked
   with no delay, once, in one Settle of ranges, so another worker has them at once.
   Waiting for every receive first is what keeps that at one delivery: a record
   handed back while another worker's receive waits would be leased (and counted)
   again by this stopping pool. The lease they were received with counts as a
   delivery, as SQS and Kafka share groups count it; the stop adds none;
3. the handlers running finish, for up to the grace period, or until a second signal;
   then the pool stops waiting: a thread cannot be cancelled, so its record stays
   leased until the lease ends (it is no longer extended); a task is cancelled and its
   message nacked with no delay;
4. the acks are flushed, and ``process`` returns how many messages were handled.

An at-most-once group acks a record as it hands it out, so nothing can be handed
back: the pools receive no more than they can soon start (a worker thread what its
handler ran in a second, or a quarter of the grace period; the asyncio pool its free
slots), start what they received even when stopping (within the grace
period), and log at WARNING, with their offsets, the records no handler finished
(``_settle.log_unhandled``). Whether a group is at-most-once is asked once
(``describe``), or learnt from its first records (lease id 0).

A message waiting its turn sits in its worker's deque; both the worker and a pool that
gives up on it take messages with ``popleft`` (atomic), so each is handled or handed
back, never both.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from ._settle import extend_ranges, log_release, log_unhandled, places_text, release_ranges
from ._stopping import caught_signals, loop_signals, signal_name
from .errors import StreamdError

if TYPE_CHECKING:
    from .queue import AsyncQueueReceiver, Message, QueueReceiver

log = logging.getLogger("streamd.client.queue")

#: The reason given with the nacks of messages handed back by a stopping pool.
STOPPING = "worker stopping"
#: The longest a worker thread's receive waits for records (so a stop is seen soon).
RECEIVE_WAIT_MS = 500
#: At most how long (or a quarter of the stop grace) the at-most-once records a worker
#: thread holds take its handler: what a stop still has to run.
AT_MOST_ONCE_HOLD_S = 1.0
#: How much longer than its long poll a stopping pool waits for a receive in flight.
GIVE_UP_SLACK_S = 1.0
#: How long handlers cancelled by a stopping asyncio pool get to unwind.
CANCEL_WAIT_S = 5.0


class ThreadPool:
    """One ``QueueReceiver.process`` run: ``workers`` threads, the stop event
    (``halt``), the count of messages handled (the run stops at ``max_messages``),
    each receive's messages received but not started, and the receives in flight."""

    def __init__(self, receiver: QueueReceiver, handler: Callable[[Message], object], *, workers: int,
                 auto_extend: bool, halt: threading.Event, max_messages: int | None) -> None:
        self.r, self.handler, self.halt = receiver, handler, halt
        self.limit, self.done = max_messages, 0
        self.auto_extend = auto_extend
        self.extender: Extender | None = None
        #: The group acks records as it hands them out: receive no more than a worker
        #: runs in ``hold_s`` (``_at_most_once_count``), and run what was received even
        #: when stopping.
        self.at_most_once = False
        self.hold_s = AT_MOST_ONCE_HOLD_S
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a receive ends
        # Under the lock: the deques of messages not started, the receives in flight,
        # whether the messages not started were handed back, whether the pool gave up.
        self._held: dict[int, deque[Message]] = {}
        self._receiving = 0
        self._asked = 0  # records the receives in flight asked for
        self._handed_back = self._gave_up = False
        self._running: dict[int, Message] = {}  # at-most-once: thread id -> the message its handler runs
        self._threads = [
            # daemon: a handler the pool gave up on does not keep the process alive
            threading.Thread(target=self._work, name=f"streamd-worker-{i}", daemon=True) for i in range(workers)
        ]

    def run(self, grace_s: float, signals: Sequence[int]) -> int:
        """Handle messages until stopped; how many were handled."""
        self.hold_s = min(AT_MOST_ONCE_HOLD_S, grace_s / 4)
        try:
            if not self.halt.is_set():
                self.at_most_once = self.r._at_most_once()
            if self.auto_extend:
                self.extender = Extender(self.r)
            with caught_signals(signals) as caught:
                for t in self._threads:
                    t.start()
                self._wait(caught, grace_s)
        finally:
            self.halt.set()
            self._settle_unstarted(self._give_up(), "received but never started (the pool stopped waiting)")
            if self.extender is not None:
                self.extender.stop()
            self.r.flush()
        return self.done

    def _wait(self, signals: list[int], grace_s: float) -> None:
        """Until the workers are done; after a stop, until ``grace_s`` passed or a
        second signal came. The messages not started are handed back once no
        receive is in flight."""
        where = f"queue {self.r.group}/{self.r.topic}"
        until = None
        seen = 0
        while any(t.is_alive() for t in self._threads):
            if self.r._stop_requested and not self.halt.is_set():
                self.halt.set()  # stop() on the main thread (see QueueReceiver.stop)
            if len(signals) > seen:
                seen = len(signals)
                if seen > 1:
                    log.warning("%s: %s again: not waiting for the handlers running; %s", where,
                                signal_name(signals[-1]), self._abandoned())
                    return
                log.info("%s: %s: stopping (again to stop waiting for the handlers)", where, signal_name(signals[0]))
                self.halt.set()
            if self.halt.is_set():
                if until is None:
                    until = time.monotonic() + grace_s
                self._hand_back()
            if until is not None and time.monotonic() >= until:
                log.warning("%s: handlers still running after %.0f s; not waiting for them; %s", where, grace_s,
                            self._abandoned())
                return
            alive = next((t for t in self._threads if t.is_alive()), None)
            if alive is not None:
                alive.join(0.1)

    def _abandoned(self) -> str:
        """What becomes of the records of the handlers the pool stops waiting for."""
        running = list(self._running.values())
        if running:
            return (f"their {len(running)} at-most-once record(s) will not come again if the handlers do not "
                    f"finish: {places_text(running)}")
        return "their records come again when their leases end"

    def _work(self) -> None:
        per_record_s: float | None = None  # at-most-once: this worker's handler time per record
        while True:
            try:
                waiting = self._receive(self._at_most_once_count(per_record_s) if self.at_most_once else None)
            except StreamdError as err:
                if self.halt.is_set():
                    break  # cut short by the stop (the channel closing): not a failure
                log.warning("queue %s/%s: receive failed: %s", self.r.group, self.r.topic, err)
                self.halt.wait(0.5)
                continue
            except ValueError:  # grpc: the channel is closed (under a worker the pool gave up on)
                if self.halt.is_set():
                    break
                raise
            if waiting is None:
                break
            started, count = time.monotonic(), len(waiting)
            self._handle(waiting)
            if self.at_most_once and count:
                took = (time.monotonic() - started) / count
                per_record_s = took if per_record_s is None else (per_record_s + took) / 2
            if not waiting:  # else stopping: the pool hands the rest back
                with self._lock:
                    self._held.pop(id(waiting), None)

    def _capped(self, count: int | None) -> int | None:
        """(Under the lock) ``count``, but no more than ``max_messages`` still needs
        beside what is held and asked for already (at least one): a run of 2 must not
        lease a whole batch that its stop then hands back, a delivery the poorer each."""
        if self.limit is None:
            return count
        remaining = self.limit - self.done - self._asked - sum(len(w) for w in self._held.values())
        return max(1, min(count or self.r.max_records, remaining))

    def _at_most_once_count(self, per_record_s: float | None) -> int:
        """How many at-most-once records a worker receives: what its handler runs in
        ``hold_s`` (one until it was timed, then up to ``max_records``), so a stop
        can run every record received within the grace while a quick handler still
        gets whole batches (a receive per record would cost far more than the handler)."""
        if per_record_s is None:
            return 1
        return max(1, min(self.r.max_records, int(self.hold_s / max(per_record_s, 1e-6))))

    def _receive(self, count: int | None) -> deque[Message] | None:
        """One receive, its messages held (and watched by the extender) before it
        counts as ended; None once the pool stops. A receive in flight is let answer
        (cancelling it could lose records leased for an answer never read), and what
        the pool hands back waits for every one: a record handed back while another
        worker's receive waits would be leased, and counted, again."""
        with self._lock:
            if self.halt.is_set():
                return None
            count = self._capped(count)
            asked = count or self.r.max_records
            self._receiving += 1
            self._asked += asked
        messages: list[Message] = []
        try:
            messages = self.r.receive(count, max_wait_ms=min(self.r.max_wait_ms, RECEIVE_WAIT_MS))
        finally:
            with self._lock:
                self._receiving -= 1
                self._asked -= asked
                self._idle.notify_all()
                late = self._gave_up
                waiting = deque(messages)
                if messages and not late:
                    self._held[id(waiting)] = waiting
                    if not messages[0].lease_id:
                        self.at_most_once = True  # learnt here if the group could not be described
                    if self.extender is not None:
                        for msg in messages:  # the whole batch: those waiting their turn keep their lease
                            self.extender.watch(msg)
        if late:  # the pool returned while this receive was in flight
            self._settle_unstarted(messages, "received after the pool stopped")
            return None
        return waiting

    def _handle(self, waiting: deque[Message]) -> None:
        """Handle the messages of ``waiting`` one by one until it is empty or the pool
        stops (at-most-once: until it is empty or the pool gives up)."""
        r, extender = self.r, self.extender
        while self.at_most_once or not self.halt.is_set():
            try:
                msg = waiting.popleft()
            except IndexError:
                return
            if msg.lease_id and time.monotonic() >= msg.deadline:
                log.info("queue %s/%s: lease of %d/%d expired before its turn; skipped",
                         r.group, r.topic, msg.partition, msg.offset)
                if extender is not None:
                    extender.forget(msg)
                continue
            if self.at_most_once:
                self._running[threading.get_ident()] = msg
            try:
                self.handler(msg)
            except Exception as exc:
                try:
                    r.nack(msg, reason=f"{type(exc).__name__}: {exc}"[:1000])
                except StreamdError as err:
                    log.info("queue %s/%s: %s", r.group, r.topic, err)
            else:
                try:
                    r.ack(msg)
                except StreamdError as err:  # closed: the pool gave up on this handler
                    log.info("queue %s/%s: %s", r.group, r.topic, err)
            finally:
                if self.at_most_once:
                    self._running.pop(threading.get_ident(), None)
                if extender is not None:
                    extender.forget(msg)
            self._add()

    def _add(self) -> None:
        with self._lock:
            self.done += 1
            if self.limit is not None and self.done >= self.limit:
                self.halt.set()

    def _hand_back(self) -> None:
        """Stopping, once no receive is in flight (so none can lease them again): the
        messages received but not started, handed back in one Settle. Not for an
        at-most-once group: its workers run what they received."""
        with self._lock:
            if self._handed_back or self._receiving or self.at_most_once:
                return
            self._handed_back = True
            held = list(self._held.values())
        self._settle_unstarted([m for waiting in held for m in _drain(waiting)], "received but not started")

    def _give_up(self) -> list[Message]:
        """Every worker's messages not started (the pool is not waiting for them), once
        the receives in flight answered (for at most a long poll)."""
        with self._lock:
            self._idle.wait_for(lambda: not self._receiving, timeout=RECEIVE_WAIT_MS / 1000 + GIVE_UP_SLACK_S)
            self._gave_up = True
            held, self._held = list(self._held.values()), {}
        return [m for waiting in held for m in _drain(waiting)]

    def _settle_unstarted(self, messages: list[Message], why: str) -> None:
        """Nack ``messages`` (not started) with no delay, in one Settle of ranges; log
        the at-most-once ones (acked already: lost)."""
        if self.extender is not None:
            for msg in messages:
                self.extender.forget(msg)
        log_unhandled(self.r.group, self.r.topic, messages, why)
        ranges = release_ranges(messages, STOPPING)
        if not ranges:
            return
        try:
            results: list | StreamdError = self.r._send([], ranges)
        except StreamdError as err:
            results = err
        except ValueError as err:  # grpc: the channel is closed (a worker the pool gave up on)
            results = StreamdError("CANCELLED", "CLOSED", str(err))
        log_release(self.r.group, self.r.topic, len(messages), results)


def _drain(waiting: deque[Message]) -> list[Message]:
    out = []
    while True:
        try:
            out.append(waiting.popleft())
        except IndexError:
            return out


class Extender:
    """Extends the leases of received messages not yet settled, when a third of the
    lease is left, by the lease's length (deadlines by this process's monotonic clock)."""

    def __init__(self, receiver: QueueReceiver) -> None:
        self.receiver = receiver
        self._watched: dict[int, Message] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamd-extender", daemon=True)
        self._thread.start()

    def watch(self, msg: Message) -> None:
        if msg.lease_id:
            with self._lock:
                self._watched[id(msg)] = msg

    def forget(self, msg: Message) -> None:
        with self._lock:
            self._watched.pop(id(msg), None)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            now = time.monotonic()
            with self._lock:
                due = [m for m in self._watched.values() if m.deadline - now < m.lease_s / 3]
            if due:
                self._extend(due)

    def _extend(self, due: list[Message]) -> None:
        """One Settle of extension ranges; a range with refused offsets is retried
        message by message, so exactly the lost leases are forgotten."""
        ranges = extend_ranges(due)
        sent = time.monotonic()
        try:
            results = self.receiver._send([], [r for r, _ in ranges])
        except StreamdError as err:
            log.info("%d lease(s) not extended: %s", len(due), err)
            return  # tried again on the next round while their leases last
        for (_, messages), result in zip(ranges, results):
            if not result.refused and not result.HasField("error"):
                for msg in messages:
                    msg.lease_expires_ms = result.lease_expires_ms
                    msg.deadline = sent + msg.lease_s
                continue
            for msg in messages:
                try:
                    self.receiver.extend(msg, int(msg.lease_s * 1000))
                except StreamdError as err:
                    log.info("lease of %s/%d@%d not extended: %s", msg.topic, msg.partition, msg.offset, err)
                    self.forget(msg)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class AsyncPool:
    """One ``AsyncQueueReceiver.process`` run: a receive loop feeding handler tasks
    (at most ``concurrency`` at once), the lease extender, and the stop."""

    def __init__(self, receiver: AsyncQueueReceiver, handler: Callable[[Message], Awaitable[object]], *,
                 concurrency: int, stop: asyncio.Event, max_messages: int | None) -> None:
        self.r, self.handler, self.concurrency = receiver, handler, concurrency
        self.stop, self.max_messages, self.done = stop, max_messages, 0
        self.abandon = asyncio.Event()
        self.limit = asyncio.Semaphore(concurrency)
        self.tasks: dict[asyncio.Task, Message] = {}
        self.watched: dict[int, Message] = {}
        self.signals = 0
        #: The group acks records as it hands them out: receive no more than there
        #: are free handler slots, and start what was received even when stopping.
        self.at_most_once = False

    def signalled(self, signum: int) -> None:
        self.signals += 1
        where = f"queue {self.r.group}/{self.r.topic}: {signal_name(signum)}"
        if self.signals == 1:
            log.info("%s: stopping (again to stop waiting for the handlers)", where)
            self.stop.set()
        else:
            log.warning("%s again: cancelling the handlers running", where)
            self.abandon.set()

    async def run(self, grace_s: float, signals: Sequence[int]) -> int:
        """Handle messages until stopped; how many were handled."""
        if not self.stop.is_set():
            self.at_most_once = await self.r._at_most_once()
        extender = asyncio.create_task(self._extend_leases())
        try:
            with loop_signals(asyncio.get_running_loop(), signals, self.signalled):
                await self._receive_loop()
                await self._finish(grace_s)
        finally:
            extender.cancel()
            await asyncio.gather(extender, return_exceptions=True)
            await self._give_up()
            await self.r.flush()
        return self.done

    async def _receive_loop(self) -> None:
        """Receive and start handlers until stopped. One receive at a time, so what
        a stop hands back (the messages waiting for a slot) cannot be leased again by
        this pool."""
        r = self.r
        while not self.stop.is_set():
            count = min(r.max_records, self.concurrency)
            if self.max_messages is not None:  # no more than the run still needs (see ThreadPool._capped)
                count = max(1, min(count, self.max_messages - self.done - len(self.tasks)))
            if self.at_most_once:
                if not await self._slot():  # wait for a free slot...
                    return
                self.limit.release()  # ...and receive no more than there are free
                count = min(count, self.concurrency - len(self.tasks))
            try:
                messages = await r.receive(count, max_wait_ms=200)
            except StreamdError as err:
                if self.stop.is_set():
                    return  # cut short by the stop: not a failure
                log.warning("queue %s/%s: receive failed: %s", r.group, r.topic, err)
                await asyncio.sleep(0.5)
                continue
            if messages and not messages[0].lease_id:
                self.at_most_once = True  # learnt here if the group could not be described
            for msg in messages:
                if msg.lease_id:
                    self.watched[id(msg)] = msg
            for i, msg in enumerate(messages):
                if not await self._slot(acked=not msg.lease_id):
                    await self._release(messages[i:], "received but not started")
                    break
                task = asyncio.create_task(self._handle(msg))
                self.tasks[task] = msg
                task.add_done_callback(self._finished)
            await r.flush()

    async def _slot(self, *, acked: bool = False) -> bool:
        """Wait for a free handler slot; False when the pool stops first. ``acked``
        (an at-most-once record): a free slot is taken even when stopping."""
        if acked and not self.limit.locked():
            await self.limit.acquire()
            return True
        if self.stop.is_set():
            return False
        if not self.limit.locked():
            await self.limit.acquire()
            return True
        acquire = asyncio.ensure_future(self.limit.acquire())
        stopped = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait((acquire, stopped), return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not acquire.done():
            acquire.cancel()
        await asyncio.gather(acquire, stopped, return_exceptions=True)
        if acquire.cancelled():
            return False
        if self.stop.is_set():
            self.limit.release()
            return False
        return True

    async def _handle(self, msg: Message) -> None:
        try:
            await self.handler(msg)
        except Exception as exc:
            try:
                await self.r.settle(msg, "nack", reason=f"{type(exc).__name__}: {exc}"[:1000])
            except StreamdError as err:
                log.info("nack failed: %s", err)
        else:
            self.r.ack(msg)
        self.done += 1
        if self.max_messages is not None and self.done >= self.max_messages:
            self.stop.set()

    def _finished(self, task: asyncio.Task) -> None:
        self.limit.release()
        msg = self.tasks.pop(task, None)
        if msg is not None:
            self.watched.pop(id(msg), None)

    async def _finish(self, grace_s: float) -> None:
        """Wait for the handlers running: up to ``grace_s``, or until a second signal."""
        loop = asyncio.get_running_loop()
        until = loop.time() + grace_s
        abandon = asyncio.ensure_future(self.abandon.wait())
        try:
            while self.tasks and not self.abandon.is_set():
                left = until - loop.time()
                if left <= 0:
                    log.warning("queue %s/%s: %d handler(s) still running after %.0f s: cancelled",
                                self.r.group, self.r.topic, len(self.tasks), grace_s)
                    return
                await asyncio.wait((*self.tasks, abandon), timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abandon.cancel()
            await asyncio.gather(abandon, return_exceptions=True)

    async def _give_up(self) -> None:
        """Cancel the handlers still running and hand their messages back at once."""
        running = dict(self.tasks)
        if not running:
            return
        for task in running:
            task.cancel()
        await asyncio.wait(running, timeout=CANCEL_WAIT_S)
        await self._release([m for t, m in running.items() if t.cancelled()], "cancelled by the stop")

    async def _release(self, messages: list[Message], why: str) -> None:
        """Nack ``messages`` (not handled) with no delay, in one Settle of ranges; log
        the at-most-once ones (acked already: lost)."""
        for msg in messages:
            self.watched.pop(id(msg), None)
        log_unhandled(self.r.group, self.r.topic, messages, why)
        ranges = release_ranges(messages, STOPPING)
        if not ranges:
            return
        try:
            results: list | StreamdError = await self.r._send([], ranges)
        except StreamdError as err:
            results = err
        log_release(self.r.group, self.r.topic, len(messages), results)

    async def _extend_leases(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            due = [m for m in self.watched.values() if m.deadline - now < m.lease_s / 3]
            if due:
                for msg in await self.r._extend(due):
                    self.watched.pop(id(msg), None)
