"""The producer through broker outages, for real: ``streamd serve`` subprocesses
SIGKILLed, kept down, SIGSTOPped.

- An outage shorter than ``delivery_timeout_ms`` (9 s here, the one that used to fail
  sends after the ~6 s of ``retries=5``): every send succeeds once the broker is back
  on the same port and data directory, and each record is stored once.
- A broker that stays down, or is stopped (SIGSTOP: connections stay open, nothing
  answers): every send fails within the delivery timeout — with ``OutcomeUnknown``
  when it may have been stored, else ``DELIVERY_TIMEOUT`` — through ``send``,
  ``send_and_wait`` and ``send_batch``, and ``flush()``/``close()`` return.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from streamd.client import Admin, Consumer, OutcomeUnknown, Producer, StreamdError

pytestmark = pytest.mark.slow


def stored(address: str, topic: str, partition: int) -> list[tuple[int, bytes]]:
    with Consumer(address) as consumer:
        consumer.assign(topic, [partition])
        return [(r.offset, r.value) for r in consumer.records(exit_at_end=True)]


def test_a_9_s_outage_fails_no_send_and_duplicates_nothing(server_process, tmp_path, same_port):
    data = tmp_path / "data"
    broker = server_process(data_dir=data)
    with Admin(broker.address) as admin:
        admin.create_topic("t", 2)
    sent: list[tuple[int, bytes, object]] = []
    with Producer(broker.address, linger_ms=2) as producer:

        def send(label: str, n: int, pause_s: float) -> None:
            for i in range(n):
                value = b"%s-%04d" % (label.encode(), i)
                sent.append((i % 2, value, producer.send("t", value, partition=i % 2)))
                time.sleep(pause_s)

        send("before", 200, 0.002)
        broker.kill()  # SIGKILL, with batches in flight
        send("during", 300, 0.03)  # ~9 s of sends into the outage
        broker = server_process(data_dir=data)  # same port, same data
        send("after", 200, 0.002)
        producer.flush()
    failed = [f.exception() for _, _, f in sent if f.exception() is not None]
    assert failed == []
    for p in (0, 1):
        acked = sorted((f.result().offset, v) for q, v, f in sent if q == p)
        assert stored(broker.address, "t", p) == acked  # each once, nothing else
        assert [v for _, v in acked] == [v for q, v, _ in sent if q == p]  # in the order sent


def _failures(futures) -> list[StreamdError]:
    # exception(timeout): resolved long before (the delivery timeout bounds it); the
    # timeout only keeps a regression from hanging the suite.
    return [f.exception(timeout=60) for f in futures]


def test_a_stopped_broker_fails_every_send_in_time_as_outcome_unknown(server_process):
    broker = server_process()
    with Admin(broker.address) as admin:
        admin.create_topic("t", 1)
    try:
        with Producer(broker.address, delivery_timeout_ms=1500) as producer:
            producer.send_and_wait("t", b"first")  # connected, with a producer id
            os.kill(broker.proc.pid, signal.SIGSTOP)  # connections stay open; nothing answers
            futures = [producer.send("t", b"r%d" % i, partition=0) for i in range(20)]
            with pytest.raises(OutcomeUnknown) as one:
                producer.send_and_wait("t", b"one", partition=0)
            with pytest.raises(OutcomeUnknown) as batch:
                producer.send_batch("t", 0, [b"a", b"b"])
            producer.flush()  # returns: everything failed in time
        for exc in _failures(futures) + [one.value, batch.value]:
            assert isinstance(exc, OutcomeUnknown), exc
            assert exc.code == "DEADLINE_EXCEEDED" and "may or may not have been stored" in exc.message
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
        broker.kill()


def test_a_broker_that_stays_down_fails_every_send_in_time(server_process):
    broker = server_process()
    with Admin(broker.address) as admin:
        admin.create_topic("t", 1)
    with Producer(broker.address, delivery_timeout_ms=1500) as producer:
        producer.send_and_wait("t", b"first")
        broker.kill()
        futures = [producer.send("t", b"r%d" % i, partition=0) for i in range(20)]
        with pytest.raises(StreamdError) as one:
            producer.send_and_wait("t", b"one", partition=0)
        with pytest.raises(StreamdError) as batch:
            producer.send_batch("t", 0, [b"a", b"b"])
        producer.flush()
    for exc in _failures(futures) + [one.value, batch.value]:
        # Written before the producer saw the broker gone: maybe stored; after: not sent.
        assert isinstance(exc, OutcomeUnknown) or (exc.code, exc.reason) == ("DEADLINE_EXCEEDED", "DELIVERY_TIMEOUT")
