"""A queue worker process to be stopped by a signal (tests/integration/test_queue_stop.py).

    python -m tests.integration.stopping_worker ADDRESS sync|async GO_FILE QUICK [WORKERS MAX_RECORDS PACE_MS]

Runs ``QueueReceiver.process`` (WORKERS threads, default 2) or
``AsyncQueueReceiver.process`` (concurrency WORKERS) on queue group "stop" of topic
"jobs", on the main thread, with the SDK's default signal handling; each receive
takes up to MAX_RECORDS (default 4). The first QUICK handlers return at once (after
PACE_MS, default 0); the later ones wait until GO_FILE exists (at most a minute), so
the test can signal while they run. One JSON line per event on stdout: {"started": [p, o]}, {"done": [p, o]}, and
{"returned": n} when ``process`` returns. The SDK's log goes to stderr (INFO).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from pathlib import Path

from streamd.client.queue import AsyncQueueReceiver, QueueReceiver

WAIT_S = 60.0


def main(address: str, flavour: str, go_file: str, quick: int, workers: int = 2, max_records: int = 4,
         pace_ms: int = 0) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    lock = threading.Lock()
    count = 0
    go = Path(go_file)

    def emit(**event) -> None:
        with lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    def should_wait() -> bool:
        nonlocal count
        with lock:
            count += 1
            return count > quick

    def handle(msg) -> None:
        emit(started=[msg.partition, msg.offset])
        time.sleep(pace_ms / 1000)
        if should_wait():
            deadline = time.monotonic() + WAIT_S
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        emit(done=[msg.partition, msg.offset])

    async def handle_async(msg) -> None:
        emit(started=[msg.partition, msg.offset])
        await asyncio.sleep(pace_ms / 1000)
        if should_wait():
            deadline = time.monotonic() + WAIT_S
            while not go.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        emit(done=[msg.partition, msg.offset])

    if flavour == "sync":
        with QueueReceiver("stop", "jobs", address, max_records=max_records, max_wait_ms=200) as receiver:
            handled = receiver.process(handle, workers=workers, stop_grace_s=30)
    else:
        async def run() -> int:
            async with AsyncQueueReceiver("stop", "jobs", address, max_records=max_records) as receiver:
                return await receiver.process(handle_async, concurrency=workers, stop_grace_s=30)

        handled = asyncio.run(run())
    emit(returned=handled)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:]))
