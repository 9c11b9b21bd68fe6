"""Group consumers: read a topic's partitions as one member of a consumer group.

``AsyncGroupConsumer`` (asyncio) is the engine (``_group_async``); ``GroupConsumer``
runs one on a private event-loop thread for blocking code (``_loop``): every method
and attribute below behaves the same on both, ``await``-ed on the first.

The broker assigns partitions (see the GroupService comment in the proto). The
membership stream (``_membership``) sends heartbeats and queues each assignment it
receives; the consumer applies assignments between fetches, so records, commits and
callbacks all happen where the caller reads (its task; for ``GroupConsumer``, its
thread):

- revoked partitions: their processed offsets are committed (at-least-once), the
  ``on_revoke`` callback runs, then the member acknowledges the generation so the
  broker can hand the partitions on;
- new partitions: reading starts at the group's committed offset, or at ``start``
  ("earliest"/"latest") when nothing is committed (or the commit is older than the
  log start), then ``on_assign`` runs;
- an operator reset (``offsets_reset``): every partition restarts from the
  committed offsets.

Callbacks take the set of (topic, partition); an ``AsyncGroupConsumer``'s may also
be coroutine functions.

Delivery: ``"at-least-once"`` (default) counts a record as processed once the caller
asks for the next one, and commits processed offsets every ``auto_commit_interval_ms``,
on revocation and on close (so the record in hand when the loop was left is read
again by the next owner); ``commit()`` with no argument also commits the record in
hand. ``"at-most-once"`` commits each fetched batch before its
records are handed out. With ``auto_commit_interval_ms=None`` call ``commit()``.

Leaving the loop inside a reply is safe: reading resumes at the record in hand once
the iterator is closed (a blocking ``for`` loop closes it as it is left; an
``async for`` loop closes it when the iterator is collected, or at once inside
``contextlib.aclosing``).

A commit that the broker refuses as stale (the partition moved, or an operator reset
fenced the generation) is dropped: the partition's new owner, or the reset, decides
where reading continues.

Damaged records (DATA_LOSS / CORRUPT_BATCH): the records before them are handed out,
then ``records()`` raises ``CorruptRecordsError`` (and again on each call while the
partition stays there). With ``skip_corrupt=True`` the member goes on at the range's
``next_offset``, logs a warning, and counts the range as processed, so the next
commit moves past it and the partition's next owner does not stop there either.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncGenerator, Iterable, Iterator
from typing import Any, Self

from ._channel import DEFAULT_TIMEOUT_S, Security
from ._group_async import RETRIABLE, AsyncGroupConsumer, Callback, TopicPartition, Turn
from ._loop import LoopThread, caller_waiting, on_caller
from .records import ConsumerRecord

__all__ = ["RETRIABLE", "AsyncGroupConsumer", "Callback", "GroupConsumer", "TopicPartition"]

log = logging.getLogger("streamd.client.group")


class _Engine(AsyncGroupConsumer):
    """A blocking GroupConsumer's engine: callbacks and unary calls go to the thread
    waiting for the operation that makes them (the caller's), as they did before the
    blocking consumer had an engine, so a callback may call the consumer again and a
    call blocks only its caller."""

    def __init__(self, owner: GroupConsumer, *args: Any, **kwargs: Any) -> None:
        self._owner = owner
        super().__init__(*args, **kwargs)

    async def _call(self, method: Any, request: Any) -> Any:
        if not caller_waiting():
            return await super()._call(method, request)
        owner = self._owner  # looked up on each call: ``GroupConsumer._call`` is the seam
        return await on_caller(lambda: owner._call(method, request))

    async def _callback(self, fn: Callback, tps: set[TopicPartition]) -> None:
        await on_caller(lambda: fn(tps))


class GroupConsumer:
    """A blocking group consumer: an ``AsyncGroupConsumer`` on a private event-loop
    thread. Takes the same arguments, except ``channel`` (its channel lives on its
    own loop)."""

    def __init__(self, group: str, topics: Iterable[str] | str, server: str | None = None, *,
                 security: Security | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, **options: Any) -> None:
        self._loop = LoopThread("streamd-group")
        self._reader: int | None = None  # the thread in records(), if any
        self._closed_event = threading.Event()

        async def make() -> _Engine:
            return _Engine(self, group, topics, server, security=security, timeout_s=timeout_s, **options)

        try:
            self._engine = self._loop.run(make())
        except BaseException:
            self._loop.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the engine's state, read-only here ------------------------------------------
    @property
    def group(self) -> str:
        return self._engine.group

    @property
    def topics(self) -> list[str]:
        return self._engine.topics

    @property
    def member_id(self) -> str:
        return self._engine.member_id

    @property
    def generation(self) -> int:
        return self._engine.generation

    @property
    def assigned(self) -> set[TopicPartition]:
        return self._engine.assigned

    @property
    def positions(self) -> dict[TopicPartition, int]:
        return self._engine.positions

    @property
    def processed(self) -> dict[TopicPartition, int]:
        return self._engine.processed

    @property
    def committed(self) -> dict[TopicPartition, int]:
        return self._engine.committed

    @property
    def timeout_s(self) -> float:
        return self._engine.timeout_s

    # -- public ---------------------------------------------------------------------
    def records(self, *, idle_timeout_s: float | None = None) -> Iterator[ConsumerRecord]:
        """As ``AsyncGroupConsumer.records``; the records are handed out on this
        thread, one hop to the loop per fetch round."""
        engine = self._engine
        self._reader = threading.get_ident()
        rounds = engine._rounds(idle_timeout_s)
        try:
            # A close() in the loop's body ends it after the turn in hand.
            while not self._loop.closed and (turns := self._loop.run(_next(rounds))):
                for turn in turns:
                    if engine._close_requested or self._loop.closed:
                        break
                    if engine._between_turns():
                        self._loop.run(engine._apply_events())
                    yield from engine._hand_out(turn)
        finally:
            if not self._loop.closed:
                self._loop.run(rounds.aclose())
            self._reader = None
            if engine._close_requested and not engine._closed:
                self._shutdown()

    def wait_for_assignment(self, timeout_s: float = 10.0) -> set[TopicPartition]:
        return self._loop.run(self._engine.wait_for_assignment(timeout_s))

    def poll_assignment(self) -> set[TopicPartition]:
        return self._loop.run(self._engine.poll_assignment())

    def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        self._loop.run(self._engine.commit(offsets))

    def close(self, *, leave: bool | None = None, timeout_s: float = 30.0) -> None:
        """As ``AsyncGroupConsumer.close``. Safe to call from another thread (a signal
        handler, a stop hook): the reading thread then closes at its next reply
        boundary, and this call waits for it."""
        engine = self._engine
        if engine._closed and self._loop.closed:
            return
        engine._leave = leave
        reader = self._reader
        if reader is not None and reader != threading.get_ident():
            engine._close_requested = True
            self._loop.loop.call_soon_threadsafe(engine._wake.set)
            if self._closed_event.wait(timeout_s):
                return
            log.warning("group %s: the reading thread did not stop within %.0f s; closing anyway",
                        self.group, timeout_s)
        self._shutdown()

    def _shutdown(self) -> None:
        try:
            if not self._loop.closed:
                self._loop.run(self._engine._finish_close())
        finally:
            self._loop.close()
            self._closed_event.set()

    def _call(self, method: Any, request: Any) -> Any:
        """One unary call of the engine, made and waited for on this thread."""
        return self._loop.run(self._engine._calls.acall(method, request))


async def _next(rounds: AsyncGenerator[list[Turn], None]) -> list[Turn]:
    try:
        return await anext(rounds)
    except StopAsyncIteration:
        return []
