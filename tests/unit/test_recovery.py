"""Recovery after an unclean stop: each kind of damage recovers to exactly the valid
prefix with a report; clean stops and data before the recovery point are not scanned."""

from __future__ import annotations

import json
import os

import pytest

from segments import PartitionLog, ReadLimits, RecoveryReport
from segments.batch import HEADER_SIZE
from segments.checkpoint import write_atomic

from ..framing import frames

SEGMENT_BYTES = 400
LAST = "00000000000000000000"


def open_log(path, **kw):
    return PartitionLog.open(path, segment_bytes=kw.pop("segment_bytes", SEGMENT_BYTES),
                             segment_ms=10**9, index_interval_bytes=64, now_ms=0, **kw)




def read_all(log):
    return frames(log.read(log.log_start_offset, ReadLimits(1 << 30, 1 << 30)).data)


def append(log, i):
    body = bytes([65 + i % 26]) * (5 + i % 4)
    info = log.append(body, record_count=i % 2 + 1, append_time_ms=100 + i)
    return (info.base_offset, i % 2 + 1, info.append_time_ms, body), info


def crashed(path, *, checkpointed=5, unflushed=3, **kw):
    """A log left as a killed process leaves it: ``checkpointed`` batches flushed and
    checkpointed, then ``unflushed`` more; files not trimmed, no clean-shutdown marker.
    Returns the batches written and the (segment, position) of each."""
    log = open_log(path, **kw)
    written, where = [], []
    for i in range(checkpointed + unflushed):
        batch, info = append(log, i)
        written.append(batch)
        seg = log._active
        where.append((seg.log_path, seg.size - info.size))
        if i == checkpointed - 1:
            log.flush()
            log.checkpoint()
    log._release()
    return written, where


def test_crash_without_damage_recovers_everything_after_the_recovery_point(tmp_path):
    written, where = crashed(tmp_path / "p", checkpointed=5, unflushed=3)
    log = open_log(tmp_path / "p")
    try:
        assert read_all(log) == written
        rep = log.recovery
        assert rep.batches_recovered == 3 and rep.bytes_truncated == 0
        assert rep.bytes_scanned == sum(HEADER_SIZE + len(w[3]) for w in written[5:])
        assert log.flushed_offset == log.log_end_offset
    finally:
        log.close()


def test_recover_truncates_torn_tail(tmp_path, caplog):
    written, where = crashed(tmp_path / "p")
    path, pos = where[-1]
    cut = HEADER_SIZE + 2  # into the body of the last frame
    os.truncate(path, pos + cut)
    log = open_log(tmp_path / "p")
    try:
        assert read_all(log) == written[:-1]
        assert log.log_end_offset == written[-1][0]
        assert log.recovery.bytes_truncated == cut
        assert log.recovery.batches_recovered == 2
        assert os.path.getsize(path) == SEGMENT_BYTES  # preallocated again, zeros after data
    finally:
        log.close()
    assert os.path.getsize(path) == pos
    assert f"truncated {path} at position {pos}, cutting {cut} bytes" in caplog.text


def test_recover_cuts_frame_with_flipped_body_byte(tmp_path):
    written, where = crashed(tmp_path / "p")
    path, pos = where[-2]
    with open(path, "r+b") as f:
        f.seek(pos + HEADER_SIZE + 2)
        byte = f.read(1)
        f.seek(pos + HEADER_SIZE + 2)
        f.write(bytes([byte[0] ^ 0x01]))
    log = open_log(tmp_path / "p")
    try:
        assert read_all(log) == written[:-2]
        frame_sizes = [HEADER_SIZE + len(w[3]) for w in written[-2:]]
        assert log.recovery.bytes_truncated == sum(frame_sizes)  # the frame and the one after
        assert log.recovery.batches_recovered == 1
        log.append(b"new", record_count=1, append_time_ms=0)
        assert read_all(log)[-1][0] == written[-2][0]
    finally:
        log.close()


