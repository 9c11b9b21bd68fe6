"""The Python SDK against a real broker: batching, partitioner, lz4, futures, errors,
seeking, pull and push consumption (blocking and asyncio)."""

from __future__ import annotations

import asyncio
import time

import pytest

from streamd.client import Admin, AsyncConsumer, AsyncProducer, Consumer, ProduceError, Producer
from streamd.partitioner import key_partition


@pytest.fixture
def admin(server):
    with Admin(server.address) as a:
        yield a


def test_producer_batches_by_linger_and_resolves_a_future_per_record(server, admin):
    # Several rounds: the first sends to a topic wait for its partition count, and a
    # send starting just as that lookup ends must not overtake them (a race).
    for round_ in range(15):
        admin.create_topic(f"r{round_}", 1)
        with Producer(server.address, linger_ms=50) as producer:
            futures = [producer.send(f"r{round_}", b"v%d" % i) for i in range(200)]
            offsets = [f.result(10).offset for f in futures]
        assert offsets == list(range(200)), round_
    admin.create_topic("t", 1)
    with Producer(server.address, linger_ms=50) as producer:
        futures = [producer.send("t", b"v%d" % i) for i in range(200)]
        assert [f.result(10).offset for f in futures] == list(range(200))
    batches = 0
    with Consumer(server.address) as consumer:
        _, reply = consumer.fetch("t", 0, 0, max_records=1000)
        batches = len(reply.batches)
    assert batches < 20  # 200 sends were shipped as a handful of batches


def test_batch_max_bytes_ships_full_batches(server, admin):
    admin.create_topic("t", 1)
    with Producer(server.address, linger_ms=10_000, batch_max_bytes=1000) as producer:
        futures = [producer.send("t", b"x" * 100) for _ in range(30)]
        producer.flush()
        assert all(f.done() for f in futures)
    with Consumer(server.address) as consumer:
        _, reply = consumer.fetch("t", 0, 0)
    assert all(b.record_count <= 9 for b in reply.batches) and sum(b.record_count for b in reply.batches) == 30


def test_keys_follow_the_documented_partitioner_and_keep_order(server, admin):
    admin.create_topic("t", 4)
    keys = [b"user-%d" % (i % 7) for i in range(70)]
    with Producer(server.address, compression="lz4") as producer:
        futures = [producer.send("t", b"%d" % i, key=k, headers=[("n", b"%d" % i)]) for i, k in enumerate(keys)]
        metas = [f.result(10) for f in futures]
    for k, meta in zip(keys, metas, strict=False):
        assert meta.partition == key_partition(k, 4)
    with Consumer(server.address) as consumer:
        consumer.assign("t")
        records = list(consumer.records(exit_at_end=True))
    assert len(records) == 70
    by_key: dict[bytes, list[int]] = {}
    for r in records:
        assert r.headers == (("n", r.value),)
        by_key.setdefault(r.key, []).append(int(r.value))
    assert all(v == sorted(v) for v in by_key.values())  # per-key order kept


def test_keyless_records_spread_over_partitions_batch_by_batch(server, admin):
    admin.create_topic("t", 3)
    with Producer(server.address, linger_ms=1) as producer:
        for _ in range(6):
            for f in [producer.send("t", b"x") for _ in range(10)]:
                f.result(10)
    ends = {o.partition: o.log_end_offset for o in admin.list_offsets("t", latest=True)}
    assert sum(ends.values()) == 60 and all(v > 0 for v in ends.values())


def test_send_and_wait_and_send_batch(server, admin):
    admin.create_topic("t", 2)
    with Producer(server.address) as producer:
        first = producer.send_and_wait("t", b"one", partition=1)
        bulk = producer.send_batch("t", 1, [b"a", b"b", b"c"])
        second = producer.send_and_wait("t", b"two", partition=1)
    assert (first.offset, bulk.offset, second.offset) == (0, 1, 4)
    assert first.durable and first.partition == 1


def test_refused_records_fail_their_futures_with_the_reason(server, admin):
    admin.create_topic("t", 1, max_record_bytes=100)
    with Producer(server.address) as producer:
        bad = producer.send("t", b"x" * 500)
        with pytest.raises(ProduceError) as caught:
            bad.result(10)
        assert caught.value.reason == "RECORD_TOO_LARGE" and caught.value.code == "RESOURCE_EXHAUSTED"
        assert producer.send_and_wait("t", b"ok").offset == 0  # the stream survives


def test_consumer_seeks_by_offset_time_beginning_and_end(server, admin):
    admin.create_topic("t", 1)
    with Producer(server.address) as producer:
        producer.send_batch("t", 0, [b"a", b"b"])
        time.sleep(0.02)
        middle = int(time.time() * 1000)
        time.sleep(0.02)
        producer.send_batch("t", 0, [b"c"])
    with Consumer(server.address) as consumer:
        consumer.assign("t")
        consumer.seek_to_time("t", middle)
        assert [r.value for r in consumer.records(exit_at_end=True)] == [b"c"]
        consumer.seek("t", 0, 1)
        assert [r.value for r in consumer.records(exit_at_end=True)] == [b"b", b"c"]
        consumer.seek_to_beginning("t")
        assert [r.offset for r in consumer.records(exit_at_end=True)] == [0, 1, 2]
        consumer.seek_to_end("t")
        assert list(consumer.records(exit_at_end=True)) == []
        records, _ = consumer.fetch("t", 0, 1)
        assert [(r.offset, r.value) for r in records] == [(1, b"b"), (2, b"c")]


def test_blocking_subscribe_tails(server, admin):
    admin.create_topic("t", 1)
    with Producer(server.address) as producer, Consumer(server.address) as consumer:
        producer.send_batch("t", 0, [b"a"])
        got = []
        for record in consumer.subscribe("t", 0, offset=0):
            got.append(record.value)
            if got == [b"a"]:
                producer.send_batch("t", 0, [b"b"])
            if len(got) == 2:
                break
    assert got == [b"a", b"b"]


@pytest.mark.parametrize("partitions", [[0], None])
def test_async_producer_and_consumer(server, admin, partitions):
    admin.create_topic("t", 3)

    async def scenario() -> list:
        async with AsyncProducer(server.address) as producer, AsyncConsumer(server.address) as consumer:
            futures = [await producer.send("t", b"%d" % i, partition=0 if partitions else None) for i in range(30)]
            await producer.flush()
            assert [(await f).offset for f in futures][:3] == [0, 1, 2] or partitions is None
            got = []

            async def read():
                async for record in consumer.subscribe("t", partitions, position="beginning"):
                    got.append(record)
                    if len(got) == 30:
                        return

            await asyncio.wait_for(read(), 10)
            records, _ = await consumer.fetch("t", 0, 0)
            assert records
            return got

    got = asyncio.run(scenario())
    assert sorted(int(r.value) for r in got) == list(range(30))
