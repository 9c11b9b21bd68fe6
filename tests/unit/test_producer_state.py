"""Idempotent producers' state: sequence checks (append, duplicate, gap, too old),
the bounded memory (last 5 batches, 7-day expiry, and a producer cap that evicts
only producers idle for PRODUCER_MIN_IDLE_MS and otherwise refuses a new one), and its persistence
(snapshot round trip, rebuild from snapshot + log tail, or from the whole log)."""

from __future__ import annotations

import struct
import zlib

import pytest

from segments import PartitionLog
from streamd.broker import producer_state
from streamd.broker.errors import (
    InvalidBatch,
    LimitExceeded,
    OutOfOrderSequence,
    TooManyProducers,
    UnknownProducer,
)
from streamd.broker.log_scan import producer_fields
from streamd.broker.producer_state import (
    PRODUCER_EXPIRY_MS,
    PRODUCER_MIN_IDLE_MS,
    REMEMBERED_BATCHES,
    SNAPSHOT_FILE,
    BatchMeta,
    ProducerStateTable,
)
from streamd.v1 import streamd_pb2 as pb

DAY = 86_400_000
PID = 7
NOW = 1000


def appended(table: ProducerStateTable, pid: int, seq: int, count: int, offset: int, now: int = 1000) -> BatchMeta:
    assert table.check(pid, seq, count, now_ms=now) is None
    meta = BatchMeta(seq, count, offset, count, now)
    table.record(pid, meta, now)
    return meta


def test_a_new_producer_starts_at_sequence_zero():
    table = ProducerStateTable()
    assert table.check(PID, 0, 3, now_ms=NOW) is None
    with pytest.raises(UnknownProducer) as caught:
        table.check(PID, 4, 1, topic="t", partition=2, now_ms=NOW)
    assert caught.value.reason == "UNKNOWN_PRODUCER"
    assert caught.value.metadata() == {
        "producer_id": "7", "expected_sequence": "0", "got": "4", "topic": "t", "partition": "2"}


def test_the_next_sequence_appends_and_a_remembered_batch_is_a_duplicate():
    table = ProducerStateTable()
    first = appended(table, PID, 0, 3, offset=10)
    second = appended(table, PID, 3, 2, offset=20)
    assert table.next_sequence(PID) == 5
    assert table.check(PID, 0, 3, now_ms=NOW) == first
    assert table.check(PID, 3, 2, now_ms=NOW) == second
    assert table.check(PID, 5, 1, now_ms=NOW) is None


def test_a_gap_and_an_unremembered_old_sequence_are_out_of_order():
    table = ProducerStateTable()
    appended(table, PID, 0, 3, offset=0)
    with pytest.raises(OutOfOrderSequence) as gap:
        table.check(PID, 4, 1, now_ms=NOW)
    assert (gap.value.reason, gap.value.expected_sequence, gap.value.got) == ("OUT_OF_ORDER_SEQUENCE", 3, 4)
    with pytest.raises(OutOfOrderSequence):
        table.check(PID, 1, 2, now_ms=NOW)  # inside a remembered batch, but not one
    with pytest.raises(OutOfOrderSequence):
        table.check(PID, 0, 2, now_ms=NOW)  # same start, another record count
    with pytest.raises(InvalidBatch):
        table.check(PID, -1, 1, now_ms=NOW)


def test_only_the_last_batches_are_remembered():
    table = ProducerStateTable()
    metas = [appended(table, PID, i, 1, offset=i) for i in range(REMEMBERED_BATCHES + 2)]
    for meta in metas[-REMEMBERED_BATCHES:]:
        assert table.check(PID, meta.base_sequence, 1, now_ms=NOW) == meta
    for meta in metas[:2]:
        with pytest.raises(OutOfOrderSequence):
            table.check(PID, meta.base_sequence, 1, now_ms=NOW)


def test_the_check_follows_earlier_batches_of_the_same_request():
    table = ProducerStateTable()
    appended(table, PID, 0, 2, offset=0)
    assert table.check(PID, 5, 1, expected=5, now_ms=NOW) is None
    with pytest.raises(OutOfOrderSequence):
        table.check(PID, 2, 1, expected=5, now_ms=NOW)


def full_table(max_producers: int, *, at: int = 0) -> ProducerStateTable:
    """A table holding producers 1..max_producers, each with one batch appended at ``at``."""
    table = ProducerStateTable(max_producers=max_producers)
    for pid in range(1, max_producers + 1):
        appended(table, pid, 0, 1, offset=pid, now=at)
    return table


