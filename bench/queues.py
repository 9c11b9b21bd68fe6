"""Queue groups under load, against one ``streamd serve`` process, with Redis Streams and
NATS JetStream work queues measured in the same run for the ratios.

1. **Receive + ack throughput** (``bench.queue_workers``): a topic of ``partitions`` x
   ``records_per_partition`` records of ``record_bytes`` (pre-filled, untimed), one fresh
   queue group per run (default config: 30 s leases, 10,000 records in flight per
   partition), drained by ``workers`` worker **processes** (raw ``QueueService`` stubs)
   looping ``Receive(max_records)`` and settling every record of each reply:
   - ``ranges``: the batched form (``ReceiveRequest.batched``: stored batches plus
     leased offset ranges, as the SDK receives; the worker decodes the batches and
     reads every leased record's value), then one ``Settle`` acking the reply's
     ranges, awaited, then the next Receive (the headline, ``batched_records_per_s``);
   - ``ranges_pipelined``: that Settle sent without waiting, the next Receive at once,
     the Settle's answer collected after it (one Settle in flight per worker; the
     Redis loop below pipelines XACK with the next read the same way);
   - ``sdk``: the SDK's ``QueueReceiver``: ``receive()`` of 1000 and ``ack()`` per
     message (acks sent in the background as ranges), every value read
     (``sdk_records_per_s``);
   - ``batched``: the per-record form (one ``LeasedRecord`` per record, one
     ``Settlement`` per record in one Settle call, awaited), as a client built on
     the per-record messages does it;
   - ``per_record``: one ``Ack`` RPC per record, each awaited before the next
     (``per_record_acks_per_s``; ``per_record_sequential_total`` records);
   - ``per_record_pipelined``: one Ack RPC per record, all of a reply's in flight at
     once (``per_record_total`` records, ``per_record_max_records`` per Receive).
   **Clock**: from just before the start signal (workers warm: channel connected) to
   the last settlement answered, ``time.time()`` on one machine. Records/s = records /
   that. **Checks** per run: every offset received exactly once (per-offset counts from
   every worker), no settlement refused, and DescribeQueueGroup says acked == total,
   ``start_offset == log_end_offset`` on every partition, nothing in flight or waiting.
   CPU: the broker's CPU seconds (whole process and its event-loop thread, from
   /proc) and the workers', per run, to tell broker-bound from client-bound.
2. **Peers** (``bench.queue_peers``): Redis Streams (XREADGROUP COUNT 1000 + XACK,
   one stream) and NATS JetStream (pull consumer, explicit per-message acks), same
   worker count, processes and clock; ``ratios`` = streamd records/s ÷ peer records/s.
   A peer that cannot run here is reported as skipped.
3. **Redelivery timing** (``bench.queue_redelivery``): error of the actual redelivery
   time against the schedule, after a Nack and after a lease expiry, with a fixed backoff.
4. **Profile** (``--profile DIR``, ``bench.queue_profile``): one extra ``ranges`` and one
   extra ``per_record_pipelined`` run, not counted above, with py-spy sampling the
   broker; hotspots in the JSON, collapsed stacks in DIR.

``python -m bench --only queues [--quick]``, or ``python -m bench.queues [--quick]
[--profile DIR] [--no-peers] ...``. Every loop is bounded by its count and by
``run_timeout_s``; every process started here is stopped in a ``finally``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace

from bench.group_members import _Fleet
from bench.groups import _fill
from bench.harness import Skip, emit, log
from bench.queue_workers import Params, _streamd_worker, streamd_run
from bench.streamd_driver import section_broker

TARGET_BATCHED_RECORDS_PER_S = 350_000
TARGET_REDELIVERY_MEDIAN_MS = 50
PROFILED_MODES = ("ranges", "per_record_pipelined")
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """utime + stime of a process (or one of its threads) from /proc; None elsewhere."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


