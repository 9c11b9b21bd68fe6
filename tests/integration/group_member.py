"""A consumer-group member process for churn tests: prints one JSON line per
assignment and per processed record; SIGTERM makes it close cleanly (leave)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

from streamd.client import GroupConsumer


def main(address: str, group: str, topic: str, name: str) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out = sys.stdout

    def emit(obj) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    consumer = GroupConsumer(
        group, topic, address, client_id=name, session_timeout_ms=3000, auto_commit_interval_ms=100,
        on_assign=lambda tps: emit({"assign": sorted(p for _, p in tps), "ts": time.time()}),
        on_revoke=lambda tps: emit({"revoke": sorted(p for _, p in tps), "ts": time.time()}),
    )
    emit({"ready": name})
    try:
        for record in consumer.records(idle_timeout_s=0.05):
            emit({"r": [record.partition, record.offset]})
            if stop.is_set():
                break
        while not stop.is_set():  # idle: keep the membership, wait for more
            for record in consumer.records(idle_timeout_s=0.05):
                emit({"r": [record.partition, record.offset]})
                if stop.is_set():
                    break
    finally:
        emit({"closing": name, "ts": time.time()})  # no record is processed after this
        consumer.close()
        emit({"closed": name})


if __name__ == "__main__":
    main(*sys.argv[1:5])
