"""The blocking clients, interrupted and abandoned, through the public SDK: an
interrupt (KeyboardInterrupt, SystemExit, or any BaseException a signal handler
raises) reaches the caller and cancels the call it interrupted, without stopping
the client's loop thread; a client collected without ``close()`` gives its thread
back; a closed receiver refuses ``process`` with CLOSED.

Each interrupt here is raised by a handler of SIGUSR1 (sent by a timer thread) on
the main thread, as Ctrl-C raises KeyboardInterrupt, so the test session itself is
never hit by a stray SIGINT."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from streamd.client import Admin, GroupConsumer, Producer, QueueReceiver, StreamdError
from tests.conftest import wait_until

BOUND_S = 15.0  # what a hang would exceed


class Interrupt(BaseException):
    """What the SIGUSR1 handler raises: a BaseException, as KeyboardInterrupt is."""


@contextlib.contextmanager
def interrupt_after(delay_s: float) -> Iterator[None]:
    """Raise ``Interrupt`` on this (the main) thread after ``delay_s``."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupt

    previous = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(delay_s, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, previous)


def in_thread(fn, timeout_s: float = BOUND_S) -> BaseException | None:
    """Run ``fn`` on a daemon thread; what it raised (None: it returned). Fails the
    test when it has not ended within ``timeout_s`` (a hang)."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            raised.append(exc)
        else:
            raised.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"still blocked after {timeout_s} s"
    return raised[0]


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_a_callback_raising_an_interrupt_reaches_the_reader_and_the_consumer_stays_usable(server, exc_type):
    with Admin(server.address) as admin:
        admin.create_topic("cb", 1)
    calls = []

    def on_assign(tps: set[tuple[str, int]]) -> None:
        calls.append(tps)
        if len(calls) == 1:
            raise exc_type()

    consumer = GroupConsumer("cb-group", "cb", server.address, on_assign=on_assign, timeout_s=5)
    try:
        raised = in_thread(lambda: list(consumer.records(idle_timeout_s=3)))
        assert isinstance(raised, exc_type)
        # The loop thread lives on: the consumer still answers.
        assert in_thread(consumer.commit) is None
    finally:
        assert in_thread(lambda: consumer.close(timeout_s=5)) is None


def test_an_interrupted_receive_is_cancelled_and_leases_nothing(server):
    with Admin(server.address) as admin:
        admin.create_topic("kb", 1)
    with QueueReceiver("kb-group", "kb", server.address, create={"lease_ms": 60_000}, timeout_s=5) as receiver:
        started = time.monotonic()
        with pytest.raises(Interrupt), interrupt_after(0.3):
            receiver.receive(max_wait_ms=3000)
        assert time.monotonic() - started < 2
        with Producer(server.address) as producer:
            producer.send("kb", b"after").result(10)
        # The interrupted receive was cancelled: it did not lease the record
        # produced after it (which would then wait out the 60 s lease).
        got = wait_until(lambda: receiver.receive(max_wait_ms=200), timeout=5)
        assert [m.value for m in got] == [b"after"]


def test_an_interrupted_records_loop_raises_the_interrupt_and_reads_on(server):
    with Admin(server.address) as admin:
        admin.create_topic("kr", 1)
    with GroupConsumer("kr-group", "kr", server.address, max_wait_ms=2000, timeout_s=5) as consumer:
        consumer.wait_for_assignment(10)
        with pytest.raises(Interrupt), interrupt_after(0.5):
            for _ in consumer.records(idle_timeout_s=5):
                pass
        with Producer(server.address) as producer:
            producer.send("kr", b"next").result(10)
        got = []
        for record in consumer.records(idle_timeout_s=5):
            got.append(record.value)
            break
        assert got == [b"next"]


def test_an_admin_dropped_without_close_gives_its_thread_back(server):
    def named() -> int:
        return sum(t.name == "streamd-admin" for t in threading.enumerate())

    before = named()
    for _ in range(5):
        Admin(server.address).list_topics()
    gc.collect()
    assert wait_until(lambda: named() == before, timeout=10), f"{named() - before} admin threads left"


def test_process_on_a_closed_receiver_is_refused_as_closed(server):
    with Admin(server.address) as admin:
        admin.create_topic("pc", 1)
    receiver = QueueReceiver("pc-group", "pc", server.address, create=True)
    receiver.close()
    with pytest.raises(StreamdError) as err:
        receiver.process(lambda m: None, max_messages=1)
    assert err.value.reason == "CLOSED"


def test_an_interrupted_process_stops_its_pool_and_hands_back_what_it_did_not_start(server):
    with Admin(server.address) as admin:
        admin.create_topic("kp", 1)
    with Producer(server.address) as producer:
        for i in range(200):
            producer.send("kp", b"%d" % i)
        producer.flush()
    handled: list[int] = []

    def handler(msg) -> None:
        time.sleep(0.05)
        handled.append(msg.offset)

    with QueueReceiver("kp-group", "kp", server.address, create={"lease_ms": 60_000}, timeout_s=5) as receiver:
        with pytest.raises(Interrupt), interrupt_after(1.0):
            receiver.process(handler, workers=2, stop_signals=())
        at_interrupt = len(handled)
        time.sleep(1.0)
        assert len(handled) <= at_interrupt + 2  # at most the handlers that were running
        # What the pool held but never started was handed back, not left leased for 60 s.
        got = receiver.receive(10, max_wait_ms=1000)
        assert got
        for msg in got:
            msg.ack()
