"""Partition.read: the range check and the high-watermark cut, done once, and
ReadLimits honoured (tests/property/test_partition_read_model.py: the same against
a model)."""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest

from segments import FrameHeader, OffsetOutOfRange, PartitionLog, ReadLimits
from segments.batch import HEADER_SIZE
from streamd.broker.batches import CheckedBatch
from streamd.broker.partition import Partition

ALL = ReadLimits(max_records=1 << 30, max_bytes=1 << 30)


@pytest.fixture
def part(tmp_path):
    """An fsync=always partition (readers see what was flushed): batches of 2 records
    at offsets 0, 2, 4 flushed, then 6, 8 not yet."""
    executor = ThreadPoolExecutor(1)
    log = PartitionLog.open(tmp_path / "p", segment_bytes=150, segment_ms=10**9, index_interval_bytes=40,
                            now_ms=0, name="t/0")
    p = Partition("t", 0, log, executor=executor, fsync_always=True)
    for i in range(3):
        p.append([CheckedBatch(b"b%d" % i * 10, 2)], now_ms=100 + i)
    asyncio.run(p.flush())
    for i in range(3, 5):
        p.append([CheckedBatch(b"b%d" % i * 10, 2)], now_ms=100 + i)
    yield p
    p.close()
    p.close_log()
    executor.shutdown()


def test_read_stops_at_the_high_watermark(part):
    assert (part.high_watermark, part.log_end_offset) == (6, 10)
    out = part.read(0, ALL)
    assert [h.base_offset for h in out.frames()] == [0, 2, 4]
    assert (out.next_offset, out.log_start_offset, out.log_end_offset) == (6, 0, 6)


@pytest.mark.parametrize("offset", [6, 7, 10])
def test_read_at_or_past_the_high_watermark_is_empty(part, offset):
    out = part.read(offset, ALL)
    assert (out.data, out.next_offset, out.log_end_offset) == (b"", offset, 6)


@pytest.mark.parametrize("offset", [-1, 11])
def test_out_of_range_names_the_valid_range_up_to_the_high_watermark(part, offset):
    with pytest.raises(OffsetOutOfRange) as caught:
        part.read(offset, ALL)
    assert (caught.value.offset, caught.value.log_start_offset, caught.value.log_end_offset) == (offset, 0, 6)
    assert "t/0" in str(caught.value)
    with pytest.raises(OffsetOutOfRange):
        part.check_offset(offset)


def test_limits_bound_records_and_bytes_but_one_frame_always_goes_out(part):
    frame = HEADER_SIZE + 20
    assert [h.base_offset for h in part.read(1, ReadLimits(0, 0)).frames()] == [0]
    assert [h.base_offset for h in part.read(0, ReadLimits(3, 1 << 20)).frames()] == [0, 2]
    assert [h.base_offset for h in part.read(0, ReadLimits(100, 2 * frame)).frames()] == [0, 2]
    assert [h.base_offset for h in part.read(0, ReadLimits(100, 2 * frame - 1)).frames()] == [0]


def test_frames_are_the_public_frame_headers(part):
    out = part.read(2, ALL)
    headers = list(out.frames())
    assert all(isinstance(h, FrameHeader) for h in headers)
    assert [(h.position, h.size, h.record_count, h.append_time_ms) for h in headers] == [
        (0, HEADER_SIZE + 20, 2, 101), (HEADER_SIZE + 20, HEADER_SIZE + 20, 2, 102)]
    assert headers[-1].end == len(out.data)


def test_append_time_and_time_lookup_stop_at_the_high_watermark(part):
    assert [part.append_time_at(o) for o in (0, 3, 5, 6, 9)] == [100, 101, 102, None, None]
    assert part.offset_for_time(101) == 2
    assert part.offset_for_time(104) == 6  # the batch appended at 104 is not visible yet


def test_read_limits_is_a_frozen_value():
    limits = ReadLimits(max_records=5, max_bytes=100)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_records = 6  # type: ignore[misc]
    assert limits == ReadLimits(5, 100) and not hasattr(limits, "__dict__")
