"""OffsetStore: the committed offsets of stream consumer groups, crash-safe.

Owns ``DIR/offsets.journal``, a ``consumer_groups.journal.Journal`` whose operations are::

    {"op":"commit","g":G,"o":[[topic,partition,offset,metadata,commit_time_ms],...]}
    {"op":"delete_group","g":G}              offsets and undo record of G
    {"op":"delete_topic","t":T}              every group's offsets and undo entries for T
    {"op":"delete_partitions","g":G,"p":[[topic,partition],...]}   offsets only
    {"op":"undo","g":G,"o":[[topic,partition,offset],...]}         replaces G's record

State is the result of replaying the operations in order. A write call returns only
once its operation is fsynced, and memory changes only then, in operation order, so
readers never see what a crash could take back. A failed write fails its callers
(``segments.DiskFull`` when there was no room, else ``OffsetStoreFailed``) and leaves
memory unchanged; the next write first rewrites the journal from memory (see
``journal``), so the store works again by itself once the disk has room, holding
exactly what was acknowledged. A failed call's operation may still reappear after a
crash before that rewrite: not acknowledged does not mean not applied. Snapshots (for
compaction and that rewrite) are one commit operation per group plus one undo
operation per undo record.

Not thread-safe: construct it before serving (open does blocking I/O) and call every
method from one event loop thread. Reads are plain in-memory lookups.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .journal import DEFAULT_COMPACT_BYTES, Journal, JournalFailed

if TYPE_CHECKING:
    from streamd.clock import Clock

JOURNAL_NAME = "offsets.journal"

TopicPartition = tuple[str, int]


class OffsetStoreFailed(JournalFailed):
    """A write failed (other than for lack of space), or the store is closed."""


@dataclass(frozen=True, slots=True)
class CommittedOffset:
    offset: int
    metadata: str
    commit_time_ms: int


class OffsetStore:
    """Committed offsets keyed by (group, topic, partition), plus one undo record per
    group (the offsets before its last reset). See the module docstring for the format."""

    def __init__(
        self,
        directory: Path,
        *,
        clock: Clock,
        executor: concurrent.futures.Executor | None = None,
        compact_bytes: int = DEFAULT_COMPACT_BYTES,
    ) -> None:
        self._clock = clock
        self._offsets: dict[str, dict[TopicPartition, CommittedOffset]] = {}
        self._undo: dict[str, dict[TopicPartition, int]] = {}
        self._journal = Journal(
            Path(directory) / JOURNAL_NAME,
            apply=self._apply,
            snapshot=self._snapshot,
            executor=executor,
            compact_bytes=compact_bytes,
        )

    # -- reading -------------------------------------------------------------
    def get(self, group: str, topic: str, partition: int) -> CommittedOffset | None:
        return self._offsets.get(group, {}).get((topic, partition))

    def offsets(self, group: str) -> dict[TopicPartition, CommittedOffset]:
        return dict(self._offsets.get(group, {}))

    def groups(self) -> list[str]:
        return sorted(self._offsets)

    def undo_groups(self) -> list[str]:
        return sorted(self._undo)

    def topics(self) -> set[str]:
        """Topics any group has an offset or undo entry for."""
        return {t for table in (self._offsets, self._undo) for entries in table.values() for t, _ in entries}

    def last_commit_ms(self, group: str) -> int:
        return max((c.commit_time_ms for c in self._offsets.get(group, {}).values()), default=0)

    def undo_offsets(self, group: str) -> dict[TopicPartition, int] | None:
        undo = self._undo.get(group)
        return None if undo is None else dict(undo)

    @property
    def journal_bytes(self) -> int:
        return self._journal.size

    # -- writing -------------------------------------------------------------
    async def commit(self, group: str, offsets: Mapping[TopicPartition, tuple[int, str]]) -> None:
        _check_name(group, "group")
        now_ms = self._clock.now_ms()
        entries = []
        for key, value in offsets.items():
            topic, partition = _check_key(key)
            if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str)):
                raise ValueError(f"offset and metadata must be a (int, str) tuple, not {value!r}")
            entries.append([topic, partition, _check_index(value[0], "offset"), value[1], now_ms])
        if entries:
            await self._submit({"op": "commit", "g": group, "o": entries})

    async def delete_group(self, group: str) -> None:
        await self._submit({"op": "delete_group", "g": _check_name(group, "group")})

    async def delete_topic(self, topic: str) -> list[str]:
        """Remove every group's offsets (and undo entries) for ``topic``; the groups affected."""
        return await self._submit({"op": "delete_topic", "t": _check_name(topic, "topic")})

    async def delete_partitions(self, group: str, partitions: Iterable[TopicPartition]) -> None:
        """Remove committed offsets only: an undo record still restores what it saved."""
        keys = [list(_check_key(key)) for key in partitions]
        await self._submit({"op": "delete_partitions", "g": _check_name(group, "group"), "p": keys})

    async def save_undo(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        # -1: the group had no committed offset there (undo removes the commit).
        entries = [[*_check_key(key), _check_index(offset, "offset", minimum=-1)] for key, offset in offsets.items()]
        await self._submit({"op": "undo", "g": _check_name(group, "group"), "o": entries})

    async def close(self) -> None:
        """Refuse new writes, wait for queued ones, close the file. Idempotent."""
        await self._journal.close()

    async def _submit(self, op: dict) -> Any:
        try:
            future = self._journal.write(op, then=self._apply)
        except JournalFailed as exc:
            raise OffsetStoreFailed(exc.errno, exc.strerror) from None
        try:
            return await future
        except JournalFailed as exc:
            raise OffsetStoreFailed(exc.errno, exc.strerror) from None

    def _snapshot(self) -> list[dict]:
        ops: list[dict] = []
        for group, offsets in self._offsets.items():
            entries = [[t, p, c.offset, c.metadata, c.commit_time_ms] for (t, p), c in offsets.items()]
            ops.append({"op": "commit", "g": group, "o": entries})
        for group, undo in self._undo.items():
            ops.append({"op": "undo", "g": group, "o": [[t, p, o] for (t, p), o in undo.items()]})
        return ops

    # -- applying operations (live and in recovery) --------------------------
    def _apply(self, op: dict) -> Any:
        """Apply one decoded operation; checks everything before changing anything, so
        a malformed frame read in recovery raises (KeyError/TypeError/ValueError) and
        leaves the state as it was."""
        kind = op["op"]
        if kind == "commit":
            group = _check_name(op["g"], "group")
            parsed = [(_check_key((t, p)), _committed(o, m, ms)) for t, p, o, m, ms in op["o"]]
            if parsed:
                self._offsets.setdefault(group, {}).update(parsed)
            return None
        if kind == "delete_group":
            group = _check_name(op["g"], "group")
            self._offsets.pop(group, None)
            self._undo.pop(group, None)
            return None
        if kind == "delete_topic":
            return self._remove_topic(_check_name(op["t"], "topic"))
        if kind == "delete_partitions":
            group = _check_name(op["g"], "group")
            keys = [_check_key((t, p)) for t, p in op["p"]]
            offsets = self._offsets.get(group, {})
            for key in keys:
                offsets.pop(key, None)
            if not offsets:
                self._offsets.pop(group, None)
            return None
        if kind == "undo":
            group = _check_name(op["g"], "group")
            self._undo[group] = {_check_key((t, p)): _check_index(o, "offset", minimum=-1) for t, p, o in op["o"]}
            return None
        raise ValueError(f"unknown operation {kind!r}")

    def _remove_topic(self, topic: str) -> list[str]:
        affected = set()
        tables: tuple[dict[str, dict[TopicPartition, Any]], ...] = (self._offsets, self._undo)
        for table in tables:
            for group, entries in list(table.items()):
                keys = [key for key in entries if key[0] == topic]
                for key in keys:
                    del entries[key]
                if keys:
                    affected.add(group)
                    if not entries and table is self._offsets:
                        del table[group]  # groups() lists only groups with offsets
        return sorted(affected)


# -- validation (defence in depth: the broker checks names first) -----------
def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, not {value!r}")
    return value


def _committed(offset: object, metadata: object, commit_time_ms: object) -> CommittedOffset:
    if not isinstance(metadata, str):
        raise ValueError(f"metadata must be a string, not {metadata!r}")
    return CommittedOffset(_check_index(offset, "offset"), metadata, _check_index(commit_time_ms, "commit_time_ms"))


def _check_index(value: object, what: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, not {value!r}")
    return value


def _check_key(key: object) -> TopicPartition:
    if not isinstance(key, (tuple, list)) or len(key) != 2:
        raise ValueError(f"a partition key must be (topic, partition), not {key!r}")
    return _check_name(key[0], "topic"), _check_index(key[1], "partition")
