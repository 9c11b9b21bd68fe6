"""Send futures that cost one small object per record (kafka-python's
``FutureRecordMetadata``): each record's future points at its batch's shared
``BatchOutcome`` and its index in the batch; the outcome is resolved once per batch
and a record's ``RecordMetadata`` is made when asked for (``base_offset + index``).

- ``RecordFuture`` (blocking ``Producer.send``) is a ``concurrent.futures.Future``:
  ``result(timeout)``, ``exception(timeout)``, ``done()``, ``add_done_callback()``,
  ``concurrent.futures.wait``/``as_completed`` and ``asyncio.wrap_future`` work on it.
  Its state lives in the outcome (a property per field ``concurrent.futures`` reads);
  while pending it is *running* (the record is in the producer's hands): ``cancel()``
  returns False, as Kafka's does. Callbacks run on the thread that resolves it (the
  producer's loop thread), or at once when added to a done future.
- ``AsyncRecordFuture`` (``AsyncProducer.send``) is an asyncio future by duck typing
  (``asyncio.isfuture`` is true: ``await``, ``gather``, ``wait``, ``wait_for``,
  ``shield`` take it as a future). ``cancel()`` cancels that future object only (as
  an ``asyncio.Future`` of a sent record always did): the record is still delivered.

A batch that ``link``s a record sent before its partition was known resolves that
record's own single-record outcome with its metadata.

Thread-safety: an outcome is resolved on its producer's event loop; a
``RecordFuture`` may be waited on from any thread (``BatchOutcome.cond``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Generator
from concurrent.futures._base import FINISHED, RUNNING
from contextvars import Context
from typing import Any

from streamd.v1 import streamd_pb2 as pb

from .records import RecordMetadata

log = logging.getLogger("streamd.client")
#: Held while an outcome's condition is made, and while it finishes (so that a
#: condition made meanwhile is never missed).
_MAKING = threading.Lock()


class BatchOutcome:
    """The shared outcome of one batch (or of one record waiting for its partition):
    pending, then finished with a result or an exception (never both)."""

    __slots__ = ("topic", "partition", "count", "state", "base_offset", "append_time_ms", "durable", "duplicate",
                 "metas", "error", "_cond", "callbacks", "watched", "links", "loop", "loop_thread")

    def __init__(self, topic: str, partition: int, loop: asyncio.AbstractEventLoop, loop_thread: int | None,
                 count: int = 0) -> None:
        self.topic = topic
        self.partition = partition
        self.count = count  # records whose metadata it gives (1 for a whole send_batch)
        self.state = RUNNING
        self.base_offset = 0
        self.append_time_ms = 0
        self.durable = False
        self.duplicate = False
        self.metas: list[RecordMetadata] | None = None  # per index, when not base + index
        self.error: BaseException | None = None
        self._cond: threading.Condition | None = None  # made when a thread waits (most batches never)
        self.callbacks: list[tuple[Any, Callable[[Any], object], Context | None]] = []
        self.watched: list[RecordFuture] = []  # futures a concurrent.futures waiter watches
        self.links: list[tuple[int, BatchOutcome]] | None = None
        self.loop = loop
        self.loop_thread = loop_thread

    @property
    def cond(self) -> threading.Condition:
        cond = self._cond
        if cond is None:
            with _MAKING:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition()
        return cond

    @property
    def done(self) -> bool:
        return self.state is FINISHED

    def metadata(self, index: int) -> RecordMetadata:
        if self.error is not None:
            raise self.error
        if self.metas is not None:
            return self.metas[index]
        return RecordMetadata(self.topic, self.partition, self.base_offset + index, self.append_time_ms, self.durable,
                              self.duplicate)

    def link(self, index: int, outcome: BatchOutcome) -> None:
        """Resolve ``outcome`` (one record's) with this batch's record ``index``."""
        if self.links is None:
            self.links = []
        self.links.append((index, outcome))

    # -- resolving (on the loop) ----------------------------------------------
    def resolve(self, result: pb.PartitionProduceResult) -> None:
        if self.state is FINISHED:
            return
        self.partition = result.partition
        self.base_offset, self.append_time_ms = result.base_offset, result.append_time_ms
        self.durable, self.duplicate = result.durable, result.duplicate
        if result.deduplicated:
            seen = {d.index: d.offset for d in result.deduplicated}
            metas, offset = [], result.base_offset
            for i in range(self.count):
                if i in seen:
                    metas.append(RecordMetadata(self.topic, self.partition, seen[i], self.append_time_ms, self.durable,
                                                True))
                else:
                    metas.append(RecordMetadata(self.topic, self.partition, offset, self.append_time_ms, self.durable,
                                                self.duplicate))
                    offset += 1
            self.metas = metas
        self._finish()

    def resolve_with(self, meta: RecordMetadata) -> None:
        if self.state is not FINISHED:
            self.metas = [meta]
            self._finish()

    def fail(self, exc: BaseException) -> None:
        if self.state is not FINISHED:
            self.error = exc
            self._finish()

    def _finish(self) -> None:
        # A thread that makes the condition after this sees FINISHED under it; one
        # that made it before is woken through it (see ``cond``).
        with _MAKING:
            self.state = FINISHED
            cond = self._cond
        if cond is None:
            callbacks, self.callbacks = self.callbacks, []
        else:
            with cond:
                cond.notify_all()
                for future in self.watched:
                    for waiter in future._w:
                        if self.error is None:
                            waiter.add_result(future)
                        else:
                            waiter.add_exception(future)
                callbacks, self.callbacks = self.callbacks, []
        for future, fn, context in callbacks:
            future._run_callback(fn, context)
        if self.links:
            for index, outcome in self.links:
                if self.error is not None:
                    outcome.fail(self.error)
                else:
                    outcome.resolve_with(self.metadata(index))

    def wait(self, timeout: float | None) -> None:
        if self.state is not FINISHED and threading.get_ident() == self.loop_thread:
            raise concurrent.futures.InvalidStateError(
                "a send future waited on from its producer's own event-loop thread would never resolve")
        with self.cond:
            if not self.cond.wait_for(lambda: self.state is FINISHED, timeout):
                raise concurrent.futures.TimeoutError


class RecordFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """One record's future from ``Producer.send`` (see module docstring)."""

    def __init__(self, outcome: BatchOutcome, index: int) -> None:  # no super(): the state is the outcome's
        self._outcome = outcome
        self._index = index

    # What concurrent.futures.wait / as_completed read, kept by the outcome.
    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        return self._outcome.cond

    @property
    def _state(self) -> str:  # type: ignore[override]
        return self._outcome.state

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        # Called with the outcome's condition held (by concurrent.futures).
        waiters: list[Any] | None = self.__dict__.get("_w")
        if waiters is None:
            waiters = self._w = []  # type: ignore[var-annotated]
            self._outcome.watched.append(self)
        return waiters

    def __repr__(self) -> str:
        o = self._outcome
        if o.state is not FINISHED:
            return f"<RecordFuture {o.topic} pending>"
        if o.error is not None:
            return f"<RecordFuture {o.topic} raised {type(o.error).__name__}>"
        return f"<RecordFuture {o.topic} {self.result()!r}>"

    def cancel(self) -> bool:
        return False  # the record is in the producer's hands

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return self._outcome.state is not FINISHED

    def done(self) -> bool:
        return self._outcome.state is FINISHED

    def result(self, timeout: float | None = None) -> RecordMetadata:
        o = self._outcome
        if o.state is not FINISHED:
            o.wait(timeout)
        return o.metadata(self._index)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        o = self._outcome
        if o.state is not FINISHED:
            o.wait(timeout)
        return o.error

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        o = self._outcome
        with o.cond:
            if o.state is not FINISHED:
                o.callbacks.append((self, fn, None))
                return
        self._run_callback(fn, None)

    def _run_callback(self, fn: Callable[[Any], object], context: Context | None) -> None:
        try:
            fn(self)
        except Exception:
            log.exception("exception calling callback for %r", self)

    def set_running_or_notify_cancel(self) -> bool:
        return True

    def set_result(self, result: object) -> None:
        raise RuntimeError("a send future is resolved by its producer")

    def set_exception(self, exception: BaseException | None) -> None:
        raise RuntimeError("a send future is resolved by its producer")


class AsyncRecordFuture:
    """One record's future from ``AsyncProducer.send``: an asyncio future by duck
    typing (see module docstring)."""

    __slots__ = ("_outcome", "_index", "_asyncio_future_blocking", "_cancelled")

    def __init__(self, outcome: BatchOutcome, index: int) -> None:
        self._outcome = outcome
        self._index = index
        self._asyncio_future_blocking = False
        self._cancelled = False

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._outcome.loop

    def done(self) -> bool:
        return self._cancelled or self._outcome.state is FINISHED

    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self, msg: object = None) -> bool:
        """Cancel this future (not the record: it is still delivered)."""
        o = self._outcome
        if self.done():
            return False
        self._cancelled = True
        mine = [c for c in o.callbacks if c[0] is self]
        o.callbacks = [c for c in o.callbacks if c[0] is not self]
        for _, fn, context in mine:
            self._run_callback(fn, context)
        return True

    def result(self) -> RecordMetadata:
        if self._cancelled:
            raise asyncio.CancelledError
        o = self._outcome
        if o.state is not FINISHED:
            raise asyncio.InvalidStateError("Result is not set.")
        return o.metadata(self._index)

    def exception(self) -> BaseException | None:
        if self._cancelled:
            raise asyncio.CancelledError
        o = self._outcome
        if o.state is not FINISHED:
            raise asyncio.InvalidStateError("Exception is not set.")
        return o.error

    def add_done_callback(self, fn: Callable[[Any], object], *, context: Context | None = None) -> None:
        if self.done():
            self._run_callback(fn, context)
        else:
            self._outcome.callbacks.append((self, fn, context))

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        o = self._outcome
        kept = [c for c in o.callbacks if not (c[0] is self and c[1] == fn)]
        removed = len(o.callbacks) - len(kept)
        o.callbacks = kept
        return removed

    def _run_callback(self, fn: Callable[[Any], object], context: Context | None) -> None:
        self._outcome.loop.call_soon(fn, self, context=context)

    def __await__(self) -> Generator[Any, None, RecordMetadata]:
        if not self.done():
            self._asyncio_future_blocking = True
            yield self
        if not self.done():
            raise RuntimeError("await wasn't used with future")
        return self.result()

    __iter__ = __await__

    def __repr__(self) -> str:
        o = self._outcome
        state = "cancelled" if self._cancelled else "finished" if o.state is FINISHED else "pending"
        return f"<AsyncRecordFuture {o.topic} {state}>"


__all__ = ["AsyncRecordFuture", "BatchOutcome", "RecordFuture"]
