"""``send()`` through the public SDK against a real broker: arguments are checked at
the call, ``delay_ms``/``deliver_at_ms`` reach the wire, a record over the topic's
``max_record_bytes`` or the transport's limit is refused alone and at once (a small
record lingering in the same batch still goes), and nothing hangs after it.

Bounds are ``result(timeout)``, never assertions on how fast anything was.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest

from streamd.client import Admin, AsyncProducer, ProduceError, Producer, StreamdError
from streamd.client.records import batch_records
from streamd.v1 import streamd_pb2 as pb
from streamd.v1 import streamd_pb2_grpc as rpc

BOUND_S = 30
MiB = 1024 * 1024


@pytest.fixture
def admin(server):
    with Admin(server.address) as client:
        yield client


def _records(address: str, topic: str) -> list[pb.Record]:
    import grpc

    with grpc.insecure_channel(address) as channel:
        answer = rpc.LogServiceStub(channel).Fetch(pb.FetchRequest(topic=topic, partition=0, offset=0), timeout=10)
    return [r for batch in answer.batches for r in batch_records(batch).records]


@pytest.mark.parametrize("bad", [
    {"value": "text"}, {"key": "k"}, {"partition": "0"}, {"partition": -1}, {"delay_ms": -5},
    {"delay_ms": 10, "deliver_at_ms": 10}, {"timestamp_ms": 1.5}, {"headers": [("h", "not bytes")]},
    {"idempotency_key": b"bytes"}, {"partition": 7},
])
def test_wrong_send_arguments_raise_at_the_call(server, admin, bad):
    admin.create_topic("t", 2)
    with Producer(server.address) as producer:
        producer.send("t", b"warm").result(BOUND_S)  # the topic is looked up
        args = {"value": b"v", **bad}
        with pytest.raises((TypeError, ValueError, StreamdError)) as caught:
            producer.send("t", args.pop("value"), **args)
        if bad == {"partition": 7}:
            assert (caught.value.code, caught.value.reason) == ("INVALID_ARGUMENT", "PARTITION_OUT_OF_RANGE")
        args = {"value": b"v", **bad}
        with pytest.raises((TypeError, ValueError, StreamdError)):
            producer.send_and_wait("t", args.pop("value"), **args)


def test_delay_and_deliver_at_reach_the_broker_per_record(server, admin):
    admin.create_topic("t", 1)
    with Producer(server.address) as producer:
        futures = [producer.send("t", b"later", delay_ms=60_000), producer.send("t", b"at", deliver_at_ms=4 * 10**12),
                   producer.send("t", b"now", key=b"k", headers=[("h", b"1")], timestamp_ms=1234,
                                 idempotency_key="id-1")]
        assert [f.result(BOUND_S).offset for f in futures] == [0, 1, 2]
    later, at, now = _records(server.address, "t")
    assert (later.value, later.delay_ms, later.deliver_at_ms) == (b"later", 60_000, 0)
    assert (at.value, at.delay_ms, at.deliver_at_ms) == (b"at", 0, 4 * 10**12)
    assert (now.key, [(h.key, h.value) for h in now.headers], now.timestamp_ms, now.idempotency_key) == (
        b"k", [("h", b"1")], 1234, "id-1")


def test_an_oversized_record_fails_alone_at_once_with_the_topics_limit(server, admin):
    admin.create_topic("t", 1, max_record_bytes=MiB)
    with Producer(server.address, linger_ms=200) as producer:
        producer.send("t", b"warm").result(BOUND_S)
        small = producer.send("t", b"small")  # lingers in the batch the big one would join
        with pytest.raises(ProduceError) as caught:
            producer.send("t", b"x" * (10 * 1000 * 1000))
        after = producer.send("t", b"after")
        assert (small.result(BOUND_S).offset, after.result(BOUND_S).offset) == (1, 2)
    err = caught.value
    assert (err.code, err.reason) == ("RESOURCE_EXHAUSTED", "RECORD_TOO_LARGE")
    assert err.metadata["limit"] == str(MiB) and err.metadata["size"].startswith("1000000")


def test_a_first_send_of_an_oversized_record_fails_its_future_alone(server, admin):
    admin.create_topic("t", 1, max_record_bytes=100)
    with Producer(server.address) as producer:
        small = producer.send("t", b"small")
        big = producer.send("t", b"x" * 500)  # the topic is not looked up yet: refused when it is
        assert small.result(BOUND_S).offset == 0
        assert isinstance(big.exception(BOUND_S), ProduceError)
    assert big.exception().metadata["limit"] == "100"


def test_a_record_over_the_transport_limit_never_hangs_an_idempotent_producer(server, admin):
    admin.create_topic("t", 1)

    async def scenario():
        async with AsyncProducer(server.address) as producer:
            await (await producer.send("t", b"warm"))
            with pytest.raises(ProduceError) as caught:
                await producer.send("t", b"x" * (65 * MiB))
            later = await producer.send("t", b"later")
            await producer.flush()
            return caught.value, (await later).offset

    err, offset = asyncio.run(asyncio.wait_for(scenario(), BOUND_S))
    assert (err.code, err.reason) == ("RESOURCE_EXHAUSTED", "RECORD_TOO_LARGE") and offset == 1


def test_send_futures_work_with_concurrent_futures_and_asyncio_helpers(server, admin):
    admin.create_topic("t", 1)
    with Producer(server.address) as producer:
        futures = [producer.send("t", b"%d" % i) for i in range(50)]
        done, pending = concurrent.futures.wait(futures, timeout=BOUND_S)
        assert not pending and len(done) == 50
        assert [f.result().offset for f in concurrent.futures.as_completed(futures, timeout=BOUND_S)]
        seen = []
        futures[0].add_done_callback(lambda f: seen.append(f.result().offset))
        assert seen == [0] and futures[0].cancel() is False and futures[0].done()

    async def scenario():
        async with AsyncProducer(server.address) as producer:
            futures = [await producer.send("t", b"a%d" % i) for i in range(20)]
            metas = await asyncio.gather(*futures)
            done, _ = await asyncio.wait(futures, timeout=BOUND_S)
            return [m.offset for m in metas], len(done), (await asyncio.wait_for(futures[0], BOUND_S)).offset

    offsets, done, first = asyncio.run(scenario())
    assert offsets == list(range(50, 70)) and done == 20 and first == 50
