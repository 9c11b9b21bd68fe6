"""The event-loop thread a blocking client runs its asyncio engine on.

Every blocking client (``Producer``, ``Admin``, ``GroupConsumer``) is a thin wrapper
over its asyncio counterpart, so each behaviour is written once. The wrapper owns a
``LoopThread``: a private event loop on a daemon thread. ``run(coro)`` runs one
operation of the engine there and blocks the calling thread until it ends.

While it waits, the calling thread is not idle: the operation may hand work back to
it (``on_caller``). The group consumer runs its ``on_assign``/``on_revoke`` callbacks
and its unary calls that way, so they happen on the caller's thread as the blocking
API promises, and a callback may call the client again (``commit()`` inside
``on_revoke``) without waiting on the loop it is blocking. Which thread to hand work
to is carried by a context variable set inside the operation's task (tasks it starts
inherit it); an operation run by an asyncio user has none, and the work runs on the
loop.

Thread-safety: ``run``, ``submit`` and ``close`` may be called from any thread but
the loop's own (``run`` there would wait for itself: it raises instead).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: How long ``close`` waits for the loop thread to end.
JOIN_TIMEOUT_S = 5.0


class _Inbox:
    """The work an operation hands to the thread blocked in ``run`` for it; ``None``
    in the queue means the operation ended. ``open`` is False once ``run`` returned."""

    __slots__ = ("items", "open")

    def __init__(self) -> None:
        self.items: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.open = True


_INBOX: contextvars.ContextVar[_Inbox | None] = contextvars.ContextVar("streamd_client_inbox", default=None)


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and return its result (or raise its exception),
        running meanwhile on this thread whatever it hands back (``on_caller``). An
        interrupt of this thread (KeyboardInterrupt) cancels the operation."""
        if threading.current_thread() is self._thread or self.closed:
            coro.close()
            raise RuntimeError("the client is closed" if self.closed else
                               "a blocking streamd client was called from its own event-loop thread")
        inbox = _Inbox()

        async def operation() -> T:
            _INBOX.set(inbox)
            return await coro

        future = asyncio.run_coroutine_threadsafe(operation(), self.loop)
        future.add_done_callback(lambda _: inbox.items.put(None))
        try:
            while (work := inbox.items.get()) is not None:
                work()
            return future.result()
        except BaseException:
            future.cancel()
            raise
        finally:
            inbox.open = False

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the loop without waiting (its work runs on the loop)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        """Stop the loop and its thread: the tasks still running (a grpc call's
        request writer, say) are cancelled and given ``JOIN_TIMEOUT_S`` to end, as
        ``asyncio.run`` does, then the loop stops."""
        if self.loop.is_closed():
            return
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            try:
                asyncio.run_coroutine_threadsafe(_cancel_the_rest(), self.loop).result(JOIN_TIMEOUT_S)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass  # stop anyway
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(JOIN_TIMEOUT_S)
        if not self._thread.is_alive():
            self.loop.close()

    @property
    def closed(self) -> bool:
        return self.loop.is_closed() or not self._thread.is_alive()


async def on_caller(fn: Callable[[], T]) -> T:
    """``fn()`` run on the thread blocked in ``LoopThread.run`` for the current
    operation; on the loop itself when there is none (an asyncio user, or the
    operation's caller stopped waiting)."""
    inbox = _INBOX.get()
    if inbox is None or not inbox.open:
        return fn()
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def work() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the waiting coroutine, which raises it
            loop.call_soon_threadsafe(_fail, done, exc)
        else:
            loop.call_soon_threadsafe(_resolve, done, result)

    inbox.items.put(work)
    return await done


def _resolve(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def caller_waiting() -> bool:
    """Whether a thread waits in ``LoopThread.run`` for the current operation."""
    inbox = _INBOX.get()
    return inbox is not None and inbox.open


async def _cancel_the_rest() -> None:
    current = asyncio.current_task()
    rest = [task for task in asyncio.all_tasks() if task is not current]
    for task in rest:
        task.cancel()
    if rest:
        await asyncio.wait(rest, timeout=JOIN_TIMEOUT_S)
    await asyncio.get_running_loop().shutdown_asyncgens()
