"""NATS JetStream peer: Debian's nats-server, nats-py client (asyncio).

Server: ``nats-server -js -a 127.0.0.1 -p P -sd DIR`` (file storage, server
defaults for syncing: JetStream fsyncs on an interval, not per message).
Each workload call creates a fresh file-backed stream with one subject and
deletes it afterwards.  The driver keeps one event loop (asyncio.Runner) for
its whole life so the connection stays bound to it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os

from bench.harness import (
    Driver,
    Pacer,
    ServerProcess,
    latency_summary,
    now,
    payload,
    require,
    stamp,
    stamp_age_ns,
    start_server,
    throughput,
)


class NatsJetStream(Driver):
    name = "nats_jetstream"

    def __init__(self, workdir: str) -> None:
        self.workdir = os.path.join(workdir, "nats")
        self.server: ServerProcess | None = None
        self.runner: asyncio.Runner | None = None
        self.nc = None
        self.js = None
        self._seq = itertools.count()
        self._argv: list[str] = []
        self._version = ""

    # ------------------------------------------------------------------ lifecycle

    def setup(self) -> None:
        binary, self._version = require("nats", "nats-py>=2.7", "nats-server")
        store = os.path.join(self.workdir, "store")
        os.makedirs(store, exist_ok=True)

        def argv(port: int) -> list[str]:
            self._argv = [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store]
            return self._argv

        self.server = start_server("nats-server", argv, os.path.join(self.workdir, "nats.log"))
        self.runner = asyncio.Runner()
        self._run(self._connect())

    async def _connect(self) -> None:
        import nats

        self.nc = await nats.connect(f"nats://127.0.0.1:{self.server.port}", connect_timeout=5,
                                     max_reconnect_attempts=0, allow_reconnect=False)
        self.js = self.nc.jetstream(timeout=30)
        # JetStream may need a moment after the port accepts
        for _ in range(50):
            try:
                await self.js.account_info()
                return
            except Exception:
                await asyncio.sleep(0.1)
        await self.js.account_info()

    def _run(self, coro):
        return self.runner.run(coro)

    def teardown(self) -> None:
        try:
            if self.runner is not None:
                try:
                    if self.nc is not None and not self.nc.is_closed:
                        self._run(asyncio.wait_for(self.nc.close(), 5))
                finally:
                    self.runner.close()
                    self.runner = None
                    self.nc = self.js = None
        finally:
            if self.server is not None:
                self.server.stop()

    def info(self) -> dict:
        from importlib.metadata import version

        return {
            "server": self._version,
            "argv": self._argv,
            "stream_config": {"storage": "file", "replicas": 1, "retention": "limits"},
            "client": f"nats-py {version('nats-py')}",
            "durability": "file storage, server-default sync interval (no fsync per message)",
        }

    # ------------------------------------------------------------------ helpers

    async def _new_stream(self) -> str:
        from nats.js.api import StorageType

        name = f"bench{next(self._seq)}"
        await self.js.add_stream(name=name, subjects=[name], storage=StorageType.FILE)
        return name

    async def _delete(self, name: str) -> None:
        try:
            await self.js.delete_stream(name)
        except Exception:
            pass

    async def _publish_batch(self, subject: str, value: bytes, b: int) -> None:
        """B publish_async outstanding, then wait for all their acks."""
        futs = [await self.js.publish_async(subject, value) for _ in range(b)]
        await self.js.publish_async_completed()
        for f in futs:
            exc = f.exception()
            if exc is not None:
                raise exc

    # ------------------------------------------------------------------ workloads

    def produce(self, record_bytes: int, batch: int, n: int, max_seconds: float) -> dict:
        return self._run(self._produce(record_bytes, batch, n, max_seconds))

    async def _produce(self, record_bytes: int, batch: int, n: int, max_seconds: float) -> dict:
        js, value = self.js, payload(record_bytes)
        s = await self._new_stream()
        done = 0
        try:
            t0 = now()
            deadline = t0 + max_seconds
            if batch == 1:  # publish and await the ack, one at a time
                while done < n and now() < deadline:
                    await js.publish(s, value)
                    done += 1
            else:
                while done < n and now() < deadline:
                    b = min(batch, n - done)
                    await self._publish_batch(s, value, b)
                    done += b
            elapsed = now() - t0
            stored = (await js.stream_info(s)).state.messages
            if stored != done:
                raise RuntimeError(f"stream holds {stored} != {done} records sent")
        finally:
            await self._delete(s)
        return throughput(done, elapsed, record_bytes)

    def consume(self, n: int, record_bytes: int, max_seconds: float) -> dict:
        return self._run(self._consume(n, record_bytes, max_seconds))

    async def _consume(self, n: int, record_bytes: int, max_seconds: float) -> dict:
        """Durable pull consumer, AckPolicy.ALL, pulls of 1000, ack of the last
        message of each batch (which acks the whole batch).

        ``records_per_s`` drives the pull protocol directly (a pull request for
        1000 to $JS.API.CONSUMER.MSG.NEXT, deliveries handled in a subscription
        callback, next pull sent when the batch is in) -- the same wire
        exchange as ``fetch(1000)``.  nats-py's ``fetch()`` itself spends a few
        asyncio tasks per message and is ~5x slower, which would measure the
        Python client rather than the server; its rate on the same stream is
        reported as ``fetch_api_records_per_s`` for reference.
        """
        s = await self._new_stream()
        value = payload(record_bytes)
        try:
            for start in range(0, n, 1000):
                await self._publish_batch(s, value, min(1000, n - start))
            t0 = now()
            got = await self._pull_batches(s, "c", n, 1000, t0 + max_seconds)
            await self.nc.flush()  # the last ack has left the client
            elapsed = now() - t0
            await self._check_all_acked(s, "c")
            t1 = now()
            fetched = await self._fetch_batches(s, "f", n, 1000, t1 + max_seconds)
            fetch_elapsed = now() - t1
            await self._check_all_acked(s, "f")
        finally:
            await self._delete(s)
        return throughput(got, elapsed, record_bytes,
                          fetch_api_records_per_s=round(fetched / max(fetch_elapsed, 1e-9), 1))

    async def _add_pull_consumer(self, stream: str, durable: str) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        await self.js.add_consumer(stream, ConsumerConfig(
            durable_name=durable, ack_policy=AckPolicy.ALL, deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=100_000))

    async def _check_all_acked(self, stream: str, durable: str) -> None:
        for _ in range(20):  # acks are fire-and-forget; give the server a moment
            ci = await self.js.consumer_info(stream, durable)
            if not ci.num_ack_pending:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"consumer {durable}: {ci.num_ack_pending} records left unacked")

    async def _pull_batches(self, stream: str, durable: str, n: int, batch: int, deadline: float) -> int:
        from nats.js import api

        await self._add_pull_consumer(stream, durable)
        nc = self.nc
        inbox = nc.new_inbox()
        next_subject = f"{api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        request = json.dumps({"batch": batch, "expires": 5_000_000_000}).encode()
        done = asyncio.Event()
        errors: list[BaseException] = []
        state = {"got": 0, "in_batch": 0, "last": None}

        async def finish_batch() -> None:
            last, state["last"], state["in_batch"] = state["last"], None, 0
            if last is not None:
                await last.ack()
            if state["got"] >= n or now() >= deadline:
                done.set()
            else:
                await nc.publish(next_subject, request, reply=inbox)

        async def on_msg(msg) -> None:
            try:
                if done.is_set():
                    return
                if msg.headers and msg.headers.get("Status"):  # 404/408: pull ended early
                    await finish_batch()
                    return
                state["got"] += 1
                state["in_batch"] += 1
                state["last"] = msg
                if state["in_batch"] >= batch or state["got"] >= n:
                    await finish_batch()
            except BaseException as e:
                errors.append(e)
                done.set()

        sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=10 * batch + 100)
        try:
            await nc.publish(next_subject, request, reply=inbox)
            try:
                await asyncio.wait_for(done.wait(), max(0.0, deadline - now()) + 10)
            except TimeoutError:
                raise RuntimeError(f"pull consumer stalled after {state['got']} records") from None
        finally:
            await sub.unsubscribe()
        if errors:
            raise errors[0]
        return state["got"]

    async def _fetch_batches(self, stream: str, durable: str, n: int, batch: int, deadline: float) -> int:
        await self._add_pull_consumer(stream, durable)
        psub = await self.js.pull_subscribe_bind(durable, stream)
        got = 0
        try:
            while got < n and now() < deadline:
                msgs = await psub.fetch(batch, timeout=5)
                got += len(msgs)
                await msgs[-1].ack()
            await self.nc.flush()
        finally:
            await psub.unsubscribe()
        return got

    def latency(self, rate: float, seconds: float, record_bytes: int) -> dict:
        return self._run(self._latency(rate, seconds, record_bytes))

    async def _latency(self, rate: float, seconds: float, record_bytes: int) -> dict:
        """js.publish (awaiting each ack) paced by a deadline schedule; an ordered
        push consumer (ack none, flow control) on the same connection/loop
        measures the age of each record in its callback."""
        s = await self._new_stream()
        lat: list[int] = []

        async def on_msg(msg) -> None:
            lat.append(stamp_age_ns(msg.data))

        sub = await self.js.subscribe(s, cb=on_msg, ordered_consumer=True)
        try:
            await self.nc.flush()
            pacer = Pacer(rate, seconds)
            sent = 0
            while await pacer.anext() is not None:
                await self.js.publish(s, stamp(record_bytes))
                sent += 1
            elapsed = pacer.elapsed()
            drain_until = now() + 3.0
            while len(lat) < sent and now() < drain_until:
                await asyncio.sleep(0.01)
        finally:
            await sub.unsubscribe()
            await self._delete(s)
        return latency_summary(lat, sent, elapsed)

    def produce_acked(self, n: int, record_bytes: int, max_seconds: float) -> dict:
        """js.publish awaited one at a time (each waits for its PubAck)."""
        return self.produce(record_bytes, 1, n, max_seconds)


def driver(workdir: str) -> NatsJetStream:
    return NatsJetStream(workdir)
