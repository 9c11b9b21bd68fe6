"""Rebalance under churn: members join, leave cleanly and are SIGKILLed while records
flow. Every record is processed, no partition is ever owned by two members at once,
and committed offsets never go backwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from streamd.client import Admin, Producer
from tests.conftest import ROOT, wait_until

PARTITIONS = 6
RECORDS = 3000


class MemberProcess:
    def __init__(self, address: str, name: str) -> None:
        self.name = name
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.group_member", address, "g", "t", name],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.lines: list[dict] = []
        self.killed_at: float | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def processed(self) -> set[tuple[int, int]]:
        return {tuple(e["r"]) for e in list(self.lines) if "r" in e}

    def ownership(self) -> list[tuple[int, float, float]]:
        """(partition, from, to) wall-clock intervals in which this member owned it."""
        out, owned = [], {}
        for e in list(self.lines):
            if "assign" in e:
                owned.update({p: e["ts"] for p in e["assign"]})
            elif "revoke" in e:
                out += [(p, owned.pop(p), e["ts"]) for p in e["revoke"] if p in owned]
            elif "closing" in e:
                out += [(p, start, e["ts"]) for p, start in owned.items()]
                owned = {}
        end = self.killed_at or time.time()
        return out + [(p, start, end) for p, start in owned.items()]

    def owns(self) -> bool:
        return any("assign" in e and e["assign"] for e in list(self.lines))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:
                self.killed_at = time.time()
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.reader.join(10)
        self.proc.stdout.close()


class Monitor(threading.Thread):
    """Samples DescribeGroup: ownership must be exclusive in every snapshot and the
    committed offsets must never go backwards."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.admin = Admin(address)
        self.done = threading.Event()
        self.problems: list[str] = []
        self.samples = 0

    def run(self) -> None:
        last: dict[int, int] = {}
        deadline = time.monotonic() + 120
        while not self.done.is_set() and time.monotonic() < deadline:
            try:
                d = self.admin.describe_group("g")
            except Exception:
                time.sleep(0.02)
                continue
            self.samples += 1
            seen: dict[int, str] = {}
            for m in d.members:
                for tps in list(m.assignment) + list(m.revoking):
                    for p in tps.partitions:
                        if p in seen:
                            self.problems.append(f"gen {d.generation}: partition {p} owned by {seen[p]} and {m.member_id}")
                        seen[p] = m.member_id
            for p in d.partitions:
                if p.committed_offset < last.get(p.partition, -1):
                    self.problems.append(f"partition {p.partition}: commit went back {last[p.partition]} -> {p.committed_offset}")
                last[p.partition] = max(last.get(p.partition, -1), p.committed_offset)
            time.sleep(0.01)

    def stop(self) -> None:
        self.done.set()
        self.join(15)
        self.admin.close()


def _produce(address: str, stop: threading.Event) -> None:
    with Producer(address, linger_ms=2) as producer:
        for i in range(RECORDS):
            if stop.is_set():
                return
            producer.send("t", str(i).encode(), key=str(i).encode())
            if i % 100 == 99:
                producer.flush()
                time.sleep(0.05)
        producer.flush()


@pytest.mark.slow
def test_every_record_is_processed_through_joins_leaves_and_kills(make_server):
    server = make_server(fsync_policy="never", group_session_timeout_ms=3000)
    with Admin(server.address) as admin:
        admin.create_topic("t", PARTITIONS)
    members: list[MemberProcess] = []
    monitor = Monitor(server.address)
    stop_producing = threading.Event()
    producer = threading.Thread(target=_produce, args=(server.address, stop_producing), daemon=True)
    try:
        members += [MemberProcess(server.address, "m0"), MemberProcess(server.address, "m1")]
        assert wait_until(lambda: any(m.owns() for m in members), timeout=20)
        monitor.start()
        producer.start()
        churn = [("join", "m2"), ("kill", 0), ("join", "m3"), ("leave", 1), ("join", "m4"), ("kill", 2)]
        for action, arg in churn:
            time.sleep(0.4)
            if action == "join":
                members.append(MemberProcess(server.address, arg))
            elif action == "kill":
                members[arg].stop(signal.SIGKILL)
            else:
                members[arg].stop(signal.SIGTERM)
        producer.join(60)
        wanted = set()
        with Admin(server.address) as admin:
            ends = {o.partition: o.log_end_offset for o in admin.list_offsets("t")}
        for p, end in ends.items():
            wanted |= {(p, o) for o in range(end)}
        assert len(wanted) == RECORDS

        def all_processed() -> bool:
            return wanted <= set().union(*(m.processed() for m in members))

        assert wait_until(all_processed, timeout=60, interval=0.1), (
            f"missing {len(wanted - set().union(*(m.processed() for m in members)))} records"
        )
        # the survivors commit everything: the group catches up to the log end
        with Admin(server.address) as admin:
            assert wait_until(
                lambda: all(p.lag == 0 for p in admin.describe_group("g").partitions), timeout=30
            )
    finally:
        stop_producing.set()
        for m in members:
            m.stop(signal.SIGKILL)
        monitor.stop()
    assert monitor.samples > 10
    assert not monitor.problems, monitor.problems[:5]
    # As the members saw it: one owner at a time per partition (a revoked owner stops
    # before the next one starts).
    intervals = sorted((p, start, end, m.name) for m in members for p, start, end in m.ownership())
    assert len(intervals) > PARTITIONS
    for (p1, _, end1, n1), (p2, start2, _, n2) in zip(intervals, intervals[1:], strict=False):
        if p1 == p2:
            assert start2 >= end1, f"partition {p1}: {n2} started before {n1} stopped ({start2} < {end1})"
