"""Traffic smoothing (the flash-sale case): producers burst at about ten times the
rate the workers process; the backlog grows instead of producers waiting on workers,
then drains at the workers' pace; nothing is lost, and a record is processed twice
only when it was delivered twice (the at-least-once contract)."""

from __future__ import annotations

import threading
import time
from collections import Counter

from streamd.client import Admin, Producer
from streamd.client.queue import QueueReceiver

BURST = 2000


def test_a_burst_becomes_a_backlog_that_drains_at_the_workers_pace(server):
    address = server.address
    with Admin(address) as admin:
        admin.create_topic("checkout", 2)
    processed: Counter = Counter()
    redelivered: set[bytes] = set()
    lock = threading.Lock()

    def handler(msg) -> None:
        time.sleep(0.002)  # ~500 records/s per worker
        with lock:
            processed[msg.value] += 1
            if msg.delivery_count > 1:
                redelivered.add(msg.value)

    with QueueReceiver("fulfilment", "checkout", address, create={"lease_ms": 30_000}, max_records=20) as r:
        stop = threading.Event()
        pool = threading.Thread(target=r.process, args=(handler,), kwargs={"workers": 2, "stop": stop})
        pool.start()
        try:
            with Producer(address, linger_ms=1) as p:
                futures = [p.send("checkout", f"order-{i}".encode()) for i in range(BURST)]
                for f in futures:
                    f.result(30)  # every producer is answered while the workers lag behind
            backlog_after_burst = sum(x.backlog + x.in_flight for x in r.describe().partitions)
            deadline = time.monotonic() + 60
            while sum(x.acked for x in r.describe().partitions) < BURST and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            pool.join(30)
        parts = r.describe().partitions
    assert backlog_after_burst > BURST // 4  # the burst was absorbed as backlog
    assert sum(x.acked for x in parts) == BURST and all(x.backlog == 0 for x in parts)
    assert set(processed) == {f"order-{i}".encode() for i in range(BURST)}  # nothing lost
    assert {v for v, n in processed.items() if n > 1} <= redelivered  # duplicates only on redelivery
