"""``streamd.testing.RunningServer`` used as a user's own suite would use it: a real
broker in a ``with`` block, the public SDK against it, and nothing left running once
the block is left (normally or by an exception)."""

from __future__ import annotations

import socket
import threading

import pytest

from streamd.client import Admin, Consumer, Producer
from streamd.testing import FakeClock, RunningServer


def _refuses_connections(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(5)
        try:
            sock.connect((host, int(port)))
        except ConnectionRefusedError:
            return True
    return False


def _read_all(address: str, topic: str) -> list[tuple[bytes | None, bytes]]:
    with Consumer(address) as consumer:
        consumer.assign(topic)
        return sorted((r.key, r.value) for r in consumer.records(exit_at_end=True))


def test_a_with_block_serves_the_sdk_and_stops_the_broker_on_leaving_it(tmp_path):
    sent = [(b"k%d" % (i % 3), b"order-%d" % i) for i in range(30)]
    with RunningServer(tmp_path / "data") as server:
        assert server.address.startswith("127.0.0.1:")
        with Admin(server.address) as admin:
            admin.create_topic("orders", 3)
        with Producer(server.address) as producer:
            metas = [producer.send("orders", value, key=key) for key, value in sent]
            assert all(m.result(10).topic == "orders" for m in metas)
        assert _read_all(server.address, "orders") == sorted(sent)
    assert not server.thread.is_alive() and server.loop.is_closed()
    assert _refuses_connections(server.address)
    server.stop()  # idempotent: stopping a stopped broker is a no-op

    # The broker stopped cleanly: another on the same directory reads it all back.
    with RunningServer(tmp_path / "data") as again:
        assert _read_all(again.address, "orders") == sorted(sent)


def test_leaving_the_block_by_an_exception_stops_the_broker_and_lets_the_exception_through(tmp_path):
    with pytest.raises(KeyError, match="from the test"):
        with RunningServer(tmp_path / "data", clock=FakeClock()) as server:
            with Admin(server.address) as admin:
                admin.create_topic("t", 1)
            raise KeyError("from the test")
    assert not server.thread.is_alive() and server.loop.is_closed()
    assert _refuses_connections(server.address)


def test_a_broker_that_cannot_start_raises_and_leaves_no_thread_behind(tmp_path):
    with RunningServer(tmp_path / "data"):
        threads = set(threading.enumerate())
        with pytest.raises(Exception, match="in use by another streamd broker"):
            RunningServer(tmp_path / "data")  # the first one holds the directory's lock
        assert not {t for t in threading.enumerate() if t.name == "streamd-testing-server"} - threads
