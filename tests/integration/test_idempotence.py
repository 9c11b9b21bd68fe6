"""Idempotent producers and idempotency keys over gRPC with raw stubs: retried batches
answered with their original offsets, out-of-order sequences refused with their
reason, nothing of a refused request appended, new producers refused rather than
active ones evicted from a full producer table, the dedup window (driven by a fake
clock), and both surviving a restart."""

from __future__ import annotations

import grpc
import pytest

from streamd.broker.producer_state import MAX_PRODUCERS, PRODUCER_MIN_IDLE_MS, SNAPSHOT_FILE
from streamd.cli.main import main
from streamd.client.records import decode_batches, encode_batch, values_batch
from streamd.testing import FakeClock
from streamd.v1 import streamd_pb2 as pb

from .helpers import Stubs, refused

WINDOW_MS = 60_000


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def running(make_server, clock):
    return make_server(clock=clock)


@pytest.fixture
def stubs(running):
    s = Stubs(running.address)
    yield s
    s.close()


def new_producer(stubs: Stubs) -> int:
    return stubs.log.InitProducer(pb.InitProducerRequest()).producer_id


def idem(values, pid: int, seq: int) -> pb.RecordBatch:
    batch = values_batch(values)
    batch.producer_id, batch.base_sequence = pid, seq
    return batch


def keyed(keys, pid: int = 0, seq: int = 0) -> pb.RecordBatch:
    record_set = pb.RecordSet()
    for k in keys:
        record_set.records.add(value=b"v-" + k.encode(), idempotency_key=k)
    batch = encode_batch(record_set)
    if pid:
        batch.producer_id, batch.base_sequence = pid, seq
    return batch


def produce(stubs: Stubs, topic: str, *batches: pb.RecordBatch, partition: int = 0) -> pb.PartitionProduceResult:
    request = pb.ProduceRequest(topic=topic, partitions=[pb.PartitionBatches(partition=partition, batches=batches)])
    return stubs.log.Produce(request).results[0]


def stored(stubs: Stubs, topic: str, partition: int = 0) -> list[bytes]:
    reply = stubs.fetch(topic, partition, 0, max_records=100_000)
    return [r.value for r in decode_batches(reply.batches, topic, partition)]


def dedup_topic_with_a_retried_batch(make_server, clock):
    """A server with dedup topic "d": record "a", then producer ``pid``'s batch b, a, c
    (a dropped as a duplicate). (server, stubs, pid)."""
    server = make_server(clock=clock)
    stubs = Stubs(server.address)
    stubs.create("d", 1, dedup_window_ms=WINDOW_MS)
    pid = new_producer(stubs)
    produce(stubs, "d", keyed(["a"]))
    produce(stubs, "d", keyed(["b", "a", "c"], pid, 0))
    return server, stubs, pid


# -- idempotent producers -------------------------------------------------------------

def test_init_producer_gives_distinct_nonzero_ids(stubs):
    ids = {new_producer(stubs) for _ in range(20)}
    assert len(ids) == 20 and 0 not in ids


def test_a_retried_batch_is_answered_with_its_original_offsets_and_not_appended(stubs):
    stubs.create("t", 1)
    pid = new_producer(stubs)
    produce(stubs, "t", values_batch([b"other"]))
    first = produce(stubs, "t", idem([b"a", b"b"], pid, 0))
    second = produce(stubs, "t", idem([b"c"], pid, 2))
    assert (first.base_offset, first.record_count, first.duplicate) == (1, 2, False)
    retry = produce(stubs, "t", idem([b"a", b"b"], pid, 0))
    assert retry.duplicate and (retry.base_offset, retry.record_count) == (1, 2)
    assert retry.append_time_ms == first.append_time_ms and retry.durable
    assert produce(stubs, "t", idem([b"c"], pid, 2)).base_offset == second.base_offset
    assert produce(stubs, "t", idem([b"d"], pid, 3)).base_offset == 4
    assert stored(stubs, "t") == [b"other", b"a", b"b", b"c", b"d"]


