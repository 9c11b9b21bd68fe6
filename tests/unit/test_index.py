"""OffsetIndex / TimeIndex: lookups against a sorted-list model, trimming, count
detection in preallocated files, validation, and rebuilding garbled index files."""

from __future__ import annotations

import bisect
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segments import OffsetIndex, PartitionLog, ReadLimits, TimeIndex
from segments.index import (
    OFFSET_ENTRY,
    TIME_ENTRY,
    check_entries,
    index_due,
    used_entries,
)

BASE = 1000


def _entries(draw_deltas: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(relative offset, position, timestamp) triples, strictly increasing from (0, 0)."""
    rel = pos = 0
    ts = 5
    out = [(0, 0, ts)]
    for d_rel, d_pos, d_ts in draw_deltas:
        rel, pos, ts = rel + d_rel, pos + d_pos, ts + d_ts
        out.append((rel, pos, ts))
    return out


deltas = st.lists(
    st.tuples(st.integers(1, 50), st.integers(1, 5000), st.integers(0, 3)), max_size=40
)


def _fill(tmp_path, entries, capacity=64):
    # A new index of a (still) empty log: data_size=0.
    oi = OffsetIndex(tmp_path / "x.index", BASE, capacity=capacity, data_size=0)
    ti = TimeIndex(tmp_path / "x.timeindex", BASE, capacity=capacity, data_size=0)
    for rel, pos, ts in entries:
        assert oi.append(BASE + rel, pos)
        assert ti.append(ts, BASE + rel)
    return oi, ti


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(d=deltas, queries=st.lists(st.integers(-5, 2500), max_size=20))
def test_lookup_matches_sorted_list_model(tmp_path, d, queries):
    entries = _entries(d)
    oi, ti = _fill(tmp_path, entries)
    try:
        rels = [e[0] for e in entries]
        times = [e[2] for e in entries]
        for q in queries + [q + d for e in entries for q in e[::2] for d in (-1, 0, 1)]:
            i = bisect.bisect_right(rels, q) - 1
            expected = (BASE, 0) if i < 0 else (BASE + rels[i], entries[i][1])
            assert oi.lookup(BASE + q) == expected
            j = bisect.bisect_left(times, q) - 1
            assert ti.lookup(q) == (BASE if j < 0 else BASE + rels[j])
    finally:
        oi.close()
        ti.close()
        for p in tmp_path.iterdir():
            p.unlink()


def test_trim_then_reopen_read_only_and_writable(tmp_path):
    entries = _entries([(3, 100, 1), (4, 200, 0), (10, 4000, 7)])
    oi, ti = _fill(tmp_path, entries, capacity=100)
    assert os.path.getsize(oi.path) == 100 * OFFSET_ENTRY.itemsize
    oi.trim()
    ti.trim()
    assert os.path.getsize(oi.path) == 4 * OFFSET_ENTRY.itemsize
    assert os.path.getsize(ti.path) == 4 * TIME_ENTRY.itemsize
    assert oi.lookup(BASE + 8) == (BASE + 7, 300)  # still usable, read-only
    before = oi.entries()
    oi.close()
    ti.close()

    ro = OffsetIndex(tmp_path / "x.index", BASE, capacity=None, data_size=5000)
    assert ro.count == 4 and np.array_equal(ro.entries(), before)
    ro.close()
    rw = OffsetIndex(tmp_path / "x.index", BASE, capacity=50, data_size=5000)
    assert rw.count == 4 and np.array_equal(rw.entries(), before)
    assert rw.append(BASE + 30, 9000)  # after the entries, not over them
    assert rw.count == 5
    rw.close()


def test_used_count_of_a_preallocated_file_with_zero_first_entry(tmp_path):
    oi = OffsetIndex(tmp_path / "x.index", 0, capacity=16, data_size=0)
    assert oi.count == 0
    oi.append(0, 0)  # an all-zero entry that is in use
    oi.close()  # not trimmed: 15 zero entries follow
    assert OffsetIndex(tmp_path / "x.index", 0, capacity=16, data_size=10).count == 1
    # The same file for an empty log holds no entries.
    assert OffsetIndex(tmp_path / "x.index", 0, capacity=16, data_size=0).count == 0


def test_used_entries_binary_search():
    rel = np.array([0, 3, 9, 12, 0, 0, 0], dtype="<u4")
    assert used_entries(rel, has_data=True) == 4
    assert used_entries(np.zeros(5, dtype="<u4"), has_data=True) == 1
    assert used_entries(np.zeros(5, dtype="<u4"), has_data=False) == 0
    assert used_entries(np.zeros(0, dtype="<u4"), has_data=True) == 0
    assert used_entries(np.array([0, 1, 2], dtype="<u4"), has_data=True) == 3


def test_full_index_skips_entries(tmp_path):
    oi = OffsetIndex(tmp_path / "x.index", 0, capacity=2, data_size=0)
    assert oi.append(0, 0) and oi.append(5, 100)
    assert not oi.append(9, 200)
    assert oi.lookup(50) == (5, 100)
    oi.close()


def test_truncate_drops_entries_and_zeroes_them(tmp_path):
    entries = _entries([(3, 100, 1), (4, 200, 0), (10, 4000, 7)])
    oi, ti = _fill(tmp_path, entries)
    oi.truncate_to_position(300)  # positions are 0, 100, 300, 4300
    ti.truncate_to_offset(BASE + 7)
    assert oi.count == 2 and ti.count == 2
    assert oi.lookup(BASE + 100) == (BASE + 3, 100)
    oi.close()
    ti.close()
    assert OffsetIndex(tmp_path / "x.index", BASE, capacity=64, data_size=1).count == 2


def test_index_due_schedule():
    assert index_due(None, 0, 4096)
    assert not index_due(0, 4095, 4096)
    assert index_due(0, 4096, 4096)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda o, t: o.__setitem__(2, (1, 300)), "not strictly increasing"),
        (lambda o, t: o.__setitem__(3, (30, 99999)), "beyond"),
        (lambda o, t: t.__setitem__(1, (9, 4, 0)), "differ"),
        (lambda o, t: t.__setitem__(3, (0, 30, 0)), "decrease"),
        (lambda o, t: o.__setitem__(0, (1, 0)), "first entry"),
    ],
)
def test_check_entries_finds_garbage(change, reason):
    offsets = np.array([(0, 0), (3, 100), (7, 200), (30, 400)], dtype=OFFSET_ENTRY)
    times = np.array([(1, 0, 0), (2, 3, 0), (2, 7, 0), (8, 30, 0)], dtype=TIME_ENTRY)
    assert check_entries(offsets, times, 500) is None
    change(offsets, times)
    assert reason in check_entries(offsets, times, 500)


def _open(path, **kw):
    return PartitionLog.open(path, segment_bytes=400, segment_ms=10**9,
                             index_interval_bytes=60, now_ms=0, **kw)


def _fill_log(path, batches=30):
    log = _open(path)
    for i in range(batches):
        log.append(bytes([65 + i % 26]) * (i % 7 * 5), record_count=i % 3 + 1, append_time_ms=i)
    log.close()


def _all_frames(log):
    return log.read(log.log_start_offset, ReadLimits(1 << 30, 1 << 30)).data


@pytest.mark.parametrize("garbage", ["random", "decreasing", "wrong_size", "past_log"])
def test_garbled_index_is_rebuilt(tmp_path, caplog, garbage):
    _fill_log(tmp_path / "p")
    log = _open(tmp_path / "p")
    expected = _all_frames(log)
    probes = {o: log.read(o, ReadLimits(1, 1)) for o in range(0, log.log_end_offset, 3)}
    times = {t: log.offset_for_time(t) for t in range(-1, 32)}
    log.close()
    first = tmp_path / "p" / "00000000000000000000.index"
    good = first.read_bytes()
    assert len(good) >= 3 * OFFSET_ENTRY.itemsize
    if garbage == "random":
        first.write_bytes(os.urandom(len(good)))
    elif garbage == "decreasing":
        arr = np.frombuffer(good, dtype=OFFSET_ENTRY).copy()
        arr[1], arr[2] = arr[2].copy(), arr[1].copy()
        first.write_bytes(arr.tobytes())
    elif garbage == "wrong_size":
        first.write_bytes(good + b"\x01\x02\x03")
    else:
        arr = np.frombuffer(good, dtype=OFFSET_ENTRY).copy()
        arr[-1]["position"] = 10**6
        first.write_bytes(arr.tobytes())
    (tmp_path / "p" / "00000000000000000000.timeindex").write_bytes(b"\xff" * 40)

    log = _open(tmp_path / "p")
    assert _all_frames(log) == expected
    assert {o: log.read(o, ReadLimits(1, 1)) for o in probes} == probes
    assert {t: log.offset_for_time(t) for t in times} == times
    log.close()
    assert "rebuilding indexes" in caplog.text
    assert first.read_bytes() == good
