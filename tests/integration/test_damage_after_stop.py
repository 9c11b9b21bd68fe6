"""Damage in the last (active) segment found when a broker starts (issue 10).

The log end a broker recorded (at a clean stop, or at the recovery point it fsynced
before a crash) is trusted: the records below it were acknowledged and may have been
read. So damage found at start-up before that point, in a header field of a stored
batch (tag, length, base offset, record count) or a file cut short, is a damaged
range (DATA_LOSS / CORRUPT_BATCH on fetch, listed by DescribeTopic), never a cut:
no good record after it is lost, the log end stays where it was, and the next
record gets the next offset, never a reused one and never one a garbled record count
made up. Only what lies after the recovery point of a crashed broker (a torn tail)
is cut (tests/crash/test_sigkill.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from segments.batch import iter_headers
from streamd.client.records import decode_batches
from streamd.v1 import streamd_pb2 as pb
from tests.faults import flip_byte

from .helpers import Stubs, error_info
from .test_damaged_log import RECORDS, _produce

#: (byte of the frame header, bit mask) to flip (``segments.batch``): one bit of the
#: tag, the length, the base offset, the record count (low byte, and a high bit that
#: made the count about a billion).
FIELDS = {"tag": (0, 0x01), "length": (2, 0x10), "base": (12, 0x01), "count": (30, 0x01), "count_hi": (33, 0x40)}


def _active(data_dir: Path) -> tuple[Path, list]:
    log_file = sorted((data_dir / "t" / "0").glob("*.log"))[-1]
    data = log_file.read_bytes()
    return log_file, list(iter_headers(data[: len(data.rstrip(b"\0"))]))


def _read_all(stubs: Stubs) -> tuple[dict[int, bytes], list[tuple[int, int]]]:
    """Every readable record by offset, skipping (and collecting) damaged ranges."""
    got, damaged, offset = {}, [], 0
    for _ in range(RECORDS):
        try:
            reply = stubs.fetch("t", 0, offset)
        except grpc.RpcError as exc:
            code, reason, meta = error_info(exc)
            assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "CORRUPT_BATCH"), exc
            damaged.append((int(meta["first_offset"]), int(meta["last_offset"])))
            offset = int(meta["next_offset"])
            continue
        if not reply.batches:
            assert offset == reply.log_end_offset
            break
        for record in decode_batches(reply.batches, "t", 0):
            if record.offset >= offset:
                got[record.offset] = record.value
        offset = reply.next_offset
    return got, damaged


def _check(stubs: Stubs, first: int, last: int, end: int = RECORDS) -> None:
    """The log end is ``end``, offsets ``first..last`` are one damaged range and
    every other record below the end reads back as written."""
    latest = stubs.log.ListOffsets(pb.ListOffsetsRequest(topic="t", position=pb.OFFSET_SPEC_LATEST))
    assert latest.offsets[0].offset == end
    got, damaged = _read_all(stubs)
    assert damaged == [(first, last)]
    assert got == {o: b"v%05d" % o for o in range(end) if not first <= o <= last}
    described = stubs.topics.DescribeTopic(pb.DescribeTopicRequest(topic="t")).topic.partitions[0].damaged
    assert [(d.first_offset, d.last_offset) for d in described] == [(first, last)]


@pytest.mark.parametrize("which", ["last", "middle", "first"])
@pytest.mark.parametrize("field", sorted(FIELDS))
def test_header_damage_in_the_active_segment_after_a_clean_stop_is_a_damaged_range(make_server, tmp_path,
                                                                                  field, which):
    running = make_server()
    stubs = Stubs(running.address)
    _produce(stubs)
    stubs.close()
    running.stop()  # a clean stop: the log end 1200 is recorded
    log_file, headers = _active(tmp_path / "data")
    assert len(headers) >= 3
    bad = {"first": headers[0], "middle": headers[len(headers) // 2], "last": headers[-1]}[which]
    byte, mask = FIELDS[field]
    flip_byte(log_file, bad.position + byte, mask)

    running = make_server()
    stubs = Stubs(running.address)
    try:
        _check(stubs, bad.base_offset, bad.next_offset - 1)
        # The next record gets the recorded log end: no offset is reused or skipped.
        assert stubs.produce_values("t", 0, [b"v%05d" % RECORDS]).base_offset == RECORDS
        assert [r.value for r in decode_batches(stubs.fetch("t", 0, RECORDS).batches, "t", 0)] == [b"v01200"]
    finally:
        stubs.close()
    running.stop()
    running = make_server()  # and once more: the same answers
    stubs = Stubs(running.address)
    try:
        _check(stubs, bad.base_offset, bad.next_offset - 1, RECORDS + 1)
    finally:
        stubs.close()


def test_active_segment_cut_short_after_a_clean_stop_keeps_the_log_end(make_server, tmp_path):
    running = make_server()
    stubs = Stubs(running.address)
    _produce(stubs)
    stubs.close()
    running.stop()
    log_file, headers = _active(tmp_path / "data")
    middle = headers[len(headers) // 2]
    os.truncate(log_file, middle.position + 5)  # inside the middle batch

    running = make_server()
    stubs = Stubs(running.address)
    try:
        _check(stubs, middle.base_offset, RECORDS - 1)
        code, reason, meta = error_info(_refused_fetch(stubs, RECORDS - 1))
        assert (code, reason, meta["next_offset"]) == (grpc.StatusCode.DATA_LOSS, "CORRUPT_BATCH", str(RECORDS))
        assert stubs.produce_values("t", 0, [b"v%05d" % RECORDS]).base_offset == RECORDS
    finally:
        stubs.close()


def _refused_fetch(stubs: Stubs, offset: int) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stubs.fetch("t", 0, offset)
    return caught.value


def test_damage_before_the_recovery_point_of_a_killed_broker_is_kept_not_cut(server_process, tmp_path):
    data = tmp_path / "data"
    proc = server_process(data_dir=data)
    stubs = Stubs(proc.address)
    _produce(stubs)
    stubs.close()
    assert proc.terminate() == 0
    proc = server_process(data_dir=data)  # opening records the recovery point at the log end
    proc.kill()  # SIGKILL: no clean-shutdown mark, the crash path runs at the next start
    log_file, headers = _active(data)
    bad = headers[len(headers) // 2]
    flip_byte(log_file, bad.position + FIELDS["base"][0])  # before the recovery point

    proc = server_process(data_dir=data)
    stubs = Stubs(proc.address)
    try:
        _check(stubs, bad.base_offset, bad.next_offset - 1)
        assert stubs.produce_values("t", 0, [b"v%05d" % RECORDS]).base_offset == RECORDS
    finally:
        stubs.close()
    assert proc.terminate() == 0
