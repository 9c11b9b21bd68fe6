"""Segment: append, positions, reads, sealing (trim + lazy read-only map), time lookup."""

from __future__ import annotations

import os

import pytest

from segments import ReadLimits, Segment
from segments.batch import encode_frame

from ..framing import frames as _frames


def _append(seg, offset, count, when, body):
    frame = encode_frame(body, base_offset=offset, append_time_ms=when, record_count=count)
    return seg.append(frame, base_offset=offset, append_time_ms=when, record_count=count)


@pytest.fixture
def segment(tmp_path):
    seg = Segment.create(tmp_path, 100, capacity_bytes=4096, index_interval_bytes=100)
    yield seg
    seg.close()


def _fill(seg, n=20):
    batches, offset = [], seg.base_offset
    for i in range(n):
        body = bytes([97 + i % 26]) * (i * 3)
        _append(seg, offset, i % 4 + 1, 10 * i, body)
        batches.append((offset, i % 4 + 1, 10 * i, body))
        offset += i % 4 + 1
    return batches


def test_new_segment_is_preallocated_and_empty(tmp_path, segment):
    assert segment.size == 0 and segment.next_offset == 100 and segment.is_active
    assert os.path.getsize(segment.log_path) == 4096
    assert segment.first_append_time_ms is None and segment.last_append_time_ms is None
    assert segment.read(0, ReadLimits(10, 100), taken_bytes=0, taken_records=0).data == b""


def test_append_then_read_every_offset(segment):
    batches = _fill(segment)
    assert segment.next_offset == batches[-1][0] + batches[-1][1]
    assert segment.first_append_time_ms == 0 and segment.last_append_time_ms == 190
    everything = segment.read(0, ReadLimits(1 << 20, 1 << 20), taken_bytes=0,
                              taken_records=0)
    assert _frames(everything.data) == batches
    for base, count, _, _ in batches:
        for offset in range(base, base + count):
            pos = segment.find_position(offset)
            got = segment.read(pos, ReadLimits(1, 1), taken_bytes=0, taken_records=0)
            assert _frames(got.data)[0][0] == base and got.batch_count == 1


def test_read_limits_are_running_totals(segment):
    batches = _fill(segment)
    one = segment.read(0, ReadLimits(0, 0), taken_bytes=0, taken_records=0)
    assert one.batch_count == 1  # always at least one frame
    # After the first frame, a frame is added only if the byte total stays in bounds.
    first = len(one.data)
    part = segment.read(0, ReadLimits(100, first + 1), taken_bytes=0, taken_records=0)
    assert part.batch_count == 1 and part.next_offset == batches[1][0]
    whole = segment.read(0, ReadLimits(100, 1 << 20), taken_bytes=0, taken_records=0)
    two = len(whole.data) if whole.batch_count == 2 else None
    if two is None:
        second = segment.read(0, ReadLimits(2, 1 << 20), taken_bytes=0, taken_records=0)
        two = len(second.data)
    part = segment.read(0, ReadLimits(100, two), taken_bytes=0, taken_records=0)
    assert part.batch_count == 2 and part.next_offset == batches[2][0]
    none = segment.read(0, ReadLimits(5, 100), taken_bytes=100, taken_records=0)
    assert none.batch_count == 0 and none.data == b""


def test_seal_trims_and_reads_lazily_read_only(tmp_path, segment):
    batches = _fill(segment)
    size = segment.size
    segment.seal()
    assert not segment.is_active
    assert os.path.getsize(segment.log_path) == size
    segment.release_fds()
    segment.close()

    again = Segment.load(tmp_path, 100, index_interval_bytes=100)
    try:
        assert again.size == size and again._map is None
        assert again.next_offset == batches[-1][0] + batches[-1][1]
        assert again.find_time(55) == batches[6][0]
        assert again.find_time(10**6) is None
        data = again.read(again.find_position(120), ReadLimits(1 << 20, 1 << 20),
                          taken_bytes=0, taken_records=0).data
        assert _frames(data)[0][0] <= 120 < _frames(data)[0][0] + _frames(data)[0][1]
    finally:
        again.close()


def test_activate_reextends_a_trimmed_segment(tmp_path, segment):
    batches = _fill(segment, 5)
    segment.seal()
    segment.close()
    seg = Segment.load(tmp_path, 100, index_interval_bytes=100)
    seg.activate(2048)
    try:
        assert os.path.getsize(seg.log_path) == 2048
        nxt = batches[-1][0] + batches[-1][1]
        assert seg.next_offset == nxt
        _append(seg, nxt, 1, 999, b"z")
        assert seg.find_time(999) == nxt
    finally:
        seg.close()


def test_delete_renames_then_caller_unlinks(tmp_path, segment):
    _fill(segment, 3)
    renamed = segment.delete()
    assert sorted(p.name for p in renamed) == [
        "00000000000000000100.index.deleted",
        "00000000000000000100.log.deleted",
        "00000000000000000100.timeindex.deleted",
    ]
    assert not segment.log_path.exists()
