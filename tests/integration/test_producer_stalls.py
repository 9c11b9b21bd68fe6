"""Every producer call returns in bounded time when a real ``streamd serve`` is
SIGSTOPped or SIGKILLed, and the producer is not wedged afterwards (the first send to
a topic: ``test_producer_first_send``).

- **A write stuck on a full flow-control window**: with the broker stopped, big
  records fill the HTTP/2 window, so a ``ProduceStream`` write never completes (not
  even after the stream is cancelled). It used to hold the producer's write lock
  for ever: ``flush()``/``close()`` hung, and so did every later send. Now every
  write is bounded: every future resolves, ``flush()``/``close()`` return, and the
  producer sends again once the broker runs.
- The same with the broker SIGKILLed and restarted on the same port: the retries go
  through, each record once.

Bounds are thread joins (``join(timeout)`` then "not alive"), never assertions on
how fast anything was.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from streamd.client import Admin, AsyncProducer, Consumer, OutcomeUnknown, Producer, StreamdError
from tests.conftest import bounded as within

pytestmark = pytest.mark.slow

DELIVERY_MS, REQUEST_MS = 2000, 1000
#: flush()/close() return within delivery + request timeout; the rest is slack for
#: a loaded 2-core machine (a hang never returns).
BOUND_S = (DELIVERY_MS + REQUEST_MS) / 1000 + 30
BIG = 1_000_000  # (under the 1 MiB record limit) 40 of these overflow the HTTP/2 window a stopped broker leaves
OPTIONS = {"delivery_timeout_ms": DELIVERY_MS, "request_timeout_ms": REQUEST_MS, "batch_max_bytes": BIG}


def bounded(fn, *args):
    """``fn(*args)``, which must return within BOUND_S (``tests.conftest.bounded``)."""
    return within(BOUND_S, fn, *args)


def stored(address: str, topic: str, partition: int) -> list[tuple[int, bytes]]:
    with Consumer(address) as consumer:
        consumer.assign(topic, [partition])
        return [(r.offset, r.value) for r in consumer.records(exit_at_end=True)]


def value(i: int) -> bytes:
    return b"%04d" % i + b"x" * (BIG - 4)


def check_outcomes(address: str, sent: list[tuple[bytes, object]]) -> None:
    """Every acknowledged record is stored once at its offset; DELIVERY_TIMEOUT ones
    are not stored; OutcomeUnknown ones at most once; nothing else fails."""
    log = stored(address, "t", 0)
    by_value: dict[bytes, list[int]] = {}
    for offset, v in log:
        by_value.setdefault(v, []).append(offset)
    assert all(len(offsets) == 1 for offsets in by_value.values()), "a record is stored twice"
    for v, outcome in sent:
        if isinstance(outcome, OutcomeUnknown):
            continue
        if isinstance(outcome, StreamdError):
            assert (outcome.code, outcome.reason) == ("DEADLINE_EXCEEDED", "DELIVERY_TIMEOUT"), outcome
            assert v not in by_value, "failed as not stored, yet stored"
        else:
            assert by_value.get(v) == [outcome.offset], "an acknowledged record is not where its metadata says"


def _topic(address: str, partitions: int = 1) -> None:
    with Admin(address) as admin:
        admin.create_topic("t", partitions)


def test_a_stopped_broker_with_a_full_window_does_not_wedge_the_producer(server_process):
    broker = server_process()
    _topic(broker.address)
    producer = Producer(broker.address, **OPTIONS)
    try:
        sent: list[tuple[bytes, object]] = [(b"first", producer.send_and_wait("t", b"first"))]
        os.kill(broker.proc.pid, signal.SIGSTOP)
        futures = [(value(i), producer.send("t", value(i), partition=0)) for i in range(40)]
        bounded(producer.flush)  # with the broker still stopped: every record fails in time
        assert all(f.done() for _, f in futures)
        os.kill(broker.proc.pid, signal.SIGCONT)
        sent += [(v, f.exception() or f.result()) for v, f in futures]
        after = bounded(producer.send_and_wait, "t", b"after")  # not wedged
        sent.append((b"after", after))
        bounded(producer.close)
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    assert all(isinstance(o, StreamdError) for _, o in sent[1:-1])
    check_outcomes(broker.address, sent)
    broker.kill()


def test_an_async_producer_is_not_wedged_by_a_stopped_broker_with_a_full_window(server_process):
    broker = server_process()
    _topic(broker.address)

    async def scenario() -> list[tuple[bytes, object]]:
        producer = AsyncProducer(broker.address, **OPTIONS)
        sent: list[tuple[bytes, object]] = [(b"first", await producer.send_and_wait("t", b"first"))]
        os.kill(broker.proc.pid, signal.SIGSTOP)
        futures = []
        for i in range(40):  # send() itself waits while a full batch is written
            futures.append((value(i), await producer.send("t", value(i), partition=0)))
        await producer.flush()  # with the broker still stopped: every record fails in time
        assert all(f.done() for _, f in futures)
        os.kill(broker.proc.pid, signal.SIGCONT)
        sent += [(v, f.exception() or f.result()) for v, f in futures]
        sent.append((b"after", await producer.send_and_wait("t", b"after")))
        await producer.close()
        return sent

    try:
        sent = bounded(asyncio.run, scenario())
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    assert all(isinstance(o, StreamdError) for _, o in sent[1:-1])
    check_outcomes(broker.address, sent)
    broker.kill()


def test_a_broker_killed_under_a_full_window_does_not_wedge_the_producer(server_process, tmp_path, same_port):
    data = tmp_path / "data"
    broker = server_process(data_dir=data)
    _topic(broker.address)
    with Producer(broker.address, delivery_timeout_ms=30_000, request_timeout_ms=REQUEST_MS,
                  batch_max_bytes=BIG) as producer:
        sent: list[tuple[bytes, object]] = [(b"first", producer.send_and_wait("t", b"first"))]
        os.kill(broker.proc.pid, signal.SIGSTOP)
        futures = [(value(i), producer.send("t", value(i), partition=0)) for i in range(40)]
        time.sleep(REQUEST_MS / 1000 * 2)  # the window fills and a write is given up on
        broker.kill()
        broker = server_process(data_dir=data)  # same port and data: the retries go through
        bounded(producer.flush)
        sent += [(v, f.exception() or f.result()) for v, f in futures]
    check_outcomes(broker.address, sent)
    assert [o for _, o in sent if isinstance(o, BaseException)] == []  # 30 s is more than the outage
