"""Every SDK call and CLI command has a deadline: against a port that accepts
connections and never answers (a plain TCP listener here), and against a SIGSTOPped
broker, each call fails with StreamdError DEADLINE_EXCEEDED / TIMED_OUT naming the
server, instead of hanging; the CLI exits 1 with one line on stderr.

The assertions are on the error and on the call having returned, never on how long
it took.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from streamd.cli.main import main
from streamd.client import (
    Admin,
    AsyncConsumer,
    AsyncProducer,
    Consumer,
    GroupConsumer,
    OutcomeUnknown,
    Producer,
    StreamdError,
)
from streamd.client.queue import AsyncQueueReceiver, QueueReceiver

from ..conftest import ROOT

T = 0.25  # the deadline under test, seconds


class SilentListener:
    """127.0.0.1:<port> accepting TCP connections and never reading or writing."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections.append(conn)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for conn in self.connections:
            conn.close()
        self.sock.close()


@pytest.fixture
def silent():
    listener = SilentListener()
    try:
        yield listener.address
    finally:
        listener.close()


def timed_out(call, address: str) -> StreamdError:
    with pytest.raises(StreamdError) as caught:
        call()
    err = caught.value
    assert (err.code, err.reason) == ("DEADLINE_EXCEEDED", "TIMED_OUT"), err
    assert address in err.message and "within" in err.message
    return err


def test_every_admin_call_times_out(silent):
    with Admin(silent, timeout_s=T) as admin:
        err = timed_out(admin.list_topics, silent)
        assert str(err) == f"DEADLINE_EXCEEDED TIMED_OUT: no answer to ListTopics from {silent} within {T:g} s"
        for call in (lambda: admin.create_topic("t"), lambda: admin.describe_topic("t"),
                     lambda: admin.delete_topic("t"), lambda: admin.list_offsets("t"), admin.list_groups,
                     lambda: admin.describe_group("g"), lambda: admin.delete_group("g"),
                     lambda: admin.fetch_offsets("g"), lambda: admin.commit_offsets("g", {("t", 0): 1}),
                     lambda: admin.reset_offsets("g", offset=0)):
            timed_out(call, silent)
    with Admin(silent, timeout_s=3600) as admin:  # a per-call deadline overrides the client's
        assert "within 0.2 s" in timed_out(lambda: admin.list_topics(timeout_s=0.2), silent).message


def test_consumer_calls_time_out_and_a_long_poll_adds_its_wait(silent):
    with Consumer(silent, timeout_s=T) as consumer:
        timed_out(lambda: consumer.partition_count("t"), silent)
        timed_out(lambda: consumer.assign("t", [0]), silent)
        timed_out(lambda: consumer.list_offsets("t"), silent)
        timed_out(lambda: consumer.seek_to_time("t", 0, [0]), silent)
        err = timed_out(lambda: consumer.fetch("t", 0, 0, max_wait_ms=200), silent)
        assert f"within {T + 0.2:g} s" in err.message
        consumer.seek("t", 0, 0)
        timed_out(lambda: list(consumer.records(exit_at_end=True)), silent)
        timed_out(lambda: list(consumer.records()), silent)  # tailing: each fetch is bounded


def test_async_consumer_calls_time_out(silent):
    async def run():
        async with AsyncConsumer(silent, timeout_s=T) as consumer:
            with pytest.raises(StreamdError) as fetch:
                await consumer.fetch("t", 0, 0, max_wait_ms=100)
            with pytest.raises(StreamdError) as describe:
                async for _ in consumer.subscribe("t"):  # partitions=None: asks the partition count
                    pass
            return fetch.value, describe.value

    for err in asyncio.run(run()):
        assert (err.code, err.reason) == ("DEADLINE_EXCEEDED", "TIMED_OUT"), err


def test_queue_receiver_calls_time_out(silent):
    with pytest.raises(StreamdError) as created:
        QueueReceiver("g", "t", silent, timeout_s=T, create=True)
    assert created.value.reason == "TIMED_OUT"
    with QueueReceiver("g", "t", silent, timeout_s=T, lease_ms=1000) as receiver:
        timed_out(lambda: receiver.create(), silent)
        timed_out(receiver.describe, silent)
        err = timed_out(lambda: receiver.receive(max_wait_ms=100), silent)
        assert f"within {T + 0.1:g} s" in err.message


