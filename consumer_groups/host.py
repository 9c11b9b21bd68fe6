"""The broker as consumer groups see it: the one face they are given.

Consumer groups (lag, reset planning, queue groups) need a few things of the broker
that hosts them: its topics and their partitions' offsets, reads of stored frames,
an append (dead letters), a topic created on demand (a dead-letter topic), its clock
and whether it is serving or stopping. They take it as a constructor argument typed
by ``Broker`` below, a ``Protocol``: ``streamd.broker.broker.Broker`` satisfies it as
it is, and ``consumer_groups`` never imports ``streamd.broker`` (nor the servicers or
the SDK). The arrows point down: broker and consumer groups both stand on
``segments`` and the shared bottom (wire types, codec, clock); the server wires the
broker in.

Errors the broker raises through this face (unknown topic, bad name, stopping) are
the broker's and pass through unchanged; consumer groups raise their own
(``consumer_groups.errors``).

Only the members listed here may be used; mypy checks the broker against the face
where the server wires it in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from typing import Protocol

from segments import FrameHeader, ReadLimits
from streamd.clock import Clock


class ReadAnswer(Protocol):
    """Stored frames from the one holding the offset asked for, never past the high
    watermark, and where the partition stood."""

    @property
    def data(self) -> bytes: ...
    @property
    def log_start_offset(self) -> int: ...
    @property
    def log_end_offset(self) -> int: ...
    def frames(self) -> Iterator[FrameHeader]:
        """The headers of the frames in ``data``, in order."""
        ...


class Partition(Protocol):
    @property
    def high_watermark(self) -> int: ...
    @property
    def log_start_offset(self) -> int: ...
    def append_time_at(self, offset: int) -> int | None:
        """Append time of the batch holding ``offset``; None past the high watermark."""
        ...
    def wait_for_data(self, offset: int, timeout_s: float | None) -> Awaitable[bool]:
        """Until the high watermark passes ``offset`` (True), or the timeout (False)."""
        ...


class TopicSettings(Protocol):
    @property
    def max_record_bytes(self) -> int: ...


class TopicMeta(Protocol):
    @property
    def settings(self) -> TopicSettings: ...


class Topic(Protocol):
    @property
    def meta(self) -> TopicMeta: ...
    @property
    def partitions(self) -> Sequence[Partition]: ...


class Broker(Protocol):
    @property
    def clock(self) -> Clock: ...
    @property
    def state(self) -> str:
        """"starting", "serving", "stopping", ..."""
        ...
    @property
    def topics(self) -> Mapping[str, Topic]: ...

    def check_serving(self) -> None:
        """Raise (UNAVAILABLE) unless the broker is serving."""
    def stopping(self) -> asyncio.Future[None]:
        """Done once the broker begins to stop."""
        ...
    def topic(self, name: str) -> Topic:
        """The topic, else the broker's error (bad name, unknown topic)."""
        ...
    def partition(self, name: str, partition: int) -> Partition: ...
    def check_topic_name(self, name: str, *, field: str = "topic") -> str:
        """``name`` if it is a valid topic name, else the broker's error naming ``field``."""
        ...
    @property
    def max_topic_name_chars(self) -> int: ...
    def read(self, name: str, partition: int, offset: int, limits: ReadLimits) -> ReadAnswer: ...
    def offset_for(self, name: str, partition: int, *, position: str | None = None,
                   timestamp_ms: int | None = None) -> int:
        """The first offset at or after ``timestamp_ms`` (capped at the high watermark)."""
        ...
    def append(
        self, name: str, partition_batches: list[tuple[int, list[bytes]]], records: list[bytes]
    ) -> tuple[Sequence[object], Awaitable[None]]:
        """Append now; the awaitable completes once the records are as durable as the
        topic's policy promises."""
        ...
    def create_topic(self, name: str, partition_count: int, overrides: dict[str, object]) -> object: ...
