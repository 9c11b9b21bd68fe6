"""Redis Streams peer: Debian's redis-server, redis-py client (synchronous).

Server: ``redis-server --port P --bind 127.0.0.1 --save '' --appendonly no``
(in memory, no persistence: the fastest Redis can be; see ``info()``).
"""

from __future__ import annotations

import itertools
import os
import threading
import time

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

FIELD = b"v"


class RedisStreams(Driver):
    name = "redis_streams"

    def __init__(self, workdir: str) -> None:
        self.workdir = os.path.join(workdir, "redis")
        self.server: ServerProcess | None = None
        self.r = None
        self._seq = itertools.count()
        self._argv: list[str] = []
        self._version = ""

    # ------------------------------------------------------------------ lifecycle

    def setup(self) -> None:
        binary, self._version = require("redis", "redis>=5", "redis-server")
        os.makedirs(self.workdir, exist_ok=True)

        def argv(port: int) -> list[str]:
            self._argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", self.workdir, "--protected-mode", "yes",
                          "--daemonize", "no"]
            return self._argv

        self.server = start_server("redis-server", argv, os.path.join(self.workdir, "redis.log"))
        self.r = self._connect()
        self.r.ping()

    def _connect(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.server.port, socket_timeout=30)

    def teardown(self) -> None:
        try:
            if self.r is not None:
                self.r.close()
                self.r = None
        finally:
            if self.server is not None:
                self.server.stop()

    def info(self) -> dict:
        from importlib.metadata import version

        cfg = {}
        try:
            for k in ("save", "appendonly", "appendfsync", "io-threads", "maxmemory"):
                cfg.update(self.r.config_get(k))
            cfg = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                   for k, v in cfg.items()}
        except Exception as e:  # pragma: no cover - informational only
            cfg = {"error": repr(e)}
        try:
            from redis.utils import HIREDIS_AVAILABLE
        except ImportError:
            HIREDIS_AVAILABLE = False
        return {
            "server": self._version,
            "argv": self._argv,
            "config": cfg,
            "client": f"redis-py {version('redis')} (parser: {'hiredis' if HIREDIS_AVAILABLE else 'python'})",
            "durability": "none: in memory only, no RDB snapshots, no AOF",
        }

    def _stream(self) -> str:
        return f"bench:{next(self._seq)}"

    # ------------------------------------------------------------------ workloads

    def produce(self, record_bytes: int, batch: int, n: int, max_seconds: float) -> dict:
        s, value, r = self._stream(), payload(record_bytes), self.r
        done = 0
        try:
            t0 = now()
            deadline = t0 + max_seconds
            if batch == 1:
                while done < n and now() < deadline:
                    r.xadd(s, {FIELD: value})
                    done += 1
            else:
                pipe = r.pipeline(transaction=False)
                while done < n and now() < deadline:
                    b = min(batch, n - done)
                    for _ in range(b):
                        pipe.xadd(s, {FIELD: value})
                    pipe.execute()
                    done += b
            elapsed = now() - t0
            stored = r.xlen(s)
            if stored != done:
                raise RuntimeError(f"XLEN {stored} != {done} records sent")
        finally:
            r.delete(s)
        return throughput(done, elapsed, record_bytes)

    def _fill(self, s: str, n: int, record_bytes: int) -> None:
        value = payload(record_bytes)
        pipe = self.r.pipeline(transaction=False)
        for start in range(0, n, 1000):
            for _ in range(min(1000, n - start)):
                pipe.xadd(s, {FIELD: value})
            pipe.execute()

    def consume(self, n: int, record_bytes: int, max_seconds: float) -> dict:
        """XREADGROUP COUNT 1000, then XACK of those ids pipelined with the next read."""
        s, r, count = self._stream(), self.r, 1000
        try:
            self._fill(s, n, record_bytes)
            r.xgroup_create(s, "g", id="0")
            got = acked = 0
            pipe = r.pipeline(transaction=False)
            t0 = now()
            deadline = t0 + max_seconds
            resp = r.xreadgroup("g", "c", {s: ">"}, count=count)
            while True:
                entries = resp[0][1] if resp else []
                got += len(entries)
                ids = [e[0] for e in entries]
                if not ids:
                    break
                pipe.xack(s, "g", *ids)
                if got >= n or now() >= deadline:
                    acked += pipe.execute()[0]
                    break
                pipe.xreadgroup("g", "c", {s: ">"}, count=count)
                a, resp = pipe.execute()
                acked += a
            elapsed = now() - t0
            if acked != got:
                raise RuntimeError(f"acked {acked} != read {got}")
        finally:
            r.delete(s)
        return throughput(got, elapsed, record_bytes)

    def latency(self, rate: float, seconds: float, record_bytes: int) -> dict:
        """XADD paced by a deadline schedule; a thread on its own connection
        does XREAD BLOCK from the last id seen and measures the age of each record."""
        s = self._stream()
        lat: list[int] = []
        stop = threading.Event()
        ready = threading.Event()
        errors: list[BaseException] = []
        reader = self._connect()

        def consumer() -> None:
            last = b"0-0"
            try:
                ready.set()
                while not stop.is_set():
                    resp = reader.xread({s: last}, count=1000, block=100)
                    if not resp:
                        continue
                    for msg_id, fields in resp[0][1]:
                        lat.append(stamp_age_ns(fields[FIELD]))
                        last = msg_id
            except BaseException as e:  # surfaced below
                errors.append(e)

        t = threading.Thread(target=consumer, name="redis-latency-consumer", daemon=True)
        t.start()
        ready.wait(5)
        time.sleep(0.05)  # let the first XREAD BLOCK reach the server
        try:
            pacer = Pacer(rate, seconds)
            sent = 0
            while pacer.next() is not None:
                self.r.xadd(s, {FIELD: stamp(record_bytes)})
                sent += 1
            elapsed = pacer.elapsed()
            drain_until = now() + 3.0
            while len(lat) < sent and now() < drain_until and t.is_alive():
                time.sleep(0.01)
        finally:
            stop.set()
            t.join(5)
            reader.close()
            self.r.delete(s)
        if errors:
            raise errors[0]
        return latency_summary(lat, sent, elapsed)

    def produce_acked(self, n: int, record_bytes: int, max_seconds: float) -> dict:
        """One XADD per round trip, each waiting for its reply (Redis's only ack)."""
        return self.produce(record_bytes, 1, n, max_seconds)


def driver(workdir: str) -> RedisStreams:
    return RedisStreams(workdir)
