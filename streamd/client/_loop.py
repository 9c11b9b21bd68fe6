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
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: How long ``close`` waits for the loop thread to end.
JOIN_TIMEOUT_S = 5.0
#: How long an interrupted ``run`` waits for its operation to be cancelled.
CANCEL_WAIT_S = 2.0


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
        self._abandoned = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        self.loop.run_forever()
        if self._abandoned:  # no one will close it: its owner is gone
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and return its result (or raise its exception),
        running meanwhile on this thread whatever it hands back (``on_caller``). An
        interrupt of this thread (KeyboardInterrupt, or any exception a signal handler
        or the work handed back raises here) cancels the operation, waits up to
        ``CANCEL_WAIT_S`` for it to end (so the client may be called again at once),
        and is raised."""
        if threading.current_thread() is self._thread or self.closed:
            coro.close()
            raise RuntimeError("the client is closed" if self.closed else
                               "a blocking streamd client was called from its own event-loop thread")
        inbox = _Inbox()
        outcome: concurrent.futures.Future[T] = concurrent.futures.Future()
        tasks: list[asyncio.Task[T]] = []

        async def operation() -> T:
            _INBOX.set(inbox)
            return await coro

        def ended(task: asyncio.Task[T]) -> None:
            # The operation's end, cancelled or not (set before the inbox hears of it).
            coro.close()  # a no-op, unless it was cancelled before it started
            if task.cancelled():
                outcome.cancel()
            elif (exc := task.exception()) is not None:
                outcome.set_exception(exc)
            else:
                outcome.set_result(task.result())
            inbox.items.put(None)

        def start() -> None:
            task = self.loop.create_task(operation())
            tasks.append(task)
            task.add_done_callback(ended)

        try:
            self.loop.call_soon_threadsafe(start)
        except RuntimeError:  # closed meanwhile
            coro.close()
            raise RuntimeError("the client is closed") from None
        try:
            while (work := inbox.items.get()) is not None:
                work()
        except BaseException:
            inbox.open = False
            self._cancel(tasks, inbox)
            raise
        finally:
            inbox.open = False
        return outcome.result()

    def _cancel(self, tasks: list[asyncio.Task[Any]], inbox: _Inbox) -> None:
        """Cancel an interrupted operation and wait (bounded) for it to end; the work
        it still hands back is dropped (its task is being cancelled)."""
        try:
            self.loop.call_soon_threadsafe(lambda: [task.cancel() for task in tasks])
        except RuntimeError:  # the loop is closed: nothing runs there any more
            return
        deadline = time.monotonic() + CANCEL_WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                if inbox.items.get(timeout=left) is None:
                    return
            except queue.Empty:
                return

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

    def abandon(self, coro: Coroutine[Any, Any, object]) -> None:
        """For a client collected without ``close()`` (from a ``weakref.finalize``, on
        whatever thread the collector runs): run ``coro`` (the client's own close, for
        up to ``JOIN_TIMEOUT_S``), then stop and close the loop on its thread, without
        waiting for any of it."""

        async def last() -> None:
            try:
                await asyncio.wait_for(coro, JOIN_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - nothing to report it to
                pass
            finally:
                await _cancel_the_rest()
                self._abandoned = True
                self.loop.stop()

        try:
            asyncio.run_coroutine_threadsafe(last(), self.loop)
        except RuntimeError:  # already closed
            coro.close()

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
        except Exception as exc:  # handed to the waiting coroutine, which raises it
            loop.call_soon_threadsafe(_fail, done, exc)
        # What is not an Exception (KeyboardInterrupt, SystemExit), raised on the loop,
        # would stop the loop thread (asyncio lets it out of run_forever) and leave
        # the caller waiting for ever. It goes up the caller's stack, and ``run``
        # cancels the operation.
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