def test_recover_zero_filled_tail(tmp_path):
    written, where = crashed(tmp_path / "p")
    path, pos = where[-2]
    keep = HEADER_SIZE + 3  # zeros from inside the second-last frame's body to the end
    with open(path, "r+b") as f:
        f.seek(pos + keep)
        f.write(bytes(SEGMENT_BYTES - pos - keep))
    log = open_log(tmp_path / "p")
    try:
        assert read_all(log) == written[:-2]
        # Cut bytes are counted up to the last non-zero byte: zeros are not data.
        assert log.recovery.bytes_truncated == keep
    finally:
        log.close()


def test_zero_tail_of_a_preallocated_file_is_not_reported_as_cut(tmp_path):
    written, _ = crashed(tmp_path / "p", checkpointed=1, unflushed=0)
    log = open_log(tmp_path / "p")
    assert log.recovery == RecoveryReport(1, 0, 0, 0, 0)
    assert read_all(log) == written
    log.close()


def test_recover_rebuilds_garbled_index(tmp_path, caplog):
    written, _ = crashed(tmp_path / "p", checkpointed=6, unflushed=0)
    (tmp_path / "p" / f"{LAST}.index").write_bytes(os.urandom(64))
    (tmp_path / "p" / f"{LAST}.timeindex").write_bytes(os.urandom(80))
    log = open_log(tmp_path / "p")
    try:
        assert read_all(log) == written
        for base, count, ts, _ in written:
            assert log.read(base + count - 1, ReadLimits(1, 1)).first_offset == base
            assert log.offset_for_time(ts) == base
        assert log.recovery.batches_recovered == 0  # all before the recovery point
    finally:
        log.close()


def test_recover_with_missing_index_files(tmp_path):
    written, _ = crashed(tmp_path / "p", checkpointed=20, unflushed=4)
    for p in list((tmp_path / "p").glob("*index")):
        p.unlink()
    log = open_log(tmp_path / "p")
    try:
        assert log.describe().segment_count > 2
        assert read_all(log) == written
        for base, _count, ts, _ in written:
            assert log.read(base, ReadLimits(1, 1)).first_offset == base
            assert log.offset_for_time(ts) == base
    finally:
        log.close()
    for p in (tmp_path / "p").glob("*.log"):
        assert p.with_suffix(".index").stat().st_size > 0


def test_recover_without_partition_json_scans_the_last_segment(tmp_path):
    written, _ = crashed(tmp_path / "p", checkpointed=20, unflushed=2)
    (tmp_path / "p" / "partition.json").unlink()
    log = open_log(tmp_path / "p")
    try:
        assert read_all(log) == written
        assert log.recovery.segments_scanned == 1
        last_segment_batches = sum(1 for w in written if w[0] >= log._active.base_offset)
        assert log.recovery.batches_recovered == last_segment_batches
    finally:
        log.close()


def test_garbled_partition_json_falls_back_to_the_segment_start(tmp_path):
    written, _ = crashed(tmp_path / "p", checkpointed=8, unflushed=1)
    state = json.loads((tmp_path / "p" / "partition.json").read_text())
    state["recovery_point"]["position"] += 3  # not a frame boundary
    write_atomic(tmp_path / "p" / "partition.json", json.dumps(state).encode())
    log = open_log(tmp_path / "p")
    try:
        assert read_all(log) == written
        assert log.recovery.bytes_truncated == 0
    finally:
        log.close()


def test_recovery_scans_only_after_the_recovery_point_across_segments(tmp_path):
    written, where = crashed(tmp_path / "p", checkpointed=30, unflushed=25)
    log = open_log(tmp_path / "p")
    try:
        assert read_all(log) == written
        rep = log.recovery
        assert rep.batches_recovered == 25
        assert rep.bytes_scanned == sum(HEADER_SIZE + len(w[3]) for w in written[30:])
        assert rep.segments_scanned == len({p for p, _ in where[29:]})
    finally:
        log.close()


