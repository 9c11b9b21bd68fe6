"""End-to-end latency for ``bench/sdk_paths.py``: a paced producer here, the reader in
its own process.

    python -m bench.sdk_latency --reader READER --address HOST:PORT --topic T --expected N --seconds S

is the reader process (``READER``: ``streamd_blocking`` = ``Consumer.subscribe()``,
``streamd_async`` = ``AsyncConsumer.subscribe()``, ``redis`` = ``XREAD BLOCK`` from the
last id seen, ``nats`` = an ordered push subscription). It reads the topic from its
start, prints ``ready`` once the warm-up record (value ``WARMUP``, sent before it
started) arrived, then takes the age of every other record (``harness.stamp_age_ns``:
``perf_counter_ns`` is ``CLOCK_MONOTONIC``, one clock for every process on the
machine), and at the end marker (``END``, sent after the last one), at ``--expected``
records or at a deadline after ready, prints one JSON line ``{"lat_ns": [...]}`` and
exits.

``measure(system, reader, driver, rate, seconds)`` is the parent: fresh topic, warm-up
record, reader started and ready, then ``harness.Pacer`` paces the producer:
streamd ``AsyncProducer(linger_ms=0).send_batch`` of one record, not awaited (the
issue's harness); Redis ``XADD`` (blocking, each reply awaited); NATS ``js.publish``
awaited. A producer that cannot keep the rate stops at ``SEND_LIMIT`` times the
nominal duration (``achieved_rate`` says what it did). The reader process is stopped by
PID in a ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from bench.harness import Pacer, latency_summary, stamp, stamp_age_ns

WARMUP = b"WARMUP"
END = b"END"
TAIL_S = 5.0
SEND_LIMIT = 1.5  # x the nominal seconds: a producer that cannot keep the rate stops then
READY_TIMEOUT_S = 30.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READERS = ("streamd_blocking", "streamd_async", "redis", "nats")


# -- the reader process ------------------------------------------------------------------
class _Collector:
    """Ages of the records after the warm-up one; prints the result once, at the
    expected count or at the deadline (a watchdog thread: a blocking iterator cannot
    time out by itself)."""

    def __init__(self, expected: int, seconds: float) -> None:
        self.expected, self.seconds = expected, seconds
        self.lat: list[int] = []
        self.ready = False
        self._lock = threading.Lock()
        self._done = False

    def add(self, value: bytes) -> bool:
        """Record one value; True when the reader should stop."""
        if value.startswith(END):
            self.finish()
            return True
        if value.startswith(WARMUP):
            if not self.ready:
                self.ready = True
                print("ready", flush=True)
                threading.Thread(target=self._watchdog, daemon=True).start()
            return False
        self.lat.append(stamp_age_ns(value))
        if len(self.lat) >= self.expected:
            self.finish()
            return True
        return False

    def _watchdog(self) -> None:
        time.sleep(self.seconds * SEND_LIMIT + 1 + TAIL_S)
        self.finish()
        os._exit(0)

    def finish(self) -> None:
        with self._lock:
            if not self._done:
                self._done = True
                print(json.dumps({"lat_ns": self.lat}), flush=True)


def _read_streamd_blocking(c: _Collector, address: str, topic: str) -> None:
    from streamd.client import Consumer

    with Consumer(address) as consumer:
        for record in consumer.subscribe(topic, 0):
            if c.add(record.value):
                return


async def _read_streamd_async(c: _Collector, address: str, topic: str) -> None:
    from streamd.client import AsyncConsumer

    async with AsyncConsumer(address) as consumer:
        async for record in consumer.subscribe(topic, [0]):
            if c.add(record.value):
                return


def _read_redis(c: _Collector, address: str, topic: str) -> None:
    import redis

    host, port = address.rsplit(":", 1)
    r = redis.Redis(host=host, port=int(port), socket_timeout=30)
    last = b"0-0"
    while True:
        resp = r.xread({topic: last}, count=1000, block=100)
        for msg_id, fields in resp[0][1] if resp else []:
            last = msg_id
            if c.add(fields[b"v"]):
                return


async def _read_nats(c: _Collector, address: str, topic: str) -> None:
    import nats

    nc = await nats.connect(f"nats://{address}", connect_timeout=5, allow_reconnect=False)
    stop = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        if c.add(msg.data):
            stop.set()

    await nc.jetstream().subscribe(topic, cb=on_msg, ordered_consumer=True)
    await stop.wait()
    await nc.close()


def reader_main(reader: str, address: str, topic: str, expected: int, seconds: float) -> None:
    c = _Collector(expected, seconds)
    if reader == "streamd_blocking":
        _read_streamd_blocking(c, address, topic)
    elif reader == "streamd_async":
        asyncio.run(_read_streamd_async(c, address, topic))
    elif reader == "redis":
        _read_redis(c, address, topic)
    else:
        asyncio.run(_read_nats(c, address, topic))
    c.finish()


# -- the parent ------------------------------------------------------------------------
def _start_reader(reader: str, address: str, topic: str, expected: int, seconds: float) -> subprocess.Popen:
    argv = [sys.executable, "-m", "bench.sdk_latency", "--reader", reader, "--address", address, "--topic", topic,
            "--expected", str(expected), "--seconds", str(seconds)]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def _wait_line(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError(f"reader said nothing in {timeout:.0f} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"reader exited ({proc.wait(5)}) before its answer")
    return line.strip()


def _topic(system: str, driver: Any) -> str:
    if system == "streamd":
        name = f"lat-{next(driver._seq)}"
        driver.admin.create_topic(name, 1, fsync=driver.fsync)
        return name
    if system == "nats":
        return driver._run(driver._new_stream())
    return f"lat:{next(driver._seq)}"


def _produce(system: str, driver: Any, topic: str, value_of: Any, pacer: Pacer | None) -> int:
    """One value (``value_of()``) per pacer slot (until ``SEND_LIMIT`` x its seconds), or
    one value with no pacer (the warm-up, the end marker)."""
    limit = pacer.total / pacer.rate * SEND_LIMIT + 1 if pacer else 0.0
    if system == "redis":
        sent = 0
        while pacer.next() is not None and pacer.elapsed() < limit if pacer else sent == 0:
            driver.r.xadd(topic, {b"v": value_of()})
            sent += 1
        return sent

    async def slots() -> AsyncIterator[None]:
        if pacer is None:
            yield None
            return
        while await pacer.anext() is not None and pacer.elapsed() < limit:
            yield None

    async def run() -> int:
        sent = 0
        if system == "nats":
            async for _ in slots():
                await driver.js.publish(topic, value_of())
                sent += 1
            return sent
        from streamd.client import AsyncProducer

        async with AsyncProducer(driver.address, linger_ms=0) as producer:
            pending = []
            async for _ in slots():
                pending.append(await producer.send_batch(topic, 0, [value_of()]))
                sent += 1
            await asyncio.gather(*pending)
        return sent

    return driver.runner.run(run()) if system == "streamd" else driver._run(run())


def _delete(system: str, driver: Any, topic: str) -> None:
    if system == "streamd":
        driver.admin.delete_topic(topic)
    elif system == "nats":
        driver._run(driver._delete(topic))
    else:
        driver.r.delete(topic)


def measure(system: str, reader: str, driver: Any, address: str, rate: float, seconds: float) -> dict[str, float]:
    """One paced run: ``latency_summary`` of the reader's samples, plus ``sent``."""
    topic = _topic(system, driver)
    expected = int(rate * seconds)
    proc = None
    try:
        _produce(system, driver, topic, lambda: WARMUP, None)
        proc = _start_reader(reader, address, topic, expected, seconds)
        line = _wait_line(proc, READY_TIMEOUT_S)
        if line != "ready":
            raise RuntimeError(f"reader said {line[:200]!r}, not ready")
        pacer = Pacer(rate, seconds)
        sent = _produce(system, driver, topic, lambda: stamp(100), pacer)
        elapsed = pacer.elapsed()
        _produce(system, driver, topic, lambda: END, None)
        answer = json.loads(_wait_line(proc, TAIL_S + 10))
        proc.wait(10)
        return latency_summary(answer["lat_ns"], sent, elapsed)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        _delete(system, driver, topic)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sdk_latency", description=__doc__.splitlines()[0])
    p.add_argument("--reader", choices=READERS, required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--expected", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    args = p.parse_args(argv)
    reader_main(args.reader, args.address, args.topic, args.expected, args.seconds)


if __name__ == "__main__":
    main()
