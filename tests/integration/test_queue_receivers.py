"""The blocking and the asyncio queue receivers behave alike (issue 11, item 3): one
engine (``AsyncQueueReceiver``), which ``QueueReceiver`` runs on a loop thread, and one
worker pool. Each test runs against both, so the two cannot drift apart again (they
had: only the blocking pool skipped leases that ended before their turn and handed
back the rest of a batch on a stop, only it sent acks in the background)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from streamd.client import Admin, Producer
from streamd.client.errors import StreamdError
from streamd.client.queue import AsyncQueueReceiver, Message, QueueReceiver
from tests.conftest import wait_until

FLAVOURS = ["sync", "async"]


def fill(address: str, n: int, **config: Any) -> None:
    with Admin(address) as admin, Producer(address) as producer:
        admin.create_topic("jobs", 1)
        for i in range(n):
            producer.send("jobs", b"job-%d" % i, partition=0)
        producer.flush()
    with QueueReceiver("q", "jobs", address) as r:
        r.create(**config)


def process(flavour: str, address: str, body: Callable[[Message, Any], float], *, handlers: int = 1,
            receiver: dict[str, Any] | None = None, **kw: Any) -> int:
    """``process`` of either receiver with ``handlers`` workers (threads or tasks); each
    message runs ``body(msg, receiver)``, then sleeps what it returned (``time.sleep``
    in a thread, ``asyncio.sleep`` in a task)."""
    options = {"max_wait_ms": 200, **(receiver or {})}
    if flavour == "sync":
        with QueueReceiver("q", "jobs", address, **options) as r:
            def handle(msg: Message) -> None:
                time.sleep(body(msg, r))

            return r.process(handle, workers=handlers, **kw)

    async def scenario() -> int:
        async with AsyncQueueReceiver("q", "jobs", address, **options) as r:
            async def handle(msg: Message) -> None:
                await asyncio.sleep(body(msg, r))

            return await r.process(handle, concurrency=handlers, **kw)

    return asyncio.run(scenario())


def receive_all(receive: Callable[..., list[Message]], n: int) -> list[Message]:
    got: list[Message] = []
    for _ in range(20):
        if len(got) >= n:
            break
        got += receive(n - len(got), max_wait_ms=500)
    return got


def counts(address: str) -> tuple[int, int]:
    """(acked, in flight) of the group."""
    with QueueReceiver("q", "jobs", address) as r:
        parts = r.describe().partitions
    return sum(p.acked for p in parts), sum(p.in_flight for p in parts)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_message_whose_lease_ended_before_its_turn_is_skipped_not_handled(server, caplog, flavour):
    fill(server.address, 3, lease_ms=300, max_deliveries=10, initial_delay_ms=0, jitter="none")
    calls: list[tuple[int, int, bool]] = []

    def body(msg: Message, r: Any) -> float:
        # Started within its lease (50 ms of slack for the step from the pool to the handler).
        calls.append((msg.offset, msg.delivery_count, time.monotonic() < msg.deadline + 0.05))
        return 0.6 if len(calls) == 1 else 0.0  # the first takes twice the lease: those behind it lapse

    caplog.set_level(logging.INFO, logger="streamd.client.queue")
    handled = process(flavour, server.address, body, receiver={"max_records": 3}, auto_extend=False,
                      max_messages=4)
    assert handled == 4
    assert all(fresh for _, _, fresh in calls), calls  # no handler ran on a lease that had ended
    assert len(set((o, d) for o, d, _ in calls)) == len(calls), calls  # no delivery handled twice
    assert "expired before its turn; skipped" in caplog.text


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_stop_hands_back_the_rest_of_the_batch_at_once(server, flavour):
    fill(server.address, 10, lease_ms=60_000)  # long: a record back before that was handed back
    seen: list[int] = []

    def body(msg: Message, r: Any) -> float:
        seen.append(msg.offset)
        if len(seen) == 1:
            time.sleep(0.3)  # the pool receives ahead meanwhile
            r.stop()
        return 0.0

    handled = process(flavour, server.address, body, handlers=2, receiver={"max_records": 10})
    assert handled == len(seen) >= 1
    acked, in_flight = counts(server.address)
    assert (acked, in_flight) == (handled, 0)  # nothing left leased for 60 s
    with QueueReceiver("q", "jobs", server.address) as r:
        rest = r.receive(10, max_wait_ms=1000)
    assert sorted(m.offset for m in rest) == sorted(set(range(10)) - set(seen))
    assert any(m.delivery_count == 2 for m in rest)  # received, not started, back at once


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_acks_go_out_in_the_background_without_a_flush(server, flavour):
    fill(server.address, 5)

    def check(r: Any) -> None:
        assert wait_until(lambda: counts(server.address)[0] == 5, timeout=30)

    if flavour == "sync":
        with QueueReceiver("q", "jobs", server.address, ack_interval_ms=20) as r:
            for msg in r.receive(5, max_wait_ms=1000):
                msg.ack()
            check(r)
        return

    async def scenario() -> None:
        async with AsyncQueueReceiver("q", "jobs", server.address, ack_interval_ms=20) as r:
            for msg in await r.receive(5, max_wait_ms=1000):
                msg.ack()
            await asyncio.to_thread(check, r)  # the loop runs meanwhile: no flush()

    asyncio.run(scenario())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_full_batch_of_acks_goes_at_once_and_acks_from_other_threads_count(server, flavour):
    fill(server.address, 6)
    options = {"ack_interval_ms": 60_000, "ack_batch": 6}  # only the full batch sends them

    def ack_all(messages: list[Message]) -> None:
        threads = [threading.Thread(target=m.ack) for m in messages]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)

    if flavour == "sync":
        with QueueReceiver("q", "jobs", server.address, **options) as r:
            ack_all(r.receive(6, max_wait_ms=1000))
            assert wait_until(lambda: counts(server.address)[0] == 6, timeout=30)
        return

    async def scenario() -> None:
        async with AsyncQueueReceiver("q", "jobs", server.address, **options) as r:
            messages = await r.receive(6, max_wait_ms=1000)
            await asyncio.to_thread(ack_all, messages)
            assert await asyncio.to_thread(wait_until, lambda: counts(server.address)[0] == 6, 30)

    asyncio.run(scenario())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_acks_refused_for_ended_leases_are_logged_once_per_batch(server, caplog, flavour):
    fill(server.address, 3, lease_ms=200, max_deliveries=10)
    caplog.set_level(logging.INFO, logger="streamd.client.queue")

    # The old leases last 200 ms (the group's); the new ones long, so that none ends
    # while the test gathers them.
    if flavour == "sync":
        with QueueReceiver("q", "jobs", server.address) as r, \
                QueueReceiver("q", "jobs", server.address, lease_ms=60_000) as later:
            old = r.receive(3, max_wait_ms=1000)
            time.sleep(0.4)
            again = receive_all(later.receive, 3)  # leased anew: the old leases are gone
            for msg in old:
                msg.ack()
            r.flush()
    else:
        async def scenario() -> list[Message]:
            async with AsyncQueueReceiver("q", "jobs", server.address) as r, \
                    AsyncQueueReceiver("q", "jobs", server.address, lease_ms=60_000) as later:
                old = await r.receive(3, max_wait_ms=1000)
                await asyncio.sleep(0.4)
                again: list[Message] = []
                for _ in range(20):
                    if len(again) >= 3:
                        break
                    again += await later.receive(3 - len(again), max_wait_ms=500)
                for msg in old:
                    msg.ack()
                await r.flush()
                return again

        again = asyncio.run(scenario())
    assert sorted(m.delivery_count for m in again) == [2, 2, 2]
    lines = [rec.getMessage() for rec in caplog.records if "ack(s) refused" in rec.getMessage()]
    assert len(lines) == 1 and "3 ack(s) refused" in lines[0], lines


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_closed_receiver_refuses_acks_and_calls(server, flavour):
    fill(server.address, 1)
    if flavour == "sync":
        r = QueueReceiver("q", "jobs", server.address)
        [msg] = r.receive(1, max_wait_ms=1000)
        r.close()
        r.close()  # twice: a no-op
        with pytest.raises(StreamdError) as receive:
            r.receive(1, max_wait_ms=100)
    else:
        async def scenario() -> tuple[Message, pytest.ExceptionInfo[StreamdError]]:
            r = AsyncQueueReceiver("q", "jobs", server.address)
            [msg] = await r.receive(1, max_wait_ms=1000)
            await r.close()
            await r.close()
            with pytest.raises(StreamdError) as receive:
                await r.receive(1, max_wait_ms=100)
            return msg, receive

        msg, receive = asyncio.run(scenario())
    assert receive.value.reason == "CLOSED"
    with pytest.raises(StreamdError) as refused:
        msg.ack()
    assert refused.value.reason == "CLOSED"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_stop_before_process_makes_the_next_one_return_at_once(server, flavour):
    fill(server.address, 4)
    seen: list[int] = []

    if flavour == "sync":
        with QueueReceiver("q", "jobs", server.address) as r:
            r.stop()
            assert r.process(lambda msg: seen.append(msg.offset), workers=2) == 0
            assert r.process(lambda msg: seen.append(msg.offset), workers=2, max_messages=4) == 4
    else:
        async def scenario() -> None:
            async with AsyncQueueReceiver("q", "jobs", server.address) as r:
                async def handle(msg: Message) -> None:
                    seen.append(msg.offset)

                r.stop()
                assert await r.process(handle, concurrency=2) == 0
                assert await r.process(handle, concurrency=2, max_messages=4) == 4

        asyncio.run(scenario())
    assert sorted(seen) == [0, 1, 2, 3]
    assert counts(server.address) == (4, 0)
