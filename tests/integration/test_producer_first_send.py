"""The first send to a topic looks its partition count up (keyed and keyless
records); that lookup is retried like any produce, until the record's
``delivery_timeout_ms``, against a real ``streamd serve`` SIGSTOPped or SIGKILLed:

- a broker stopped or down for less than the delivery timeout fails nothing;
- one stopped for longer fails the send with ``DEADLINE_EXCEEDED``/``DELIVERY_TIMEOUT``
  (not stored), and the failed lookup is not kept: a later send looks again;
- sends sharing one lookup each keep their own deadline (so does
  ``partition_count()``, bounded by ``request_timeout_ms``);
- NOT_FOUND fails at once.

Bounds are thread joins and ``result(timeout)``, never assertions on how fast
anything was.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from streamd.client import Admin, AsyncProducer, OutcomeUnknown, Producer, StreamdError

from .helpers import ADMIN_OF_ALL, auth_toml
from .test_producer_stalls import BOUND_S, bounded, stored

pytestmark = pytest.mark.slow


def _topic(address: str, partitions: int) -> None:
    with Admin(address) as admin:
        admin.create_topic("t", partitions)


def test_a_first_send_waits_out_a_stop_shorter_than_the_delivery_timeout(server_process):
    broker = server_process()
    _topic(broker.address, 3)
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        with Producer(broker.address, delivery_timeout_ms=60_000, request_timeout_ms=500) as producer:
            keyless = producer.send("t", b"keyless")
            keyed = producer.send("t", b"keyed", key=b"k")
            pinned = producer.send("t", b"pinned", partition=0)
            time.sleep(2.0)  # several lookup attempts time out meanwhile
            os.kill(broker.proc.pid, signal.SIGCONT)
            metas = [f.result(timeout=BOUND_S) for f in (keyless, keyed, pinned)]
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    for (v, meta) in zip((b"keyless", b"keyed", b"pinned"), metas, strict=False):
        assert (meta.offset, v) in stored(broker.address, "t", meta.partition)
    broker.kill()


def test_a_first_send_after_a_kill_waits_for_the_restarted_broker(server_process, tmp_path, same_port):
    data = tmp_path / "data"
    broker = server_process(data_dir=data)
    _topic(broker.address, 3)
    broker.kill()

    async def scenario():
        async with AsyncProducer(broker.address, delivery_timeout_ms=60_000, request_timeout_ms=500) as producer:
            sends = [asyncio.ensure_future(producer.send("t", b"keyless")),
                     asyncio.ensure_future(producer.send("t", b"keyed", key=b"k"))]
            await asyncio.sleep(1.5)  # down meanwhile: lookups fail UNAVAILABLE / time out
            restarted.append(await asyncio.to_thread(server_process, data_dir=data))
            return [await (await s) for s in sends]

    restarted: list = []
    metas = bounded(asyncio.run, scenario())
    for v, meta in zip((b"keyless", b"keyed"), metas, strict=False):
        assert (meta.offset, v) in stored(restarted[0].address, "t", meta.partition)
    restarted[0].kill()


def test_a_first_send_fails_with_delivery_timeout_when_the_stop_outlasts_it(server_process):
    broker = server_process()
    _topic(broker.address, 3)
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        with Producer(broker.address, delivery_timeout_ms=1500, request_timeout_ms=500) as producer:
            futures = [producer.send("t", b"keyless"), producer.send("t", b"keyed", key=b"k")]
            errors = [f.exception(timeout=BOUND_S) for f in futures]
            os.kill(broker.proc.pid, signal.SIGCONT)
            later = bounded(producer.send("t", b"later").result)  # the failed lookup is not kept
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    for err in errors:
        assert isinstance(err, StreamdError) and not isinstance(err, OutcomeUnknown), err
        assert (err.code, err.reason) == ("DEADLINE_EXCEEDED", "DELIVERY_TIMEOUT"), err
        assert "not stored" in err.message
    assert (later.offset, b"later") in stored(broker.address, "t", later.partition)
    broker.kill()


def test_a_first_send_to_a_missing_topic_fails_at_once(server_process):
    broker = server_process()
    with Producer(broker.address, delivery_timeout_ms=120_000) as producer:
        err = bounded(producer.send("nope", b"v").exception)
    assert isinstance(err, StreamdError) and err.code == "NOT_FOUND", err
    broker.kill()


def test_one_senders_delivery_timeout_does_not_fail_a_later_send_sharing_the_lookup(server_process):
    broker = server_process()
    _topic(broker.address, 3)
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        with Producer(broker.address, delivery_timeout_ms=4000, request_timeout_ms=500) as producer:
            early = producer.send("t", b"early")
            time.sleep(3.0)
            late = producer.send("t", b"late", key=b"k")  # waits on the same lookup, 3 s later
            err = early.exception(timeout=BOUND_S)  # its own deadline passed
            os.kill(broker.proc.pid, signal.SIGCONT)
            meta = late.result(timeout=BOUND_S)
            with pytest.raises(StreamdError) as timed_out:  # a short deadline of its own, same lookup
                os.kill(broker.proc.pid, signal.SIGSTOP)
                producer.partition_count("other")
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    assert (err.code, err.reason) == ("DEADLINE_EXCEEDED", "DELIVERY_TIMEOUT"), err
    assert (meta.offset, b"late") in stored(broker.address, "t", meta.partition)
    assert (timed_out.value.code, timed_out.value.reason) == ("DEADLINE_EXCEEDED", "TIMED_OUT")
    broker.kill()


def test_a_first_send_to_a_topic_it_may_not_see_fails_at_once(make_server, tmp_path, monkeypatch):
    from streamd.auth import new_token

    admin_token, admin_hash = new_token()
    token, token_hash = new_token()
    auth = tmp_path / "auth.toml"
    auth.write_text(auth_toml({"ops": admin_hash, "orders-api": token_hash}, ADMIN_OF_ALL,
                              ("orders-api", ["produce"], ["orders"])))
    server = make_server(auth_file=str(auth))
    monkeypatch.setenv("STREAMD_TOKEN", admin_token)
    with Admin(server.address) as admin:
        admin.create_topic("payroll", 1)
    monkeypatch.setenv("STREAMD_TOKEN", token)
    with Producer(server.address, delivery_timeout_ms=120_000) as producer:
        err = bounded(producer.send("payroll", b"v", key=b"k").exception)
    assert isinstance(err, StreamdError) and err.code == "PERMISSION_DENIED", err
