"""PartitionLog: dense offsets, reads (in a batch, across segments, limits, range
errors), time lookup, rolling by size and age, retention, flush and reopen."""

from __future__ import annotations

import json
import os
import threading

import pytest

from segments import (
    BatchTooLarge,
    InvalidBatch,
    LogClosed,
    OffsetOutOfRange,
    PartitionLog,
    ReadLimits,
)
from segments.batch import HEADER_SIZE

from ..framing import frames

DAY = 86_400_000




def open_log(path, *, segment_bytes=300, segment_ms=DAY, index_interval_bytes=64, now_ms=0, **kw):
    return PartitionLog.open(path, segment_bytes=segment_bytes, segment_ms=segment_ms,
                             index_interval_bytes=index_interval_bytes, now_ms=now_ms, **kw)


@pytest.fixture
def plog(tmp_path):
    log = open_log(tmp_path / "p", topic="orders", partition=3)
    yield log
    log.close()


def fill(log, n=30, start_time=1000):
    written = []
    for i in range(n):
        body = bytes([65 + i % 26]) * (i % 9 * 4)
        info = log.append(body, record_count=i % 3 + 1, append_time_ms=start_time + 10 * i)
        written.append((info.base_offset, i % 3 + 1, info.append_time_ms, body))
    return written


def read_all(log):
    return frames(log.read(log.log_start_offset, ReadLimits(1 << 30, 1 << 30)).data)


def segment_files(path):
    return sorted(p.name for p in path.iterdir() if p.suffix == ".log")


def test_new_log_is_empty(tmp_path, plog):
    assert (plog.log_start_offset, plog.log_end_offset, plog.flushed_offset) == (0, 0, 0)
    assert plog.recovery is None
    assert plog.describe() == (0, 0, 1, 0, 0, 0)
    assert plog.read(0, ReadLimits(100, 100)) == (b"", 0, 0, 0, 0)
    assert segment_files(tmp_path / "p") == ["00000000000000000000.log"]


def test_offsets_are_dense_and_reads_return_what_was_written(plog):
    written = fill(plog)
    offset = 0
    for base, count, _, _ in written:
        assert base == offset
        offset += count
    assert plog.log_end_offset == offset
    assert read_all(plog) == written


def test_read_in_the_middle_of_a_batch_returns_the_containing_batch(plog):
    written = fill(plog)
    for base, count, _, body in written:
        for offset in range(base, base + count):
            got = plog.read(offset, ReadLimits(1, 1))
            assert got.first_offset == base and got.next_offset == base + count
            assert got.batch_count == 1 and got.record_count == count
            assert frames(got.data)[0][3] == body


def test_reads_cross_segments(tmp_path, plog):
    written = fill(plog)
    assert len(segment_files(tmp_path / "p")) > 3
    got = plog.read(written[2][0], ReadLimits(1 << 20, 1 << 20))
    assert frames(got.data) == written[2:]
    assert got.next_offset == plog.log_end_offset


def test_max_bytes_is_a_hard_limit_after_the_first_frame(plog):
    written = fill(plog)
    sizes = [HEADER_SIZE + len(w[3]) for w in written]
    got = plog.read(0, ReadLimits(0, 0))
    assert got.batch_count == 1  # always one frame, however large
    # A further frame is added only if the total stays within max_bytes.
    got = plog.read(0, ReadLimits(1000, sizes[0] + sizes[1]))
    assert got.batch_count == 2 and len(got.data) == sizes[0] + sizes[1]
    got = plog.read(0, ReadLimits(1000, sizes[0] + sizes[1] + sizes[2] - 1))
    assert got.batch_count == 2
    got = plog.read(0, ReadLimits(1000, sizes[0] + sizes[1] + sizes[2]))
    assert got.batch_count == 3
    # max_records stays soft: frames are added while fewer records are taken.
    got = plog.read(0, ReadLimits(3, 1 << 20))  # counts 1, 2 -> 3 records
    assert got.batch_count == 2 and got.record_count == 3
    got = plog.read(0, ReadLimits(4, 1 << 20))
    assert got.batch_count == 3 and got.record_count == 6


def test_offset_out_of_range_carries_the_valid_range(plog):
    fill(plog, 5)
    end = plog.log_end_offset
    assert plog.read(end, ReadLimits(10, 10)) == (b"", end, end, 0, 0)
    with pytest.raises(OffsetOutOfRange) as err:
        plog.read(end + 1, ReadLimits(10, 10))
    e = err.value
    assert (e.offset, e.log_start_offset, e.log_end_offset) == (end + 1, 0, end)
    assert (e.topic, e.partition, e.name) == ("orders", 3, "orders-3")
    assert "orders-3" in str(e)
    with pytest.raises(OffsetOutOfRange):
        plog.read(-1, ReadLimits(10, 10))