def test_a_full_table_evicts_the_least_recent_producer_idle_long_enough_for_a_new_one():
    table = full_table(3)
    appended(table, 1, 1, 1, offset=9, now=PRODUCER_MIN_IDLE_MS)  # 1 is active again
    appended(table, 4, 0, 1, offset=10, now=PRODUCER_MIN_IDLE_MS)  # 2 and 3 idle just long enough
    assert len(table) == 3 and 2 not in table and all(p in table for p in (1, 3, 4))
    with pytest.raises(UnknownProducer):
        table.check(2, 1, 1, now_ms=PRODUCER_MIN_IDLE_MS)


def test_a_full_table_of_active_producers_refuses_a_new_one_and_keeps_its_producers():
    table = full_table(3)
    now = PRODUCER_MIN_IDLE_MS - 1  # nobody idle long enough
    before = table.snapshot(0)
    with pytest.raises(TooManyProducers) as caught:
        table.check(4, 0, 1, now_ms=now, topic="t", partition=2)
    assert (caught.value.reason, isinstance(caught.value, LimitExceeded)) == ("TOO_MANY_PRODUCERS", True)
    assert caught.value.metadata() == {"producer_id": "4", "limit": "3", "min_idle_ms": str(PRODUCER_MIN_IDLE_MS),
                                       "topic": "t", "partition": "2"}
    assert table.snapshot(0) == before  # the check changes nothing
    with pytest.raises(UnknownProducer):  # not a first batch: unknown, whatever the room
        table.check(4, 5, 1, now_ms=now)
    assert table.check(2, 0, 1, now_ms=now).base_offset == 2  # a retry is still a duplicate
    appended(table, 3, 1, 1, offset=20, now=now)  # and the producers it holds still append
    assert len(table) == 3 and table.next_sequence(3) == 2


def test_new_producers_earlier_in_the_same_request_take_the_room():
    table = ProducerStateTable(max_producers=5)
    for pid in (1, 2):  # idle long enough at `now`
        appended(table, pid, 0, 1, offset=pid, now=0)
    appended(table, 3, 0, 1, offset=3, now=PRODUCER_MIN_IDLE_MS)  # active
    now = PRODUCER_MIN_IDLE_MS
    for earlier in range(4):  # 2 free places + 2 idle producers
        assert table.check(100 + earlier, 0, 1, now_ms=now, new_in_request=earlier) is None
    with pytest.raises(TooManyProducers):
        table.check(104, 0, 1, now_ms=now, new_in_request=4)
    assert table.has_room(4, now) and not table.has_room(5, now) and not table.has_room(3, now - 1)


def test_an_active_producer_is_never_evicted_for_a_new_one_even_past_the_limit():
    # The corner the docstring names: 1 was idle when the check counted it, then
    # appended in the same request before the new producer was recorded.
    table = ProducerStateTable(max_producers=2)
    appended(table, 1, 0, 1, offset=0, now=0)
    appended(table, 2, 0, 1, offset=1, now=PRODUCER_MIN_IDLE_MS)
    now = PRODUCER_MIN_IDLE_MS
    assert table.check(3, 0, 1, now_ms=now) is None
    table.record(1, BatchMeta(1, 1, 2, 1, now), now)
    table.record(3, BatchMeta(0, 1, 3, 1, now), now)
    assert len(table) == 3 and all(p in table for p in (1, 2, 3))
    with pytest.raises(TooManyProducers):  # over the limit: nobody new until producers idle
        table.check(4, 0, 1, now_ms=now + PRODUCER_MIN_IDLE_MS - 1)
    later = now + PRODUCER_MIN_IDLE_MS  # all three idle: room for two new ones, not three
    assert table.has_room(2, later) and not table.has_room(3, later)
    appended(table, 4, 0, 1, offset=4, now=later)  # evicts two to get back under
    assert len(table) == 2 and 4 in table and 3 in table


def test_rebuilding_takes_every_stored_batch_and_keeps_the_most_recent_producers(tmp_path):
    table = ProducerStateTable(max_producers=3)
    for pid in range(1, 6):  # all "active": replay cannot refuse what the log holds
        table.replay(pid, 0, 1, base_offset=pid, append_time_ms=1000)
    assert len(table) == 3 and [p for p in range(1, 6) if p in table] == [3, 4, 5]
    copy, _ = ProducerStateTable.from_snapshot(table.snapshot(6), max_producers=3)
    assert copy.snapshot(6) == table.snapshot(6)
    plog = open_log(tmp_path / "p")
    for pid in range(11, 16):
        store(plog, pid, 0, 1, time=1000)
    loaded, _ = producer_state.load(plog, now_ms=1001, max_producers=3)
    assert [p for p in range(11, 16) if p in loaded] == [13, 14, 15]
    producer_state.write_snapshot(plog.directory, loaded.snapshot(plog.log_end_offset))
    again, covers = producer_state.load(plog, now_ms=1001, max_producers=3)
    assert covers == plog.log_end_offset and again.snapshot(covers) == loaded.snapshot(covers)
    plog.close()