def test_damage_in_a_middle_segment_deletes_the_later_segments(tmp_path):
    written, where = crashed(tmp_path / "p", checkpointed=5, unflushed=40)
    segments = sorted({p for p, _ in where[5:]})
    assert len(segments) >= 3
    victim = segments[1]
    first_in_victim = next(i for i, (p, _) in enumerate(where) if p == victim)
    path, pos = where[first_in_victim + 1]
    with open(path, "r+b") as f:
        f.seek(pos + 8)
        f.write(b"\xee")  # inside the CRC field
    log = open_log(tmp_path / "p")
    try:
        assert read_all(log) == written[: first_in_victim + 1]
        assert log.recovery.segments_deleted == len(segments) - 2
        assert sorted((tmp_path / "p").glob("*.log"))[-1] == victim
        info = log.append(b"after", record_count=1, append_time_ms=0)
        assert info.base_offset == written[first_in_victim + 1][0]
    finally:
        log.close()


def test_clean_close_then_reopen_scans_nothing(tmp_path):
    crashed(tmp_path / "p")
    log = open_log(tmp_path / "p")
    assert log.recovery is not None
    log.close()
    log = open_log(tmp_path / "p")
    assert log.recovery is None
    log.close()


def test_clean_marker_with_damaged_tail_keeps_the_log_end_and_reports_the_cut(tmp_path, caplog):
    log = open_log(tmp_path / "p")
    written = [append(log, i)[0] for i in range(4)]
    log.close()
    path = tmp_path / "p" / f"{LAST}.log"
    size = path.stat().st_size
    os.truncate(path, size - 3)
    log = open_log(tmp_path / "p")
    try:
        # The close recorded the log end: the cut batch is a damaged range, not cut off
        # (its offsets were acknowledged and may have been read), and not reused.
        assert read_all(log) == written[:-1]
        end = written[-1][0] + written[-1][1]
        assert log.log_end_offset == end
        assert [(d.first_offset, d.last_offset) for d in log.damaged()] == [(written[-1][0], end - 1)]
        assert append(log, 9)[1].base_offset == end
        assert log.recovery is not None
        assert "clean-shutdown marker present" in caplog.text
    finally:
        log.close()


@pytest.mark.parametrize("leftover", ["00000000000000000099.log.deleted", ".partition.json.x.tmp",
                                      "00000000000000000777.index"])
def test_leftover_files_are_removed_on_open(tmp_path, leftover):
    log = open_log(tmp_path / "p")
    log.close()
    (tmp_path / "p" / leftover).write_bytes(b"junk")
    log = open_log(tmp_path / "p")
    log.close()
    assert not (tmp_path / "p" / leftover).exists()


def test_a_recovery_point_left_stale_by_undone_appends_is_not_taken_for_damage(tmp_path):
    # A checkpoint records the point after a request's batch; the request fails on
    # another partition and its batch is undone; a batch of the same frame size but
    # another record count takes its place, is flushed (acknowledged), and the broker
    # dies before the next checkpoint. The frames before the stale point are whole and
    # match their CRCs: the point is stale, not the data damaged.
    log = open_log(tmp_path / "p", segment_bytes=1 << 20)
    kept = [append(log, i)[0] for i in range(4)]
    undone = log.append(b"U" * 9, record_count=3, append_time_ms=200)
    log.flush()
    log.checkpoint()  # the point: after the undone batch, at offset undone + 3
    log.undo_appends(undone.base_offset)
    again = log.append(b"A" * 9, record_count=1, append_time_ms=201)
    assert (again.base_offset, again.size) == (undone.base_offset, undone.size)
    log.flush()
    log._release()
    log = open_log(tmp_path / "p")
    try:
        assert read_all(log) == kept + [(again.base_offset, 1, 201, b"A" * 9)]
        assert log.log_end_offset == again.base_offset + 1 and log.damaged() == []
    finally:
        log.close()
