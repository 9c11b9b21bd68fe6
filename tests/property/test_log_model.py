"""PartitionLog against a plain list of batches: appends, reads, time lookups, rolls
(tiny segments), retention, flush, clean reopen and crash reopen."""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from segments import OffsetOutOfRange, PartitionLog, ReadLimits
from segments.batch import HEADER_SIZE

from ..framing import frames

SEGMENT_BYTES = 200
INDEX_INTERVAL = 50




class LogModel(RuleBasedStateMachine):
    directory = None  # set per test run (inside tmp_path)

    def __init__(self) -> None:
        super().__init__()
        self.path = self.directory / f"p{next(self.counter)}"
        self.batches: list[tuple[int, int, int, bytes]] = []  # (base, count, time, body)
        self.log_start = 0
        self.last_time = 0
        self.log = self._open()

    def _open(self) -> PartitionLog:
        return PartitionLog.open(self.path, segment_bytes=SEGMENT_BYTES, segment_ms=1000,
                                 index_interval_bytes=INDEX_INTERVAL, now_ms=self.last_time)

    @property
    def log_end(self) -> int:
        return self.batches[-1][0] + self.batches[-1][1] if self.batches else self.log_start

    def teardown(self) -> None:
        self.log.close()

    @rule(size=st.one_of(st.integers(0, 120), st.integers(170, 300)),  # some above segment_bytes
          count=st.integers(1, 4),
          dt=st.one_of(st.just(0), st.integers(-20, 400)))
    def append(self, size, count, dt):
        body = bytes([65 + len(self.batches) % 26]) * size
        info = self.log.append(body, record_count=count, append_time_ms=self.last_time + dt)
        expected_time = max(self.last_time, self.last_time + dt)
        assert info == (self.log_end, expected_time, HEADER_SIZE + size)
        self.batches.append((info.base_offset, count, expected_time, body))
        self.last_time = expected_time

    @rule(where=st.floats(0, 1), max_bytes=st.integers(0, 600), max_records=st.integers(0, 12))
    def read(self, where, max_bytes, max_records):
        offset = self.log_start + int(where * (self.log_end - self.log_start))
        got = self.log.read(offset, ReadLimits(max_records, max_bytes))
        if offset == self.log_end:
            assert got == (b"", offset, offset, 0, 0)
            return
        i = next(i for i, b in enumerate(self.batches) if b[0] + b[1] > offset)
        expected, size, records = [], 0, 0
        for batch in self.batches[i:]:
            frame_size = HEADER_SIZE + len(batch[3])
            if expected and not (size + frame_size <= max_bytes and records < max_records):
                break
            expected.append(batch)
            size += HEADER_SIZE + len(batch[3])
            records += batch[1]
        assert frames(got.data) == expected
        assert got[1:] == (expected[0][0], expected[-1][0] + expected[-1][1], len(expected), records)

    @rule(delta=st.integers(1, 5))
    def read_out_of_range(self, delta):
        for offset in (self.log_end + delta, self.log_start - delta):
            try:
                self.log.read(offset, ReadLimits(10, 10))
            except OffsetOutOfRange as err:
                assert (err.log_start_offset, err.log_end_offset) == (self.log_start, self.log_end)
            else:
                raise AssertionError(f"read at {offset} did not raise OffsetOutOfRange")

    @rule(dt=st.integers(-10, 30))
    def offset_for_time(self, dt):
        times = sorted({b[2] for b in self.batches} | {self.last_time + dt})
        for ts in {t + d for t in times for d in (-1, 0, 1)}:
            expected = next((b[0] for b in self.batches if b[2] >= ts), self.log_end)
            assert self.log.offset_for_time(ts) == expected

    @rule(age=st.integers(-1, 3000), limit=st.integers(-1, 1500), now_dt=st.integers(0, 500))
    def retention(self, age, limit, now_dt):
        now = self.last_time + now_dt
        before = self.log.describe()
        deleted = self.log.apply_retention(now_ms=now, retention_ms=age, retention_bytes=limit)
        after = self.log.describe()
        assert after.log_end_offset == before.log_end_offset
        assert after.segment_count == before.segment_count - len(deleted) >= 1
        for d in deleted:
            if d.reason == "retention_ms":
                assert d.newest_timestamp_ms < now - age
        if limit >= 0 and deleted and deleted[-1].reason == "retention_bytes":
            assert after.size_bytes + deleted[-1].size_bytes > limit
        if deleted:
            assert self.log.log_start_offset == deleted[-1].next_offset
            self.log_start = deleted[-1].next_offset
            self.batches = [b for b in self.batches if b[0] >= self.log_start]
            assert not self.batches or self.batches[0][0] == self.log_start

    @rule()
    def flush(self):
        assert self.log.flush() == self.log_end == self.log.flushed_offset

    @rule()
    def reopen(self):
        stats = self.log.describe()
        self.log.close()
        self.log = self._open()
        assert self.log.recovery is None
        assert self.log.describe() == stats

    @rule(checkpoint=st.booleans())
    def crash_and_reopen(self, checkpoint):
        if checkpoint:
            self.log.flush()
            self.log.checkpoint()
        self.log._release()  # the page cache keeps the writes, as after a killed process
        self.log = self._open()
        assert self.log.recovery is not None
        assert self.log.recovery.bytes_truncated == 0

    @invariant()
    def offsets_and_stats_match(self):
        assert self.log.log_start_offset == self.log_start
        assert self.log.log_end_offset == self.log_end
        stats = self.log.describe()
        assert stats.size_bytes == sum(HEADER_SIZE + len(b[3]) for b in self.batches)
        assert stats.oldest_timestamp_ms == (self.batches[0][2] if self.batches else 0)
        assert stats.newest_timestamp_ms == (self.batches[-1][2] if self.batches else 0)

    @invariant()
    def everything_reads_back(self):
        got = self.log.read(self.log_start, ReadLimits(1 << 30, 1 << 30))
        assert frames(got.data) == self.batches


def test_partition_log_matches_list_model(tmp_path):
    LogModel.directory = tmp_path
    LogModel.counter = itertools.count()
    run_state_machine_as_test(
        LogModel,
        settings=settings(max_examples=40, stateful_step_count=40, deadline=None, database=None),
    )
