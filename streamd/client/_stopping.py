"""Stopping a queue worker pool on a signal (``QueueReceiver.process`` and
``AsyncQueueReceiver.process``).

While a pool runs on the main thread, SIGINT and SIGTERM (``STOP_SIGNALS``) no longer
raise ``KeyboardInterrupt`` or end the process: the first asks the pool to stop (stop
receiving, let the handlers in flight finish, hand back what was not started, flush
the acks), a second one stops waiting for the handlers, as the broker does with its
own shutdown. The previous handlers are put back when the pool returns; a signal
ignored when the pool starts (SIG_IGN, as for a shell's background job) stays ignored.

A signal handler here only appends to a list (no lock: it runs on the main thread
between two bytecodes, possibly while that thread holds a lock the stop would take);
the pool's waiting loop looks at the list. On asyncio the loop's own signal handling
(``add_signal_handler``) already runs the callback from the loop, outside any handler.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

log = logging.getLogger("streamd.client.queue")

STOP_SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
#: How long a stopping pool waits for its handlers in flight before it gives up on them.
DEFAULT_STOP_GRACE_S = 30.0


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def caught_signals(signals: Sequence[int]) -> Iterator[list[int]]:
    """Record each of ``signals`` that arrives in the yielded list instead of its usual
    action, and put the previous handlers back on exit. Off the main thread (where
    Python cannot set handlers) nothing is installed and the list stays empty."""
    caught: list[int] = []
    if not signals or not _on_main_thread():
        yield caught
        return
    previous: dict[int, signal._HANDLER] = {}
    try:
        for sig in signals:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue  # ignored on purpose (a background job's SIGINT): left so
            previous[sig] = signal.signal(sig, lambda signum, _frame: caught.append(signum))
        yield caught
    finally:
        for sig, handler in previous.items():
            # None: the handler was not set from Python; the default is the best guess.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@contextmanager
def loop_signals(loop: asyncio.AbstractEventLoop, signals: Sequence[int],
                 callback: Callable[[int], None]) -> Iterator[None]:
    """Call ``callback(signum)`` on ``loop`` for each of ``signals`` while inside, when
    the loop runs on the main thread (and the platform has loop signal handlers); put
    the previous Python-level handlers back on exit."""
    installed: dict[int, signal._HANDLER] = {}
    if signals and _on_main_thread():
        for sig in signals:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:
                continue
            try:
                loop.add_signal_handler(sig, callback, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue
            installed[sig] = previous
    try:
        yield
    finally:
        for sig, previous in installed.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