def test_async_queue_receiver_calls_time_out(silent):
    async def run():
        async with AsyncQueueReceiver("g", "t", silent, timeout_s=T) as receiver:
            errors = []
            for call in (receiver.create, lambda: receiver.receive(max_wait_ms=100)):
                with pytest.raises(StreamdError) as caught:
                    await call()
                errors.append(caught.value)
            return errors

    for err in asyncio.run(run()):
        assert (err.code, err.reason) == ("DEADLINE_EXCEEDED", "TIMED_OUT"), err


def test_a_group_consumer_does_not_hang(silent):
    consumer = GroupConsumer("g", ["t"], silent, timeout_s=T, max_wait_ms=50)
    try:
        assert consumer.wait_for_assignment(timeout_s=T) == set()
        assert list(consumer.records(idle_timeout_s=T)) == []
    finally:
        consumer.close(timeout_s=5)


def test_a_producer_fails_its_sends_in_time(silent):
    options = {"request_timeout_ms": T * 1000, "delivery_timeout_ms": 2 * T * 1000}
    with Producer(silent, **options) as producer:
        timed_out(lambda: producer.partition_count("t"), silent)
        with pytest.raises(StreamdError) as caught:  # no producer id came: nothing was sent
            producer.send_and_wait("t", b"v", partition=0)
        assert (caught.value.code, caught.value.reason) == ("DEADLINE_EXCEEDED", "DELIVERY_TIMEOUT")
        assert not isinstance(caught.value, OutcomeUnknown)
        future = producer.send("t", b"w", partition=0)
        producer.flush()
        assert future.exception().reason == "DELIVERY_TIMEOUT"

    async def run():
        async with AsyncProducer(silent, **options) as producer:
            return await (await producer.send_batch("t", 0, [b"a"]))

    with pytest.raises(StreamdError) as caught:
        asyncio.run(run())
    assert caught.value.reason == "DELIVERY_TIMEOUT"


def test_the_cli_times_out_with_one_line_and_exit_1(silent, capsys):
    assert main(["--server", silent, "topics", "list", "--timeout", "1"]) == 1
    err = capsys.readouterr().err
    assert err == f"streamd: DEADLINE_EXCEEDED TIMED_OUT: no answer to ListTopics from {silent} within 1 s\n"
    assert main(["--server", silent, "--timeout", "0.5", "offsets", "t"]) == 1  # before the subcommand too
    assert "within 0.5 s" in capsys.readouterr().err
    for argv in (["groups", "list"], ["queue", "list"], ["consume", "t", "--partition", "0"]):
        assert main(["--server", silent, "--timeout", "0.5", *argv]) == 1, argv
        assert capsys.readouterr().err.startswith("streamd: DEADLINE_EXCEEDED TIMED_OUT: "), argv


def test_the_cli_rejects_a_timeout_that_is_not_positive(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["topics", "list", "--timeout", "0"])
    assert caught.value.code == 2
    assert "must be a positive number of seconds" in capsys.readouterr().err


def test_the_cli_subprocess_times_out_without_a_traceback(silent):
    proc = subprocess.run([sys.executable, "-m", "streamd", "--server", silent, "topics", "list", "--timeout", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"streamd: DEADLINE_EXCEEDED TIMED_OUT: no answer to ListTopics from {silent} "
                                        "within 1 s"]


def test_a_stopped_broker_times_every_call_out(server_process, capsys):
    broker = server_process()
    address = broker.address
    with Admin(address) as admin:
        admin.create_topic("t", 1)
    receiver = QueueReceiver("q", "t", address, timeout_s=T, create=True)
    group = GroupConsumer("g", ["t"], address, timeout_s=T, auto_commit_interval_ms=None)
    try:
        assert group.wait_for_assignment(timeout_s=30) == {("t", 0)}
        os.kill(broker.proc.pid, signal.SIGSTOP)
        with Admin(address, timeout_s=T) as admin:
            timed_out(admin.list_topics, address)
        with Consumer(address, timeout_s=T) as consumer:
            timed_out(lambda: consumer.fetch("t", 0, 0, max_wait_ms=100), address)
        timed_out(lambda: receiver.receive(max_wait_ms=100), address)
        timed_out(lambda: group.commit({("t", 0): 0}), address)
        assert main(["--server", address, "topics", "list", "--timeout", "0.5"]) == 1
        assert capsys.readouterr().err.startswith("streamd: DEADLINE_EXCEEDED TIMED_OUT: ")
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
        receiver.close()
        group.close(timeout_s=5)
        broker.kill()