def test_producers_idle_for_a_week_expire():
    table = ProducerStateTable()
    appended(table, 1, 0, 1, offset=0, now=0)
    appended(table, 2, 0, 1, offset=1, now=DAY)
    assert table.expire(PRODUCER_EXPIRY_MS) == 0
    assert table.expire(PRODUCER_EXPIRY_MS + 1) == 1
    assert 1 not in table and 2 in table
    assert table.expire(PRODUCER_EXPIRY_MS + DAY + 1) == 1 and len(table) == 0


def test_relaxed_matching_recognises_a_batch_stored_with_fewer_records():
    table = ProducerStateTable()
    # stored copy of (seq 0, 5 records) with 2 records dropped: base shifted to 3
    table.record(PID, BatchMeta(3, 2, 40, 2, 1000), 1000)
    assert table.next_sequence(PID) == 5
    with pytest.raises(OutOfOrderSequence):
        table.check(PID, 0, 5, now_ms=NOW)
    assert table.check(PID, 0, 5, relaxed=True, now_ms=NOW).base_offset == 40


def test_snapshot_round_trips_and_damage_is_detected():
    table = ProducerStateTable()
    for pid in (1, 2):
        for i in range(7):
            appended(table, pid, i * 2, 2, offset=100 * pid + i, now=5000 + i)
    raw = table.snapshot(covers_offset=1234)
    copy, covers = ProducerStateTable.from_snapshot(raw)
    assert covers == 1234
    assert copy.snapshot(1234) == raw
    assert copy.check(2, 12, 2, now_ms=NOW) == table.check(2, 12, 2, now_ms=NOW)
    for bad in (raw[:-1], raw[:10], b"XXXX" + raw[4:], raw[:20] + bytes([raw[20] ^ 1]) + raw[21:]):
        with pytest.raises(ValueError):
            ProducerStateTable.from_snapshot(bad)


def test_snapshot_round_trips_the_deduplicated_answers_and_reads_version_1_snapshots():
    table = ProducerStateTable()
    known = BatchMeta(0, 3, 40, 2, 1000, ((1, 7),))  # record 1 was dropped, answered with offset 7
    all_dropped = BatchMeta(3, 2, 42, 0, 1001, ((0, 41), (1, (1 << 40) + 3)))
    unknown = BatchMeta(6, 2, 43, 2, 1002, None)  # replayed from the log: not known
    table.record(PID, known, 1000)
    table.record(PID, all_dropped, 1001)
    table.record(PID, BatchMeta(5, 1, 42, 1, 1002), 1002)
    table.record(PID, unknown, 1002)
    raw = table.snapshot(covers_offset=44)
    copy, covers = ProducerStateTable.from_snapshot(raw)
    assert covers == 44 and copy.snapshot(44) == raw
    assert list(copy.entry(PID).batches) == list(table.entry(PID).batches)
    assert copy.check(PID, 0, 3, now_ms=NOW) == known
    assert copy.check(PID, 3, 2, now_ms=NOW).deduplicated == ((0, 41), (1, (1 << 40) + 3))
    assert copy.check(PID, 6, 2, now_ms=NOW).deduplicated is None and copy.answer_entries == 3
    for cut in range(1, 30):  # damage inside the answers (checksum fixed up) is still refused
        body = raw[:-4 - cut]
        with pytest.raises(ValueError):
            ProducerStateTable.from_snapshot(body + struct.pack("<I", zlib.crc32(body)))
    # A version 1 snapshot (no answers) is read: every answer not known.
    v1 = struct.pack("<4sHqI", b"SDPS", 1, 44, 1) + struct.pack("<QqqB", PID, 1000, 3, 1)
    v1 += struct.pack("<qIqIq", 0, 3, 40, 2, 1000)
    old, covers = ProducerStateTable.from_snapshot(v1 + struct.pack("<I", zlib.crc32(v1)))
    assert covers == 44 and old.check(PID, 0, 3, now_ms=NOW) == BatchMeta(0, 3, 40, 2, 1000, None)
    assert old.next_sequence(PID) == 3 and old.answer_entries == 0


def test_answers_beyond_the_budget_are_forgotten_least_recent_producer_first():
    table = ProducerStateTable(max_answer_entries=10)
    table.record(1, BatchMeta(0, 5, 0, 1, 1000, ((1, 0), (2, 0), (3, 0), (4, 0))), 1000)
    table.record(2, BatchMeta(0, 5, 1, 1, 1000, ((1, 0), (2, 0), (3, 0), (4, 0))), 1000)
    assert table.answer_entries == 8
    table.record(3, BatchMeta(0, 4, 2, 1, 1000, ((1, 0), (2, 0), (3, 0))), 1000)
    assert table.answer_entries == 3  # down to half the budget: producers 1 and 2 forgot theirs
    assert table.check(1, 0, 5, now_ms=NOW).deduplicated is None
    assert table.check(2, 0, 5, now_ms=NOW).deduplicated is None
    assert table.check(3, 0, 4, now_ms=NOW).deduplicated == ((1, 0), (2, 0), (3, 0))
    for seq in range(1, REMEMBERED_BATCHES + 1):  # pushed out of the last batches: no longer counted
        table.record(3, BatchMeta(seq * 4, 4, 2 + seq, 1, 1000, ((1, 0),)), 1000)
    assert table.answer_entries == REMEMBERED_BATCHES
    assert table.expire(PRODUCER_EXPIRY_MS + 1001) == 3 and table.answer_entries == 0


