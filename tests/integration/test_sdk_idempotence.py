"""The SDK's idempotent producer (the default) and idempotency keys against a real
broker: producer ids on the wire, keys resolving to the first offset, retries across
a broker restart on the same address, a refused batch leaving no gap (also when a
full producer table refuses a new producer), and OUT_OF_ORDER_SEQUENCE failing
records clearly before the producer starts over."""

from __future__ import annotations

import asyncio
import errno
import threading

import pytest

from streamd.broker.producer_state import MAX_PRODUCERS, PRODUCER_MIN_IDLE_MS
from streamd.client import Admin, AsyncProducer, Consumer, ProduceError, Producer, StreamdError
from streamd.client._sender import Sender
from streamd.client.records import values_batch
from streamd.testing import FakeClock
from streamd.v1 import streamd_pb2 as pb

from ..conftest import RunningServer, free_port
from .helpers import Stubs


@pytest.fixture
def fixed(tmp_path):
    port = free_port()
    started: list[RunningServer] = []

    def start() -> RunningServer:
        s = RunningServer(tmp_path / "data", port=port)
        started.append(s)
        return s

    try:
        yield start
    finally:
        for s in started:
            s.stop()


@pytest.fixture
def admin(server):
    with Admin(server.address) as a:
        yield a


def all_records(address: str, topic: str, partition: int = 0):
    with Consumer(address) as consumer:
        consumer.assign(topic, [partition])
        return [(r.offset, r.value) for r in consumer.records(exit_at_end=True)]


def stored_batches(address: str, topic: str):
    with Consumer(address) as consumer:
        _, reply = consumer.fetch(topic, 0, 0, max_records=100_000)
    return list(reply.batches)


def test_producers_are_idempotent_by_default(server, admin):
    admin.create_topic("t", 1)
    with Producer(server.address) as producer:
        producer.send_batch("t", 0, [b"a", b"b"])
        producer.send("t", b"c").result(10)
        assert producer.send_and_wait("t", b"d").offset == 3
    batches = stored_batches(server.address, "t")
    ids = {b.producer_id for b in batches}
    assert len(ids) == 1 and 0 not in ids
    assert [b.base_sequence for b in batches] == [0, 2, 3]
    with Producer(server.address, idempotent=False) as plain:
        assert plain.send_and_wait("t", b"e").offset == 4
    assert stored_batches(server.address, "t")[-1].producer_id == 0


def test_an_idempotency_key_resolves_to_the_first_record_with_it(server, admin):
    admin.create_topic("d", 1, dedup_window_ms=60_000)
    with Producer(server.address, linger_ms=20) as producer:
        first = producer.send("d", b"order-1", idempotency_key="order-1")
        again = producer.send("d", b"order-1 again", idempotency_key="order-1")  # same batch: first wins
        other = producer.send("d", b"order-2", idempotency_key="order-2")
        assert (first.result(10).offset, first.result().duplicate) == (0, False)
        assert (again.result(10).offset, again.result().duplicate) == (0, True)
        assert other.result(10).offset == 1
        late = producer.send_and_wait("d", b"order-2 later", idempotency_key="order-2")
        assert (late.offset, late.duplicate) == (1, True)
        assert producer.send_and_wait("d", b"order-3", idempotency_key="order-3").offset == 2
    assert [v for _, v in all_records(server.address, "d")] == [b"order-1", b"order-2", b"order-3"]


def test_sends_during_a_broker_restart_are_retried_and_sequences_continue(fixed):
    broker = fixed()
    with Admin(broker.address) as admin:
        admin.create_topic("t", 2)
    with Producer(broker.address, linger_ms=1) as producer:
        before = [producer.send("t", b"before-%d" % i, partition=i % 2) for i in range(20)]
        producer.flush()
        producer_id = producer._producer.producer_id
        broker.stop()  # clean stop: the producer state is snapshotted
        restart = threading.Timer(0.5, fixed)
        restart.start()
        during = [producer.send("t", b"during-%d" % i, partition=i % 2) for i in range(20)]
        producer.flush()
        restart.join()
        assert all(f.exception() is None for f in before + during)
        assert producer._producer.producer_id == producer_id  # no restart of the sequences
        address = broker.address
    for p in (0, 1):
        records = all_records(address, "t", p)
        assert [o for o, _ in records] == list(range(20))
        assert [v for _, v in records] == [b"before-%d" % i for i in range(p, 20, 2)] + [
            b"during-%d" % i for i in range(p, 20, 2)]
    for f in before + during:
        meta = f.result()
        assert dict(all_records(address, "t", meta.partition))[meta.offset] is not None