def test_offset_for_time_matches_a_scan(plog):
    written = fill(plog)
    for ts in range(900, 1400, 3):
        expected = next((w[0] for w in written if w[2] >= ts), plog.log_end_offset)
        assert plog.offset_for_time(ts) == expected


def test_append_time_is_forced_monotonic(plog):
    assert plog.append(b"a", record_count=1, append_time_ms=500).append_time_ms == 500
    assert plog.append(b"b", record_count=1, append_time_ms=400).append_time_ms == 500
    assert plog.append(b"c", record_count=2, append_time_ms=600) == (2, 600, HEADER_SIZE + 1)


def test_roll_by_size(tmp_path):
    log = open_log(tmp_path / "p", segment_bytes=3 * (HEADER_SIZE + 10))
    try:
        for _ in range(7):
            log.append(b"x" * 10, record_count=1, append_time_ms=0)
        assert segment_files(tmp_path / "p") == [
            "00000000000000000000.log", "00000000000000000003.log", "00000000000000000006.log"]
        # Sealed segments are trimmed to their data.
        assert os.path.getsize(tmp_path / "p" / "00000000000000000000.log") == 3 * (HEADER_SIZE + 10)
        assert log.describe().segment_count == 3
    finally:
        log.close()


def test_oversized_batch_goes_to_its_own_segment(tmp_path):
    log = open_log(tmp_path / "p", segment_bytes=100)
    try:
        log.append(b"a", record_count=1, append_time_ms=0)
        log.append(b"b" * 500, record_count=1, append_time_ms=0)
        log.append(b"c", record_count=1, append_time_ms=0)
        assert segment_files(tmp_path / "p") == [
            "00000000000000000000.log", "00000000000000000001.log", "00000000000000000002.log"]
        assert [f[3] for f in read_all(log)] == [b"a", b"b" * 500, b"c"]
    finally:
        log.close()
    log = open_log(tmp_path / "p", segment_bytes=100)
    assert [f[3] for f in read_all(log)] == [b"a", b"b" * 500, b"c"]
    log.close()


def test_oversized_first_batch_grows_the_empty_active_segment(tmp_path):
    log = open_log(tmp_path / "p", segment_bytes=100)
    try:
        log.append(b"big" * 100, record_count=2, append_time_ms=0)
        log.append(b"next", record_count=1, append_time_ms=0)
        assert segment_files(tmp_path / "p") == ["00000000000000000000.log",
                                                 "00000000000000000002.log"]
        assert [f[3] for f in read_all(log)] == [b"big" * 100, b"next"]
    finally:
        log.close()


def test_roll_by_age_of_the_first_batch(tmp_path):
    log = open_log(tmp_path / "p", segment_bytes=1 << 20, segment_ms=1000)
    try:
        log.append(b"a", record_count=1, append_time_ms=0)
        log.append(b"b", record_count=1, append_time_ms=1000)  # exactly segment_ms: no roll
        assert log.describe().segment_count == 1
        log.append(b"c", record_count=1, append_time_ms=1001)
        assert segment_files(tmp_path / "p")[-1] == "00000000000000000002.log"
    finally:
        log.close()


def test_time_retention_never_deletes_the_active_segment(tmp_path):
    log = open_log(tmp_path / "p", segment_bytes=2 * (HEADER_SIZE + 1))
    try:
        for t in range(6):  # three segments: times (0,1) (2,3) (4,5)
            log.append(b"x", record_count=1, append_time_ms=t)
        assert log.apply_retention(now_ms=1000, retention_ms=-1, retention_bytes=-1) == []
        deleted = log.apply_retention(now_ms=1002, retention_ms=1000, retention_bytes=-1)
        assert [(d.base_offset, d.next_offset, d.newest_timestamp_ms, d.reason) for d in deleted] \
            == [(0, 2, 1, "retention_ms")]
        assert log.log_start_offset == 2
        deleted = log.apply_retention(now_ms=10**9, retention_ms=0, retention_bytes=-1)
        assert [d.base_offset for d in deleted] == [2]
        assert log.log_start_offset == 4 and log.describe().segment_count == 1
        assert [f[0] for f in read_all(log)] == [4, 5]
        with pytest.raises(OffsetOutOfRange) as err:
            log.read(3, ReadLimits(10, 10))
        assert err.value.log_start_offset == 4
        assert not list((tmp_path / "p").glob("*.deleted"))
        state = json.loads((tmp_path / "p" / "partition.json").read_text())
        assert state["log_start_offset"] == 4
    finally:
        log.close()
    log = open_log(tmp_path / "p", segment_bytes=2 * (HEADER_SIZE + 1))
    assert (log.log_start_offset, log.log_end_offset) == (4, 6)
    assert log.describe().oldest_timestamp_ms == 4
    log.close()


