"""The per-record produce paths of ``bench/sdk_paths.py``, one function per (system, idiom).

Each function runs in this (the benchmark's) process against a driver already set up
(``bench.streamd_driver.Streamd``, ``bench.peers.redis_streams.RedisStreams``,
``bench.peers.nats_jetstream.NatsJetStream``), on a fresh one-partition topic / stream
that it deletes afterwards, and returns ``harness.throughput(...)`` plus
``client_cpu_us_per_record``: this process's CPU (``getrusage(RUSAGE_SELF)``, user + system, every
thread: the blocking ``Producer``'s loop thread counts) over the timed part, per record.
The servers are other processes, so their CPU is not in it.

Every loop stops at ``n`` records or at ``max_seconds`` (checked every ``CHECK_EVERY``
records), then waits for every acknowledgement; the clock includes that wait (the
``flush()``), because a record is sent only once it is acknowledged. Every record's
acknowledgement is checked (an offset / reply per record).

Idioms, 100 B records, default client settings everywhere:

- streamd ``send_blocking``: ``Producer.send()`` per record, then ``flush()``;
- streamd ``send_async``: ``await AsyncProducer.send()`` per record, then ``flush()``;
- streamd ``send_and_wait_blocking`` / ``send_and_wait_async``: one at a time;
- Redis ``pipeline``: redis-py ``pipe.xadd()`` per record, ``execute()`` every
  ``REDIS_PIPELINE_EVERY`` records (redis-py's per-record idiom: it has no background
  batching);
- NATS ``publish_async``: ``await js.publish_async()`` per record (nats-py keeps up to
  4,000 in flight by default), then ``publish_async_completed()``;
- one at a time for the peers: the drivers' ``produce_acked`` (XADD / ``js.publish``
  awaited).
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench.harness import now, payload, throughput

RECORD_BYTES = 100
CHECK_EVERY = 1000
REDIS_PIPELINE_EVERY = 1000


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # microsecond resolution (os.times(): 10 ms ticks)
    return r.ru_utime + r.ru_stime


@contextmanager
def timed(out: dict[str, float]) -> Iterator[None]:
    """Wall seconds and this process's CPU seconds of the block, into ``out``."""
    t0, c0 = now(), cpu_seconds()
    yield
    out["seconds"], out["cpu"] = now() - t0, cpu_seconds() - c0


def result(records: int, clock: dict[str, float], **extra: float) -> dict[str, float]:
    cpu_us = clock["cpu"] / max(records, 1) * 1e6
    return throughput(records, clock["seconds"], RECORD_BYTES, client_cpu_us_per_record=round(cpu_us, 2), **extra)


def with_cpu(call: Callable[[], dict[str, float]]) -> dict[str, float]:
    """A driver method's result plus this process's CPU per record over the whole call
    (its untimed topic set-up included: small beside the records)."""
    c0 = cpu_seconds()
    out = call()
    out["client_cpu_us_per_record"] = round((cpu_seconds() - c0) / max(out["records"], 1) * 1e6, 2)
    return out


# -- streamd ---------------------------------------------------------------------------
def _streamd_topic(d: Any, fsync: str | None = None) -> str:
    name = f"sdk-{next(d._seq)}"
    d.admin.create_topic(name, 1, **({"fsync": fsync} if fsync else {"fsync": d.fsync}))
    return name


def _check(d: Any, topic: str, offsets: list[int], sent: int) -> None:
    stored = d.admin.describe_topic(topic).partitions[0].log_end_offset
    if len(offsets) != sent or stored != sent or any(o < 0 for o in offsets):
        raise RuntimeError(f"{topic}: {len(offsets)} acks, log end {stored}, {sent} sent")


def streamd_send_blocking(d: Any, n: int, max_seconds: float) -> dict[str, float]:
    from streamd.client import Producer

    topic, value, clock = _streamd_topic(d), payload(RECORD_BYTES), {}
    try:
        with Producer(d.address) as producer:
            with timed(clock):
                futures, deadline = [], now() + max_seconds
                while len(futures) < n and (len(futures) % CHECK_EVERY or now() < deadline):
                    futures.append(producer.send(topic, value))
                producer.flush()
            offsets = [f.result(timeout=60).offset for f in futures]
        _check(d, topic, offsets, len(futures))
    finally:
        d.admin.delete_topic(topic)
    return result(len(futures), clock)


