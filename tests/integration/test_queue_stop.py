"""Stopping a queue worker pool (issue 10, item 10): ``receiver.stop()`` and, for a
pool on the main thread, SIGINT / SIGTERM. The handlers running finish, the messages
received but not started go back at once (nacked with no delay), the acks are
flushed, and the process exits 0 with no traceback; a second signal stops waiting."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from streamd.client import Admin, Producer
from streamd.client.queue import AsyncQueueReceiver, QueueReceiver
from tests.conftest import ROOT, wait_until

TOTAL = 24
QUICK = 3  # handlers that return at once; the later ones wait for the test's go-ahead
RUNNING = 2  # handlers at once in the worker (2 threads, or concurrency 2)


def fill(address: str, n: int = TOTAL) -> None:
    with Admin(address) as admin, Producer(address) as producer:
        admin.create_topic("jobs", 2)
        for i in range(n):
            producer.send("jobs", b"job-%d" % i, key=b"k%d" % i)
        producer.flush()
    with QueueReceiver("stop", "jobs", address) as r:
        r.create(lease_ms=60_000)  # long: a record back before that was handed back


class Worker:
    """tests/integration/stopping_worker.py as a child process, its output read as it comes."""

    def __init__(self, address: str, flavour: str, go: Path, quick: int = QUICK, *more: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.stopping_worker", address, flavour, str(go), str(quick),
             *map(str, more)],
            cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self, stream, events: bool) -> None:
        for line in stream:
            (self.events if events else self.err).append(json.loads(line) if events else line)

    def places(self, kind: str) -> list[tuple[int, int]]:
        return [tuple(e[kind]) for e in list(self.events) if kind in e]

    def returned(self) -> int | None:
        return next((e["returned"] for e in list(self.events) if "returned" in e), None)

    def stderr(self) -> str:
        return "".join(self.err)

    def busy(self) -> bool:
        """The quick handlers are done and RUNNING handlers are waiting."""
        return len(self.places("done")) == QUICK and len(self.places("started")) == QUICK + RUNNING

    def wait(self, timeout: float = 60) -> int:
        rc = self.proc.wait(timeout)
        for t in self._readers:
            t.join(10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


def receive_all(receiver: QueueReceiver, n: int) -> list:
    got: list = []
    for _ in range(40):
        if len(got) >= n:
            break
        got += receiver.receive(n - len(got), max_wait_ms=200)
    return got


def places(messages) -> list[tuple[int, int]]:
    return [(m.partition, m.offset) for m in messages]


def all_places(address: str) -> set[tuple[int, int]]:
    with Admin(address) as admin:
        return {(o.partition, i) for o in admin.list_offsets("jobs") for i in range(o.log_end_offset)}


def assert_clean_exit(worker: Worker, rc: int) -> None:
    err = worker.stderr()
    assert rc == 0, err
    assert "Traceback" not in err and "CANCELLED" not in err, err
    assert worker.returned() == len(worker.places("done"))


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signalled_worker_finishes_its_handlers_hands_back_the_rest_and_exits_cleanly(server, tmp_path, flavour,
                                                                                      sig):
    fill(server.address)
    go = tmp_path / "go"
    worker = Worker(server.address, flavour, go)
    try:
        assert wait_until(worker.busy, timeout=60), (worker.events, worker.stderr())
        worker.proc.send_signal(sig)
        assert wait_until(lambda: "stopping" in worker.stderr(), timeout=30), worker.stderr()
        go.touch()  # the handlers running may finish now: after the stop
        rc = worker.wait()
    finally:
        worker.kill()
    assert_clean_exit(worker, rc)
    started, done = worker.places("started"), worker.places("done")
    assert sorted(started) == sorted(done) and len(set(done)) == len(done) == QUICK + RUNNING
    with QueueReceiver("stop", "jobs", server.address) as r:
        parts = r.describe().partitions
        assert sum(p.acked for p in parts) == len(done)  # every handled message acked
        # The rest handed back (nacked with no delay: "waiting" until the next receive
        # looks at the timers, which is at once), not left leased for 60 s.
        assert sum(p.in_flight for p in parts) == 0
        rest = receive_all(r, TOTAL - len(done))
        assert sorted(places(rest)) == sorted(all_places(server.address) - set(done))
        assert any(m.delivery_count == 2 for m in rest)  # received by the worker, not started, back at once
        for msg in rest:
            msg.ack()
        r.flush()
        assert sum(p.acked for p in r.describe().partitions) == TOTAL


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_second_signal_stops_waiting_for_the_handlers(server, tmp_path, flavour):
    fill(server.address)
    worker = Worker(server.address, flavour, tmp_path / "never")
    try:
        assert wait_until(worker.busy, timeout=60), (worker.events, worker.stderr())
        worker.proc.send_signal(signal.SIGINT)
        assert wait_until(lambda: "stopping" in worker.stderr(), timeout=30), worker.stderr()
        worker.proc.send_signal(signal.SIGINT)
        rc = worker.wait()
    finally:
        worker.kill()
    assert_clean_exit(worker, rc)
    done = set(worker.places("done"))
    stuck = set(worker.places("started")) - done
    assert len(done) == QUICK and len(stuck) == RUNNING
    with QueueReceiver("stop", "jobs", server.address) as r:
        parts = r.describe().partitions
        assert sum(p.acked for p in parts) == QUICK
        if flavour == "sync":
            # Threads cannot be cancelled: their records stay leased until the lease ends.
            assert sum(p.in_flight for p in parts) == RUNNING
            back = all_places(server.address) - done - stuck
        else:
            # Cancelled handlers: their records are handed back with the others.
            assert sum(p.in_flight for p in parts) == 0
            back = all_places(server.address) - done
        rest = receive_all(r, len(back))
        assert sorted(places(rest)) == sorted(back)


def test_stop_from_a_handler_returns_after_the_handlers_running(server):
    fill(server.address)
    handled: list = []
    with QueueReceiver("stop", "jobs", server.address, max_records=4) as r:
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

        def handle(msg) -> None:
            handled.append(msg)
            if len(handled) == 5:
                r.stop()

        # On pytest's main thread: the pool installs its signal handlers, then restores them.
        count = r.process(handle, workers=2)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
        assert count == len(handled) >= 5
        parts = r.describe().partitions
        assert sum(p.acked for p in parts) == count
        assert sum(p.in_flight for p in parts) == 0
        r.stop()  # before a process(): the next one returns at once
        assert r.process(handle, workers=2) == 0
        assert len(handled) == count
        # From another thread, as the README shows.
        timer = threading.Timer(0.3, r.stop)
        timer.start()
        more = r.process(handle, workers=4, stop_grace_s=30)
        timer.join(10)
        assert sum(p.acked for p in r.describe().partitions) == count + more == len(handled)
        assert sum(p.in_flight for p in r.describe().partitions) == 0


def test_the_pool_takes_the_signals_while_it_runs_but_leaves_an_ignored_one_alone(server):
    fill(server.address)
    seen: list = []
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        int_before = signal.getsignal(signal.SIGINT)
        with QueueReceiver("stop", "jobs", server.address) as r:
            def handle(msg) -> None:
                seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
                r.stop()

            r.process(handle, workers=1)
        during_int, during_term = seen[0]
        assert during_int is not int_before and during_term is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is int_before
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_stop_from_the_main_thread_stops_a_pool_running_in_another(server):
    fill(server.address)
    with QueueReceiver("stop", "jobs", server.address, max_records=4) as r:
        handled = threading.Event()
        result: list[int] = []
        pool = threading.Thread(target=lambda: result.append(r.process(lambda m: handled.set(), workers=2)))
        pool.start()
        assert handled.wait(30)
        r.stop()
        pool.join(30)
        assert not pool.is_alive() and result[0] >= 1
        parts = r.describe().partitions
        assert sum(p.acked for p in parts) == result[0]
        assert sum(p.in_flight for p in parts) == 0


def test_stop_from_another_thread_stops_the_asyncio_pool(server):
    fill(server.address)
    handled: list = []

    async def scenario() -> int:
        async with AsyncQueueReceiver("stop", "jobs", server.address, max_records=4) as r:
            async def handle(msg) -> None:
                handled.append(msg)
                if len(handled) == 5:
                    threading.Thread(target=r.stop).start()
                await asyncio.sleep(0.01)

            count = await r.process(handle, concurrency=3)
            return count

    count = asyncio.run(scenario())
    assert count == len(handled) >= 5
    with QueueReceiver("stop", "jobs", server.address) as r:
        parts = r.describe().partitions
        assert sum(p.acked for p in parts) == count
        assert sum(p.in_flight for p in parts) == 0


# -- what a stop costs the records no handler saw ---------------------------------------
# One partition nearly drained by one receive: the first worker's receive takes every
# record while the other workers' receives wait on the broker, so a record handed back
# while they wait would be leased again (and counted again) by a pool that is stopping.
FEW = 50
WORKERS = 4


def fill_one(address: str, **config) -> None:
    with Admin(address) as admin, Producer(address) as producer:
        admin.create_topic("jobs", 1)
        for i in range(FEW):
            producer.send("jobs", b"job-%d" % i, partition=0)
        producer.flush()
    with QueueReceiver("stop", "jobs", address) as r:
        r.create(lease_ms=60_000, **config)


def assert_handed_back_once(address: str, handled: set[tuple[int, int]]) -> None:
    """Every record not handled comes again at once, with one delivery of the
    stopped run at most (so 2 now): none was dead-lettered at max_deliveries=2."""
    with QueueReceiver("stop", "jobs", address) as r:
        parts = r.describe().partitions
        assert sum(p.acked for p in parts) == len(handled)
        assert sum(p.dead_lettered for p in parts) == 0
        assert sum(p.in_flight for p in parts) == 0
        rest = receive_all(r, FEW - len(handled))
        assert sorted(places(rest)) == sorted(all_places(address) - handled)
        assert max(m.delivery_count for m in rest) <= 2, sorted(m.delivery_count for m in rest)


def run_sync(address: str, how: str) -> set[tuple[int, int]]:
    handled: set[tuple[int, int]] = set()
    with QueueReceiver("stop", "jobs", address, max_wait_ms=200) as r:
        def handle(msg) -> None:
            handled.add((msg.partition, msg.offset))
            if how == "handler":
                r.stop()
            elif how == "thread" and len(handled) == 3:
                threading.Thread(target=r.stop).start()

        count = r.process(handle, workers=WORKERS, max_messages=5 if how == "max_messages" else None)
    assert count == len(handled) >= 1
    return handled


def run_async(address: str, how: str) -> set[tuple[int, int]]:
    handled: set[tuple[int, int]] = set()

    async def scenario() -> int:
        async with AsyncQueueReceiver("stop", "jobs", address, max_wait_ms=200) as r:
            async def handle(msg) -> None:
                handled.add((msg.partition, msg.offset))
                if how == "handler":
                    r.stop()
                elif how == "thread" and len(handled) == 3:
                    threading.Thread(target=r.stop).start()

            return await r.process(handle, concurrency=WORKERS, max_messages=5 if how == "max_messages" else None)

    assert asyncio.run(scenario()) == len(handled) >= 1
    return handled


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("how", ["max_messages", "handler", "thread"])
def test_a_stop_costs_a_record_no_handler_saw_at_most_one_delivery(server, flavour, how):
    fill_one(server.address, max_deliveries=2)
    handled = (run_sync if flavour == "sync" else run_async)(server.address, how)
    assert_handed_back_once(server.address, handled)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_signal_costs_a_record_no_handler_saw_at_most_one_delivery(server, tmp_path, flavour):
    fill_one(server.address, max_deliveries=2)
    # Every handler quick (20 ms each); one receive takes the whole partition.
    worker = Worker(server.address, flavour, tmp_path / "never", FEW, WORKERS, 100, 20)
    try:
        assert wait_until(lambda: len(worker.places("done")) >= 3, timeout=60), (worker.events, worker.stderr())
        worker.proc.send_signal(signal.SIGINT)
        rc = worker.wait()
    finally:
        worker.kill()
    assert_clean_exit(worker, rc)
    done = set(worker.places("done"))
    assert len(done) < FEW, "stopped after the queue drained: nothing to check"
    assert_handed_back_once(server.address, done)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_short_run_leases_no_more_than_it_needs(server, flavour):
    """process(max_messages=2), again and again: each run leases about what it will
    handle (one more per other worker at most), not the whole partition its stop then
    hands back, each record a delivery the poorer."""
    fill_one(server.address, max_deliveries=100)
    handled: set[tuple[int, int]] = set()
    for _ in range(6):
        with QueueReceiver("stop", "jobs", server.address, max_wait_ms=200) as r:
            before = sum(p.redelivered for p in r.describe().partitions)
        if flavour == "sync":
            with QueueReceiver("stop", "jobs", server.address, max_wait_ms=200) as r:
                count = r.process(lambda msg: handled.add((msg.partition, msg.offset)), workers=WORKERS,
                                  max_messages=2)
        else:
            async def scenario() -> int:
                async with AsyncQueueReceiver("stop", "jobs", server.address, max_wait_ms=200) as r:
                    async def handle(msg) -> None:
                        handled.add((msg.partition, msg.offset))
                    return await r.process(handle, concurrency=WORKERS, max_messages=2)
            count = asyncio.run(scenario())
        assert count >= 2
        with QueueReceiver("stop", "jobs", server.address) as r:
            parts = r.describe().partitions
        assert sum(p.redelivered for p in parts) - before <= WORKERS  # handed back by this stop
    assert sum(p.acked for p in parts) == len(handled)


# -- at-most-once groups: a record received is already acked --------------------------
def lost_and_logged(address: str, handled: set, caplog) -> tuple[set, str]:
    """The records gone from the queue that no handler ran, and the pool's warnings."""
    rest: set = set()
    with QueueReceiver("stop", "jobs", address) as r:
        for _ in range(FEW):  # acked as they are handed out; none left at the first empty answer
            got = r.receive(FEW, max_wait_ms=200)
            if not got:
                break
            rest |= set(places(got))
    warnings = "\n".join(rec.getMessage() for rec in caplog.records
                         if rec.levelname == "WARNING" and rec.name == "streamd.client.queue")
    return all_places(address) - handled - rest, warnings


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("how", ["max_messages", "handler", "thread"])
def test_a_stopped_at_most_once_pool_runs_every_record_it_received(server, caplog, flavour, how):
    fill_one(server.address, at_most_once=True)
    handled = (run_sync if flavour == "sync" else run_async)(server.address, how)
    lost, warnings = lost_and_logged(server.address, handled, caplog)
    assert not lost, (sorted(lost), warnings)


