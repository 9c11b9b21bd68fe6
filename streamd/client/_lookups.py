"""Topic lookups of a producer: ``DescribeTopic`` once per topic, shared by the
sends waiting for it; what it tells (partition count, ``max_record_bytes``) is kept
in the accumulator's ``topics`` once known. A failed lookup is not kept: the next
send looks again.

The lookup is retried like a produce (backoff, each attempt bounded by
``request_timeout_ms``) within each waiting record's delivery deadline: a record
whose deadline passes first fails with ``DEADLINE_EXCEEDED``/``DELIVERY_TIMEOUT``
(not stored); NOT_FOUND, PERMISSION_DENIED and the other ``FATAL_CODES`` fail at
once. A record sent to an explicit partition does not need the count: when the
lookup is refused (PERMISSION_DENIED: a principal that may produce but not describe;
UNIMPLEMENTED), it is sent without the checks the lookup allows, and the topic is
kept as not describable.

Lives on the producer's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from streamd.v1 import streamd_pb2 as pb

from ._accumulator import Accumulator, TopicInfo
from ._sender import Sender
from .errors import StreamdError

#: Refusals of a lookup after which a record with an explicit partition is sent anyway.
_UNDESCRIBABLE = {"PERMISSION_DENIED", "UNIMPLEMENTED"}


class _Lookup:
    """One topic's lookup in progress, shared by the calls waiting for it
    (``waiters``); ``last_error``: its last failed attempt."""

    __slots__ = ("task", "waiters", "last_error")

    def __init__(self) -> None:
        self.task: asyncio.Task[TopicInfo] | None = None
        self.waiters = 0
        self.last_error: StreamdError | None = None


class TopicLookups:
    def __init__(self, describe: Any, sender: Sender, accumulator: Accumulator, server: str, timeout_s: float) -> None:
        self._describe = describe  # TopicService.DescribeTopic
        self._sender = sender
        self._acc = accumulator
        self._server = server
        self._timeout_s = timeout_s
        self._lookups: dict[str, _Lookup] = {}

    def cancel(self) -> None:
        for lookup in list(self._lookups.values()):
            if lookup.task is not None:
                lookup.task.cancel()  # its waiters fail with PRODUCER_CLOSED

    async def partition_count(self, topic: str) -> int:
        """The topic's partition count. Waits at most ``request_timeout_ms``
        (retrying meanwhile), then fails with ``DEADLINE_EXCEEDED``/``TIMED_OUT``."""
        info = self._acc.topics.get(topic)
        if info is None or info.partition_count is None:
            timeout_s = self._timeout_s
            info = await self._wait(topic, asyncio.get_running_loop().time() + timeout_s, lambda last: StreamdError(
                "DEADLINE_EXCEEDED", "TIMED_OUT",
                f"no answer to DescribeTopic from {self._server} within {timeout_s:g} s{_last(last)}"))
        assert info.partition_count is not None
        return info.partition_count

    async def info_for(self, topic: str, deadline: float, *, pinned: bool) -> TopicInfo:
        """What a record sent with delivery ``deadline`` needs of its topic (``pinned``:
        it has an explicit partition)."""
        info = self._acc.topics.get(topic)
        if info is not None and (pinned or info.partition_count is not None):
            return info
        try:
            return await self._wait(topic, deadline, lambda last: StreamdError(
                "DEADLINE_EXCEEDED", "DELIVERY_TIMEOUT",
                f"record(s) for {topic} not stored: its partition count was not known within delivery_timeout_ms="
                f"{self._sender.delivery_timeout_s * 1000:g}{_last(last)}"))
        except StreamdError as exc:
            if not (pinned and exc.code in _UNDESCRIBABLE):
                raise
            info = TopicInfo(None, None)
            with self._acc.lock:
                self._acc.topics.setdefault(topic, info)
            return info

    async def _wait(self, topic: str, deadline: float, timed_out: Callable[[StreamdError | None], StreamdError]
                    ) -> TopicInfo:
        """Wait for the topic's shared lookup until ``deadline`` (loop time), then
        raise ``timed_out(last error)``; the lookup goes on for the other waiters and
        is given up when none is left."""
        lookup = self._lookups.get(topic)
        if lookup is None:
            lookup = self._lookups[topic] = _Lookup()
            lookup.task = asyncio.ensure_future(self._look_up(topic, lookup))
        task = lookup.task
        assert task is not None
        lookup.waiters += 1
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(task)
        except TimeoutError:
            raise timed_out(lookup.last_error) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current is not None and current.cancelling()):
                raise StreamdError("CANCELLED", "PRODUCER_CLOSED",
                                   f"the producer was closed before the partition count of {topic} was known") from None
            raise
        finally:
            lookup.waiters -= 1
            if not lookup.waiters and not task.done():
                # Nobody waits for it: give it up now (not when the task gets to
                # it), so that the next send starts a lookup of its own.
                task.cancel()
                if self._lookups.get(topic) is lookup:
                    del self._lookups[topic]

    async def _look_up(self, topic: str, lookup: _Lookup) -> TopicInfo:
        """DescribeTopic until it answers or fails for good (FATAL_CODES); keeps what it
        tells. A failure is not kept (the lookup leaves ``_lookups`` either way)."""
        try:
            reply: pb.DescribeTopicResponse = await self._sender.call_retrying(
                self._describe, pb.DescribeTopicRequest(topic=topic),
                failed=lambda exc: setattr(lookup, "last_error", exc))
            config = reply.topic.config
            info = TopicInfo(reply.topic.partition_count,
                             config.max_record_bytes if config.HasField("max_record_bytes") else None)
            with self._acc.lock:
                self._acc.topics[topic] = info
            return info
        finally:
            if self._lookups.get(topic) is lookup:
                del self._lookups[topic]


def _last(error: StreamdError | None) -> str:
    return "" if error is None else f" (last error: {error})"