def streamd_send_async(d: Any, n: int, max_seconds: float) -> dict[str, float]:
    from streamd.client import AsyncProducer

    topic, value, clock = _streamd_topic(d), payload(RECORD_BYTES), {}

    async def run() -> list[int]:
        async with AsyncProducer(d.address) as producer:
            with timed(clock):
                futures, deadline = [], now() + max_seconds
                while len(futures) < n and (len(futures) % CHECK_EVERY or now() < deadline):
                    futures.append(await producer.send(topic, value))
                await producer.flush()
                metas = await asyncio.gather(*futures)
            return [m.offset for m in metas]

    try:
        offsets = d.runner.run(run())
        _check(d, topic, offsets, len(offsets))
    finally:
        d.admin.delete_topic(topic)
    return result(len(offsets), clock)


def streamd_send_and_wait_blocking(d: Any, n: int, max_seconds: float) -> dict[str, float]:
    from streamd.client import Producer

    topic, value, clock = _streamd_topic(d), payload(RECORD_BYTES), {}
    offsets: list[int] = []
    try:
        with Producer(d.address) as producer:
            producer.send_and_wait(topic, value, partition=0)  # warm: the topic lookup, the stream
            with timed(clock):
                deadline = now() + max_seconds
                while len(offsets) < n and now() < deadline:
                    offsets.append(producer.send_and_wait(topic, value, partition=0).offset)
        _check(d, topic, [0, *offsets], len(offsets) + 1)
    finally:
        d.admin.delete_topic(topic)
    return result(len(offsets), clock)


def streamd_send_and_wait_async(d: Any, n: int, max_seconds: float, *, fsync: str | None = None) -> dict[str, float]:
    from streamd.client import AsyncProducer

    topic, value, clock = _streamd_topic(d, fsync), payload(RECORD_BYTES), {}

    async def run() -> list[int]:
        offsets: list[int] = []
        async with AsyncProducer(d.address) as producer:
            await producer.send_and_wait(topic, value, partition=0)  # warm
            with timed(clock):
                deadline = now() + max_seconds
                while len(offsets) < n and now() < deadline:
                    offsets.append((await producer.send_and_wait(topic, value, partition=0)).offset)
        return offsets

    try:
        offsets = d.runner.run(run())
        _check(d, topic, [0, *offsets], len(offsets) + 1)
    finally:
        d.admin.delete_topic(topic)
    return result(len(offsets), clock)


# -- peers -----------------------------------------------------------------------------
def redis_pipeline(rd: Any, n: int, max_seconds: float) -> dict[str, float]:
    """The driver's ``produce`` with a batch of REDIS_PIPELINE_EVERY is exactly this
    idiom (an ``xadd`` call per record on a pipeline, executed every N)."""
    return with_cpu(lambda: rd.produce(RECORD_BYTES, REDIS_PIPELINE_EVERY, n, max_seconds))


def nats_publish_async(nd: Any, n: int, max_seconds: float) -> dict[str, float]:
    clock: dict[str, float] = {}

    async def run() -> int:
        js, value = nd.js, payload(RECORD_BYTES)
        s = await nd._new_stream()
        try:
            with timed(clock):
                futures, deadline = [], now() + max_seconds
                while len(futures) < n and (len(futures) % CHECK_EVERY or now() < deadline):
                    futures.append(await js.publish_async(s, value))
                await js.publish_async_completed()
            failed = [f for f in futures if f.exception() is not None]
            if failed:
                raise failed[0].exception()
            stored = (await js.stream_info(s)).state.messages
            if stored != len(futures):
                raise RuntimeError(f"stream holds {stored} != {len(futures)} sent")
            return len(futures)
        finally:
            await nd._delete(s)

    sent = nd._run(run())
    return result(sent, clock)


def one_at_a_time(peer: Any, n: int, max_seconds: float) -> dict[str, float]:
    """A peer driver's ``produce_acked``: XADD / ``js.publish`` each awaited."""
    return with_cpu(lambda: peer.produce_acked(n, RECORD_BYTES, max_seconds))


def send_batch(driver: Any, n: int, max_seconds: float) -> dict[str, float]:
    """The shared ``produce/100B/b1000`` workload, through any driver."""
    return with_cpu(lambda: driver.produce(RECORD_BYTES, 1000, n, max_seconds))
