"""The transport's floor and the broker's cost of a one-record request, in one run.

    python -m bench.floor [--messages N] [--seconds S] [--latency | --latency-only]
                          [--rates 2000,20000] [--fsync always] [--broker-tree DIR]

(a) **echo floor**: a bare grpc.aio bidi echo server in its own process (the same
read/write handler style as the broker's ProduceStream), a client here doing one-message
round trips of 100 B: round trips/s and the SERVER's CPU per message.
(b) **one-record produce**: a real ``streamd serve`` process; one-record produces one at
a time through the SDK (``AsyncProducer.send_and_wait``, blocking
``Producer.send_and_wait``) and through the raw ProduceStream (hand-built requests,
nothing of the SDK), on a topic with ``fsync=interval`` and one with ``fsync=always``:
rate and the BROKER's CPU per record, and ``broker_cpu_vs_floor`` (broker CPU ÷ echo
server CPU per message, measured minutes apart in this run; the issue's target: <= 1.5).
(c) ``--latency``: end-to-end latency (``latency()``): a producer here sends paced
one-record batches (``AsyncProducer.send_batch``, not awaited, as the issue's harness);
the reader, in its own process, is the blocking ``Consumer.subscribe()`` or
``AsyncConsumer.subscribe()``; each record carries its send time (``CLOCK_MONOTONIC``
is system-wide, so ages compare across processes).

CPU is read from ``/proc/<pid>/stat`` (utime + stime of every thread, clock ticks of
10 ms: the counts are large enough that a tick is < 2%). Every loop is bounded by a
count and by ``--seconds``. JSON on stdout; ``floor()`` and ``latency()`` return the
same dicts for ``make bench`` (bench/__main__).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench.harness import (
    Pacer,
    latency_summary,
    payload,
    stamp,
    stamp_age_ns,
    start_server,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ECHO_METHOD = "/floor.Echo/Echo"
RECORD_BYTES = 100
CLK_TCK = os.sysconf("SC_CLK_TCK")


_RUNNER: asyncio.Runner | None = None


def run(coro: Any) -> Any:
    """Run ``coro`` on this process's one event loop (grpc.aio binds to the first loop
    it runs on; a second ``asyncio.run`` leaves callbacks for a closed loop)."""
    global _RUNNER
    if _RUNNER is None:
        _RUNNER = asyncio.Runner()
    return _RUNNER.run(coro)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


@contextlib.contextmanager
def measured(pid: int, out: dict[str, float], count: Callable[[], int]) -> Iterator[None]:
    """Time the block and the CPU ``pid`` spent in it; ``out`` gets rate and us/op."""
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    yield
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    n = count()
    out.update(count=n, seconds=round(elapsed, 3), per_s=round(n / elapsed, 1),
               server_cpu_us=round(cpu * 1e6 / max(n, 1), 1))


# -- (a) the echo floor ----------------------------------------------------------
async def _echo_serve(port: int) -> None:
    import grpc

    async def echo(request_iterator, context) -> None:
        while (message := await context.read()) is not grpc.aio.EOF:
            await context.write(message)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.stream_stream_rpc_method_handler(echo)  # bytes in, bytes out
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("floor.Echo", {"Echo": handler})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def _echo_client(address: str, n: int, seconds: float, pid: int) -> dict[str, float]:
    import grpc

    out: dict[str, float] = {}
    body = payload(RECORD_BYTES)
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(ECHO_METHOD)()
        for _ in range(200):  # warm up: connection, stream, allocator
            await call.write(body)
            await call.read()
        done = 0
        with measured(pid, out, lambda: done):
            deadline = time.perf_counter() + seconds
            while done < n and time.perf_counter() < deadline:
                await call.write(body)
                await call.read()
                done += 1
        await call.done_writing()
    return out


def echo_floor(workdir: str, n: int, seconds: float) -> dict[str, float]:
    server = start_server("echo", lambda port: [sys.executable, "-m", "bench.floor", "echo-server", str(port)],
                          os.path.join(workdir, "echo.log"), cwd=ROOT)
    try:
        assert server.proc is not None
        return run(_echo_client(f"127.0.0.1:{server.port}", n, seconds, server.proc.pid))
    finally:
        server.stop()


# -- (b) one-record produces against the broker -------------------------------------
def _serve_argv(data_dir: str) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "streamd", "serve", "--data-dir", data_dir, "--listen", f"127.0.0.1:{port}",
                "--metrics-listen", "127.0.0.1:0", "--log-level", "WARNING"]

    return argv


#: Where the broker's streamd comes from (``--broker-tree``: compare a tree's broker
#: with this one's under the same clients); None: this checkout.
BROKER_TREE: str | None = None


@contextlib.contextmanager
def broker(workdir: str) -> Iterator[tuple[str, int]]:
    """A ``streamd serve`` process: (address, pid); stopped on the way out."""
    tree = BROKER_TREE or ROOT
    env = {**os.environ, "PYTHONPATH": tree}
    server = start_server("streamd", _serve_argv(os.path.join(workdir, "data")),
                          os.path.join(workdir, "streamd.log"), cwd=tree, env=env)
    try:
        assert server.proc is not None
        yield f"127.0.0.1:{server.port}", server.proc.pid
    finally:
        server.stop()


async def _async_sdk(address: str, topic: str, n: int, seconds: float, pid: int) -> dict[str, float]:
    from streamd.client import AsyncProducer

    out: dict[str, float] = {}
    value = payload(RECORD_BYTES)
    async with AsyncProducer(address) as producer:
        for _ in range(100):
            await producer.send_and_wait(topic, value, partition=0)
        done = 0
        with measured(pid, out, lambda: done):
            deadline = time.perf_counter() + seconds
            while done < n and time.perf_counter() < deadline:
                await producer.send_and_wait(topic, value, partition=0)
                done += 1
    return out


def _blocking_sdk(address: str, topic: str, n: int, seconds: float, pid: int) -> dict[str, float]:
    from streamd.client import Producer

    out: dict[str, float] = {}
    value = payload(RECORD_BYTES)
    with Producer(address) as producer:
        for _ in range(100):
            producer.send_and_wait(topic, value, partition=0)
        done = 0
        with measured(pid, out, lambda: done):
            deadline = time.perf_counter() + seconds
            while done < n and time.perf_counter() < deadline:
                producer.send_and_wait(topic, value, partition=0)
                done += 1
    return out


async def _raw_stream(address: str, topic: str, n: int, seconds: float, pid: int) -> dict[str, float]:
    """ProduceStream by hand: one request of one one-record batch, then its answer."""
    import grpc

    from streamd.codec import values_batch
    from streamd.v1 import streamd_pb2 as pb
    from streamd.v1 import streamd_pb2_grpc as rpc

    out: dict[str, float] = {}
    batch = values_batch([payload(RECORD_BYTES)])
    async with grpc.aio.insecure_channel(address) as channel:
        call = rpc.LogServiceStub(channel).ProduceStream()

        async def one(request_id: int) -> None:
            message = pb.ProduceStreamRequest(request_id=request_id)
            message.request.topic = topic
            message.request.partitions.add(partition=0).batches.append(batch)
            await call.write(message)
            answer = await call.read()
            if answer.HasField("error"):
                raise RuntimeError(f"produce failed: {answer.error}")

        for i in range(100):
            await one(i)
        done = 0
        with measured(pid, out, lambda: done):
            deadline = time.perf_counter() + seconds
            while done < n and time.perf_counter() < deadline:
                await one(1000 + done)
                done += 1
        await call.done_writing()
    return out


def produce_one_at_a_time(address: str, pid: int, n: int, seconds: float) -> dict[str, Any]:
    from streamd.client import Admin

    results: dict[str, Any] = {}
    with Admin(address) as admin:
        for fsync in ("interval", "always"):
            topic = f"floor-{fsync}"
            admin.create_topic(topic, 1, fsync=fsync)
            results[f"raw_stream/{fsync}"] = run(_raw_stream(address, topic, n, seconds, pid))
            results[f"send_and_wait_async/{fsync}"] = run(_async_sdk(address, topic, n, seconds, pid))
            results[f"send_and_wait_blocking/{fsync}"] = _blocking_sdk(address, topic, n, seconds, pid)
            admin.delete_topic(topic)
    return results


def floor(*, messages: int = 5000, seconds: float = 5.0, workdir: str | None = None) -> dict[str, Any]:
    """Echo floor and one-record produces, one run: the dict printed by ``main``."""
    with contextlib.ExitStack() as stack:
        work = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="floor-"))
        echo = echo_floor(work, messages, seconds)
        with broker(work) as (address, pid):
            produce = produce_one_at_a_time(address, pid, messages, seconds)
    base = echo["server_cpu_us"]
    ratios = {name: round(r["server_cpu_us"] / base, 2) for name, r in produce.items() if base}
    return {"echo": echo, "produce": produce, "broker_cpu_vs_floor": ratios}


# -- (c) end-to-end latency ------------------------------------------------------------
def _read_blocking(address: str, topic: str, expected: int, seconds: float) -> list[int]:
    from streamd.client import Consumer

    lat: list[int] = []
    deadline = time.monotonic() + seconds
    with Consumer(address) as consumer:
        records = consumer.subscribe(topic, 0, offset=0)
        next(records)  # the warm-up record: the stream is up
        print("ready", flush=True)
        for record in records:
            lat.append(stamp_age_ns(record.value))
            if len(lat) >= expected or time.monotonic() > deadline:
                break
        records.close()
    return lat


async def _read_async(address: str, topic: str, expected: int, seconds: float) -> list[int]:
    from streamd.client import AsyncConsumer

    lat: list[int] = []
    deadline = time.monotonic() + seconds
    async with AsyncConsumer(address) as consumer:
        first = True
        records = consumer.subscribe(topic, [0], offset=0)
        async for record in records:
            if first:
                first = False
                print("ready", flush=True)
                continue
            lat.append(stamp_age_ns(record.value))
            if len(lat) >= expected or time.monotonic() > deadline:
                break
        await records.aclose()
    return lat


def reader_main(reader: str, address: str, topic: str, expected: int, seconds: float) -> None:
    """The reader process: 'ready' once subscribed, then the ages (ns) as one JSON line."""
    if reader == "blocking":
        lat = _read_blocking(address, topic, expected, seconds)
    else:
        lat = asyncio.run(_read_async(address, topic, expected, seconds))
    print(json.dumps(lat), flush=True)


async def _paced_send(address: str, topic: str, rate: float, seconds: float,
                      ready: Callable[[], None]) -> tuple[int, float]:
    from streamd.client import AsyncProducer

    async with AsyncProducer(address, linger_ms=0) as producer:
        await (await producer.send_batch(topic, 0, [stamp(RECORD_BYTES)]))  # the warm-up record
        await asyncio.get_running_loop().run_in_executor(None, ready)
        pacer = Pacer(rate, seconds)
        sent, pending = 0, []
        while await pacer.anext() is not None:
            pending.append(await producer.send_batch(topic, 0, [stamp(RECORD_BYTES)]))
            sent += 1
        elapsed = pacer.elapsed()
        await asyncio.gather(*pending)
    return sent, elapsed


def latency(reader: str = "blocking", rate: float = 2000, seconds: float = 5.0, *, fsync: str = "always",
            address: str | None = None, workdir: str | None = None) -> dict[str, Any]:
    """End-to-end latency at ``rate`` one-record batches/s for ``seconds``, read by
    ``reader`` ("blocking": ``Consumer.subscribe``; "async": ``AsyncConsumer.subscribe``)
    in its own process, on a topic with ``fsync`` ("always", the broker's default:
    readers see a record once it is fsynced). Starts its own broker unless given
    ``address``."""
    if reader not in ("blocking", "async"):
        raise ValueError("reader must be 'blocking' or 'async'")
    with contextlib.ExitStack() as stack:
        if address is None:
            work = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="floor-"))
            address, _ = stack.enter_context(broker(work))
        from streamd.client import Admin

        topic = f"latency-{reader}-{int(rate)}-{fsync}-{time.monotonic_ns()}"
        with Admin(address) as admin:
            admin.create_topic(topic, 1, fsync=fsync)
        expected = int(rate * seconds)
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.floor", "reader", reader, address, topic, str(expected), str(seconds + 20)],
            stdout=subprocess.PIPE, cwd=ROOT, text=True)
        try:
            assert proc.stdout is not None
            stdout = proc.stdout

            def ready() -> None:
                if stdout.readline().strip() != "ready":
                    raise RuntimeError("the reader did not start")

            sent, elapsed = run(_paced_send(address, topic, rate, seconds, ready))
            line, _ = proc.communicate(timeout=seconds + 30)
            lat = json.loads(line.strip().splitlines()[-1])
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            with Admin(address) as admin:
                admin.delete_topic(topic)
    return {"reader": reader, "rate": rate, "fsync": fsync, **latency_summary(lat, sent, elapsed)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "echo-server":
        asyncio.run(_echo_serve(int(argv[1])))
        return
    if argv and argv[0] == "reader":
        reader, address, topic, expected, seconds = argv[1:6]
        reader_main(reader, address, topic, int(expected), float(seconds))
        return
    ap = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000, help="round trips / records per workload")
    ap.add_argument("--seconds", type=float, default=5.0, help="time bound per workload (and latency run)")
    ap.add_argument("--latency", action="store_true", help="also end-to-end latency, both readers")
    ap.add_argument("--latency-only", action="store_true", help="only end-to-end latency")
    ap.add_argument("--rates", default="2000,20000", help="latency: records/s, comma-separated")
    ap.add_argument("--broker-tree", help="run the broker from this streamd source tree (default: this one)")
    ap.add_argument("--fsync", default="always", help="latency: the topic's fsync policy")
    args = ap.parse_args(argv)
    global BROKER_TREE
    BROKER_TREE = args.broker_tree
    doc: dict[str, Any] = {}
    if not args.latency_only:
        doc.update(floor(messages=args.messages, seconds=args.seconds))
    if args.latency or args.latency_only:
        with tempfile.TemporaryDirectory(prefix="floor-") as work, broker(work) as (address, _):
            doc["latency"] = [latency(reader, float(rate), args.seconds, fsync=args.fsync, address=address)
                              for rate in args.rates.split(",") for reader in ("blocking", "async")]
    json.dump(doc, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