def test_gaps_and_forgotten_sequences_are_refused_with_the_reason(stubs):
    stubs.create("t", 1)
    pid = new_producer(stubs)
    for i in range(7):
        produce(stubs, "t", idem([b"x%d" % i], pid, i))
    code, reason, meta = refused(lambda: produce(stubs, "t", idem([b"gap"], pid, 9)))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "OUT_OF_ORDER_SEQUENCE")
    assert meta["producer_id"] == str(pid) and meta["expected_sequence"] == "7" and meta["got"] == "9"
    assert meta["topic"] == "t" and meta["partition"] == "0"
    _, reason, meta = refused(lambda: produce(stubs, "t", idem([b"x0"], pid, 0)))  # too old to be remembered
    assert reason == "OUT_OF_ORDER_SEQUENCE" and meta["got"] == "0"
    _, reason, meta = refused(lambda: produce(stubs, "t", idem([b"new"], pid + 1, 3)))
    assert reason == "UNKNOWN_PRODUCER" and meta["expected_sequence"] == "0"
    assert stored(stubs, "t") == [b"x%d" % i for i in range(7)]


def test_batches_of_one_request_are_checked_in_order_and_a_refusal_appends_nothing(stubs):
    stubs.create("t", 2)
    pid = new_producer(stubs)
    ok = produce(stubs, "t", idem([b"a"], pid, 0), idem([b"b", b"c"], pid, 1), idem([b"d"], pid, 3))
    assert (ok.base_offset, ok.record_count) == (0, 4)
    # partition 1 is fine, partition 0 has a gap in its second batch: nothing anywhere
    request = pb.ProduceRequest(topic="t", partitions=[
        pb.PartitionBatches(partition=1, batches=[idem([b"p1"], pid, 0)]),
        pb.PartitionBatches(partition=0, batches=[idem([b"e"], pid, 4), idem([b"f"], pid, 6)]),
    ])
    _, reason, _ = refused(lambda: stubs.log.Produce(request))
    assert reason == "OUT_OF_ORDER_SEQUENCE"
    assert stored(stubs, "t", 0) == [b"a", b"b", b"c", b"d"] and stored(stubs, "t", 1) == []
    # sequences are per partition: partition 1 still starts at 0
    assert produce(stubs, "t", idem([b"p1"], pid, 0), partition=1).base_offset == 0