def test_producer_fields_are_read_in_any_field_order():
    batch = pb.RecordBatch(compression=pb.COMPRESSION_NONE, records=b"\x0a\x02\x1a\x00" * 100,
                           producer_id=(1 << 64) - 5, base_sequence=123456789012)
    body = batch.SerializeToString()
    assert producer_fields(body) == ((1 << 64) - 5, 123456789012)
    reordered = pb.RecordBatch(base_sequence=9).SerializeToString() + pb.RecordBatch(producer_id=3).SerializeToString()
    assert producer_fields(reordered) == (3, 9)
    assert producer_fields(pb.RecordBatch(records=b"x").SerializeToString()) == (0, 0)
    with pytest.raises(ValueError):
        producer_fields(body[:-3])


# -- persistence against a real PartitionLog ------------------------------------------

def open_log(path) -> PartitionLog:
    return PartitionLog.open(path, segment_bytes=400, segment_ms=DAY, index_interval_bytes=64, now_ms=0)


def store(plog: PartitionLog, pid: int, seq: int, count: int, time: int = 1000) -> None:
    records = pb.RecordSet(records=[pb.Record(value=b"v%d" % i) for i in range(count)]).SerializeToString()
    body = pb.RecordBatch(compression=pb.COMPRESSION_NONE, records=records, producer_id=pid,
                          base_sequence=seq).SerializeToString()
    plog.append(body, record_count=count, append_time_ms=time)


def fill(plog: PartitionLog, rounds: int, start: int = 0) -> None:
    for r in range(start, start + rounds):
        for pid in (11, 12):
            store(plog, pid, r * 2, 2)
        plog.append(pb.RecordBatch(records=pb.RecordSet(records=[pb.Record()]).SerializeToString())
                    .SerializeToString(), record_count=1, append_time_ms=1000)  # not idempotent


def expected_table(plog: PartitionLog) -> bytes:
    table = ProducerStateTable()
    table.replay_log(plog, 0)
    return table.snapshot(plog.log_end_offset)


def test_load_takes_the_snapshot_and_replays_only_the_batches_after_it(tmp_path):
    plog = open_log(tmp_path / "p")
    fill(plog, 4)
    table, _ = producer_state.load(plog, now_ms=2000)
    covers = plog.log_end_offset
    producer_state.write_snapshot(plog.directory, table.snapshot(covers))
    fill(plog, 3, start=4)  # several segments roll by now
    reopened, on_disk = producer_state.load(plog, now_ms=2000)
    assert on_disk == covers
    assert reopened.snapshot(plog.log_end_offset) == expected_table(plog)
    assert reopened.next_sequence(11) == 14 and reopened.check(12, 12, 2, now_ms=NOW).base_sequence == 12
    plog.close()


def test_without_a_usable_snapshot_the_state_is_rebuilt_from_the_whole_log(tmp_path):
    plog = open_log(tmp_path / "p")
    fill(plog, 5)
    table, covers = producer_state.load(plog, now_ms=2000)
    assert covers == -1 and table.snapshot(plog.log_end_offset) == expected_table(plog)
    path = tmp_path / "p" / SNAPSHOT_FILE
    path.write_bytes(b"garbage")
    table, covers = producer_state.load(plog, now_ms=2000)
    assert covers == -1 and table.next_sequence(12) == 10
    # a snapshot claiming more than the log holds (the log lost its tail) is not trusted
    ahead = ProducerStateTable()
    ahead.record(11, BatchMeta(10, 100, 0, 100, 1000), 1000)
    path.write_bytes(ahead.snapshot(plog.log_end_offset + 5))
    table, covers = producer_state.load(plog, now_ms=2000)
    assert covers == -1 and table.next_sequence(11) == 10
    plog.close()


def test_loading_expires_idle_producers(tmp_path):
    plog = open_log(tmp_path / "p")
    store(plog, 11, 0, 1, time=1000)
    store(plog, 12, 0, 1, time=1000 + 2 * DAY)
    table, _ = producer_state.load(plog, now_ms=1001 + PRODUCER_EXPIRY_MS)
    assert 11 not in table and 12 in table
    plog.close()