def test_a_refused_batch_leaves_no_gap_for_the_batches_after_it(server, admin):
    admin.create_topic("t", 1, max_record_bytes=100)

    async def run():
        async with AsyncProducer(server.address) as producer:
            futures = []
            for i in range(12):  # pipelined: later batches are on the wire when #5 is refused
                values = [b"x" * 500] if i == 5 else [b"ok-%d" % i]
                futures.append(await producer.send_batch("t", 0, values))
            return await asyncio.gather(*futures, return_exceptions=True)

    results = asyncio.run(run())
    assert isinstance(results[5], ProduceError) and results[5].reason == "RECORD_TOO_LARGE"
    good = [r for i, r in enumerate(results) if i != 5]
    assert [r.offset for r in good] == list(range(11))
    assert [v for _, v in all_records(server.address, "t")] == [b"ok-%d" % i for i in range(12) if i != 5]


def test_a_partition_that_forgot_the_producer_takes_the_batch_under_a_new_id(server, admin):
    # UNKNOWN_PRODUCER refuses the batch (nothing stored): the partition's batches are
    # numbered anew under a new producer id and sent again; nothing fails.
    admin.create_topic("t", 1)
    with Producer(server.address) as producer:
        producer.send_and_wait("t", b"one")
        first_id = producer._producer.producer_id
        admin.delete_topic("t")
        admin.create_topic("t", 1)  # a partition that never heard of this producer
        assert producer.send_and_wait("t", b"two").offset == 0
        assert producer.send_and_wait("t", b"three").offset == 1
        assert producer._producer.producer_id not in (None, first_id)
    assert [v for _, v in all_records(server.address, "t")] == [b"two", b"three"]
    batches = stored_batches(server.address, "t")
    assert [(b.producer_id, b.base_sequence) for b in batches] == [(batches[0].producer_id, 0),
                                                                   (batches[0].producer_id, 1)]
    assert batches[0].producer_id != first_id


def test_retries_are_bounded_by_the_delivery_timeout_and_the_producer_recovers_afterwards(fixed):
    broker = fixed()
    with Admin(broker.address) as admin:
        admin.create_topic("t", 1)
    with Producer(broker.address, delivery_timeout_ms=3000, retry_backoff_ms=20) as producer:
        producer.send_and_wait("t", b"a")
        broker.stop()
        with pytest.raises(StreamdError) as caught:  # given up when its time ran out (the bound, not a hang)
            producer.send("t", b"lost").result(timeout=60)
        assert caught.value.code == "DEADLINE_EXCEEDED"
        fixed()
        assert producer.send_and_wait("t", b"b").offset >= 1


def test_records_keep_their_order_while_batches_wait_to_be_sealed(server, admin, monkeypatch):
    # The first batch waits for the producer id while later ones are shipped (full
    # batches from send(), partial ones from linger timers): they must be numbered and
    # written in the order they were shipped, never a later one first.
    original = Sender._init_producer

    async def slow_init(self, *args):
        await asyncio.sleep(0.05)
        return await original(self, *args)

    monkeypatch.setattr(Sender, "_init_producer", slow_init)
    parts, n = 4, 150
    admin.create_topic("t", parts)
    for round_ in range(10):
        values = [[b"r%d-p%d-%03d" % (round_, p, i) for i in range(n)] for p in range(parts)]
        sent = [(p, values[p][i]) for i in range(n) for p in range(parts)]
        with Producer(server.address, linger_ms=1, batch_max_bytes=200) as producer:
            futures = [producer.send("t", v, partition=p) for p, v in sent]
            metas = [f.result(10) for f in futures]
        for p in range(parts):
            stored = all_records(server.address, "t", p)[-n:]
            assert [v for _, v in stored] == values[p], round_
            assert [(m.offset, v) for m, (q, v) in zip(metas, sent, strict=False) if q == p] == stored


def test_a_failed_producer_state_save_is_retried_and_the_next_records_are_kept(server, admin, monkeypatch):
    # A batch whose every record the dedup window drops only moves the producer's
    # sequence, which the broker saves in its producer snapshot before answering. If
    # that save fails (a full disk), the answer must not read as "not appended": the
    # producer would give the next records the same sequence numbers and the broker
    # would take them for a retry of the dropped batch, answer "duplicate" and drop them.
    from streamd.broker import partition as partition_module

    real, calls = partition_module.write_snapshot, []

    def full_once(directory, data):
        calls.append(directory)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(directory, data)

    admin.create_topic("d", 1, dedup_window_ms=60_000)
    with Producer(server.address, retry_backoff_ms=10) as producer:
        assert producer.send_and_wait("d", b"first", idempotency_key="k").offset == 0
        monkeypatch.setattr(partition_module, "write_snapshot", full_once)
        again = producer.send_and_wait("d", b"again", idempotency_key="k")
        assert (again.offset, again.duplicate) == (0, True)
        kept = producer.send_and_wait("d", b"next")
        assert (kept.offset, kept.duplicate) == (1, False)
    assert calls and [v for _, v in all_records(server.address, "d")] == [b"first", b"next"]