def test_an_at_most_once_record_whose_handler_is_cancelled_is_logged_with_its_offset(server, caplog):
    fill_one(server.address, at_most_once=True)
    handled: set[tuple[int, int]] = set()
    started: list[tuple[int, int]] = []

    async def scenario() -> int:
        async with AsyncQueueReceiver("stop", "jobs", server.address, max_wait_ms=200) as r:
            async def handle(msg) -> None:
                started.append((msg.partition, msg.offset))
                r.stop()
                await asyncio.Event().wait()  # never returns: cancelled when the grace ends

            return await r.process(handle, concurrency=2, stop_grace_s=0.2)

    assert asyncio.run(scenario()) == 0
    lost, warnings = lost_and_logged(server.address, handled, caplog)
    assert lost == set(started) and lost, (sorted(lost), started)
    offsets = sorted(o for _, o in started)
    assert f"{len(offsets)} at-most-once record(s)" in warnings, warnings
    assert " ".join(f"0@{o}" for o in offsets) in warnings or f"0@{offsets[0]}-{offsets[-1]}" in warnings, warnings


def test_an_at_most_once_record_whose_thread_outlives_the_grace_is_logged_with_its_offset(server, caplog):
    fill_one(server.address, at_most_once=True)
    release = threading.Event()
    started: list[tuple[int, int]] = []
    try:
        with QueueReceiver("stop", "jobs", server.address, max_wait_ms=200) as r:
            def handle(msg) -> None:
                started.append((msg.partition, msg.offset))
                r.stop()
                release.wait(60)  # past the grace: the pool stops waiting for it

            assert r.process(handle, workers=1, stop_grace_s=0.2) == 0
    finally:
        release.set()
    lost, warnings = lost_and_logged(server.address, set(), caplog)
    assert lost == set(started) and len(started) == 1, (sorted(lost), started)
    assert "1 at-most-once record(s) will not come again" in warnings and f"0@{started[0][1]}" in warnings, warnings
