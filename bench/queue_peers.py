"""The peers of the queue-group benchmark (``bench.queues``): the same work queue, drained
by ``workers`` competing consumer processes that each report their last ack's time.

- **Redis Streams** (Debian's redis-server, in memory, no persistence, as in
  ``bench/peers/redis_streams.py``): **one stream** holding every record, one consumer
  group, one consumer name per worker (Redis's competing-consumer work queue; a group
  spans a single stream). Loop: ``XREADGROUP COUNT peer_batch >``, then XACK of those
  ids pipelined with the next XREADGROUP (one round trip per batch, as the core
  ``consume`` workload does); a worker stops when a read returns nothing. Checked after:
  ``XPENDING`` is 0 and the group's ``entries-read`` equals the stream length.
- **NATS JetStream** (Debian's nats-server, file storage, as in
  ``bench/peers/nats_jetstream.py``): one stream, one durable **pull** consumer with
  ``AckPolicy.EXPLICIT`` shared by the workers. Each worker drives the pull protocol
  (``{"batch": peer_batch, "no_wait": true}`` to ``$JS.API.CONSUMER.MSG.NEXT``) from a
  subscription callback and acks every message on its own (``msg.ack()``: a publish,
  fire-and-forget); it stops when a pull delivers nothing, and flushes (one PING/PONG,
  so the server has read every ack) before taking its time. Checked after: no ack
  pending, nothing left to deliver, nothing redelivered.

A peer that cannot run here (client or server missing) raises ``harness.Skip``.
Worker processes take the same commands as streamd's (``bench.queue_workers``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from multiprocessing.connection import Connection

from bench.group_members import _Fleet
from bench.harness import payload, require, start_server
from bench.queue_workers import Params, serve_commands

FIELD = b"v"


def _result(done: list[dict], t0: float, total: int, check: dict, correct: bool) -> dict:
    records = sum(d["records"] for d in done)
    seconds = max(max(d["last_ack_time"] for d in done) - t0, 1e-9)
    return {"records": records, "seconds": round(seconds, 4), "records_per_s": round(records / seconds, 1),
            "largest_worker_share": round(max(d["records"] for d in done) / max(1, records), 3),
            "correct": correct and records == total, "check": {"records_total": total, **check}}


def _start_fleet(ctx, target, params: Params, *args) -> _Fleet:
    fleet = _Fleet(ctx)
    deadline = time.time() + 3600
    for _ in range(params.workers):
        fleet.spawn(target, *args, deadline)
    fleet.send(("warm",))
    fleet.collect("ready", params.workers, 60)
    return fleet


# --------------------------------------------------------------------------- Redis Streams


def _redis_worker(conn: Connection, index: int, port: int, deadline: float) -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)

    def run(spec: dict) -> dict:
        stream, group, consumer = spec["stream"], spec["group"], f"c{index}"
        until = time.time() + spec["seconds"]
        got = acked = 0
        last = 0.0
        pipe = r.pipeline(transaction=False)
        resp = r.xreadgroup(group, consumer, {stream: ">"}, count=spec["count"])
        while time.time() < until:
            entries = resp[0][1] if resp else []
            if not entries:
                break
            got += len(entries)
            pipe.xack(stream, group, *[e[0] for e in entries])
            pipe.xreadgroup(group, consumer, {stream: ">"}, count=spec["count"])
            a, resp = pipe.execute()
            acked += a
            last = time.time()
        return {"records": got, "acked": acked, "last_ack_time": last}

    try:
        serve_commands(conn, deadline, r.ping, run)
    finally:
        r.close()


def redis_streams(ctx, workdir: str, params: Params, repeat: int) -> dict:
    import redis

    binary, version = require("redis", "redis>=5", "redis-server")
    os.makedirs(workdir, exist_ok=True)
    argv = lambda port: [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",  # noqa: E731
                         "--dir", workdir, "--protected-mode", "yes", "--daemonize", "no"]
    total = params.peer_records or params.total
    server = start_server("redis-server", argv, os.path.join(workdir, "redis.log"))
    fleet = None
    runs = []
    try:
        r = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=30)
        value, pipe = payload(params.record_bytes), r.pipeline(transaction=False)
        for start in range(0, total, 1000):
            for _ in range(min(1000, total - start)):
                pipe.xadd("work", {FIELD: value})
            pipe.execute()
        fleet = _start_fleet(ctx, _redis_worker, params, server.port)
        for k in range(repeat):
            group = f"g{k}"
            r.xgroup_create("work", group, id="0")
            t0 = time.time()
            fleet.send(("run", {"stream": "work", "group": group, "count": params.peer_batch,
                                "seconds": params.run_timeout_s}))
            done = [m[1] for m in fleet.collect("done", params.workers, params.run_timeout_s + 30).values()]
            pending = r.xpending("work", group)["pending"]
            info = next(g for g in r.xinfo_groups("work") if g["name"] in (group, group.encode()))
            read = info.get("entries-read")
            acked = sum(d["acked"] for d in done)
            runs.append(_result(done, t0, total, {"acked": acked, "pending_after": pending, "entries_read": read},
                                correct=acked == total and pending == 0 and read in (None, total)))
            r.xgroup_destroy("work", group)
        r.close()
    finally:
        if fleet is not None:
            fleet.stop()
        server.stop()
    from importlib.metadata import version as pkg_version

    from redis.utils import HIREDIS_AVAILABLE
    return {"runs": runs, "info": {
        "server": version, "layout": f"one stream of {total} records, one group, {params.workers} consumers",
        "loop": f"XREADGROUP COUNT {params.peer_batch}; XACK pipelined with the next XREADGROUP",
        "client": f"redis-py {pkg_version('redis')} (parser: {'hiredis' if HIREDIS_AVAILABLE else 'python'})",
        "durability": "none: in memory only, no RDB snapshots, no AOF"}}


# --------------------------------------------------------------------------- NATS JetStream


def _nats_worker(conn: Connection, index: int, port: int, deadline: float) -> None:
    import nats

    runner = asyncio.Runner()
    nc = runner.run(nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=5, allow_reconnect=False))
    try:
        serve_commands(conn, deadline, lambda: runner.run(nc.flush(5)),
                        lambda spec: runner.run(_nats_drain(nc, spec)))
    finally:
        runner.run(nc.close())
        runner.close()


async def _nats_drain(nc, spec: dict) -> dict:
    """Pull batches until a pull delivers nothing; ack every message on its own."""
    subject = f"$JS.API.CONSUMER.MSG.NEXT.{spec['stream']}.{spec['durable']}"
    pull = json.dumps({"batch": spec["batch"], "no_wait": True}).encode()
    inbox = nc.new_inbox()
    until = time.time() + spec["seconds"]
    done = asyncio.Event()
    state = {"got": 0, "in_pull": -1}  # -1: the first pull is still to be sent

    async def next_pull() -> None:
        if state["in_pull"] == 0 or time.time() >= until:  # nothing came: drained
            done.set()
            return
        state["in_pull"] = 0
        await nc.publish(subject, pull, reply=inbox)

    async def on_msg(msg) -> None:
        if done.is_set():
            return
        if msg.headers and msg.headers.get("Status"):  # 404 / 408: this pull is over
            await next_pull()
            return
        await msg.ack()
        state["got"] += 1
        state["in_pull"] += 1
        if state["in_pull"] >= spec["batch"]:
            await next_pull()

    sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=10 * spec["batch"] + 100)
    try:
        await next_pull()
        await asyncio.wait_for(done.wait(), max(0.0, until - time.time()) + 10)
        await nc.flush(10)
    finally:
        await sub.unsubscribe()
    return {"records": state["got"], "last_ack_time": time.time()}


def nats_jetstream(ctx, workdir: str, params: Params, repeat: int) -> dict:
    binary, version = require("nats", "nats-py>=2.7", "nats-server")
    store = os.path.join(workdir, "store")
    os.makedirs(store, exist_ok=True)
    server = start_server("nats-server", lambda port: [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store],
                          os.path.join(workdir, "nats.log"))
    fleet = nc = None
    runner = asyncio.Runner()
    runs = []
    try:
        nc = runner.run(_nats_connect(server.port))
        js = nc.jetstream(timeout=30)
        total = params.peer_records or params.total
        runner.run(_nats_fill(js, total, params.record_bytes))
        fleet = _start_fleet(ctx, _nats_worker, params, server.port)
        for k in range(repeat):
            durable = f"w{k}"
            runner.run(_nats_consumer(js, durable))
            t0 = time.time()
            fleet.send(("run", {"stream": "work", "durable": durable, "batch": params.peer_batch,
                                "seconds": params.run_timeout_s}))
            done = [m[1] for m in fleet.collect("done", params.workers, params.run_timeout_s + 30).values()]
            check = runner.run(_nats_check(js, durable))
            runs.append(_result(done, t0, total, check,
                                correct=not check["ack_pending"] and not check["pending"] and not check["redelivered"]))
            runner.run(js.delete_consumer("work", durable))
    finally:
        if fleet is not None:
            fleet.stop()
        try:
            if nc is not None and not nc.is_closed:
                runner.run(asyncio.wait_for(nc.close(), 5))
        finally:
            runner.close()
            server.stop()
    from importlib.metadata import version as pkg_version
    return {"runs": runs, "info": {
        "server": version, "layout": f"one file-backed stream of {total} records, one durable pull "
                                     f"consumer (AckPolicy.EXPLICIT) shared by {params.workers} workers",
        "loop": f"pull {params.peer_batch} (no_wait) from a subscription callback, msg.ack() per message",
        "client": f"nats-py {pkg_version('nats-py')}",
        "durability": "file storage, server-default sync interval (no fsync per message or ack)"}}


async def _nats_connect(port: int):
    import nats

    nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=5, allow_reconnect=False)
    js = nc.jetstream(timeout=30)
    for _ in range(50):  # JetStream may need a moment after the port accepts
        try:
            await js.account_info()
            break
        except Exception:
            await asyncio.sleep(0.1)
    return nc


async def _nats_fill(js, total: int, record_bytes: int) -> None:
    from nats.js.api import StorageType

    await js.add_stream(name="work", subjects=["work"], storage=StorageType.FILE)
    value = payload(record_bytes)
    for start in range(0, total, 1000):
        for _ in range(min(1000, total - start)):
            await js.publish_async("work", value)
        await js.publish_async_completed()
    stored = (await js.stream_info("work")).state.messages
    if stored != total:
        raise RuntimeError(f"stream holds {stored} != {total} records sent")


async def _nats_consumer(js, durable: str) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    await js.add_consumer("work", ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT,
                                                 deliver_policy=DeliverPolicy.ALL, max_ack_pending=1_000_000,
                                                 ack_wait=120))


async def _nats_check(js, durable: str) -> dict:
    for _ in range(40):  # acks are fire-and-forget: give the server a moment
        ci = await js.consumer_info("work", durable)
        if not ci.num_ack_pending:
            break
        await asyncio.sleep(0.05)
    return {"ack_pending": ci.num_ack_pending, "pending": ci.num_pending, "redelivered": ci.num_redelivered,
            "delivered": ci.delivered.stream_seq}