def test_a_retry_of_several_batches_is_one_duplicate_answer_but_mixing_in_new_ones_is_refused(stubs):
    stubs.create("t", 1)
    pid = new_producer(stubs)
    produce(stubs, "t", idem([b"a"], pid, 0), idem([b"b", b"c"], pid, 1))
    retry = produce(stubs, "t", idem([b"a"], pid, 0), idem([b"b", b"c"], pid, 1))
    assert retry.duplicate and (retry.base_offset, retry.record_count) == (0, 3)
    code, reason, _ = refused(lambda: produce(stubs, "t", idem([b"b", b"c"], pid, 1), idem([b"d"], pid, 3)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BATCH")
    assert stored(stubs, "t") == [b"a", b"b", b"c"]


def test_the_producer_id_and_sequence_stay_in_the_stored_batch(stubs):
    stubs.create("t", 1, compression=pb.COMPRESSION_LZ4)  # rebuilt by the broker, fields kept
    pid = new_producer(stubs)
    produce(stubs, "t", idem([b"a"], pid, 0))
    batch = stubs.fetch("t", 0, 0).batches[0]
    assert (batch.producer_id, batch.base_sequence, batch.compression) == (pid, 0, pb.COMPRESSION_LZ4)


def test_producer_state_survives_a_clean_restart(make_server, tmp_path):
    first = make_server()
    stubs = Stubs(first.address)
    stubs.create("t", 1)
    pid = new_producer(stubs)
    for i in range(3):
        produce(stubs, "t", idem([b"r%d" % i], pid, i))
    stubs.close()
    first.stop()
    assert (tmp_path / "data" / "t" / "0" / SNAPSHOT_FILE).exists()
    again = make_server()
    stubs = Stubs(again.address)
    try:
        retry = produce(stubs, "t", idem([b"r2"], pid, 2))
        assert retry.duplicate and retry.base_offset == 2
        assert produce(stubs, "t", idem([b"r3"], pid, 3)).base_offset == 3
        _, reason, _ = refused(lambda: produce(stubs, "t", idem([b"r9"], pid, 9)))
        assert reason == "OUT_OF_ORDER_SEQUENCE"
    finally:
        stubs.close()


def test_producer_state_is_rebuilt_from_the_log_without_a_snapshot(make_server, tmp_path):
    first = make_server()
    stubs = Stubs(first.address)
    stubs.create("t", 1)
    pid = new_producer(stubs)
    for i in range(4):
        produce(stubs, "t", idem([b"r%d" % i, b"s%d" % i], pid, 2 * i))
    stubs.close()
    first.stop()
    (tmp_path / "data" / "t" / "0" / SNAPSHOT_FILE).unlink()
    again = make_server()
    stubs = Stubs(again.address)
    try:
        assert produce(stubs, "t", idem([b"r3", b"s3"], pid, 6)).duplicate
        assert produce(stubs, "t", idem([b"r4"], pid, 8)).base_offset == 8
    finally:
        stubs.close()


# -- idempotency keys -----------------------------------------------------------------

def dedup_pairs(result: pb.PartitionProduceResult) -> list[tuple[int, int]]:
    return [(d.index, d.offset) for d in result.deduplicated]


def test_keys_seen_within_the_window_are_not_appended_again(stubs, clock):
    stubs.create("d", 1, dedup_window_ms=WINDOW_MS)
    first = produce(stubs, "d", keyed(["a", "b", ""]))
    assert (first.base_offset, first.record_count, dedup_pairs(first)) == (0, 3, [])
    clock.advance(WINDOW_MS - 1)
    again = produce(stubs, "d", keyed(["c", "a", "", "b"]))
    assert (again.base_offset, again.record_count) == (3, 2)
    assert dedup_pairs(again) == [(1, 0), (3, 1)]
    assert stored(stubs, "d") == [b"v-a", b"v-b", b"v-", b"v-c", b"v-"]


def test_a_key_older_than_the_window_is_appended_again(stubs, clock):
    stubs.create("d", 1, dedup_window_ms=WINDOW_MS)
    produce(stubs, "d", keyed(["a"]))
    clock.advance(WINDOW_MS + 1)
    later = produce(stubs, "d", keyed(["a"]))
    assert (later.base_offset, later.record_count, dedup_pairs(later)) == (1, 1, [])
    clock.advance(10)
    assert dedup_pairs(produce(stubs, "d", keyed(["a"]))) == [(0, 1)]


def test_the_first_of_equal_keys_in_one_request_wins_and_all_duplicates_append_nothing(stubs):
    stubs.create("d", 1, dedup_window_ms=WINDOW_MS)
    result = produce(stubs, "d", keyed(["x", "y"]), keyed(["y", "x", "z"]))
    assert (result.base_offset, result.record_count) == (0, 3)
    assert dedup_pairs(result) == [(2, 1), (3, 0)]
    nothing = produce(stubs, "d", keyed(["z", "x"]))
    assert (nothing.record_count, dedup_pairs(nothing)) == (0, [(0, 2), (1, 0)])
    assert stored(stubs, "d") == [b"v-x", b"v-y", b"v-z"]


def test_broker_routed_records_are_deduplicated_too(stubs):
    stubs.create("d", 1, dedup_window_ms=WINDOW_MS)
    records = [pb.Record(value=b"1", idempotency_key="k"), pb.Record(value=b"2", idempotency_key="k")]
    result = stubs.log.Produce(pb.ProduceRequest(topic="d", records=records)).results[0]
    assert (result.record_count, dedup_pairs(result)) == (1, [(1, 0)])


def test_topics_without_a_window_keep_every_record(stubs):
    stubs.create("plain", 1)
    result = produce(stubs, "plain", keyed(["a", "a"]))
    assert (result.record_count, dedup_pairs(result)) == (2, [])


def test_an_idempotent_retry_repeats_which_records_were_deduplicated(stubs):
    stubs.create("d", 1, dedup_window_ms=WINDOW_MS)
    pid = new_producer(stubs)
    produce(stubs, "d", keyed(["a"]))
    first = produce(stubs, "d", keyed(["b", "a", "c"], pid, 0))
    assert (first.base_offset, first.record_count, dedup_pairs(first)) == (1, 2, [(1, 0)])
    retry = produce(stubs, "d", keyed(["b", "a", "c"], pid, 0))
    assert retry.duplicate and (retry.base_offset, retry.record_count, dedup_pairs(retry)) == (1, 2, [(1, 0)])
    dropped = produce(stubs, "d", keyed(["a", "c"], pid, 3))  # every record a duplicate
    assert (dropped.record_count, dedup_pairs(dropped)) == (0, [(0, 0), (1, 2)])
    assert produce(stubs, "d", keyed(["e"], pid, 5)).base_offset == 3  # the sequence moved on
    assert stored(stubs, "d") == [b"v-a", b"v-b", b"v-c", b"v-e"]


def test_dedup_window_and_producer_state_survive_restarts(make_server, clock, tmp_path):
    first, stubs, pid = dedup_topic_with_a_retried_batch(make_server, clock)
    produce(stubs, "d", keyed(["a", "c"], pid, 3))  # all duplicates: only the snapshot knows
    stubs.close()
    first.stop()
    second = make_server(clock=clock)
    stubs = Stubs(second.address)
    assert produce(stubs, "d", keyed(["e"], pid, 5)).base_offset == 3
    stubs.close()
    second.stop()
    (tmp_path / "data" / "d" / "0" / SNAPSHOT_FILE).unlink()  # now from the log alone
    third = make_server(clock=clock)
    stubs = Stubs(third.address)
    try:
        retry = produce(stubs, "d", keyed(["b", "a", "c"], pid, 0))
        assert retry.duplicate and (retry.base_offset, retry.record_count, dedup_pairs(retry)) == (1, 2, [(1, 0)])
        assert produce(stubs, "d", keyed(["e"], pid, 5)).duplicate
        assert dedup_pairs(produce(stubs, "d", keyed(["c", "f"]))) == [(0, 2)]
        assert produce(stubs, "d", keyed(["g"], pid, 6)).base_offset == 5
    finally:
        stubs.close()


def test_the_dedup_window_is_validated_and_described(stubs):
    for bad in (-1, 7 * 86_400_000 + 1):
        code, _, meta = refused(lambda bad=bad: stubs.create("bad", 1, dedup_window_ms=bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and meta["field"] == "config.dedup_window_ms"
    assert stubs.create("d", 1, dedup_window_ms=5000).config.dedup_window_ms == 5000
    assert stubs.create("plain", 1).config.dedup_window_ms == 0


def test_the_cli_creates_and_describes_a_topic_with_a_dedup_window(running, capsys):
    assert main(["--server", running.address, "topics", "create", "d", "--dedup-window-ms", "5000"]) == 0
    assert main(["--server", running.address, "topics", "describe", "d"]) == 0
    assert "dedup_window_ms=5000" in capsys.readouterr().out


def test_a_retry_after_the_window_still_repeats_which_records_were_deduplicated(stubs, clock):
    stubs.create("d", 1, dedup_window_ms=WINDOW_MS)
    pid = new_producer(stubs)
    produce(stubs, "d", keyed(["a"]))
    first = produce(stubs, "d", keyed(["b", "a", "c"], pid, 0))
    assert (first.base_offset, first.record_count, dedup_pairs(first)) == (1, 2, [(1, 0)])
    clock.advance(WINDOW_MS + 1)
    produce(stubs, "d", keyed(["z"]))  # a lookup: the window forgets a, b and c
    retry = produce(stubs, "d", keyed(["b", "a", "c"], pid, 0))
    assert retry.duplicate and (retry.base_offset, retry.record_count) == (1, 2)
    # Without the pair, a client places b, a, c at 1, 2, 3: c is at 2 and 3 is "z".
    assert dedup_pairs(retry) == [(1, 0)]


def test_a_retry_after_a_restart_past_the_window_repeats_which_records_were_deduplicated(make_server, clock):
    first, stubs, pid = dedup_topic_with_a_retried_batch(make_server, clock)
    produce(stubs, "d", keyed(["c", "a"], pid, 3))  # every record a duplicate
    stubs.close()
    first.stop()
    clock.advance(WINDOW_MS + 1)  # the reopened window holds no key: only the snapshot knows
    second = make_server(clock=clock)
    stubs = Stubs(second.address)
    try:
        retry = produce(stubs, "d", keyed(["b", "a", "c"], pid, 0))
        assert retry.duplicate and (retry.base_offset, retry.record_count, dedup_pairs(retry)) == (1, 2, [(1, 0)])
        dropped = produce(stubs, "d", keyed(["c", "a"], pid, 3))
        assert dropped.duplicate and (dropped.record_count, dedup_pairs(dropped)) == (0, [(0, 2), (1, 0)])
        assert produce(stubs, "d", keyed(["a"], pid, 5)).base_offset == 3  # past the window: stored again
        assert stored(stubs, "d") == [b"v-a", b"v-b", b"v-c", b"v-a"]
    finally:
        stubs.close()


def test_a_retry_whose_deduplicated_records_are_no_longer_known_is_refused_not_misanswered(
        make_server, clock, tmp_path):
    first, stubs, pid = dedup_topic_with_a_retried_batch(make_server, clock)
    stubs.close()
    first.stop()
    (tmp_path / "data" / "d" / "0" / SNAPSHOT_FILE).unlink()  # the log keeps only b and c
    clock.advance(WINDOW_MS + 1)
    second = make_server(clock=clock)
    stubs = Stubs(second.address)
    try:
        code, reason, meta = refused(lambda: produce(stubs, "d", keyed(["b", "a", "c"], pid, 0)))
        assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "RETRY_ANSWER_UNKNOWN")
        assert (meta["producer_id"], meta["base_sequence"]) == (str(pid), "0")
        assert produce(stubs, "d", keyed(["e"], pid, 3)).base_offset == 3  # its sequence numbers stay used
        assert stored(stubs, "d") == [b"v-a", b"v-b", b"v-c", b"v-e"]
    finally:
        stubs.close()


# -- other clients' producers ----------------------------------------------------------

def test_other_producers_cannot_make_a_retry_append_twice(stubs, clock):
    # Anyone can invent producer ids; were the producer table to evict the least
    # recent producer to make room, a flood of them would make the victim's retry of
    # its first batch an append. New producers are refused instead while every
    # producer the partition remembers was active within PRODUCER_MIN_IDLE_MS.
    stubs.create("t", 1)
    victim = new_producer(stubs)
    assert produce(stubs, "t", idem([b"once"], victim, 0)).base_offset == 0
    flood = [idem([b"x"], (1 << 40) + i, 0) for i in range(MAX_PRODUCERS)]  # ids nobody issued
    code, reason, meta = refused(lambda: produce(stubs, "t", *flood))  # one more than there is room for
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_PRODUCERS")
    assert (meta["producer_id"], meta["limit"]) == (str((1 << 40) + MAX_PRODUCERS - 1), str(MAX_PRODUCERS))
    assert (meta["topic"], meta["partition"], meta["min_idle_ms"]) == ("t", "0", str(PRODUCER_MIN_IDLE_MS))
    assert stored(stubs, "t") == [b"once"]  # the request is refused whole
    assert produce(stubs, "t", *flood[:-1]).record_count == MAX_PRODUCERS - 1  # fills the table exactly
    clock.advance(PRODUCER_MIN_IDLE_MS - 1)
    _, reason, _ = refused(lambda: produce(stubs, "t", flood[-1]))
    assert reason == "TOO_MANY_PRODUCERS"
    retry = produce(stubs, "t", idem([b"once"], victim, 0))
    assert retry.duplicate and retry.base_offset == 0
    assert produce(stubs, "t", idem([b"twice"], victim, 1)).base_offset == MAX_PRODUCERS
    clock.advance(1)  # the flood is idle long enough now: its least recent producer makes room
    assert produce(stubs, "t", flood[-1]).base_offset == MAX_PRODUCERS + 1
    assert produce(stubs, "t", idem([b"twice"], victim, 1)).duplicate
    _, reason, _ = refused(lambda: produce(stubs, "t", idem([b"x"], 1 << 40, 1)))
    assert reason == "UNKNOWN_PRODUCER"  # the one evicted
