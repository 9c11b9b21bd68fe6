"""The queue SDK hands out exactly the leased records: after nacks, a receive answers
stored batches that hold far more records than the lease (issue 10, item 1)."""

from __future__ import annotations

import asyncio
import time

from streamd.client import Admin, Producer
from streamd.client.queue import AsyncQueueReceiver, QueueReceiver


def value(partition: int, offset: int) -> bytes:
    return f"p{partition}-o{offset}".encode()


def produce_batches(address: str, topic: str, sizes: dict[int, list[int]]) -> None:
    """One send_batch per size and partition; record values name their place."""
    with Admin(address) as admin, Producer(address) as producer:
        admin.create_topic(topic, len(sizes))
        for p, batch_sizes in sizes.items():
            offset = 0
            for n in batch_sizes:
                producer.send_batch(topic, p, [value(p, offset + i) for i in range(n)])
                offset += n


def receive_all(receiver: QueueReceiver, n: int) -> list:
    """Receive until ``n`` messages came (bounded), then one more short receive that
    must come back empty."""
    got: list = []
    for _ in range(50):
        if len(got) >= n:
            break
        got += receiver.receive(max(n - len(got), 1), max_wait_ms=200)
    return got


def places(messages) -> list[tuple[int, int]]:
    return [(m.partition, m.offset) for m in messages]


def test_a_receive_after_nacks_hands_out_only_the_nacked_records(server):
    produce_batches(server.address, "jobs", {0: [10, 10]})
    with QueueReceiver("work", "jobs", server.address, create=True) as r:
        first = receive_all(r, 20)
        assert sorted(places(first)) == [(0, o) for o in range(20)]
        for msg in first:
            if msg.offset in (5, 15):
                msg.nack(delay_ms=0)
            else:
                msg.ack()
        r.flush()
        again = r.receive(20, max_wait_ms=2000)
        assert [m.offset for m in again] == [5, 15]
        assert [m.value for m in again] == [value(0, 5), value(0, 15)]
        assert all(m.delivery_count == 2 for m in again)
        for msg in again:
            msg.ack()
        r.flush()
        assert r.receive(20, max_wait_ms=100) == []
        parts = r.describe().partitions
    assert sum(p.acked for p in parts) == 20 and sum(p.in_flight for p in parts) == 0


NACKED = {0: {0, 7, 8, 9, 23}, 1: {4}, 2: {1, 2, 3, 30, 31}}


def test_nacked_records_of_several_partitions_come_back_exactly_once(server):
    sizes = {0: [7, 1, 12, 5], 1: [3, 3, 3], 2: [2, 20, 10]}
    produce_batches(server.address, "multi", sizes)
    total = sum(map(sum, sizes.values()))
    with QueueReceiver("work", "multi", server.address, create=True) as r:
        first = receive_all(r, total)
        assert sorted(places(first)) == sorted((p, o) for p, s in sizes.items() for o in range(sum(s)))
        for msg in first:
            if msg.offset in NACKED[msg.partition]:
                msg.nack(delay_ms=0)
            else:
                msg.ack()
        r.flush()
        again = receive_all(r, sum(map(len, NACKED.values())))
        assert sorted(places(again)) == sorted((p, o) for p, offsets in NACKED.items() for o in offsets)
        assert all(m.value == value(m.partition, m.offset) for m in again)
        for p in NACKED:  # each partition's records in offset order
            offsets = [m.offset for m in again if m.partition == p]
            assert offsets == sorted(offsets)
        for msg in again:
            msg.ack()
        r.flush()
        parts = r.describe().partitions
    assert sum(p.acked for p in parts) == total and sum(p.in_flight for p in parts) == 0


def test_the_asyncio_receiver_hands_out_only_the_nacked_records(server):
    produce_batches(server.address, "jobs", {0: [10, 10]})

    async def scenario() -> list:
        async with AsyncQueueReceiver("work", "jobs", server.address) as r:
            await r.create(exist_ok=True)
            first: list = []
            deadline = time.monotonic() + 20
            while len(first) < 20 and time.monotonic() < deadline:
                first += await r.receive(20 - len(first), max_wait_ms=200)
            assert sorted(m.offset for m in first) == list(range(20))
            for msg in first:
                if msg.offset in (5, 15):
                    await r.settle(msg, "nack", delay_ms=0)
                else:
                    r.ack(msg)
            await r.flush()
            again = await r.receive(20, max_wait_ms=2000)
            for msg in again:
                r.ack(msg)
            await r.flush()
            return again

    again = asyncio.run(scenario())
    assert [(m.offset, m.value) for m in again] == [(5, value(0, 5)), (15, value(0, 15))]
