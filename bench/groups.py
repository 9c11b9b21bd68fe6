"""Consumer groups under load, against one ``streamd serve`` process (streamd only).

1. **Throughput**: a pre-filled topic (``partitions`` x ``records_per_partition`` records
   of ``record_bytes``) read from offset 0 by
   - ``single``: one ``Consumer`` in this process, ``assign`` + ``records(exit_at_end=True)``
     over all partitions (the reading method of the core ``consume`` workload);
   - ``single_group_member``: one ``GroupConsumer`` alone in a fresh group, own process;
   - ``group``: ``members`` GroupConsumers of a fresh group, one process each (2 cores:
     processes, not threads, are what users run), auto-commit every 1 s.
   All run the same per-record body (:func:`read_records`: touch the value, check the
   offset against the partition's high-water mark, counting duplicates and gaps).
   Members join and the group settles *before* the clock: DescribeGroup says STABLE with
   ``members`` members, every member reports the group's generation, every partition is
   owned. **Clock**: from the start signal (``time.time()`` in the parent just before
   sending it) to the last member's last record (``time.time()`` there; one machine).
   A member stops once it has read the log end of the partitions it owns.
   **Warm start**: a GroupConsumer sends a partition's first Fetch when it gets the
   partition, so at the start signal each first reply (<= 4 MB, the broker's default)
   is already in. ``single`` starts the same way (iterator primed, 0.3 s for the
   replies); ``single_cold`` is that reader timed from before ``records()``, as the core
   ``consume`` workload times it.
   Correctness per group run: consumed == produced, duplicates, missing, and the lag
   left after every member ``commit()``s the offsets it read and ``close()``s.

2. **Reassignment latency**: ``reassign_members`` members, a producer process writing
   ``produce_batch`` records to every partition each ``produce_interval_ms``.
   ``clean_leave``: a member takes ``time.time()`` just before calling ``close()``
   (commit, LeaveGroup); latency = from then until the others have consumed a record of
   *every* partition it owned (each member reports the wall-clock time of its first
   record of each newly assigned partition). ``kill``: the same from just before a
   SIGKILL of a member process (the broker sees its JoinGroup stream break). A
   replacement joins and the group settles before the next round. Rounds also report
   ``assign_ms`` (until the last moved partition was assigned) and ``close_ms``.

``python -m bench --only groups`` (part of ``make bench``), or ``python -m bench.groups
[--quick] [--records-per-partition N] [--profile DIR] ...``. Every wait is bounded; every
process started here is stopped in a ``finally`` and exits on its own when its pipe
to this process closes.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict

from bench.group_members import (
    REASSIGN_TIMEOUT_S,
    SETTLE_S,
    STABLE_TIMEOUT_S,
    TARGET_MIN_RATIO,
    TARGET_REASSIGN_MS,
    WARM_UP_S,
    Params,
    Tally,
    _Fleet,
    _live_member,
    _producer,
    _throughput_member,
    read_records,
)
from bench.harness import emit, log, median_of, payload
from bench.streamd_driver import section_broker

# --------------------------------------------------------------------------- throughput


def _fill(address: str, topic: str, params: Params) -> float:
    """Pre-fill every partition (batches of 1000, pipelined, partitions round-robin)."""
    from streamd.client import AsyncProducer

    value = payload(params.record_bytes)

    async def run() -> float:
        t0 = time.perf_counter()
        async with AsyncProducer(address) as producer:
            futures = []
            for start in range(0, params.records_per_partition, 1000):
                size = min(1000, params.records_per_partition - start)
                for p in range(params.partitions):
                    futures.append(await producer.send_batch(topic, p, [value] * size))
            await asyncio.gather(*futures)
        return time.perf_counter() - t0

    return asyncio.run(run())


def _single(address: str, topic: str, total: int, params: Params, *, warm: bool) -> dict:
    from streamd.client import Consumer

    tally = Tally([0] * params.partitions)
    with Consumer(address) as consumer:
        consumer.assign(topic)
        records = consumer.records(exit_at_end=True)
        if warm:  # every partition's first Fetch answered before the clock starts
            read_records(records, tally, 1, time.time() + params.read_timeout_s)
            time.sleep(WARM_UP_S)
        t0 = time.time()
        read_records(records, tally, total - tally.records, t0 + params.read_timeout_s)
        records.close()
    return _result(tally.records, tally.last_time - t0, params, duplicates=tally.duplicates, gaps=tally.gaps)


def _result(records: int, seconds: float, params: Params, **extra) -> dict:
    seconds = max(seconds, 1e-9)
    return {"records": records, "seconds": round(seconds, 4), "records_per_s": round(records / seconds, 1),
            "mb_per_s": round(records * params.record_bytes / seconds / 1e6, 3), **extra}


def _group_run(ctx, admin, address: str, topic: str, ends: list[int], members: int, group: str,
               params: Params) -> dict:
    """``members`` GroupConsumer processes read the topic once; see the module docstring."""
    fleet = _Fleet(ctx)
    deadline = time.time() + STABLE_TIMEOUT_S + 2 * params.read_timeout_s
    try:
        for _ in range(members):
            fleet.spawn(_throughput_member, address, group, topic, ends, params, deadline)
        fleet.wait_stable(admin, group, members, params.partitions, STABLE_TIMEOUT_S)
        fleet.settle(WARM_UP_S)
        t0 = time.time()
        fleet.send(("start",))
        done = {i: msg[1] for i, msg in fleet.collect("done", members, params.read_timeout_s + 10).items()}
        fleet.send(("commit",))
        fleet.collect("committed", members, 10)
        fleet.send(("close",))
        for p in fleet.procs.values():
            p.proc.join(10)
        lag = sum(p.lag for p in admin.describe_group(group).partitions)
    finally:
        fleet.stop()
    return _group_result(done, t0, ends, params, lag)


def _group_result(done: dict[int, dict], t0: float, ends: list[int], params: Params, lag: int) -> dict:
    consumed = sum(d["records"] for d in done.values())
    produced = sum(ends)
    covered = sum(max(d["hw"][p] for d in done.values()) for p in range(len(ends)))
    shared = sum(1 for p in range(len(ends)) if sum(1 for d in done.values() if d["hw"][p]) > 1)
    within = sum(d["duplicates"] for d in done.values())
    return _result(
        consumed, max(d["last_time"] for d in done.values()) - t0, params,
        records_produced=produced,
        duplicates=within + max(0, consumed - within - covered),
        missing=produced - covered + sum(d["gaps"] for d in done.values()),
        partitions_read_by_several_members=shared,
        committed_lag_after_close=lag,
        largest_member_share=max(d["target"] for d in done.values()),
    )


def throughput(ctx, admin, address: str, params: Params) -> dict:
    topic = "groups-throughput"
    admin.create_topic(topic, params.partitions, fsync="interval")
    seconds = _fill(address, topic, params)
    ends = [p.log_end_offset for p in admin.describe_topic(topic).partitions]
    total = sum(ends)
    if total != params.partitions * params.records_per_partition:
        raise RuntimeError(f"filled {total} records, expected {params.partitions * params.records_per_partition}")
    log(f"groups: filled {total:,} records in {seconds:.1f} s")
    runs: dict[str, list[dict]] = {"single": [], "single_cold": [], "single_group_member": [], "group": []}
    for r in range(params.repeat):  # interleaved, so drift hits every reader alike
        runs["single"].append(_single(address, topic, total, params, warm=True))
        runs["single_cold"].append(_single(address, topic, total, params, warm=False))
        runs["single_group_member"].append(_group_run(ctx, admin, address, topic, ends, 1, f"single-{r}", params))
        runs["group"].append(_group_run(ctx, admin, address, topic, ends, params.members, f"group-{r}", params))
        log("groups: run {}/{}: {}".format(r + 1, params.repeat, " ".join(
            f"{k}={v[-1]['records_per_s']:,.0f}/s" for k, v in runs.items())))
    admin.delete_topic(topic)
    return runs


# --------------------------------------------------------------------------- reassignment


def _reassign_once(fleet: _Fleet, victim: int, how: str, timeout: float) -> dict:
    """Make ``victim`` leave (or SIGKILL it); ms until its partitions were read by others."""
    moved = set(fleet.procs[victim].partitions)
    t0 = t_closed = None
    if how == "leave":
        fleet.send(("leave",), [victim])
    else:
        t0 = time.time()
        fleet.procs[victim].proc.kill()
    seen: list[tuple[int, float, float]] = []
    first: dict[int, tuple[float, float]] = {}
    deadline = time.time() + timeout
    while time.time() < deadline and not (t0 is not None and moved <= first.keys()):
        for i, msg in fleet.pump(0.02):
            if msg[0] == "left" and i == victim:
                t0, t_closed = msg[1], msg[2]
            elif msg[0] == "first" and msg[1] in moved:
                seen.append(msg[1:])
        if t0 is not None:
            for p, t_record, t_assigned in seen:
                if t_record >= t0:
                    first.setdefault(p, (t_record, t_assigned))
    fleet.procs[victim].proc.join(5)
    fleet.procs[victim].alive = False
    out = {"partitions_moved": len(moved), "reassign_ms": None, "assign_ms": None}
    if t_closed is not None:
        out["close_ms"] = round((t_closed - t0) * 1000, 2)
    if t0 is not None and moved <= first.keys():
        out["reassign_ms"] = round((max(t for t, _ in first.values()) - t0) * 1000, 2)
        out["assign_ms"] = round((max(a for _, a in first.values()) - t0) * 1000, 2)
    return out


def reassignment(ctx, admin, address: str, params: Params) -> dict[str, list[dict]]:
    topic, group, n = "groups-live", "live", params.reassign_members
    admin.create_topic(topic, params.partitions, fsync="interval")
    rounds = [how for how in ("leave", "kill") for _ in range(params.reassign_repeat)]
    deadline = time.time() + len(rounds) * (STABLE_TIMEOUT_S + REASSIGN_TIMEOUT_S) + 60
    fleet = _Fleet(ctx)
    to_producer, producer_end = ctx.Pipe()
    producer = ctx.Process(target=_producer, args=(producer_end, address, topic, params, deadline),
                           daemon=True, name="bench-groups-producer")
    out: dict[str, list[dict]] = {"leave": [], "kill": []}
    try:
        producer.start()
        producer_end.close()
        for _ in range(n):
            fleet.spawn(_live_member, address, group, topic, params, deadline)
        for k, how in enumerate(rounds):
            if not producer.is_alive():
                raise RuntimeError(f"the producer process exited ({producer.exitcode})")
            fleet.wait_stable(admin, group, n, params.partitions, STABLE_TIMEOUT_S)
            fleet.settle(SETTLE_S)
            live = sorted(fleet.live())
            result = _reassign_once(fleet, live[k % len(live)], how, REASSIGN_TIMEOUT_S)
            out[how].append(result)
            log(f"groups: {how} round {len(out[how])}: {result}")
            if k + 1 < len(rounds):
                fleet.spawn(_live_member, address, group, topic, params, deadline)
    finally:
        fleet.stop()
        try:
            to_producer.send(("stop",))
        except OSError:
            pass
        producer.join(10)
        if producer.is_alive():
            producer.kill()
            producer.join(5)
        to_producer.close()
    admin.delete_topic(topic)
    return out


# --------------------------------------------------------------------------- report


def _latency_summary(rounds: list[dict]) -> dict:
    def median(key: str) -> float | None:
        values = [r[key] for r in rounds if r.get(key) is not None]
        return round(statistics.median(values), 2) if values else None

    ms = [r["reassign_ms"] for r in rounds if r["reassign_ms"] is not None]
    out = {"median": median("reassign_ms"), "max": max(ms, default=None), "runs": ms,
           "timeouts": len(rounds) - len(ms), "assign_ms_median": median("assign_ms")}
    if any("close_ms" in r for r in rounds):
        out["close_ms_median"] = median("close_ms")
    return out


def summarize(runs: dict[str, list[dict]], rounds: dict[str, list[dict]], params: Params) -> dict:
    med = {k: median_of(v) for k, v in runs.items()}
    group, single = med["group"]["records_per_s"], med["single"]["records_per_s"]
    member = med["single_group_member"]["records_per_s"]
    checks = runs["group"] + runs["single_group_member"]
    return {
        "status": "ok",
        "group_records_per_s": group,
        "single_records_per_s": single,
        "single_cold_records_per_s": med["single_cold"]["records_per_s"],
        "single_group_member_records_per_s": member,
        "ratio_group_vs_single": round(group / single, 3),
        "ratio_group_vs_single_group_member": round(group / member, 3),
        "clean_leave_reassign_ms": _latency_summary(rounds["leave"]),
        "kill_reassign_ms": _latency_summary(rounds["kill"]),
        "correctness": {
            "records_produced": checks[0]["records_produced"],
            "all_records_read_once": all(c["records"] == c["records_produced"] and not c["duplicates"]
                                         and not c["missing"] for c in checks),
            "duplicates_max": max(c["duplicates"] for c in checks),
            "missing_max": max(c["missing"] for c in checks),
            "committed_lag_after_close_max": max(c["committed_lag_after_close"] for c in checks),
        },
        "targets": {"ratio_group_vs_single_min": TARGET_MIN_RATIO, "reassign_ms_max": TARGET_REASSIGN_MS},
        "params": {k: v for k, v in asdict(params).items() if k != "profile_dir"},
        "throughput_runs": {k: [{"records_per_s": s["records_per_s"], "seconds": s["seconds"]} for s in v]
                            for k, v in runs.items()},
        "reassign_rounds": rounds,
    }


def run(workdir: str, quick: bool, *, repeat: int | None = None, **overrides) -> dict:
    """The whole section: one broker, throughput then reassignment; a JSON-able dict."""
    from streamd.client import Admin

    if overrides.get("reassign_repeat") is None:
        overrides["reassign_repeat"] = repeat
    params = Params.for_run(quick, repeat=repeat, **overrides)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding gRPC channels
    with section_broker(workdir) as (_, address), Admin(address) as admin:
        runs = throughput(ctx, admin, address, params)
        rounds = reassignment(ctx, admin, address, params)
    return summarize(runs, rounds, params)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.groups", description="consumer-group benchmark (JSON on stdout)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (smoke test)")
    p.add_argument("--records-per-partition", type=int)
    p.add_argument("--partitions", type=int)
    p.add_argument("--members", type=int)
    p.add_argument("--repeat", type=int, help="throughput runs (median reported)")
    p.add_argument("--reassign-repeat", type=int, help="leave and kill rounds each")
    p.add_argument("--profile", metavar="DIR", help="cProfile every group member's read loop into DIR")
    p.add_argument("--out", metavar="FILE", help="also write the JSON to FILE")
    a = p.parse_args(argv)
    overrides = dict(records_per_partition=a.records_per_partition, partitions=a.partitions, members=a.members,
                     reassign_repeat=a.reassign_repeat, profile_dir=a.profile and os.path.abspath(a.profile))
    with tempfile.TemporaryDirectory(prefix="bench-streamd-groups-") as workdir:
        doc = run(workdir, a.quick, repeat=a.repeat, **overrides)
    emit(doc, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
