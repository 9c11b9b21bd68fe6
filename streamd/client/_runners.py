"""How the queue worker pool (``_pools.Pool``) calls its handlers: the one thing
that differs between ``AsyncQueueReceiver.process`` and ``QueueReceiver.process``.

- ``TaskRunner``: ``concurrency`` worker tasks on the engine's loop, each awaiting a
  coroutine handler; one receive in flight; one receive's worth held ahead of the
  handlers (as the asyncio pool always did); given up on: cancelled, and their
  messages handed back;
- ``ThreadRunner``: ``workers`` daemon threads (a handler the pool gave up on does not
  keep the process alive), each calling a blocking handler; a receive in flight per
  thread, a batch each. A thread takes its next message straight from the pool's
  deque (``Pool.take``: no hop to the loop per message), and goes to the loop only to
  wait for more (``Pool.next_message``) or to nack. Given up on: a thread cannot be
  cancelled; its record stays leased (no longer extended) until the lease ends.

Both run the same steps per message: take, handler, ack (queued) or nack, finished.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from ._message import Message

if TYPE_CHECKING:
    from ._pools import Pool

#: How long handlers cancelled by a stopping pool get to unwind.
CANCEL_WAIT_S = 5.0


class Runner(Protocol):
    """How a pool calls its handler: ``slots`` handlers at once, up to ``receives``
    receives in flight; ``ahead``: one receive's worth (up to ``slots``) is held ahead
    of the handlers, busy or not (else a handler with nothing to do gets a batch)."""

    slots: int
    receives: int
    ahead: bool

    def batch(self, max_records: int) -> int:
        """How many messages received wake one idle worker."""

    def start(self, pool: Pool) -> list[asyncio.Future[None]]: ...
    def abandon(self, pool: Pool) -> str: ...
    async def give_up(self, pool: Pool, workers: list[asyncio.Future[None]]) -> None: ...


class TaskRunner:
    """Coroutine handlers: ``concurrency`` worker tasks on the loop."""

    receives = 1  # what a stop hands back waits for the receive anyway; one keeps the loop light
    ahead = True

    def __init__(self, handler: Callable[[Message], Awaitable[object]], concurrency: int) -> None:
        self.handler, self.slots = handler, concurrency

    def batch(self, max_records: int) -> int:
        return 1

    def start(self, pool: Pool) -> list[asyncio.Future[None]]:
        return [asyncio.ensure_future(self._work(pool, slot)) for slot in range(self.slots)]

    async def _work(self, pool: Pool, slot: int) -> None:
        while (msg := await pool.next_message(slot)) is not None:
            began = time.monotonic()
            try:
                await self.handler(msg)
            except Exception as exc:
                await pool.nack(msg, exc)
            else:
                pool.ack(msg)
            pool.finished(slot, msg, began)

    def abandon(self, pool: Pool) -> str:
        return "cancelling the handlers running"

    async def give_up(self, pool: Pool, workers: list[asyncio.Future[None]]) -> None:
        """Cancel the handlers still running and hand their messages back at once."""
        if not workers:
            return
        for task in workers:
            task.cancel()
        await asyncio.wait(workers, timeout=CANCEL_WAIT_S)
        await pool.release(list(pool.running.values()), "cancelled by the stop")


class ThreadRunner:
    """Blocking handlers: ``workers`` daemon threads (a handler the pool gave up on
    does not keep the process alive)."""

    ahead = False  # a thread handles a batch in turn, as if it received its own

    def __init__(self, handler: Callable[[Message], object], workers: int) -> None:
        self.handler, self.slots, self.receives = handler, workers, workers

    def batch(self, max_records: int) -> int:
        return max_records

    def start(self, pool: Pool) -> list[asyncio.Future[None]]:
        futures: list[asyncio.Future[None]] = []
        for slot in range(self.slots):
            ended: asyncio.Future[None] = pool.loop.create_future()
            threading.Thread(target=self._work, args=(pool, slot, ended), name=f"streamd-worker-{slot}",
                             daemon=True).start()
            futures.append(ended)
        return futures

    def _work(self, pool: Pool, slot: int, ended: asyncio.Future[None]) -> None:
        try:
            while True:
                msg = pool.take(slot)
                if msg is None:
                    msg = pool.wait_on_loop(pool.next_message(slot))
                    if msg is None:
                        return
                began = time.monotonic()
                try:
                    self.handler(msg)
                except Exception as exc:
                    pool.wait_on_loop(pool.nack(msg, exc))
                else:
                    pool.ack(msg)
                pool.finished(slot, msg, began)
        finally:
            pool.on_loop(lambda: _resolve(ended))

    def abandon(self, pool: Pool) -> str:
        return f"not waiting for the handlers running; {pool.abandoned()}"

    async def give_up(self, pool: Pool, workers: list[asyncio.Future[None]]) -> None:
        """A thread cannot be cancelled: its record stays leased (no longer extended)
        until the lease ends."""
        for msg in list(pool.running.values()):
            pool.watched.pop(id(msg), None)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
