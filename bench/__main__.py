"""python -m bench [--quick] [--only NAME ...] [--repeat N] [--out FILE]

``--only groups`` runs only the consumer-group section (bench/groups.py), ``--only
queues`` only the queue-group section (bench/queues.py), ``--only sdk_paths`` only the
per-SDK-class paths beside the peers (bench/sdk_paths.py).

Prints one JSON document on stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import tempfile
import time
from typing import Any

from bench import harness

# system name -> module exposing ``driver(workdir: str) -> harness.Driver``.
# streamd comes first; ratios are computed streamd vs every other system.
SYSTEMS = {
    "streamd": "bench.streamd_driver",
    "redis_streams": "bench.peers.redis_streams",
    "nats_jetstream": "bench.peers.nats_jetstream",
}
# streamd-only sections that ``--only`` can also name; they run with streamd otherwise.
SECTIONS = ("groups", "queues", "sdk_paths")


def _factory(module_name: str, workdir: str):
    def make() -> harness.Driver:
        try:
            mod = importlib.import_module(module_name)
        except ImportError as e:
            raise harness.Skip(f"cannot import {module_name}: {e}") from e
        return mod.driver(workdir)
    return make


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small N, repeat 1: a smoke test (< 1 min)")
    p.add_argument("--only", action="append", metavar="NAME", default=[],
                   help=f"run only this system ({', '.join(SYSTEMS)}), section ({', '.join(SECTIONS)}) or workload "
                        "(produce, produce/100B, consume, latency, produce_acked, ...); repeatable")
    p.add_argument("--repeat", type=int, default=None, metavar="N",
                   help="runs per workload, median reported (default 5, 1 with --quick)")
    p.add_argument("--pin", action="store_true",
                   help="pin this process to CPU 0 and the servers to the other CPUs, so "
                        "one-at-a-time round trips do not depend on where the scheduler puts them")
    p.add_argument("--out", metavar="FILE", help="also write the JSON document to FILE")
    args = p.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = harness.make_plan(args.quick, args.repeat)
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            print("--pin needs at least 2 CPUs", file=sys.stderr)
            return 2
        harness.pin({cpus[0]}, set(cpus[1:]))
    only = {o for item in args.only for o in item.split(",") if o}
    only_sections = only & set(SECTIONS)
    only -= only_sections
    only_systems = {o for o in only if o in SYSTEMS}
    only_workloads = only - only_systems
    if only_workloads:
        plan.workloads = [w for w in plan.workloads
                          if any(w.key == o or w.key.startswith(o + "/") for o in only_workloads)]
        if not plan.workloads:
            print(f"--only: no system or workload matches {sorted(only_workloads)}", file=sys.stderr)
            return 2

    t0 = time.time()
    systems: dict[str, Any] = {}
    for name, module in SYSTEMS.items():
        if (only_systems and name not in only_systems) or (only_sections and not only):
            continue
        if importlib.util.find_spec(module) is None:
            systems[name] = {"status": "omitted",
                             "reason": f"{module.replace('.', '/')}.py does not exist yet"}
            harness.log(f"{name}: omitted ({systems[name]['reason']})")
            continue
        harness.log(f"{name}: starting")
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as workdir:
            systems[name] = harness.run_system(name, _factory(module, workdir), plan)

    streamd_only: dict[str, Any] = {}
    if systems.get("streamd", {}).get("status") == "ok" and not only_workloads:
        from bench import streamd_extra

        harness.log("streamd: fsync=always, memory and restart measurements")
        with tempfile.TemporaryDirectory(prefix="bench-streamd-extra-") as workdir:
            try:
                streamd_only = streamd_extra.run(workdir, args.quick)
            except Exception as e:
                streamd_only = {"status": "error", "reason": repr(e)}

    def section(name: str, label: str) -> dict[str, Any]:
        """Run bench.<name> when asked for, or with everything of streamd; {} if not."""
        if name not in only_sections and (only_sections or only_workloads or "streamd" not in systems):
            return {}
        import importlib

        harness.log(f"streamd: {label}")
        with tempfile.TemporaryDirectory(prefix=f"bench-streamd-{name}-") as workdir:
            try:
                return importlib.import_module(f"bench.{name}").run(workdir, args.quick, repeat=args.repeat)
            except Exception as e:
                return {"status": "error", "reason": repr(e)}

    groups = section("groups", "consumer groups (throughput, reassignment latency)")
    queues = section("queues", "queue groups (receive + ack throughput vs peers, redelivery timing)")
    sdk_paths = section("sdk_paths", "each SDK class's per-record paths beside the peers, interleaved")

    doc = {
        "benchmark": "streamd vs Redis Streams vs NATS JetStream",
        "meta": {
            **harness.machine_info(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
            "wall_seconds": round(time.time() - t0, 1),
            "repeat": plan.repeat,
            **plan.params,
            "units": {"records_per_s": "records/s", "mb_per_s": "payload 10^6 B/s",
                      "p50_ms/p99_ms": "ms, receive time - send time, same process clock"},
            "ratios": "streamd/peer for records_per_s and mb_per_s, peer/streamd for p50_ms and "
                      "p99_ms: > 1 means streamd is better",
        },
        "workloads": {w.key: {"method": w.method, **w.kwargs} for w in plan.workloads},
        "systems": systems,
        "ratios": harness.ratios(systems),
        "streamd_only": streamd_only,
        "streamd_groups": groups,
        "streamd_queues": queues,
        "sdk_paths": sdk_paths,
    }
    harness.emit(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
