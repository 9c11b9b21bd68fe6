"""What a user of each SDK class gets, beside the peers, in one interleaved run.

    python -m bench --only sdk_paths [--quick]       # section "sdk_paths" of python -m bench
    python -m bench.sdk_paths [--quick] [--rounds N] [--no-floor] [--out FILE]

One ``streamd serve`` (topics with ``fsync=interval``, as in the shared workloads), one
in-memory Redis, one Redis with ``--appendonly yes --appendfsync always`` and one NATS
JetStream server (file storage) are started once. Each round runs every group below,
each entry of a group once, the order of the entries rotated from round to round (so
drift on this shared machine falls on all alike). Default client settings everywhere,
one partition / stream, 100 B records:

- ``send``: per-record produce (``bench.sdk_workloads``): blocking ``Producer.send()``
  loop + ``flush()``, ``AsyncProducer.send()`` loop + ``flush()``, redis-py pipeline of
  XADDs executed every 1,000, nats-py ``js.publish_async`` per record; records/s and
  client CPU per record;
- ``one_at_a_time``: ``send_and_wait`` blocking and asyncio, XADD, ``js.publish`` awaited;
- ``latency_2000`` / ``latency_20000``: end-to-end at 2,000 and 20,000 records/s, the
  reader in its own process (``bench.sdk_latency``): blocking ``Consumer.subscribe()``,
  ``AsyncConsumer.subscribe()``, Redis XREAD BLOCK, a NATS push subscription;
  p50/p90/p99/max;
- ``send_batch``: the shared ``produce/100B/b1000`` workload, for reference;
- ``fsync_always``: ``AsyncProducer.send_and_wait`` one at a time on a topic with
  ``fsync=always`` vs XADD one at a time on Redis with AOF ``appendfsync always``.

After the rounds, once: ``bench/floor.py``'s ``floor()`` (the grpc.aio echo floor and
the broker's CPU per one-record produce), when that module exists. Queue throughput is
the ``streamd_queues`` section (``bench/queues.py``), referenced in the table, not rerun.

JSON: ``entries`` (every run and the median of each measured entry), ``table`` (one
row per path of the issue's table: streamd's median, the best peer's median and name,
``ratio`` > 1 = streamd better: streamd ÷ peer for rates, peer ÷ streamd for
latencies; client CPU per record beside the rates, the rate the producer kept beside the
latencies: a producer that falls behind its schedule measures its own queue), ``servers`` (each driver's ``info()``), ``floor``. A peer that cannot run
here is reported skipped, with its rows' peer left empty.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import sdk_latency as lat
from bench import sdk_workloads as wl
from bench.harness import Skip, emit, log, median_of, start_server
from bench.peers.nats_jetstream import NatsJetStream
from bench.peers.redis_streams import RedisStreams
from bench.streamd_driver import Streamd

PEER_NAMES = {"redis": "Redis Streams", "nats": "NATS JetStream", "redis_aof": "Redis Streams (AOF always)"}


@dataclass(frozen=True)
class Sizes:
    rounds: int
    send_n: int
    send_s: float
    one_n: int
    one_s: float
    latency_s: float
    batch_n: int
    floor_messages: int
    floor_s: float


QUICK = Sizes(rounds=1, send_n=30_000, send_s=2.0, one_n=500, one_s=1.0, latency_s=1.5, batch_n=20_000,
              floor_messages=1_000, floor_s=2.0)
FULL = Sizes(rounds=3, send_n=300_000, send_s=8.0, one_n=5_000, one_s=4.0, latency_s=5.0, batch_n=200_000,
             floor_messages=5_000, floor_s=5.0)


class RedisAof(RedisStreams):
    """Redis with every write fsynced before its reply (``appendfsync always``)."""

    name = "redis_aof"

    def setup(self) -> None:
        from bench.harness import require

        binary, self._version = require("redis", "redis>=5", "redis-server")
        os.makedirs(self.workdir, exist_ok=True)

        def argv(port: int) -> list[str]:
            self._argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                          "--appendfsync", "always", "--dir", self.workdir, "--daemonize", "no"]
            return self._argv

        self.server = start_server("redis-server", argv, os.path.join(self.workdir, "redis.log"))
        self.r = self._connect()
        self.r.ping()


# -- the plan: (group, entry key, system, call(driver, sizes)) --------------------------
Call = Callable[[Any, Sizes], dict[str, float]]


def _latency(system: str, reader: str, rate: int) -> Call:
    return lambda d, z: lat.measure(system, reader, d, d.address if system == "streamd" else
                                    f"127.0.0.1:{d.server.port}", rate, z.latency_s)


PLAN: list[tuple[str, str, str, Call]] = [
    ("send", "streamd_blocking_send", "streamd", lambda d, z: wl.streamd_send_blocking(d, z.send_n, z.send_s)),
    ("send", "streamd_async_send", "streamd", lambda d, z: wl.streamd_send_async(d, z.send_n, z.send_s)),
    ("send", "redis_pipeline", "redis", lambda d, z: wl.redis_pipeline(d, z.send_n, z.send_s)),
    ("send", "nats_publish_async", "nats", lambda d, z: wl.nats_publish_async(d, z.send_n, z.send_s)),
    ("one_at_a_time", "streamd_blocking_send_and_wait", "streamd",
     lambda d, z: wl.streamd_send_and_wait_blocking(d, z.one_n, z.one_s)),
    ("one_at_a_time", "streamd_async_send_and_wait", "streamd",
     lambda d, z: wl.streamd_send_and_wait_async(d, z.one_n, z.one_s)),
    ("one_at_a_time", "redis_xadd", "redis", lambda d, z: wl.one_at_a_time(d, z.one_n, z.one_s)),
    ("one_at_a_time", "nats_publish", "nats", lambda d, z: wl.one_at_a_time(d, z.one_n, z.one_s)),
    *[(f"latency_{rate}", key, system, _latency(system, reader, rate))
      for rate in (2000, 20000)
      for key, system, reader in (("streamd_blocking_consumer", "streamd", "streamd_blocking"),
                                  ("streamd_async_consumer", "streamd", "streamd_async"),
                                  ("redis_xread_block", "redis", "redis"), ("nats_push", "nats", "nats"))],
    ("send_batch", "streamd_send_batch_1000", "streamd", lambda d, z: wl.send_batch(d, z.batch_n, z.send_s)),
    ("send_batch", "redis_pipeline_1000", "redis", lambda d, z: wl.send_batch(d, z.batch_n, z.send_s)),
    ("send_batch", "nats_publish_async_1000", "nats", lambda d, z: wl.send_batch(d, z.batch_n, z.send_s)),
    ("fsync_always", "streamd_async_send_and_wait", "streamd",
     lambda d, z: wl.streamd_send_and_wait_async(d, z.one_n, z.one_s, fsync="always")),
    ("fsync_always", "redis_aof_xadd", "redis_aof", lambda d, z: wl.one_at_a_time(d, z.one_n, z.one_s)),
]

# (path, streamd entry, peer entries, metric): one row of the table each.
TABLE: list[tuple[str, str, tuple[str, ...], str]] = [
    ("send_batch of 1000, records/s", "send_batch/streamd_send_batch_1000",
     ("send_batch/redis_pipeline_1000", "send_batch/nats_publish_async_1000"), "records_per_s"),
    ("blocking Producer.send() loop + flush, records/s", "send/streamd_blocking_send",
     ("send/redis_pipeline", "send/nats_publish_async"), "records_per_s"),
    ("AsyncProducer.send() loop + flush, records/s", "send/streamd_async_send",
     ("send/redis_pipeline", "send/nats_publish_async"), "records_per_s"),
    ("send_and_wait one at a time (blocking), records/s", "one_at_a_time/streamd_blocking_send_and_wait",
     ("one_at_a_time/redis_xadd", "one_at_a_time/nats_publish"), "records_per_s"),
    ("send_and_wait one at a time (asyncio), records/s", "one_at_a_time/streamd_async_send_and_wait",
     ("one_at_a_time/redis_xadd", "one_at_a_time/nats_publish"), "records_per_s"),
    *[(f"end-to-end {q} at {rate:,}/s, {reader} reader, ms", f"latency_{rate}/streamd_{reader}_consumer",
       (f"latency_{rate}/redis_xread_block", f"latency_{rate}/nats_push"), f"{q}_ms")
      for rate in (2000, 20000) for reader in ("blocking", "async") for q in ("p50", "p99")],
    ("fsync=always one at a time, records/s", "fsync_always/streamd_async_send_and_wait",
     ("fsync_always/redis_aof_xadd",), "records_per_s"),
]


def _peer_of(entry: str) -> str:
    return next(system for group, key, system, _ in PLAN if f"{group}/{key}" == entry)


def table(medians: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path, mine, theirs, metric in TABLE:
        lower_better = metric.endswith("_ms")
        value = medians.get(mine, {}).get(metric)
        peers = [(medians[e][metric], e) for e in theirs if metric in medians.get(e, {})]
        best = (min if lower_better else max)(peers, default=None)
        row: dict[str, Any] = {"path": path, "metric": metric, "streamd": value,
                               "best_peer": best[0] if best else None,
                               "best_peer_name": PEER_NAMES[_peer_of(best[1])] if best else None, "ratio": None}
        if value and best and best[0]:
            row["ratio"] = round(best[0] / value if lower_better else value / best[0], 3)
        for extra in ("client_cpu_us_per_record", "achieved_rate"):  # CPU for rates, the rate kept for latencies
            if extra in medians.get(mine, {}):
                row[f"streamd_{extra}"] = medians[mine][extra]
                if best:
                    row[f"best_peer_{extra}"] = medians[best[1]].get(extra)
        rows.append(row)
    rows.append({"path": "queue receive+ack", "metric": "records_per_s", "streamd": None, "best_peer": None,
                 "best_peer_name": None, "ratio": None,
                 "see": "section streamd_queues (bench/queues.py): python -m bench --only queues"})
    return rows


def _floor(workdir: str, z: Sizes) -> dict[str, Any]:
    try:
        from bench import floor  # helper module: may not exist in every checkout
    except ImportError as e:
        return {"status": "skipped", "reason": f"bench/floor.py not importable: {e}"}
    if not hasattr(floor, "floor"):
        return {"status": "skipped", "reason": "bench/floor.py has no floor()"}
    try:
        return {"status": "ok", **floor.floor(messages=z.floor_messages, seconds=z.floor_s, workdir=workdir)}
    except Exception as e:
        return {"status": "error", "reason": repr(e)}


def _start(drivers: dict[str, Any]) -> dict[str, Any]:
    status: dict[str, Any] = {}
    for name, d in list(drivers.items()):
        try:
            d.setup()
            status[name] = {"status": "ok", "info": d.info()}
        except Skip as e:
            status[name] = {"status": "skipped", "reason": str(e)}
        except Exception as e:
            status[name] = {"status": "error", "reason": f"setup failed: {e!r}"}
        if status[name]["status"] != "ok":
            log(f"sdk_paths: {name} {status[name]['status']}: {status[name]['reason']}")
            d.teardown()
            del drivers[name]
    return status


def _rounds(drivers: dict[str, Any], z: Sizes) -> dict[str, list[dict[str, float]]]:
    samples: dict[str, list[dict[str, float]]] = {}
    groups = list(dict.fromkeys(g for g, *_ in PLAN))
    for r in range(z.rounds):
        for group in groups:
            entries = [e for e in PLAN if e[0] == group and e[2] in drivers]
            shift = r % max(len(entries), 1)
            for _, key, system, call in entries[shift:] + entries[:shift]:
                name = f"{group}/{key}"
                try:
                    s = call(drivers[system], z)
                except Exception as e:
                    log(f"sdk_paths {name} [{r + 1}/{z.rounds}]: error {e!r}")
                    s = {"error": repr(e)}
                samples.setdefault(name, []).append(s)
                shown = {k: s[k] for k in ("records_per_s", "client_cpu_us_per_record", "p50_ms", "p99_ms") if k in s}
                log(f"sdk_paths {name} [{r + 1}/{z.rounds}] {shown or s}")
    return samples


def run(workdir: str, quick: bool, repeat: int | None = None, *, with_floor: bool = True) -> dict[str, Any]:
    z = QUICK if quick else FULL
    if repeat is not None:
        z = Sizes(**{**z.__dict__, "rounds": repeat})
    drivers: dict[str, Any] = {"streamd": Streamd(os.path.join(workdir, "streamd")),
                               "redis": RedisStreams(os.path.join(workdir, "redis")),
                               "redis_aof": RedisAof(os.path.join(workdir, "redis_aof")),
                               "nats": NatsJetStream(os.path.join(workdir, "nats"))}
    for path in ("streamd", "redis", "redis_aof", "nats", "floor"):
        os.makedirs(os.path.join(workdir, path), exist_ok=True)
    try:
        servers = _start(drivers)
        if "streamd" not in drivers:
            return {"status": "error", "reason": "streamd did not start", "servers": servers}
        samples = _rounds(drivers, z)
    finally:
        for d in drivers.values():
            d.teardown()
    entries: dict[str, Any] = {}
    medians: dict[str, dict[str, float]] = {}
    for name, runs in samples.items():
        good = [s for s in runs if "error" not in s]
        entries[name] = {"runs": runs}
        if good:
            entries[name]["median"] = medians[name] = median_of(good)
    return {"status": "ok", "sizes": z.__dict__, "servers": servers, "table": table(medians), "entries": entries,
            "floor": _floor(os.path.join(workdir, "floor"), z) if with_floor else {"status": "skipped",
                                                                                  "reason": "--no-floor"}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sdk_paths", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small counts, one round (< 2 min)")
    p.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    p.add_argument("--no-floor", action="store_true", help="skip bench/floor.py's echo floor")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be >= 1")
    with tempfile.TemporaryDirectory(prefix="bench-sdk-paths-") as workdir:
        doc = run(workdir, args.quick, args.rounds, with_floor=not args.no_floor)
    emit(doc, args.out)
    return 0 if doc["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
