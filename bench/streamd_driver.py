"""streamd under the shared workloads: ``python -m streamd serve`` as a separate
process, driven by the Python SDK (asyncio for producing, the blocking Consumer for
reading).

Durability as run: the benchmark topics use ``fsync=interval`` (1 s), the closest
match to JetStream's default and still more durable than Redis without AOF; the
streamd-only section (``bench/streamd_extra.py``) measures ``fsync=always``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys

from bench.harness import (
    Driver,
    Pacer,
    ServerProcess,
    latency_summary,
    now,
    payload,
    stamp,
    stamp_age_ns,
    start_server,
    throughput,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serve_argv(data_dir: str, *extra: str):
    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "streamd", "serve", "--data-dir", data_dir,
                "--listen", f"127.0.0.1:{port}", "--metrics-listen", "127.0.0.1:0", "--log-level", "WARNING",
                *extra]

    return argv


@contextlib.contextmanager
def section_broker(workdir: str):
    """One ``streamd serve`` process for a streamd-only section (data and log under
    ``workdir``), stopped on the way out: (server, address)."""
    server = start_server("streamd", serve_argv(os.path.join(workdir, "data")),
                          os.path.join(workdir, "streamd.log"), cwd=ROOT)
    try:
        yield server, f"127.0.0.1:{server.port}"
    finally:
        server.stop()


class Streamd(Driver):
    name = "streamd"

    def __init__(self, workdir: str, *, fsync: str = "interval") -> None:
        self.workdir = workdir
        self.fsync = fsync
        self.server: ServerProcess | None = None
        self.runner: asyncio.Runner | None = None
        self.address = ""
        self._seq = itertools.count()
        self._argv: list[str] = []

    def setup(self) -> None:
        from streamd.client import Admin

        argv = serve_argv(os.path.join(self.workdir, "data"))
        self.server = start_server("streamd", argv, os.path.join(self.workdir, "streamd.log"), cwd=ROOT)
        self._argv = argv(self.server.port)
        self.address = f"127.0.0.1:{self.server.port}"
        self.admin = Admin(self.address)
        self.runner = asyncio.Runner()

    def teardown(self) -> None:
        try:
            if getattr(self, "admin", None) is not None:
                self.admin.close()
                self.admin = None
            if self.runner is not None:
                self.runner.close()
                self.runner = None
        finally:
            if self.server is not None:
                self.server.stop()

    def info(self) -> dict:
        import google.protobuf
        import grpc

        return {
            "server": "streamd 0.1.0 (this checkout)",
            "argv": self._argv,
            "client": f"streamd SDK (grpcio {grpc.__version__}, protobuf {google.protobuf.__version__})",
            "durability": f"topics with fsync={self.fsync}: fsync every 1 s, acks say durable=false; "
                          "the process can crash without loss, a power cut loses up to 1 s",
        }

    def _topic(self) -> str:
        name = f"bench-{next(self._seq)}"
        self.admin.create_topic(name, 1, fsync=self.fsync)
        return name

    # -- workloads -------------------------------------------------------------
    def produce(self, record_bytes: int, batch: int, n: int, max_seconds: float) -> dict:
        from streamd.client import AsyncProducer

        topic, value = self._topic(), payload(record_bytes)
        values = [value] * batch

        async def run() -> tuple[int, float]:
            async with AsyncProducer(self.address) as producer:
                done, pending = 0, []
                t0 = now()
                deadline = t0 + max_seconds
                while done < n and now() < deadline:
                    size = min(batch, n - done)
                    future = await producer.send_batch(topic, 0, values[:size])
                    if batch == 1:
                        await future  # one record per round trip, as the peers do
                    else:
                        pending.append(future)
                    done += size
                await asyncio.gather(*pending)
                return done, now() - t0

        try:
            done, elapsed = self.runner.run(run())
            stored = self.admin.describe_topic(topic).partitions[0].log_end_offset
            if stored != done:
                raise RuntimeError(f"log end {stored} != {done} records sent")
        finally:
            self.admin.delete_topic(topic)
        return throughput(done, elapsed, record_bytes)

    def _fill(self, topic: str, n: int, record_bytes: int) -> None:
        from streamd.client import AsyncProducer

        value = payload(record_bytes)

        async def run() -> None:
            async with AsyncProducer(self.address) as producer:
                futures = [await producer.send_batch(topic, 0, [value] * min(1000, n - i)) for i in range(0, n, 1000)]
                await asyncio.gather(*futures)

        self.runner.run(run())

    def consume(self, n: int, record_bytes: int, max_seconds: float) -> dict:
        """The SDK's pipelined Fetch iterator from offset 0 until n records were read
        (each record's value touched)."""
        from streamd.client import Consumer

        topic = self._topic()
        try:
            self._fill(topic, n, record_bytes)
            with Consumer(self.address) as consumer:
                consumer.assign(topic, [0])
                got, total_bytes = 0, 0
                t0 = now()
                deadline = t0 + max_seconds
                for record in consumer.records(exit_at_end=True):
                    total_bytes += len(record.value)
                    got += 1
                    if got >= n or (got % 10_000 == 0 and now() > deadline):
                        break
                elapsed = now() - t0
            if total_bytes != got * record_bytes:
                raise RuntimeError("short read")
        finally:
            self.admin.delete_topic(topic)
        return throughput(got, elapsed, record_bytes)

    def produce_acked(self, n: int, record_bytes: int, max_seconds: float) -> dict:
        """The SDK's send_and_wait over its ProduceStream, one record at a time."""
        from streamd.client import AsyncProducer

        topic, value = self._topic(), payload(record_bytes)

        async def run() -> tuple[int, float]:
            async with AsyncProducer(self.address) as producer:
                done = 0
                t0 = now()
                deadline = t0 + max_seconds
                while done < n and now() < deadline:
                    await producer.send_and_wait(topic, value, partition=0)
                    done += 1
                return done, now() - t0

        try:
            done, elapsed = self.runner.run(run())
        finally:
            self.admin.delete_topic(topic)
        return throughput(done, elapsed, record_bytes)

    def latency(self, rate: float, seconds: float, record_bytes: int) -> dict:
        """Records sent one per request on a deadline schedule; a Subscribe stream
        (the SDK's AsyncConsumer, on the producer's event loop) measures each
        record's age on arrival."""
        from streamd.client import AsyncConsumer, AsyncProducer

        topic = self._topic()
        lat: list[int] = []
        expected = int(rate * seconds)

        async def run() -> tuple[int, float]:
            async with AsyncConsumer(self.address) as consumer, AsyncProducer(self.address, linger_ms=0) as producer:

                async def read() -> None:
                    async for record in consumer.subscribe(topic, [0]):
                        lat.append(stamp_age_ns(record.value))
                        if len(lat) >= expected:
                            return

                reader = asyncio.create_task(read())
                await asyncio.sleep(0.1)  # let the subscription reach the broker
                pacer = Pacer(rate, seconds)
                sent, pending = 0, []
                while await pacer.anext() is not None:
                    pending.append(await producer.send_batch(topic, 0, [stamp(record_bytes)]))
                    sent += 1
                await asyncio.gather(*pending)
                elapsed = pacer.elapsed()
                try:
                    await asyncio.wait_for(reader, 5)
                except TimeoutError:
                    pass
                return sent, elapsed

        try:
            sent, elapsed = self.runner.run(run())
        finally:
            self.admin.delete_topic(topic)
        return latency_summary(lat, sent, elapsed)


def driver(workdir: str) -> Driver:
    return Streamd(workdir)
