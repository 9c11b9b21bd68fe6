"""The plain consumers' ``auto_offset_reset`` against a broker whose retention really
deleted the records a position points at."""

from __future__ import annotations

import asyncio
import logging

import pytest

from streamd.client import Admin, AsyncConsumer, Consumer, Producer, StreamdError

from ..conftest import bounded, wait_until

RECORDS = 100


@pytest.fixture
def trimmed(make_server):
    """A server and a topic whose first segments retention deleted: (address, log start)."""
    server = make_server(retention_check_ms=50)
    with Admin(server.address) as admin:
        admin.create_topic("t", 1, segment_bytes=4096, retention_bytes=8192)
        with Producer(server.address) as producer:
            for i in range(RECORDS // 5):
                producer.send_batch("t", 0, [b"record-%03d" % (i * 5 + k) + b"." * 200 for k in range(5)])
        assert wait_until(lambda: admin.list_offsets("t")[0].log_start_offset > 0, timeout=10)
        start = admin.list_offsets("t")[0].log_start_offset
    return server.address, start


def _resets(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", "") == "offset_reset"]


def test_error_is_the_default_and_raises_out_of_range(trimmed):
    address, start = trimmed
    with Consumer(address) as consumer:
        consumer.seek("t", 0, 0)
        with pytest.raises(StreamdError) as raised:
            consumer.poll(max_wait_ms=0)
        assert raised.value.reason == "OFFSET_OUT_OF_RANGE"
        assert int(raised.value.metadata["log_start_offset"]) == start
        assert consumer.positions[("t", 0)] == 0  # left where it was
        with pytest.raises(StreamdError):
            list(consumer.records(exit_at_end=True))


def test_earliest_goes_on_at_the_log_start_and_logs_once(trimmed, caplog):
    address, start = trimmed
    caplog.set_level(logging.WARNING, logger="streamd.client.consumer")
    with Consumer(address, auto_offset_reset="earliest") as consumer:
        consumer.seek("t", 0, 0)
        offsets = [r.offset for r in consumer.records(exit_at_end=True)]
    assert offsets == list(range(start, RECORDS))
    assert len(_resets(caplog)) == 1 and _resets(caplog)[0].levelname == "WARNING"
    assert f"goes on at {start}" in _resets(caplog)[0].getMessage()


def test_earliest_also_resets_a_position_past_the_end(trimmed):
    address, start = trimmed
    with Consumer(address, auto_offset_reset="earliest") as consumer:
        consumer.seek("t", 0, RECORDS + 50)
        assert consumer.poll(max_wait_ms=0) == []
        assert consumer.positions[("t", 0)] == start
        assert consumer.poll(max_wait_ms=0)[0].offset == start


def test_latest_goes_on_at_the_end_with_what_comes_next(trimmed):
    address, _ = trimmed
    with Consumer(address, auto_offset_reset="latest") as consumer, Producer(address) as producer:
        consumer.seek("t", 0, 0)
        assert consumer.poll(max_wait_ms=0) == []
        assert consumer.positions[("t", 0)] == RECORDS
        producer.send_and_wait("t", b"next", partition=0)
        got = consumer.poll(max_wait_ms=2000)
        assert [(r.offset, r.value) for r in got] == [(RECORDS, b"next")]


def test_blocking_subscribe_resets_to_earliest(trimmed):
    address, start = trimmed
    with Consumer(address, auto_offset_reset="earliest") as consumer:
        stream = consumer.subscribe("t", 0, offset=0)
        first = bounded(10, next, stream)
        stream.close()
    assert first.offset == start


def test_blocking_subscribe_raises_out_of_range_by_default(trimmed):
    address, _ = trimmed
    with Consumer(address) as consumer:
        with pytest.raises(StreamdError) as raised:
            bounded(10, next, consumer.subscribe("t", 0, offset=0))
    assert raised.value.reason == "OFFSET_OUT_OF_RANGE"


def test_async_subscribe_resets_and_raises(trimmed):
    address, start = trimmed

    async def first(reset: str, partitions: list[int]) -> int:
        async with AsyncConsumer(address, auto_offset_reset=reset) as consumer:
            records = consumer.subscribe("t", partitions, offset=0)
            try:
                return (await asyncio.wait_for(records.__anext__(), 10)).offset
            finally:
                await records.aclose()

    assert asyncio.run(first("earliest", [0])) == start

    async def latest() -> tuple[int, bytes]:
        async with AsyncConsumer(address, auto_offset_reset="latest") as consumer:
            records = consumer.subscribe("t", [0], offset=0)
            try:
                pending = asyncio.ensure_future(records.__anext__())
                await asyncio.sleep(0.3)  # the stream resubscribed at the end
                with Producer(address) as producer:
                    await asyncio.to_thread(producer.send_and_wait, "t", b"after", partition=0)
                record = await asyncio.wait_for(pending, 10)
                return record.offset, record.value
            finally:
                await records.aclose()

    assert asyncio.run(latest()) == (RECORDS, b"after")
    with pytest.raises(StreamdError) as raised:
        asyncio.run(first("error", [0]))
    assert raised.value.reason == "OFFSET_OUT_OF_RANGE"


def test_an_unknown_policy_is_refused_at_once():
    with pytest.raises(ValueError, match="auto_offset_reset"):
        Consumer("127.0.0.1:1", auto_offset_reset="smallest")
    with pytest.raises(ValueError, match="auto_offset_reset"):
        AsyncConsumer("127.0.0.1:1", auto_offset_reset="none")