class _CpuMeter:
    """CPU seconds used by the broker (process, event-loop thread) and the workers."""

    def __init__(self, server_pid: int, worker_pids: list[int]) -> None:
        self.server_pid, self.worker_pids = server_pid, worker_pids

    def read(self) -> tuple:
        workers = [cpu_seconds(p) for p in self.worker_pids]
        return (cpu_seconds(self.server_pid), cpu_seconds(self.server_pid, self.server_pid),
                None if None in workers else sum(workers))

    def since(self, before: tuple, records: int, seconds: float) -> dict:
        names = ("broker_cpu_s", "broker_loop_thread_cpu_s", "workers_cpu_s")
        out = {k: round(b - a, 3) for k, a, b in zip(names, before, self.read(), strict=True) if a is not None and b is not None}
        for k in names:
            if k in out and records:
                out[k[:-len("_s")] + "_us_per_record"] = round(out[k] / records * 1e6, 2)
        if "broker_loop_thread_cpu_s" in out:  # ~1.0: the event loop is the bottleneck
            out["broker_loop_thread_busy"] = round(out["broker_loop_thread_cpu_s"] / max(seconds, 1e-9), 3)
        return out


# --------------------------------------------------------------------------- streamd


def _make_topic(admin, address: str, topic: str, partitions: int, per_partition: int, params: Params) -> list[int]:
    admin.create_topic(topic, partitions, fsync="interval")
    seconds = _fill(address, topic, replace(params, partitions=partitions, records_per_partition=per_partition))
    ends = [p.log_end_offset for p in admin.describe_topic(topic).partitions]
    if sum(ends) != partitions * per_partition:
        raise RuntimeError(f"{topic}: filled {sum(ends)} records, expected {partitions * per_partition}")
    log(f"queues: {topic}: {sum(ends):,} records in {seconds:.1f} s")
    return ends


