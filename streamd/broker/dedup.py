"""Idempotency keys: which keys one partition appended within its topic's dedup window.

On a topic with ``dedup_window_ms`` > 0, a record whose ``idempotency_key`` was
appended to the same partition within the last ``dedup_window_ms`` (by append time)
is not appended again; the producer is told the offset of the first one. Records
without a key are never deduplicated. Topics without a window have no
``DedupWindow`` at all and pay nothing.

Per key the window keeps the offset of the record appended first (about 150 bytes
with the key's string); keys leave it once older than the window (checked at every
lookup) or, past ``MAX_DEDUP_KEYS`` keys or ``MAX_DEDUP_KEY_CHARS`` characters of
keys, oldest first (a key evicted early can be appended again). The character
budget matters because a key is only limited by the record size: without it a
producer sending long keys would make the broker hold up to a million of them.

Nothing is persisted: opening a partition rebuilds the window from the log, reading
the batches appended within the last ``dedup_window_ms`` (``rebuild``). Start-up
therefore reads (and decodes) up to one window of data on dedup topics.

Invariants: ``_order`` lists (append_time_ms, key, offset) in append order, so times
are non-decreasing (append times are monotonic per partition); every key in
``_keys`` has its entry in ``_order`` and nothing older than the window once
``evict`` ran. Not thread-safe: the event-loop thread owns it.
"""

from __future__ import annotations

from collections import deque

import lz4.frame

from segments import CorruptRecords, PartitionLog
from streamd.v1 import streamd_pb2 as pb

from .log_scan import iter_batches

MAX_DEDUP_KEYS = 1_000_000
MAX_DEDUP_KEY_CHARS = 64 * 1024 * 1024


class DedupWindow:
    def __init__(self, window_ms: int, *, max_keys: int = MAX_DEDUP_KEYS,
                 max_key_chars: int = MAX_DEDUP_KEY_CHARS) -> None:
        if window_ms <= 0:
            raise ValueError("window_ms must be positive")
        self.window_ms = window_ms
        self.max_keys = max_keys
        self.max_key_chars = max_key_chars
        self._keys: dict[str, int] = {}  # key -> offset; kept small: up to a million
        self._order: deque[tuple[int, str, int]] = deque()
        self._chars = 0  # characters of the keys listed in _order

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, key: str, now_ms: int) -> int | None:
        """The offset of the record appended with ``key`` within the window, if any."""
        self.evict(now_ms)
        return self._keys.get(key)

    def offset_of(self, key: str) -> int | None:
        """The offset remembered for ``key`` (answering a retry)."""
        return self._keys.get(key)

    def add(self, keys: list[str], base_offset: int, append_time_ms: int) -> None:
        """Remember the keyed records of one stored batch (record i at base_offset + i)."""
        entries, order = self._keys, self._order
        for i, key in enumerate(keys):
            if key:
                offset = base_offset + i
                entries[key] = offset
                order.append((append_time_ms, key, offset))
                self._chars += len(key)
        while len(entries) > self.max_keys or self._chars > self.max_key_chars:
            self._pop()

    def evict(self, now_ms: int) -> None:
        """Forget keys appended before the window."""
        limit = now_ms - self.window_ms
        order = self._order
        while order and order[0][0] < limit:
            self._pop()

    def _pop(self) -> None:
        _, key, offset = self._order.popleft()
        self._chars -= len(key)
        if self._keys.get(key) == offset:
            del self._keys[key]

    def rebuild(self, plog: PartitionLog, now_ms: int) -> int:
        """Load the keys of the batches appended within the window; batches read."""
        since = now_ms - self.window_ms
        read = 0
        try:
            start = plog.offset_for_time(since)
        except CorruptRecords as exc:  # the window may start in damage: scan from before it
            start = exc.first_offset
        for header, body in iter_batches(plog, start):
            if header.append_time_ms < since:
                continue
            keys = stored_keys(bytes(body))
            if keys is not None:
                self.add(keys, header.base_offset, header.append_time_ms)
            read += 1
        return read


def stored_keys(body: bytes) -> list[str] | None:
    """The idempotency key of every record of a stored batch body (None when no
    record has one, or the body cannot be decoded: reads report that)."""
    try:
        batch = pb.RecordBatch.FromString(body)
        payload = batch.records
        if batch.compression == pb.COMPRESSION_LZ4:
            payload = lz4.frame.decompress(payload)
        keys = [r.idempotency_key for r in pb.RecordSet.FromString(payload).records]
    except Exception:
        return None
    return keys if any(keys) else None
