"""Partition.read against a plain list model: random appends, a random high
watermark (an fsync=always partition: readers see up to the last flush), retention,
and reads at random offsets with random limits return exactly the model's frames
below the watermark; out of range is OffsetOutOfRange naming [log start, watermark]."""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from segments import OffsetOutOfRange, PartitionLog, ReadLimits
from segments.batch import HEADER_SIZE
from streamd.broker.batches import CheckedBatch
from streamd.broker.partition import Partition

from ..framing import frames

SEGMENT_BYTES = 200


class PartitionReadModel(RuleBasedStateMachine):
    directory = None  # set per test run (inside tmp_path)
    counter = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.executor = ThreadPoolExecutor(1)
        log = PartitionLog.open(self.directory / f"p{next(self.counter)}", segment_bytes=SEGMENT_BYTES,
                                segment_ms=10**9, index_interval_bytes=50, now_ms=0, name="t/0")
        self.part = Partition("t", 0, log, executor=self.executor, fsync_always=True)
        self.batches: list[tuple[int, int, int, bytes]] = []  # (base, count, time, body)
        self.log_start = 0
        self.high_watermark = 0
        self.now = 0

    def teardown(self) -> None:
        self.part.close()
        self.part.close_log()
        self.executor.shutdown()

    @property
    def log_end(self) -> int:
        return self.batches[-1][0] + self.batches[-1][1] if self.batches else self.log_start

    @rule(size=st.integers(0, 150), count=st.integers(1, 4), dt=st.integers(0, 50))
    def append(self, size, count, dt):
        self.now += dt
        body = bytes([65 + len(self.batches) % 26]) * size
        base, records, when = self.part.append([CheckedBatch(body, count)], now_ms=self.now)
        assert (base, records, when) == (self.log_end, count, self.now)
        self.batches.append((base, count, when, body))

    @rule()
    def flush(self):
        asyncio.run(self.part.flush())
        self.high_watermark = self.log_end

    @rule(limit=st.integers(0, 800))
    def retention(self, limit):
        deleted = self.part.apply_retention(now_ms=self.now, retention_ms=-1, retention_bytes=limit)
        if deleted:
            self.log_start = deleted[-1].next_offset
            self.batches = [b for b in self.batches if b[0] >= self.log_start]

    @rule(where=st.integers(-3, 3) | st.floats(0, 1), max_records=st.integers(0, 12),
          max_bytes=st.integers(0, 700))
    def read(self, where, max_records, max_bytes):
        offset = (self.log_end + where if where > 0 else self.log_start + where) if isinstance(where, int) \
            else self.log_start + int(where * (self.log_end - self.log_start))
        try:
            got = self.part.read(offset, ReadLimits(max_records, max_bytes))
        except OffsetOutOfRange as err:
            assert not self.log_start <= offset <= self.log_end
            assert (err.offset, err.log_start_offset, err.log_end_offset) == (
                offset, self.log_start, self.high_watermark)
            return
        assert self.log_start <= offset <= self.log_end
        assert (got.log_start_offset, got.log_end_offset) == (self.log_start, self.high_watermark)
        expected = self._expected(offset, ReadLimits(max_records, max_bytes))
        assert frames(got.data) == expected
        assert [(h.base_offset, h.record_count) for h in got.frames()] == [(b[0], b[1]) for b in expected]
        assert got.next_offset == (expected[-1][0] + expected[-1][1] if expected else offset)

    def _expected(self, offset: int, limits: ReadLimits) -> list[tuple[int, int, int, bytes]]:
        """The first batch holding ``offset``, then more while both totals stay within
        the limits; none at or past the high watermark."""
        visible = [b for b in self.batches if b[0] < self.high_watermark and b[0] + b[1] > offset]
        out, size, records = [], 0, 0
        for batch in visible:
            frame_size = HEADER_SIZE + len(batch[3])
            if out and not (size + frame_size <= limits.max_bytes and records < limits.max_records):
                break
            out.append(batch)
            size += frame_size
            records += batch[1]
        return out

    @rule(where=st.floats(0, 1))
    def append_time_at(self, where):
        offset = self.log_start + int(where * (self.log_end - self.log_start))
        holding = next((b for b in self.batches if b[0] <= offset < b[0] + b[1]), None)
        expected = holding[2] if holding is not None and offset < self.high_watermark else None
        assert self.part.append_time_at(offset) == expected

    @rule(dt=st.integers(-5, 60))
    def offset_for_time(self, dt):
        ts = self.now + dt - 30
        expected = next((b[0] for b in self.batches if b[2] >= ts), self.log_end)
        assert self.part.offset_for_time(ts) == min(expected, self.high_watermark)

    @invariant()
    def offsets_match(self):
        assert (self.part.log_start_offset, self.part.log_end_offset, self.part.high_watermark) == (
            self.log_start, self.log_end, self.high_watermark)


def test_partition_read_matches_list_model(tmp_path):
    PartitionReadModel.directory = tmp_path
    run_state_machine_as_test(
        PartitionReadModel,
        settings=settings(max_examples=40, stateful_step_count=40, deadline=None, database=None),
    )