def streamd_section(ctx, server, admin, address: str, params: Params) -> tuple[dict, dict | None]:
    """Every streamd throughput run (interleaved by repetition) and the optional profile."""
    from streamd.client._channel import sync_channel
    from streamd.v1 import streamd_pb2 as pb
    from streamd.v1 import streamd_pb2_grpc as rpc

    parts = params.partitions
    topics = {
        "ranges": ("queues-throughput", params.records_per_partition, params.max_records),
        "ranges_pipelined": ("queues-throughput", params.records_per_partition, params.max_records),
        "sdk": ("queues-throughput", params.records_per_partition, params.max_records),
        "batched": ("queues-throughput", params.records_per_partition, params.max_records),
        "per_record": ("queues-ack-each", params.per_record_sequential_total // parts, params.per_record_max_records),
        "per_record_pipelined": ("queues-ack-each-pipelined", params.per_record_total // parts,
                                 params.per_record_max_records),
    }
    ends = {}
    for topic, per_partition, _ in topics.values():
        if topic not in ends:
            ends[topic] = _make_topic(admin, address, topic, parts, per_partition, params)
    fleet = _Fleet(ctx)
    channel = sync_channel(address)
    runs: dict[str, list[dict]] = {mode: [] for mode in topics}
    profile = None
    try:
        deadline = time.time() + 3600
        for _ in range(params.workers):
            fleet.spawn(_streamd_worker, address, deadline)
        fleet.send(("warm",))
        fleet.collect("ready", params.workers, 60)
        stub = rpc.QueueServiceStub(channel)
        meter = _CpuMeter(server.proc.pid, [p.proc.pid for p in fleet.procs.values()])
        for r in range(params.repeat):
            for mode, (topic, _, max_records) in topics.items():
                before = meter.read()
                result = streamd_run(fleet, stub, pb, topic, ends[topic], mode, f"{mode}-{r}", max_records, params)
                result.update(meter.since(before, result["records"], result["seconds"]))
                runs[mode].append(result)
                log(f"queues: {mode} run {r + 1}/{params.repeat}: {result['records_per_s']:,.0f} records/s "
                    f"({result['records']:,} in {result['seconds']:.2f} s), correct={result['correct']}")
        if params.profile_dir:
            profile = {mode: _profiled_run(fleet, stub, pb, server.proc.pid, topics[mode], ends[topics[mode][0]],
                                           mode, meter, params) for mode in PROFILED_MODES}
    finally:
        fleet.stop()
        channel.close()
    for topic in ends:
        admin.delete_topic(topic)
    return runs, profile


def _profiled_run(fleet, stub, pb, pid: int, topic: tuple, ends: list[int], mode: str, meter: _CpuMeter,
                  params: Params) -> dict:
    from bench import queue_profile

    if queue_profile.py_spy() is None:
        return {"status": "skipped", "reason": "py-spy not found: pip install py-spy"}
    os.makedirs(params.profile_dir, exist_ok=True)
    path = os.path.join(params.profile_dir, f"broker-{mode}.folded")
    before = meter.read()
    with queue_profile.Sampler(pid, path):
        result = streamd_run(fleet, stub, pb, topic[0], ends, mode, f"profiled-{mode}", topic[2], params)
    result.update(meter.since(before, result["records"], result["seconds"]))
    summary = queue_profile.summarize(path)
    with open(os.path.join(params.profile_dir, f"summary-{mode}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"queues: profiled {mode} run: {result['records_per_s']:,.0f} records/s; stacks in {path}")
    return {"status": "ok", "run": {k: v for k, v in result.items() if k != "check"},
            "folded": os.path.basename(path), **summary}


# --------------------------------------------------------------------------- peers


def peers_section(ctx, workdir: str, params: Params) -> dict:
    from bench import queue_peers

    out = {}
    for name, run in (("redis_streams", queue_peers.redis_streams), ("nats_jetstream", queue_peers.nats_jetstream)):
        log(f"queues: peer {name}")
        try:
            got = run(ctx, os.path.join(workdir, name), params, params.repeat)
        except Skip as e:
            log(f"queues: {name} skipped: {e}")
            out[name] = {"status": "skipped", "reason": str(e)}
            continue
        except Exception as e:
            log(f"queues: {name} failed: {e!r}")
            out[name] = {"status": "error", "reason": repr(e)}
            continue
        rates = [r["records_per_s"] for r in got["runs"]]
        out[name] = {"status": "ok", "records_per_s": round(statistics.median(rates), 1),
                     "correct": all(r["correct"] for r in got["runs"]), "info": got["info"], "runs": got["runs"]}
        log(f"queues: {name}: {out[name]['records_per_s']:,.0f} records/s, correct={out[name]['correct']}")
    return out


# --------------------------------------------------------------------------- report


def summarize(runs: dict[str, list[dict]], peers: dict, redelivery: dict, profile: dict | None,
              params: Params) -> dict:
    def median(mode: str, key: str = "records_per_s") -> float | None:
        values = [r[key] for r in runs[mode] if r.get(key) is not None]
        return round(statistics.median(values), 2) if values else None

    ours = {mode: median(mode) for mode in runs}
    ratios = {}
    for peer, res in peers.items():
        if res.get("status") == "ok" and res["records_per_s"]:
            for mode, name in (("ranges", "batched"), ("ranges_pipelined", "batched_pipelined")):
                ratios[f"{name}_vs_{peer}"] = round(ours[mode] / res["records_per_s"], 3)
    every = [r for rs in runs.values() for r in rs]
    batched, nack = ours["ranges"], redelivery.get("nack", {}).get("median")
    expiry = redelivery.get("expiry", {}).get("median")
    return {
        "status": "ok",
        "batched_records_per_s": batched,
        "batched_pipelined_records_per_s": ours["ranges_pipelined"],
        "record_form_batched_records_per_s": ours["batched"],
        "sdk_records_per_s": ours["sdk"],
        "per_record_acks_per_s": ours["per_record"],
        "per_record_acks_pipelined_per_s": ours["per_record_pipelined"],
        "peers": {k: {kk: vv for kk, vv in v.items() if kk != "runs"} for k, v in peers.items()},
        "ratios": ratios,
        "redelivery_error_ms": redelivery,
        "cpu": {mode: {k: median(mode, k) for k in ("broker_cpu_us_per_record", "broker_loop_thread_cpu_us_per_record",
                                                    "broker_loop_thread_busy", "workers_cpu_us_per_record")}
                for mode in runs},
        "correctness": {
            "streamd_every_record_received_once_and_acked": all(r["correct"] for r in every),
            "duplicates_max": max(r["check"]["duplicates"] for r in every),
            "missing_max": max(r["check"]["missing"] for r in every),
            "settle_errors_max": max(r["check"]["settle_errors"] for r in every),
            "broker_acked_equals_total": all(r["check"]["broker"]["acked"] == r["check"]["records_total"]
                                             for r in every),
            "broker_drained": all(r["check"]["broker"]["drained"] for r in every),
            "peers_correct": {k: v.get("correct") for k, v in peers.items() if v.get("status") == "ok"},
            "redelivery_unexpected": sum(v.get("unexpected", 0) + v.get("settle_errors", 0)
                                         for v in redelivery.values() if isinstance(v, dict)),
        },
        "targets": {
            "batched_records_per_s_min": TARGET_BATCHED_RECORDS_PER_S,
            "redelivery_median_error_ms_max": TARGET_REDELIVERY_MEDIAN_MS,
            "batched_met": batched is not None and batched >= TARGET_BATCHED_RECORDS_PER_S,
            "redelivery_met": all(m is not None and abs(m) <= TARGET_REDELIVERY_MEDIAN_MS for m in (nack, expiry)),
        },
        "params": {k: v for k, v in asdict(params).items() if k != "profile_dir"},
        "runs": {mode: [{k: v for k, v in r.items() if k != "check"} for r in rs] for mode, rs in runs.items()},
        "peer_runs": {k: v.get("runs", []) for k, v in peers.items()},
        "profile": profile,
    }


def run(workdir: str, quick: bool, *, repeat: int | None = None, peers: bool = True, **overrides) -> dict:
    """The whole section: one broker for streamd's runs, then the peers; a JSON-able dict."""
    from bench import queue_redelivery
    from streamd.client import Admin

    params = Params.for_run(quick, repeat=repeat, **overrides)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding gRPC channels
    with section_broker(workdir) as (server, address), Admin(address) as admin:
        runs, profile = streamd_section(ctx, server, admin, address, params)
        redelivery = {}
        for how in ("nack", "expiry"):
            redelivery[how] = queue_redelivery.measure(address, admin, how, params)
            log(f"queues: redelivery after {how}: {redelivery[how]}")
    peer_results = peers_section(ctx, workdir, params) if peers else {}
    return summarize(runs, peer_results, redelivery, profile, params)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.queues", description="queue-group benchmark (JSON on stdout)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (smoke test)")
    p.add_argument("--records-per-partition", type=int)
    p.add_argument("--partitions", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--max-records", type=int, help="Receive size of the batched runs")
    p.add_argument("--per-record-total", type=int)
    p.add_argument("--peer-records", type=int, help="records of the peers' stream (default: the same total)")
    p.add_argument("--redelivery-records", type=int)
    p.add_argument("--repeat", type=int, help="runs of each throughput measurement (median reported)")
    p.add_argument("--no-peers", action="store_true", help="skip Redis and NATS")
    p.add_argument("--profile", metavar="DIR", help="extra batched and per-record runs with py-spy sampling the broker (pip install py-spy)")
    p.add_argument("--out", metavar="FILE", help="also write the JSON to FILE")
    a = p.parse_args(argv)
    overrides = dict(records_per_partition=a.records_per_partition, partitions=a.partitions, workers=a.workers,
                     max_records=a.max_records, per_record_total=a.per_record_total, peer_records=a.peer_records,
                     redelivery_records=a.redelivery_records, profile_dir=a.profile and os.path.abspath(a.profile))
    with tempfile.TemporaryDirectory(prefix="bench-streamd-queues-") as workdir:
        doc = run(workdir, a.quick, repeat=a.repeat, peers=not a.no_peers, **overrides)
    emit(doc, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