def test_size_retention_deletes_oldest_while_over_the_limit(tmp_path):
    frame = HEADER_SIZE + 6
    log = open_log(tmp_path / "p", segment_bytes=2 * frame)
    try:
        for t in range(9):  # segments of 2, 2, 2, 2 frames + active with 1
            log.append(b"y" * 6, record_count=1, append_time_ms=t)
        assert log.describe().size_bytes == 9 * frame
        deleted = log.apply_retention(now_ms=0, retention_ms=-1, retention_bytes=5 * frame)
        assert [d.base_offset for d in deleted] == [0, 2]  # 9 -> 7 -> 5 frames
        assert [d.reason for d in deleted] == ["retention_bytes"] * 2
        assert log.describe().size_bytes == 5 * frame and log.log_start_offset == 4
        deleted = log.apply_retention(now_ms=0, retention_ms=-1, retention_bytes=0)
        assert [d.base_offset for d in deleted] == [4, 6]
        assert log.describe() == (8, 9, 1, frame, 8, 8)
    finally:
        log.close()


def test_delete_segments_with_a_predicate(plog):
    fill(plog)
    before = plog.describe().segment_count
    deleted = plog.delete_segments(lambda seg: seg.base_offset < 10)
    assert deleted and all(d.reason == "predicate" for d in deleted)
    assert plog.describe().segment_count == before - len(deleted)
    assert plog.log_start_offset == deleted[-1].next_offset


def test_reopen_after_close_reproduces_state(tmp_path):
    log = open_log(tmp_path / "p")
    written = fill(log)
    stats = log.describe()
    log.close()
    assert (tmp_path / "p" / "clean-shutdown").exists()
    again = open_log(tmp_path / "p")
    try:
        assert not (tmp_path / "p" / "clean-shutdown").exists()
        assert again.recovery is None
        assert again.describe() == stats
        assert read_all(again) == written
        assert again.flushed_offset == again.log_end_offset
        info = again.append(b"more", record_count=2, append_time_ms=0)
        assert info.base_offset == stats.log_end_offset and info.append_time_ms == stats.newest_timestamp_ms
    finally:
        again.close()


def test_flush_advances_flushed_offset_and_checkpoint_persists_it(tmp_path, plog):
    fill(plog, 10)
    assert plog.flushed_offset == 0
    assert plog.flush() == plog.log_end_offset == plog.flushed_offset
    plog.checkpoint()
    state = json.loads((tmp_path / "p" / "partition.json").read_text())
    assert state["recovery_point"]["offset"] == plog.log_end_offset


def test_flush_from_a_worker_thread_while_appending(plog):
    stop = threading.Event()
    errors = []

    def flusher():
        try:
            while not stop.is_set():
                plog.flush()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=flusher)
    worker.start()
    try:
        written = fill(plog, 300)
    finally:
        stop.set()
        worker.join()
    assert not errors
    assert plog.flush() == plog.log_end_offset
    assert read_all(plog) == written


def test_invalid_appends_are_typed_errors(plog):
    with pytest.raises(InvalidBatch):
        plog.append(b"", record_count=0, append_time_ms=0)
    with pytest.raises(InvalidBatch):
        plog.append(b"", record_count=1 << 32, append_time_ms=0)
    assert issubclass(BatchTooLarge, Exception)


def test_closed_log_raises_log_closed(tmp_path):
    log = open_log(tmp_path / "p")
    log.close()
    log.close()  # idempotent
    with pytest.raises(LogClosed):
        log.append(b"", record_count=1, append_time_ms=0)
    with pytest.raises(LogClosed):
        log.read(0, ReadLimits(1, 1))


def test_delete_removes_the_directory(tmp_path):
    log = open_log(tmp_path / "p")
    fill(log, 5)
    log.delete()
    assert not (tmp_path / "p").exists()
