"""Profiling the broker during a queue-group run (``python -m bench.queues --profile DIR``).

``Sampler`` attaches ``py-spy record`` (a sampling profiler in its own process: the
broker is not restarted or instrumented; ``pip install py-spy``) to the broker's pid
with ``--idle --threads --format raw`` and stops it with SIGINT when the run is over;
the collapsed stacks land in ``DIR/broker.folded`` (open them with speedscope or
``flamegraph.pl``). ``summarize`` reads that file:

- per thread: samples, the share spent idle (leaf in ``select``/``wait``) and the share
  in native code that py-spy cannot split (gRPC's poller thread);
- the event-loop thread (MainThread, where every queue-group state change, protobuf
  encode/decode of the queue RPCs and JSON journal encoding happen): each named
  ``BUCKETS`` function's inclusive share of its *busy* samples (idle epoll waits left
  out), the top functions by self time and the top source lines by self time;
- the I/O threads (``streamd-io_*``: journal write + fsync, log reads): their busy
  samples and where.

Shares are of samples, so of wall time on that thread, not of CPU time.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import time

RATE_HZ = 250
ATTACH_S = 1.0  # py-spy needs a moment to attach before the run starts
#: Leaf frames of a thread waiting (py-spy --idle samples them too).
IDLE_LEAVES = ("EpollSelector.select (", "Condition.wait (", "_worker (concurrent/futures/thread.py")
#: A leaf that is a thread's entry point: the thread is in native code (gRPC's poller),
#: busy or waiting, which py-spy cannot tell apart without --native.
NATIVE_LEAVES = ("Thread.run (threading.py",)
#: Functions whose inclusive time is reported (name as py-spy prints it, file suffix).
BUCKETS = (
    ("receive: QueueService.Receive", "QueueService.Receive", "queue_service.py"),
    ("receive: engine (_lease_round)", "QueueEngine._lease_round", "queue/engine.py"),
    ("receive: admission (_fill: log read, decode, admit, cache)", "QueueEngine._fill", "queue/engine.py"),
    ("receive: admission / PartitionQueue.admit", "PartitionQueue.admit", "queue/window.py"),
    ("receive: admission / _Cache.put (ByteSize per record)", "_Cache.put", "queue/engine.py"),
    ("receive: admission / Broker.read", "Broker.read", "broker.py"),
    ("receive: PartitionQueue.lease", "PartitionQueue.lease", "queue/window.py"),
    ("receive: PartitionQueue.expire", "PartitionQueue.expire", "queue/window.py"),
    ("receive: journal 'dlv' (QueueStore.delivered)", "QueueStore.delivered", "queue/store.py"),
    ("receive: LeasedRecord response (queue_service._fill)", "_fill", "queue_service.py"),
    ("settle: QueueService.Settle", "QueueService.Settle", "queue_service.py"),
    ("settle: engine (QueueEngine.settle)", "QueueEngine.settle", "queue/engine.py"),
    ("settle: _settle_one", "QueueEngine._settle_one", "queue/engine.py"),
    ("settle: PartitionQueue.ack", "PartitionQueue.ack", "queue/window.py"),
    ("settle: _Cache.drop (ByteSize per record)", "_Cache.drop", "queue/engine.py"),
    ("settle: journal 'set' (QueueStore.settled)", "QueueStore.settled", "queue/store.py"),
    ("ack: QueueService.Ack (one RPC per record)", "QueueService.Ack", "queue_service.py"),
    ("journal: Journal.write (queue an op)", "Journal.write", "journal.py"),
    ("journal: encode_frame (json.dumps + crc32)", "encode_frame", "journal.py"),
    ("journal: flusher on the loop (_flush_pending)", "Journal._flush_pending", "journal.py"),
    ("journal: compaction snapshot on the loop (Journal._compact)", "Journal._compact", "journal.py"),
    ("grpc: request parse (handlers._parser.parse)", "_parser.<locals>.parse", "handlers.py"),
    ("grpc: response serialize (handlers._serialize)", "_serialize", "handlers.py"),
    ("asyncio: run_in_executor (journal flushes, log reads)", "BaseEventLoop.run_in_executor", "base_events.py"),
    ("asyncio: Handle._run (all callbacks and tasks)", "Handle._run", "asyncio/events.py"),
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    candidate = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return candidate if os.access(candidate, os.X_OK) else shutil.which("py-spy")


class Sampler:
    """``with Sampler(pid, path):`` samples ``pid`` while the block runs."""

    def __init__(self, pid: int, path: str) -> None:
        self.pid, self.path = pid, path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Sampler:
        binary = py_spy()
        if binary is None:
            raise RuntimeError("py-spy not found: pip install py-spy")
        self._err = open(self.path + ".log", "wb")
        self.proc = subprocess.Popen(
            [binary, "record", "--pid", str(self.pid), "--rate", str(RATE_HZ), "--idle", "--threads",
             "--format", "raw", "--output", self.path],
            stdin=subprocess.DEVNULL, stdout=self._err, stderr=subprocess.STDOUT)
        time.sleep(ATTACH_S)
        if self.proc.poll() is not None:
            self._err.close()
            raise RuntimeError(f"py-spy exited {self.proc.returncode}: see {self.path}.log")
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        finally:
            self._err.close()


def _parse(frame: str) -> tuple[str, str, str]:
    m = _FRAME.match(frame)
    if m is None:
        return frame, "", ""
    return m["func"], m["file"], m["line"] or ""


def _idle(leaf: str) -> bool:
    return leaf.startswith(IDLE_LEAVES)


def summarize(path: str, *, top: int = 15) -> dict:
    """The hotspots of a ``broker.folded`` file; see the module docstring."""
    threads: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])  # name -> [samples, idle, native]
    busy_main = 0
    inclusive: collections.Counter = collections.Counter()
    self_fn: collections.Counter = collections.Counter()
    self_line: collections.Counter = collections.Counter()
    io_leaf: collections.Counter = collections.Counter()
    with open(path) as f:
        for raw in f:
            stack, _, count = raw.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            thread = re.sub(r"^thread \(\d+\): ", "", frames[0])
            thread = re.sub(r"_\d+$", "_*", thread)
            leaf = frames[-1]
            idle = _idle(leaf)
            native = leaf.startswith(NATIVE_LEAVES)
            threads[thread][0] += n
            threads[thread][1] += n if idle else 0
            threads[thread][2] += n if native else 0
            if idle or native:
                continue
            if thread != "MainThread":
                func, file, _ = _parse(leaf)
                io_leaf[f"{thread}: {func} ({file})"] += n
                continue
            busy_main += n
            parsed = [_parse(fr) for fr in frames[1:]]
            for func, file in {(fn, fl) for fn, fl, _ in parsed}:
                inclusive[(func, file)] += n
            func, file, line = parsed[-1]
            self_fn[f"{func} ({file})"] += n
            self_line[f"{func} ({file}:{line})"] += n

    def pct(n: int, of: int) -> float:
        return round(100.0 * n / of, 1) if of else 0.0

    buckets = {}
    for label, func, file in BUCKETS:
        n = sum(c for (fn, fl), c in inclusive.items() if fn == func and fl.endswith(file))
        buckets[label] = pct(n, busy_main)
    return {
        "rate_hz": RATE_HZ,
        "threads": {t: {"samples": s, "idle_pct": pct(i, s), "native_pct": pct(x, s)}
                    for t, (s, i, x) in sorted(threads.items())},
        "main_thread_busy_samples": busy_main,
        "main_thread_busy_pct_by_function_inclusive": buckets,
        "main_thread_top_self": [{"function": k, "pct": pct(v, busy_main)} for k, v in self_fn.most_common(top)],
        "main_thread_top_lines": [{"line": k, "pct": pct(v, busy_main)} for k, v in self_line.most_common(top)],
        "io_threads_busy": [{"where": k, "samples": v} for k, v in io_leaf.most_common(8)],
    }
