"""The order-processing scenario end to end over real gRPC: 4 worker processes
compete for order events; a flaky email step succeeds on the third try after backoff;
a malformed order is dead-lettered without holding up the others; a worker killed
mid-task (after its side effect, before its ack) loses the order to another worker;
idempotency keys keep every order's email single; a stream group on the same topic
still sees every order event."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from streamd.client import Admin, Consumer, GroupConsumer, Producer
from streamd.client.queue import QueueReceiver
from tests.conftest import ROOT, wait_until

ORDERS = 40
FLAKY = {"order-05", "order-15"}
MALFORMED = "order-09"
HOLD = "order-17"


class Worker:
    def __init__(self, address: str, name: str) -> None:
        self.name = name
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.queue_worker", address, name, HOLD],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.events: list[dict] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.reader.join(10)
        self.proc.stdout.close()


@pytest.mark.slow
def test_order_processing_end_to_end(make_server):
    server = make_server(fsync_policy="interval")
    address = server.address
    with Admin(address) as admin:
        admin.create_topic("orders", 4)
        admin.create_topic("emails", 2, dedup_window_ms=300_000)
    with QueueReceiver("fulfilment", "orders", address) as r:
        r.create(max_deliveries=3, lease_ms=1000, initial_delay_ms=100, multiplier=2.0, jitter="equal")
    analytics = GroupConsumer("analytics", "orders", address)
    workers = [Worker(address, f"w{i}") for i in range(4)]
    try:
        with Producer(address) as p:
            for i in range(ORDERS):
                oid = f"order-{i:02d}"
                order = {"id": oid, "flaky": oid in FLAKY, "malformed": oid == MALFORMED}
                p.send("orders", json.dumps(order).encode(), key=oid.encode())
        holder = wait_until(lambda: next((w for w in workers for e in list(w.events) if "holding" in e), None), 30)
        assert holder is not None, "no worker took the order to hold"
        holder.stop(signal.SIGKILL)

        def done() -> set[str]:
            return {e["done"] for w in workers for e in list(w.events) if "done" in e}

        expected = {f"order-{i:02d}" for i in range(ORDERS)} - {MALFORMED}
        assert wait_until(lambda: done() >= expected, timeout=60), sorted(expected - done())
        with QueueReceiver("fulfilment", "orders", address) as r:
            assert wait_until(lambda: sum(p.dead_lettered for p in r.describe().partitions) == 1, timeout=30)
            # workers batch their acks: the last ones land a moment after the work is done
            assert wait_until(lambda: sum(p.acked for p in r.describe().partitions) == ORDERS - 1, timeout=30)

        deliveries = [e for w in workers for e in list(w.events) if "order" in e]
        by_order: dict[str, list[int]] = {}
        for e in deliveries:
            by_order.setdefault(e["order"], []).append(e["delivery"])
        assert all(sorted(by_order[o]) == [1, 2, 3] for o in FLAKY)  # failed twice, then done
        assert sorted(by_order[MALFORMED]) == [1, 2, 3]  # dead-lettered at max_deliveries
        assert sorted(by_order[HOLD]) == [1, 2]  # the killed worker's lease expired, another finished
        finisher = next(w for w in workers for e in w.events if e.get("done") == HOLD)
        assert finisher is not holder

        with Consumer(address) as c:
            c.assign("orders.dlq")
            letters = list(c.records(exit_at_end=True))
            assert [json.loads(r.value)["id"] for r in letters] == [MALFORMED]
            assert dict(letters[0].headers)["streamd-dlq-reason"].startswith(b"ValueError")
            c.assign("emails")
            emails = [r.key.decode() for r in c.records(exit_at_end=True)]
        assert sorted(emails) == sorted(expected)  # one email per order, the retried one too

        seen = set()
        for record in analytics.records(idle_timeout_s=5):
            seen.add(json.loads(record.value)["id"])
            if len(seen) == ORDERS:
                break
        assert len(seen) == ORDERS  # the stream group sees every order event
    finally:
        analytics.close()
        for w in workers:
            w.stop(signal.SIGKILL)
