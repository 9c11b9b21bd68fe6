"""Damaged segment files, through gRPC stubs, the SDK and the CLI (issue 10, items 4-6).

A real broker, real segment files, real damage: one bit flipped in a stored batch (in
its header's base offset, its CRC or its body; in a sealed or the active segment; at
a segment's first, a middle or its last batch), or a sealed segment cut in half while
the broker was stopped. Readers get every good record, are told the damaged offset
range (never a server path or byte position), and can go on after it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from segments.batch import iter_headers
from streamd.cli.main import main
from streamd.client import AsyncConsumer, Consumer, CorruptRecordsError, GroupConsumer
from streamd.testing import FakeClock
from streamd.v1 import streamd_pb2 as pb
from tests.conftest import ROOT
from tests.faults import flip_byte

from .helpers import Stubs, error_info, refused

BATCHES, PER_BATCH = 60, 20
RECORDS = BATCHES * PER_BATCH
SEGMENT_BYTES = 4096
#: Byte of the frame (``segments.batch``) to flip: base offset, CRC, inside the body.
FIELDS = {"base": 12, "crc": 8, "body": 60}


def _produce(stubs: Stubs, topic: str = "t", clock: FakeClock | None = None) -> None:
    stubs.create(topic, 1, segment_bytes=SEGMENT_BYTES)
    for b in range(BATCHES):
        stubs.produce_values(topic, 0, [b"v%05d" % (b * PER_BATCH + i) for i in range(PER_BATCH)])
        if clock is not None:
            clock.advance(10)


def _segments(data_dir: Path, topic: str = "t") -> list[tuple[Path, list]]:
    """Each segment file and its frame headers, in offset order."""
    out = []
    for log_file in sorted((data_dir / topic / "0").glob("*.log")):
        out.append((log_file, list(iter_headers(log_file.read_bytes()))))
    return out




def _damage(data_dir: Path, segment: str, which: str, field: str):
    """Flip one bit of a batch; the damaged batch's header (as it was)."""
    segments = _segments(data_dir)
    assert len(segments) >= 3
    log_file, headers = segments[1] if segment == "sealed" else segments[-1]
    header = {"first": headers[0], "middle": headers[len(headers) // 2], "last": headers[-1]}[which]
    flip_byte(log_file, header.position + FIELDS[field])
    return header


def _values(batches) -> list[bytes]:
    from streamd.client.records import decode_batches

    return [r.value for r in decode_batches(batches, "t", 0)]


def _no_server_details(message: str, metadata: dict, data_dir: Path) -> None:
    text = message + " " + " ".join(f"{k}={v}" for k, v in metadata.items())
    assert str(data_dir) not in text and ".log" not in text and "byte" not in text and "position" not in text


@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize("segment", ["sealed", "active"])
@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_fetch_returns_the_good_records_then_the_damaged_range(server, stubs, tmp_path, field, segment, which):
    _produce(stubs)
    bad = _damage(tmp_path / "data", segment, which, field)
    first, last = bad.base_offset, bad.next_offset - 1
    # Fetch from 0 with default limits: every record before the damage, then DATA_LOSS.
    got, offset = [], 0
    for _ in range(RECORDS):
        try:
            reply = stubs.fetch("t", 0, offset)
        except grpc.RpcError as exc:
            err = exc
            code, reason, meta = error_info(err)
            break
        assert reply.batches, f"empty answer at {offset} below the log end"
        got += _values(reply.batches)
        offset = reply.next_offset
    assert got == [b"v%05d" % i for i in range(first)]
    assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "CORRUPT_BATCH")
    assert meta == {"topic": "t", "partition": "0", "first_offset": str(first), "last_offset": str(last),
                    "next_offset": str(last + 1)}
    _no_server_details(err.details(), meta, tmp_path / "data")
    assert f"offsets {first}..{last}" in err.details()
    # Any offset inside it answers the same; reading goes on after it.
    assert refused(stubs.fetch, "t", 0, last)[2]["first_offset"] == str(first)
    rest = stubs.fetch("t", 0, last + 1, max_records=RECORDS)
    assert _values(rest.batches) == [b"v%05d" % i for i in range(last + 1, RECORDS)]
    # Subscribe (push) the same: the good records, then the stream ends with the range.
    call = stubs.log.Subscribe(pb.SubscribeRequest(topic="t", partition=0, offset=0))
    pushed = []
    with pytest.raises(grpc.RpcError) as caught:
        for message in call:
            pushed += _values(message.batches)
    assert pushed == got
    assert error_info(caught.value)[1:] == ("CORRUPT_BATCH", meta)
    # DescribeTopic lists it.
    damaged = stubs.topics.DescribeTopic(pb.DescribeTopicRequest(topic="t")).topic.partitions[0].damaged
    assert [(d.first_offset, d.last_offset) for d in damaged] == [(first, last)]


def test_sdk_consumer_stops_with_a_typed_error_or_skips_with_a_warning(server, stubs, tmp_path, caplog):
    _produce(stubs)
    bad = _damage(tmp_path / "data", "sealed", "middle", "body")
    first, last = bad.base_offset, bad.next_offset - 1
    with Consumer(server.address) as consumer:
        consumer.assign("t")
        got = []
        with pytest.raises(CorruptRecordsError) as caught:
            for record in consumer.records(exit_at_end=True):
                got.append(record.offset)
        err = caught.value
        assert got == list(range(first))
        assert (err.topic, err.partition, err.first_offset, err.last_offset, err.next_offset) == (
            "t", 0, first, last, last + 1)
        assert (err.code, err.reason) == ("DATA_LOSS", "CORRUPT_BATCH")
        assert consumer.positions[("t", 0)] == first  # left at the damage: the caller decides
        with pytest.raises(CorruptRecordsError):
            consumer.poll(max_wait_ms=0)
        with pytest.raises(CorruptRecordsError):
            list(consumer.subscribe("t", 0, offset=0))
    skipped = list(range(first)) + list(range(last + 1, RECORDS))
    with caplog.at_level(logging.WARNING, logger="streamd.client.consumer"):
        with Consumer(server.address, skip_corrupt=True) as consumer:
            consumer.assign("t")
            assert [r.offset for r in consumer.records(exit_at_end=True)] == skipped
            pushed = []
            for record in consumer.subscribe("t", 0, offset=0):
                pushed.append(record.offset)
                if record.offset == RECORDS - 1:
                    break
            assert pushed == skipped
    warnings = [r.getMessage() for r in caplog.records if r.name == "streamd.client.consumer"]
    assert warnings and all(f"skipping damaged offsets {first}..{last}" in w for w in warnings)


def test_async_consumer_and_group_consumer_skip_when_asked(server, stubs, tmp_path):
    _produce(stubs)
    bad = _damage(tmp_path / "data", "sealed", "first", "base")
    first, last = bad.base_offset, bad.next_offset - 1
    expected = list(range(first)) + list(range(last + 1, RECORDS))

    async def read(skip: bool) -> list[int]:
        got = []
        async with AsyncConsumer(server.address, skip_corrupt=skip) as consumer:
            async for record in consumer.subscribe("t", [0], offset=0):
                got.append(record.offset)
                if record.offset == RECORDS - 1:
                    break
        return got

    assert asyncio.run(read(True)) == expected
    with pytest.raises(CorruptRecordsError) as caught:
        asyncio.run(read(False))
    assert caught.value.first_offset == first

    member = GroupConsumer("g", ["t"], server.address, skip_corrupt=True, auto_commit_interval_ms=None)
    try:
        member.wait_for_assignment()
        got = []
        for record in member.records(idle_timeout_s=2):
            got.append(record.offset)
            if record.offset == RECORDS - 1:
                break
        member.commit()
        assert got == expected
        assert member.committed[("t", 0)] == RECORDS
    finally:
        member.close()
    stopper = GroupConsumer("g2", ["t"], server.address, auto_commit_interval_ms=None)
    try:
        stopper.wait_for_assignment()
        got = []
        with pytest.raises(CorruptRecordsError):
            for record in stopper.records(idle_timeout_s=5):
                got.append(record.offset)
        assert got == list(range(first))
    finally:
        stopper.close()


def test_cli_consume_and_replay_stop_or_skip(server, stubs, tmp_path, capsys):
    _produce(stubs)
    bad = _damage(tmp_path / "data", "active", "middle", "crc")
    first, last = bad.base_offset, bad.next_offset - 1
    base = ["--server", server.address]
    assert main(base + ["consume", "t", "--exit-at-end"]) == 1
    out, err = capsys.readouterr()
    assert out.split() == [f"v{i:05d}" for i in range(first)]
    assert f"streamd: DATA_LOSS CORRUPT_BATCH: t/0: offsets {first}..{last} cannot be read" in err
    assert "(--skip-corrupt reads on past them)" in err
    assert main(base + ["consume", "t", "--exit-at-end", "--skip-corrupt"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [f"v{i:05d}" for i in range(RECORDS) if not first <= i <= last]
    assert f"warning: t/0: skipping damaged offsets {first}..{last}" in err

    stubs.create("copy", 1)
    assert main(base + ["replay", "t", "--from", "0", "--into", "copy"]) == 1
    _, err = capsys.readouterr()
    assert f"offsets {first}..{last} cannot be read" in err and "resume with" in err
    target = tmp_path / "out.jsonl"
    assert main(base + ["replay", "t", "--from", "0", "--output", str(target), "--skip-corrupt"]) == 0
    _, err = capsys.readouterr()
    assert len(target.read_text().splitlines()) == RECORDS - (last - first + 1)
    assert f"skipping damaged offsets {first}..{last}" in err and f"skipped {last - first + 1} damaged" in err


def test_queue_group_skips_damaged_records_counts_them_and_goes_on(make_server, tmp_path, capsys):
    from .test_queues import create, receive, stats

    running = make_server()
    stubs = Stubs(running.address)
    _produce(stubs)
    bad = _damage(tmp_path / "data", "sealed", "middle", "base")
    first, last = bad.base_offset, bad.next_offset - 1
    create(stubs, "workers", "t", at_most_once=True)  # settled when handed out: no acks to send
    got = []
    for _ in range(50):
        got += [m.offset for m in receive(stubs, 500, "workers", "t")]
        if len(got) >= RECORDS - (last - first + 1):
            break
    assert sorted(got) == [i for i in range(RECORDS) if not first <= i <= last]
    s = stats(stubs, "workers", "t")
    assert (s.lost_to_corruption, s.backlog, s.in_flight, s.start_offset) == (last - first + 1, 0, 0, RECORDS)
    stubs.close()
    running.stop()
    # After a restart the skip is remembered: counted once, nothing delivered again.
    running = make_server()
    stubs = Stubs(running.address)
    try:
        s = stats(stubs, "workers", "t")
        assert (s.lost_to_corruption, s.start_offset) == (last - first + 1, RECORDS)
        assert receive(stubs, 500, "workers", "t", max_wait_ms=100) == []
        assert stats(stubs, "workers", "t").lost_to_corruption == last - first + 1
        assert main(["--server", running.address, "queue", "stats", "workers", "--topic", "t", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["partitions"][0]["lost_to_corruption"] == str(last - first + 1)
    finally:
        stubs.close()


def test_list_offsets_by_time_does_not_trust_a_damaged_header(make_server, tmp_path, capsys):
    clock = FakeClock(1_700_000_000_000)
    running = make_server(clock=clock)
    stubs = Stubs(running.address)
    try:
        start = clock.now_ms()
        _produce(stubs, clock=clock)  # batch b appended at start + 10 * b
        bad = _damage(tmp_path / "data", "sealed", "middle", "base")
        b = bad.base_offset // PER_BATCH

        def at(t: int):
            request = pb.ListOffsetsRequest(topic="t", timestamp_ms=t)
            return stubs.log.ListOffsets(request).offsets[0].offset

        # Between the last good batch before it and the first after it, the answer may
        # be the damaged batch (its append time is not known): DATA_LOSS with its range.
        for t in (start + 10 * b, start + 10 * b + 5, start + 10 * (b + 1)):
            code, reason, meta = refused(at, t)
            assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "CORRUPT_BATCH")
            assert (meta["first_offset"], meta["last_offset"]) == (str(bad.base_offset), str(bad.next_offset - 1))
        # Before and after it the answers are exact.
        assert at(start + 10 * (b - 1)) == bad.base_offset - PER_BATCH
        assert at(start + 10 * (b + 2)) == bad.next_offset + PER_BATCH
        server = ["--server", running.address]
        assert main(server + ["offsets", "t", "--at", str(start + 10 * b)]) == 1
        assert f"offsets {bad.base_offset}..{bad.next_offset - 1} cannot be read" in capsys.readouterr().err
        assert main(server + ["offsets", "t", "--at", str(start + 10 * (b + 2)), "--json"]) == 0
        assert f'"at": {bad.next_offset + PER_BATCH}' in capsys.readouterr().out
    finally:
        stubs.close()


def test_sealed_segment_cut_in_half_is_reported_and_reads_answer_data_loss(make_server, tmp_path, caplog, capsys):
    from .test_metrics import samples, scrape, value

    running = make_server()
    stubs = Stubs(running.address)
    _produce(stubs)
    stubs.close()
    running.stop()  # a clean shutdown
    log_file, headers = _segments(tmp_path / "data")[1]
    next_base = _segments(tmp_path / "data")[2][1][0].base_offset
    os.truncate(log_file, log_file.stat().st_size // 2)
    kept = [h for h in headers if h.end <= log_file.stat().st_size]
    cut = kept[-1].next_offset  # the first offset the file no longer holds

    with caplog.at_level(logging.WARNING):
        running = make_server()
    events = [r for r in caplog.records if getattr(r, "event", None) == "log_damaged"]
    assert [(r.first_offset, r.last_offset) for r in events] == [(cut, next_base - 1)]
    stubs = Stubs(running.address)
    try:
        assert value(samples(scrape(running)), "streamd_log_damaged_offsets", topic="t", partition=0) \
            == next_base - cut
        damaged = stubs.topics.DescribeTopic(pb.DescribeTopicRequest(topic="t")).topic.partitions[0].damaged
        assert [(d.first_offset, d.last_offset, d.cause) for d in damaged] == [
            (cut, next_base - 1, "the segment file ends before its last offset")]
        assert main(["--server", running.address, "topics", "describe", "t"]) == 0
        assert f"damaged: partition 0 offsets {cut}..{next_base - 1} cannot be read" in capsys.readouterr().out
        # A fetch in the missing range is DATA_LOSS with the range, never an empty answer.
        code, reason, meta = refused(stubs.fetch, "t", 0, cut + 1)
        assert (code, reason, meta["first_offset"], meta["next_offset"]) == (
            grpc.StatusCode.DATA_LOSS, "CORRUPT_BATCH", str(cut), str(next_base))
        reply = stubs.fetch("t", 0, headers[0].base_offset, max_records=RECORDS)
        assert reply.next_offset == cut
        # consume --exit-at-end ends: an error by default, every other record with --skip-corrupt.
        cmd = [sys.executable, "-m", "streamd", "--server", running.address, "consume", "t", "--exit-at-end"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        stopped = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
        assert stopped.returncode == 1 and f"offsets {cut}..{next_base - 1}" in stopped.stderr
        assert stopped.stdout.split() == [f"v{i:05d}" for i in range(cut)]
        skipped = subprocess.run(cmd + ["--skip-corrupt"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                                 env=env)
        assert skipped.returncode == 0, skipped.stderr
        assert skipped.stdout.split() == [f"v{i:05d}" for i in range(RECORDS) if not cut <= i < next_base]
        assert f"skipping damaged offsets {cut}..{next_base - 1}" in skipped.stderr
    finally:
        stubs.close()


def test_seek_to_time_into_damage_raises_or_starts_after_it(make_server, tmp_path):
    clock = FakeClock(1_700_000_000_000)
    running = make_server(clock=clock)
    stubs = Stubs(running.address)
    try:
        start = clock.now_ms()
        _produce(stubs, clock=clock)
        bad = _damage(tmp_path / "data", "sealed", "middle", "crc")
        when = start + 10 * (bad.base_offset // PER_BATCH)
        with Consumer(running.address) as consumer:
            consumer.assign("t")
            with pytest.raises(CorruptRecordsError) as caught:
                consumer.seek_to_time("t", when)
            assert caught.value.first_offset == bad.base_offset
        with Consumer(running.address, skip_corrupt=True) as consumer:
            consumer.assign("t")
            consumer.seek_to_time("t", when)
            assert consumer.positions[("t", 0)] == bad.next_offset
            assert next(consumer.records(exit_at_end=True)).offset == bad.next_offset
    finally:
        stubs.close()


def test_sealed_segment_cut_under_a_running_broker_answers_data_loss_not_sigbus(server_process, tmp_path):
    proc = server_process()
    stubs = Stubs(proc.address)
    pad = b"." * 200
    try:
        # Segments of several pages: a read through the map of a page past the new end
        # of the file is SIGBUS (the page holding the end reads zeros).
        stubs.create("t", 1, segment_bytes=64 * 1024)
        for b in range(100):
            stubs.produce_values("t", 0, [b"v%05d" % (b * PER_BATCH + i) + pad for i in range(PER_BATCH)])
        offset = 0  # read it all once, so the sealed segments are mapped
        for _ in range(100):
            reply = stubs.fetch("t", 0, offset)
            if not reply.batches:
                break
            offset = reply.next_offset
        assert offset == 100 * PER_BATCH
        segments = _segments(proc.data_dir)
        assert len(segments) >= 3
        log_file, headers = segments[0]
        next_base = segments[1][1][0].base_offset
        cut = headers[1]
        os.truncate(log_file, cut.position + 5)  # an operator's mistake, under the broker
        # The broker stays up and answers the lost offsets as a damaged range.
        code, reason, meta = refused(stubs.fetch, "t", 0, headers[-1].base_offset)
        assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "CORRUPT_BATCH")
        assert (meta["first_offset"], meta["last_offset"], meta["next_offset"]) == (
            str(cut.base_offset), str(next_base - 1), str(next_base))
        reply = stubs.fetch("t", 0, 0, max_records=100 * PER_BATCH)
        assert reply.next_offset == cut.base_offset
        assert [v[:6] for v in _values(reply.batches)] == [b"v%05d" % i for i in range(cut.base_offset)]
        assert _values(stubs.fetch("t", 0, next_base, max_records=1).batches)[0] == b"v%05d" % next_base + pad
        damaged = stubs.topics.DescribeTopic(pb.DescribeTopicRequest(topic="t")).topic.partitions[0].damaged
        assert [(d.first_offset, d.last_offset) for d in damaged] == [(cut.base_offset, next_base - 1)]
        assert proc.proc.poll() is None
    finally:
        stubs.close()
    assert proc.terminate() == 0


def test_garbled_length_of_a_sealed_segments_last_batch_is_a_garbled_header_not_a_cut_file(make_server, tmp_path):
    running = make_server()
    stubs = Stubs(running.address)
    _produce(stubs)
    stubs.close()
    running.stop()
    log_file, headers = _segments(tmp_path / "data")[1]
    last = headers[-1]
    flip_byte(log_file, last.position + 2, 0x10)  # its length now runs past the end of the file

    running = make_server()
    stubs = Stubs(running.address)
    try:
        damaged = stubs.topics.DescribeTopic(pb.DescribeTopicRequest(topic="t")).topic.partitions[0].damaged
        assert [(d.first_offset, d.last_offset, d.cause) for d in damaged] == [
            (last.base_offset, last.next_offset - 1, "a stored batch header is garbled")]
        with pytest.raises(grpc.RpcError) as caught:
            stubs.fetch("t", 0, last.base_offset)
        assert "(a stored batch header is garbled)" in caught.value.details()
    finally:
        stubs.close()