def test_a_retry_the_broker_can_no_longer_answer_fails_alone_and_the_next_records_are_kept(
        server, admin, monkeypatch):
    # The broker recognises a retry of a batch whose records its dedup window dropped
    # but no longer knows which (state rebuilt from the log, window expired): it
    # answers DATA_LOSS / RETRY_ANSWER_UNKNOWN. The sequence numbers are used, so the
    # producer must not reuse them: the next records would be taken for the retry.
    from streamd.broker import partition as partition_module
    from streamd.broker.dedup import DedupWindow
    from streamd.broker.producer_state import ProducerStateTable

    real_save, real_record, calls = partition_module.write_snapshot, ProducerStateTable.record, []

    def full_once(directory, data):  # the first attempt is answered UNAVAILABLE: the SDK retries
        calls.append(directory)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(directory, data)

    def without_answers(self, producer_id, meta, now_ms):  # as if rebuilt from the log
        real_record(self, producer_id, meta._replace(deduplicated=None), now_ms)

    admin.create_topic("d", 1, dedup_window_ms=60_000)
    with Producer(server.address, retry_backoff_ms=10) as producer:
        assert producer.send_and_wait("d", b"first", idempotency_key="k").offset == 0
        monkeypatch.setattr(partition_module, "write_snapshot", full_once)
        monkeypatch.setattr(ProducerStateTable, "record", without_answers)
        monkeypatch.setattr(DedupWindow, "offset_of", lambda self, key: None)  # and the window forgot
        with pytest.raises(ProduceError) as caught:
            producer.send_and_wait("d", b"again", idempotency_key="k")
        assert (caught.value.code, caught.value.reason) == ("DATA_LOSS", "RETRY_ANSWER_UNKNOWN")
        kept = producer.send_and_wait("d", b"next")
        assert (kept.offset, kept.duplicate) == (1, False)
    assert [v for _, v in all_records(server.address, "d")] == [b"first", b"next"]


def test_a_producer_refused_by_a_full_producer_table_fails_its_records_and_numbers_on_from_zero(make_server):
    # TOO_MANY_PRODUCERS (RESOURCE_EXHAUSTED) refuses a new producer's first batch:
    # nothing appended, so the pipelined batches behind it are renumbered down (and
    # refused the same way), and once there is room the producer starts at 0.
    clock = FakeClock()
    server = make_server(clock=clock)
    with Admin(server.address) as admin:
        admin.create_topic("t", 1)
    flood = []
    for i in range(MAX_PRODUCERS):  # ids nobody issued, filling the partition's table
        batch = values_batch([b"x"])
        batch.producer_id, batch.base_sequence = (1 << 40) + i, 0
        flood.append(batch)
    stubs = Stubs(server.address)
    try:
        stubs.log.Produce(pb.ProduceRequest(topic="t", partitions=[pb.PartitionBatches(partition=0, batches=flood)]))
    finally:
        stubs.close()

    async def run():
        async with AsyncProducer(server.address) as producer:
            futures = [await producer.send_batch("t", 0, [b"r%d" % i]) for i in range(3)]
            refused = await asyncio.gather(*futures, return_exceptions=True)
            clock.advance(PRODUCER_MIN_IDLE_MS)
            later = [await producer.send_batch("t", 0, [b"s%d" % i]) for i in range(2)]
            return refused, await asyncio.gather(*later), producer._sender.producer_id

    refused, kept, producer_id = asyncio.run(run())
    for exc in refused:
        assert isinstance(exc, ProduceError), exc
        assert (exc.code, exc.reason, exc.metadata["limit"]) == ("RESOURCE_EXHAUSTED", "TOO_MANY_PRODUCERS",
                                                                 str(MAX_PRODUCERS))
    assert [m.offset for m in kept] == [MAX_PRODUCERS, MAX_PRODUCERS + 1]
    mine = stored_batches(server.address, "t")[MAX_PRODUCERS:]
    assert [(b.producer_id, b.base_sequence) for b in mine] == [(producer_id, 0), (producer_id, 1)]
