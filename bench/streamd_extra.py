"""streamd-only measurements (no peer equivalent), each against its own baseline:

- ``fsync_always``: 4 concurrent producers on a topic with fsync=always, as a ratio of
  the same load on a topic with fsync=never (target >= 0.4: group commit at work);
- ``memory``: the server's anonymous RSS (RssAnon, /proc) after writing and then
  reading back a large log (target < 200 MB with 2 GB);
- ``restart``: time from SIGKILL to serving again, with a small and a large log
  (target: large within 2x of small; recovery scans only what follows the last
  recovery checkpoint, so it does not grow with the log).
"""

from __future__ import annotations

import asyncio
import os
import time

from bench.harness import ServerProcess, log, now, payload, start_server
from bench.streamd_driver import ROOT, serve_argv

MB = 1_000_000
CHECKPOINT_MS = 5_000  # the broker default, waited out before each SIGKILL


def _rss_anon_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc status")


class _Server:
    def __init__(self, workdir: str, name: str) -> None:
        self.data = os.path.join(workdir, name)
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.proc: ServerProcess | None = None

    def start(self) -> _Server:
        self.proc = start_server("streamd", serve_argv(self.data), self.log_path, cwd=ROOT)
        self.address = f"127.0.0.1:{self.proc.port}"
        return self

    def kill(self) -> None:
        assert self.proc is not None and self.proc.proc is not None
        self.proc.proc.kill()
        self.proc.proc.wait(10)
        self.proc.stop()

    def restart_seconds(self) -> float:
        """SIGKILL, start again on the same port and data, time until a topic read answers."""
        from streamd.client import Admin

        port = self.proc.port
        self.kill()
        argv = serve_argv(self.data)(port)
        t0 = now()
        self.proc = ServerProcess("streamd", argv, port, self.log_path, cwd=ROOT, start_timeout=120).start()
        with Admin(self.address) as admin:
            for _ in range(10_000):
                try:
                    admin.describe_topic("big")
                    break
                except Exception:
                    time.sleep(0.005)
        return now() - t0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


async def _produce(address: str, topic: str, *, producers: int, batches: int, batch: int, record_bytes: int) -> float:
    from streamd.client import AsyncProducer

    value = payload(record_bytes)
    values = [value] * batch

    async def one(i: int) -> None:
        async with AsyncProducer(address, max_in_flight=8) as producer:
            futures = [await producer.send_batch(topic, 0, values) for _ in range(batches)]
            await asyncio.gather(*futures)

    t0 = now()
    await asyncio.gather(*(one(i) for i in range(producers)))
    return now() - t0


def fsync_always(workdir: str, quick: bool) -> dict:
    from streamd.client import Admin

    server = _Server(workdir, "fsync").start()
    batches = 100 if quick else 500
    out = {}
    try:
        with Admin(server.address) as admin:
            for policy in ("never", "always"):
                admin.create_topic(policy, 1, fsync=policy)
                seconds = asyncio.run(
                    _produce(server.address, policy, producers=4, batches=batches, batch=100, record_bytes=100)
                )
                records = 4 * batches * 100
                out[f"{policy}_records_per_s"] = round(records / seconds, 1)
                log(f"streamd fsync={policy}: {records / seconds:,.0f} records/s (4 producers, batches of 100)")
    finally:
        server.stop()
    out["always_vs_never"] = round(out["always_records_per_s"] / out["never_records_per_s"], 3)
    out["target_min_ratio"] = 0.4
    return out


def _fill(address: str, topic: str, total_bytes: int, record_bytes: int = 1024) -> float:
    from streamd.client import Admin

    with Admin(address) as admin:
        admin.create_topic(topic, 1, fsync="never")
    batch = 1000
    batches = max(1, total_bytes // (record_bytes * batch))
    return asyncio.run(_produce(address, topic, producers=1, batches=batches, batch=batch, record_bytes=record_bytes))


def _read_all(address: str, topic: str) -> int:
    from streamd.client import Consumer

    with Consumer(address) as consumer:
        offset, end = 0, consumer.list_offsets(topic, position="latest")[0].log_end_offset
        while offset < end:
            _, reply = consumer.fetch(topic, 0, offset, max_bytes=4_000_000)
            offset = reply.next_offset
    return offset


def memory_and_restart(workdir: str, quick: bool) -> dict:
    small_bytes = 20 * MB
    large_bytes = (200 if quick else 2000) * MB
    out: dict = {"small_log_bytes": small_bytes, "large_log_bytes": large_bytes}
    for label, size in (("small", small_bytes), ("large", large_bytes)):
        server = _Server(workdir, f"restart-{label}").start()
        try:
            seconds = _fill(server.address, "big", size)
            log(f"streamd {label} log: wrote {size / MB:,.0f} MB in {seconds:.1f} s")
            pid = server.proc.proc.pid
            out[f"{label}_rss_anon_mb_after_write"] = round(_rss_anon_kb(pid) / 1024, 1)
            _read_all(server.address, "big")
            out[f"{label}_rss_anon_mb_after_read"] = round(_rss_anon_kb(pid) / 1024, 1)
            time.sleep(CHECKPOINT_MS / 1000 + 1)
            restarts = [server.restart_seconds() for _ in range(1 if quick else 3)]
            out[f"{label}_restart_s"] = round(sorted(restarts)[len(restarts) // 2], 3)
            log(f"streamd {label} log: restart after SIGKILL {out[f'{label}_restart_s']:.3f} s")
        finally:
            server.stop()
    out["restart_large_vs_small"] = round(out["large_restart_s"] / out["small_restart_s"], 3)
    out["targets"] = {"rss_anon_mb_max": 200, "restart_large_vs_small_max": 2.0}
    return out


def run(workdir: str, quick: bool) -> dict:
    return {"fsync_always": fsync_always(workdir, quick), "memory_restart": memory_and_restart(workdir, quick)}
