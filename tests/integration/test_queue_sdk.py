"""The queue SDK: a worker pool with retries, dead letters and automatic lease
extension; the asyncio receiver."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

from streamd.client import Admin, Producer
from streamd.client.queue import AsyncQueueReceiver, QueueReceiver


def fill(address: str, topic: str, n: int, partitions: int = 2) -> None:
    with Admin(address) as admin, Producer(address) as p:
        admin.create_topic(topic, partitions)
        for i in range(n):
            p.send(topic, f"job-{i}".encode(), key=f"k{i}".encode())
        p.flush()


def test_worker_pool_retries_flaky_jobs_and_dead_letters_poison(server):
    fill(server.address, "jobs", 40)
    attempts: Counter = Counter()
    lock = threading.Lock()

    def handler(msg) -> None:
        with lock:
            attempts[msg.value] += 1
            n = attempts[msg.value]
        if msg.value == b"job-13":
            raise ValueError("malformed order")
        if msg.value.endswith(b"7") and n < 3:
            raise RuntimeError("email service down")

    config = {"max_deliveries": 3, "initial_delay_ms": 20, "multiplier": 2.0, "jitter": "equal", "lease_ms": 5000}
    with QueueReceiver("workers", "jobs", server.address, create=config, max_wait_ms=200) as r:
        stop = threading.Event()
        pool = threading.Thread(target=r.process, args=(handler,), kwargs={"workers": 4, "stop": stop})
        pool.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            parts = r.describe().partitions
            if sum(p.acked for p in parts) == 39 and sum(p.dead_lettered for p in parts) == 1:
                break
            time.sleep(0.05)
        stop.set()
        pool.join(30)
        parts = r.describe().partitions
    assert sum(p.acked for p in parts) == 39 and sum(p.dead_lettered for p in parts) == 1
    assert attempts[b"job-13"] == 3  # dead-lettered exactly at max_deliveries
    assert all(attempts[f"job-{i}".encode()] == 3 for i in (7, 17, 27, 37))  # failed twice, then done
    assert all(attempts[f"job-{i}".encode()] == 1 for i in range(40) if i % 10 != 7 and i != 13)
    with Admin(server.address) as admin:
        assert sum(o.log_end_offset for o in admin.list_offsets("jobs.dlq")) == 1


def test_leases_of_slow_handlers_are_extended_automatically(server):
    fill(server.address, "jobs", 4, partitions=1)
    deliveries = []

    def slow(msg) -> None:
        deliveries.append((msg.offset, msg.delivery_count))
        time.sleep(2.0)  # twice the lease (a third of it, 333 ms, is the margin the extender keeps)

    with QueueReceiver("slow", "jobs", server.address, create={"lease_ms": 1000}, max_records=1) as r:
        handled = r.process(slow, workers=2, max_messages=4)
        assert handled == 4
        assert sorted(deliveries) == [(0, 1), (1, 1), (2, 1), (3, 1)]  # nobody got a record twice
        assert sum(p.acked for p in r.describe().partitions) == 4


def test_async_receiver_processes_with_bounded_concurrency(server):
    fill(server.address, "jobs", 30)

    async def scenario() -> int:
        seen = set()
        running = 0
        peak = 0

        async def handler(msg) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1
            seen.add(msg.value)

        async with AsyncQueueReceiver("async", "jobs", server.address) as r:
            await r.create(exist_ok=True)
            done = await r.process(handler, concurrency=5, max_messages=30)
        assert len(seen) == 30 and peak <= 5
        return done

    assert asyncio.run(scenario()) == 30


def test_a_batch_that_outlasts_its_lease_is_handled_once(server):
    fill(server.address, "jobs", 6, partitions=1)
    calls: Counter = Counter()

    def handler(msg) -> None:
        calls[msg.offset] += 1
        time.sleep(0.4)  # 6 x 0.4 s in one worker, with 1 s leases

    with QueueReceiver("batch", "jobs", server.address, create={"lease_ms": 1000}, max_records=6) as r:
        assert r.process(handler, workers=1, max_messages=6) == 6
        assert dict(calls) == {o: 1 for o in range(6)}
        assert sum(p.acked for p in r.describe().partitions) == 6


def test_async_process_extends_leases_of_slow_handlers(server):
    fill(server.address, "jobs", 1, partitions=1)
    calls: Counter = Counter()

    async def scenario() -> None:
        async def slow(msg) -> None:
            calls[msg.offset] += 1
            await asyncio.sleep(1.6)  # past the 1 s lease

        async with AsyncQueueReceiver("aslow", "jobs", server.address) as r:
            await r.create(exist_ok=True, lease_ms=1000)
            assert await r.process(slow, concurrency=2, max_messages=1) == 1

    asyncio.run(scenario())
    assert dict(calls) == {0: 1}
    with QueueReceiver("aslow", "jobs", server.address) as r:
        assert sum(p.acked for p in r.describe().partitions) == 1


def test_async_messages_settle_themselves(server):
    fill(server.address, "jobs", 4, partitions=1)

    async def scenario() -> None:
        async with AsyncQueueReceiver("self", "jobs", server.address, max_wait_ms=2000) as r:
            await r.create(exist_ok=True, max_deliveries=5)
            first = await r.receive(4)
            assert [m.offset for m in first] == [0, 1, 2, 3]
            ack, nack, extend, reject = first
            ack.ack()
            await nack.nack(delay_ms=0, reason="later")
            expires = await extend.extend(60_000)
            assert expires == extend.lease_expires_ms > first[0].lease_expires_ms
            await reject.reject(reason="poison")
            await r.flush()
            again = await r.receive(4)
            assert [(m.offset, m.delivery_count) for m in again] == [(1, 2)]  # only the nacked one
            again[0].ack()
            extend.ack()
            await r.flush()
        with QueueReceiver("self", "jobs", server.address) as sync:
            d = sync.describe()
            assert sum(p.acked for p in d.partitions) == 3 and sum(p.dead_lettered for p in d.partitions) == 1

    asyncio.run(scenario())
