"""A process committing offsets is SIGKILLed at random points (twice per test, on the
same directory): after recovery, every key holds at least its last acknowledged offset."""

from __future__ import annotations

import asyncio
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from consumer_groups.offsets import OffsetStore
from streamd.testing import FakeClock

ROOT = Path(__file__).resolve().parents[2]
COMMITTERS = 4

# Each committer owns two keys and commits ever larger offsets for both at once,
# continuing from what a previous run left; a line "<committer> <offset>" is printed
# only after the commit is acknowledged (durable). A small compact_bytes makes kills
# land during compactions too.
CHILD = """
import asyncio, sys
from pathlib import Path
from consumer_groups.offsets import OffsetStore
from streamd.clock import SystemClock

def keys(i):
    return [("t", i), ("u", i)]

async def committer(store, i):
    start = max((c.offset for c in store.offsets(f"g{i}").values()), default=0)
    for n in range(start + 1, start + 10**6):
        await store.commit(f"g{i}", {key: (n, "m" * (n % 50)) for key in keys(i)})
        print(i, n, flush=True)

async def main():
    store = OffsetStore(Path(sys.argv[1]), clock=SystemClock(), compact_bytes=4096)
    await asyncio.gather(*(committer(store, i) for i in range(int(sys.argv[2]))))

asyncio.run(main())
"""


def run_until_killed(script: Path, directory: Path, acks_wanted: int, stderr_path: Path) -> dict[int, int]:
    """Start the committer, SIGKILL it after ``acks_wanted`` acknowledgements; the last
    acknowledged offset of every committer (including lines printed before the kill)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(script), str(directory), str(COMMITTERS)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr)
    output = b""
    try:
        deadline = time.monotonic() + 30
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while output.count(b"\n") < acks_wanted and time.monotonic() < deadline:
                if selector.select(timeout=max(deadline - time.monotonic(), 0)):
                    chunk = os.read(proc.stdout.fileno(), 1 << 16)
                    if not chunk:
                        break  # the child exited on its own
                    output += chunk
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        output += proc.stdout.read()  # acknowledged before the kill landed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
    lines = output.split(b"\n")[:-1]  # the last piece is empty or a torn line
    assert len(lines) >= acks_wanted, stderr_path.read_text()
    acked: dict[int, int] = {}
    for line in lines:
        committer, offset = map(int, line.split())
        assert offset > acked.get(committer, 0)  # acknowledged in order, per committer
        acked[committer] = offset
    return acked


@pytest.mark.parametrize("seed", range(3))
def test_acknowledged_commits_survive_sigkill(tmp_path, seed):
    rng = random.Random(seed)
    script = tmp_path / "committer.py"
    script.write_text(CHILD)
    directory = tmp_path / "offsets"
    for round_ in range(2):
        acked = run_until_killed(script, directory, rng.randint(20, 1500), tmp_path / f"stderr-{round_}")
        store = OffsetStore(directory, clock=FakeClock())
        try:
            for committer, offset in acked.items():
                for topic in ("t", "u"):
                    recovered = store.get(f"g{committer}", topic, committer)
                    assert recovered is not None and recovered.offset >= offset, (committer, topic, recovered)
        finally:
            asyncio.run(store.close())
