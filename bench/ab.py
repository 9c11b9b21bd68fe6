"""Before/after: two versions of streamd in one interleaved run, as an SDK user sees them.

    python -m bench.ab --before HEAD~3 --after WORKTREE [--rounds 5] [--records 200000] [--out F]

``--before``/``--after`` each take a git revision of this repository (checked out,
detached, into a temporary worktree) or a directory holding a streamd source tree.
Each round runs every workload once with the *before* tree, then once with the
*after* tree (the order alternates from round to round, so drift on this shared
machine falls on both alike). A run is a fresh process pair: a ``streamd serve``
broker and one SDK client process, both importing streamd from that tree
(``PYTHONPATH``), with default settings except where noted.

Workloads (one partition, ``--records`` records of 100 B, produced untimed with
``Producer.send_batch`` of 1,000):

- ``produce``: the untimed produce above, timed: ``Producer.send_batch`` of 1,000
  records per call, each acknowledged before the next (the bulk path);
- ``consume``: ``Consumer.assign`` + ``records(exit_at_end=True)``, every record read;
- ``queue``: ``QueueReceiver(create=True)``, ``receive(1000)`` and ``ack()`` per
  message until every record came, then ``flush()``; checked with ``describe()``;
- ``process``: ``QueueReceiver.process(handler, max_messages=N)`` with a handler that
  does nothing (default workers), then ``flush()``; checked with ``describe()``;
- ``send``: ``Producer.send()`` of each record (no key, default ``linger_ms``) in a
  loop, then ``flush()``, every future resolved (nothing produced beforehand);
- ``async_send``: the same with ``AsyncProducer.send()`` (``await producer.send(...)``
  per record, then ``await flush()``).

JSON on stdout: per workload and version the runs and their median, and
``after_vs_before`` (median after ÷ median before; > 1: after is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("produce", "consume", "queue", "process", "send", "async_send")


def client(address: str, workload: str, records: int) -> dict:
    """One timed run in this process (the tree on PYTHONPATH provides streamd)."""
    import streamd
    from streamd.client import Admin, Consumer, Producer
    from streamd.client.queue import QueueReceiver

    print(f"client: streamd from {Path(streamd.__file__).parent.parent}", file=sys.stderr)

    topic = "ab"
    with Admin(address) as admin:
        admin.create_topic(topic, partitions=1)
    value = os.urandom(100)
    got = 0
    if workload == "async_send":
        import asyncio

        from streamd.client import AsyncProducer

        async def run() -> tuple[int, float]:
            async with AsyncProducer(address) as producer:
                began = time.perf_counter()
                futures = [await producer.send(topic, value) for _ in range(records)]
                await producer.flush()
                seconds = time.perf_counter() - began
                return sum([(await f).offset >= 0 for f in futures]), seconds

        got, seconds = asyncio.run(run())
        return {"records": got, "seconds": seconds, "records_per_s": got / seconds}
    if workload == "send":
        with Producer(address) as producer:
            began = time.perf_counter()
            futures = [producer.send(topic, value) for _ in range(records)]
            producer.flush()
            seconds = time.perf_counter() - began
            got = sum(f.result(timeout=60).offset >= 0 for f in futures)
        return {"records": got, "seconds": seconds, "records_per_s": got / seconds}
    with Producer(address) as producer:
        began = time.perf_counter()
        for start in range(0, records, 1000):
            count = min(1000, records - start)
            got += count if producer.send_batch(topic, 0, [value] * count).offset >= 0 else 0
        seconds = time.perf_counter() - began
    if workload == "produce":
        if got != records:
            raise SystemExit(f"produce: {got} of {records} acknowledged")
        return {"records": got, "seconds": seconds, "records_per_s": got / seconds}
    got = 0
    if workload == "consume":
        with Consumer(address) as consumer:
            consumer.assign(topic)
            began = time.perf_counter()
            for record in consumer.records(exit_at_end=True):
                got += len(record.value) > 0
            seconds = time.perf_counter() - began
    elif workload == "process":
        with QueueReceiver("ab", topic, address, create=True) as receiver:
            began = time.perf_counter()
            got = receiver.process(lambda msg: None, max_messages=records)
            receiver.flush()
            seconds = time.perf_counter() - began
            acked = sum(p.acked for p in receiver.describe().partitions)
            if acked < records:
                raise SystemExit(f"process: {acked} of {records} acked")
    else:
        with QueueReceiver("ab", topic, address, create=True) as receiver:
            began = time.perf_counter()
            deadline = time.monotonic() + 300
            while got < records and time.monotonic() < deadline:
                for msg in receiver.receive(1000, max_wait_ms=1000):
                    got += len(msg.value) > 0
                    msg.ack()
            receiver.flush()
            seconds = time.perf_counter() - began
            acked = sum(p.acked for p in receiver.describe().partitions)
            if acked != records:
                raise SystemExit(f"queue: {acked} of {records} acked")
    if got != records:
        raise SystemExit(f"{workload}: read {got} of {records}")
    return {"records": got, "seconds": seconds, "records_per_s": got / seconds}


def _tree(spec: str, scratch: Path) -> Path:
    path = Path(spec)
    if path.is_dir() and (path / "streamd").is_dir():
        return path.resolve()
    target = scratch / f"tree-{len(list(scratch.iterdir()))}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(target), spec], check=True)
    return target


def _run(tree: Path, workload: str, records: int, workdir: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from bench.harness import start_server

    env = dict(os.environ, PYTHONPATH=str(tree))
    data = workdir / "data"
    server = start_server(
        "streamd",
        lambda port: [sys.executable, "-m", "streamd", "serve", "--data-dir", str(data), "--listen",
                      f"127.0.0.1:{port}", "--metrics-listen", "", "--log-level", "WARNING"],
        str(workdir / "streamd.log"), cwd=str(tree), env=env)
    try:
        out = subprocess.run(
            # This file as a script: its directory, then the tree, is all of sys.path
            # ahead of site-packages, so the client imports streamd from the tree.
            [sys.executable, __file__, "--client", f"127.0.0.1:{server.port}", "--workload", workload,
             "--records", str(records)],
            cwd=str(tree), env=env, capture_output=True, text=True, timeout=600)
    finally:
        server.stop()
    if out.returncode:
        raise RuntimeError(f"{workload} on {tree}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    p.add_argument("--before", help="git revision or source directory")
    p.add_argument("--after", default=str(ROOT), help="git revision or source directory (default: this tree)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--only", action="append", choices=WORKLOADS, help="workloads to run (default: all)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        print(json.dumps(client(args.client, args.workload, args.records)))
        return 0
    if not args.before:
        p.error("--before is required")
    workloads = args.only or list(WORKLOADS)
    with tempfile.TemporaryDirectory(prefix="streamd-ab-") as tmp:
        scratch = Path(tmp) / "trees"
        scratch.mkdir()
        trees = {"before": _tree(args.before, scratch), "after": _tree(args.after, scratch)}
        runs: dict[str, dict[str, list[float]]] = {w: {"before": [], "after": []} for w in workloads}
        try:
            for r in range(args.rounds):
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                for workload in workloads:
                    for version in order:
                        workdir = Path(tempfile.mkdtemp(dir=tmp))
                        result = _run(trees[version], workload, args.records, workdir)
                        runs[workload][version].append(round(result["records_per_s"]))
                        print(f"round {r + 1}: {workload} {version}: {result['records_per_s']:,.0f} records/s",
                              file=sys.stderr)
        finally:
            for tree in trees.values():
                if str(tree).startswith(str(scratch)):
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                                   capture_output=True)
    doc = {
        "meta": {"before": args.before, "after": args.after, "rounds": args.rounds, "records": args.records,
                 "record_bytes": 100, "unit": "records_per_s"},
        "workloads": {
            w: {v: {"median": statistics.median(rs), "runs": rs} for v, rs in by.items()} for w, by in runs.items()
        },
    }
    doc["after_vs_before"] = {w: round(d["after"]["median"] / d["before"]["median"], 3)
                              for w, d in doc["workloads"].items()}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
