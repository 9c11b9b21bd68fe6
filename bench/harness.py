"""Benchmark harness: driver interface, timing helpers, server processes, JSON assembly.

A *driver* is one system under test (streamd or a peer).  See bench/README.md
for the contract; :class:`Driver` below is the reference.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MB = 1_000_000  # MB/s in the results is payload bytes / 10**6 per second


# --------------------------------------------------------------------------- errors


class Skip(Exception):
    """Raised by a driver factory or ``setup()`` when the system cannot run here
    (binary missing and not installable, ...).  The harness reports
    ``{"status": "skipped", "reason": str(exc)}`` and carries on."""


class Unsupported(Exception):
    """Raised by a workload method the system has no sensible equivalent for.
    The harness reports that workload as ``{"status": "unsupported"}``."""


# --------------------------------------------------------------------------- driver


class Driver:
    """Base class / contract for a system under test.

    Every workload method is synchronous (run your own event loop inside if the
    client is asyncio), bounded by both its count argument and ``max_seconds``,
    and returns a flat dict of plain numbers.  Untimed preparation (creating a
    fresh stream, pre-filling data for ``consume``) and cleanup (deleting it)
    happen inside the method but outside the timed region.
    """

    name = "driver"

    def setup(self) -> None:
        """Start the server (use :class:`ServerProcess`) and connect.  Raise
        :class:`Skip` if the system cannot run on this machine."""

    def teardown(self) -> None:
        """Disconnect and stop the server.  Must be safe after a failed or
        partial ``setup()`` and safe to call twice."""

    def info(self) -> dict[str, Any]:
        """Version and configuration of the server as run (goes into the JSON)."""
        return {}

    def produce(self, record_bytes: int, batch: int, n: int, max_seconds: float) -> dict[str, float]:
        """Write ``n`` records of ``record_bytes`` payload, ``batch`` records per
        request / outstanding window (batch 1 = one record per round trip).
        Return at least ``records``, ``seconds`` (use :func:`throughput`)."""
        raise Unsupported

    def consume(self, n: int, record_bytes: int, max_seconds: float) -> dict[str, float]:
        """Pre-fill (untimed) one stream/partition with ``n`` records, then read
        them all back (with acks where the system has them), timed.
        Return at least ``records``, ``seconds`` (use :func:`throughput`)."""
        raise Unsupported

    def latency(self, rate: float, seconds: float, record_bytes: int) -> dict[str, float]:
        """Produce at ``rate`` records/s for ``seconds`` on a deadline schedule
        (use :class:`Pacer`), send time stamped in the value; a concurrent
        blocking consumer records receive time - send time.  Return at least
        ``p50_ms``, ``p99_ms`` (use :func:`latency_summary`)."""
        raise Unsupported

    def produce_acked(self, n: int, record_bytes: int, max_seconds: float) -> dict[str, float]:
        """Send ``n`` records one at a time, each waiting for its ack before the
        next.  Return at least ``records``, ``seconds`` (use :func:`throughput`)."""
        raise Unsupported


def require(client_module: str, pip_spec: str, binary: str) -> tuple[str, str]:
    """The path and version of a peer's server binary, installing it if need be, after
    checking its Python client imports; :class:`Skip` when either is missing."""
    import importlib

    from bench import install

    try:
        importlib.import_module(client_module)
    except ImportError as e:
        raise Skip(f"{client_module} not installed ({e}); pip install '{pip_spec}'") from e
    try:
        path = install.ensure(binary)
    except install.InstallError as e:
        raise Skip(f"{binary} unavailable: {e}") from e
    return path, install.version(path)


# --------------------------------------------------------------------------- timing helpers


now = time.perf_counter


def emit(doc: dict, out: str | None) -> None:
    """Print a benchmark's JSON document, and write it to ``out`` when given."""
    text = json.dumps(doc, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def throughput(records: int, seconds: float, record_bytes: int | None = None, **extra: float) -> dict[str, float]:
    """Standard result dict for a throughput workload."""
    seconds = max(seconds, 1e-9)
    out: dict[str, float] = {
        "records": records,
        "seconds": round(seconds, 6),
        "records_per_s": round(records / seconds, 1),
    }
    if record_bytes is not None:
        out["mb_per_s"] = round(records * record_bytes / seconds / MB, 3)
    out.update(extra)
    return out


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list (p in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def latency_summary(latencies_ns: list[int], sent: int, seconds: float, **extra: float) -> dict[str, float]:
    """Standard result dict for the latency workload from raw samples in ns."""
    lat = sorted(x / 1e6 for x in latencies_ns)
    out: dict[str, float] = {
        "sent": sent,
        "received": len(lat),
        "achieved_rate": round(sent / max(seconds, 1e-9), 1),
        "p50_ms": round(percentile(lat, 50), 4),
        "p90_ms": round(percentile(lat, 90), 4),
        "p99_ms": round(percentile(lat, 99), 4),
        "max_ms": round(lat[-1], 4) if lat else float("nan"),
    }
    out.update(extra)
    return out


class Pacer:
    """Deadline schedule: record i is due at start + i/rate.  Never drifts:
    if we fall behind, records are sent immediately until we catch up.

        pacer = Pacer(rate, seconds)
        while (i := pacer.next()) is not None:   # sleeps until due
            send(i)

    For asyncio use ``await pacer.anext()``.
    """

    def __init__(self, rate: float, seconds: float) -> None:
        self.rate = float(rate)
        self.total = int(rate * seconds)
        self.i = 0
        self.start = now()

    def _due(self) -> float:
        return self.start + self.i / self.rate

    def next(self) -> int | None:
        if self.i >= self.total:
            return None
        delay = self._due() - now()
        if delay > 0:
            time.sleep(delay)
        i, self.i = self.i, self.i + 1
        return i

    async def anext(self) -> int | None:
        import asyncio

        if self.i >= self.total:
            return None
        delay = self._due() - now()
        if delay > 0:
            await asyncio.sleep(delay)
        i, self.i = self.i, self.i + 1
        return i

    def elapsed(self) -> float:
        return now() - self.start


def stamp(record_bytes: int) -> bytes:
    """Value carrying the send time (perf_counter_ns, 20 ASCII digits) padded to record_bytes."""
    s = b"%020d" % time.perf_counter_ns()
    return s + b"x" * max(0, record_bytes - len(s))


def stamp_age_ns(value: bytes) -> int:
    """Receive time minus the send time stamped by :func:`stamp`, in ns."""
    return time.perf_counter_ns() - int(value[:20])


def payload(record_bytes: int) -> bytes:
    """Incompressible payload (so compression cannot flatter anyone)."""
    return os.urandom(record_bytes)


# --------------------------------------------------------------------------- processes


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# CPU placement (``--pin``): None = let the scheduler decide (default).  When
# set, servers started by ServerProcess get SERVER_CPUS (inherited by all their
# threads) and the benchmark process is put on CLIENT_CPUS.
SERVER_CPUS: set[int] | None = None
CLIENT_CPUS: set[int] | None = None


def pin(client_cpus: set[int], server_cpus: set[int]) -> None:
    global SERVER_CPUS, CLIENT_CPUS
    CLIENT_CPUS, SERVER_CPUS = set(client_cpus), set(server_cpus)
    os.sched_setaffinity(0, CLIENT_CPUS)


def _server_preexec() -> None:  # runs in the child before exec (Linux)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM the server if we die
    except Exception:
        pass
    if SERVER_CPUS:
        os.sched_setaffinity(0, SERVER_CPUS)


_live: set[ServerProcess] = set()


class ServerProcess:
    """A server subprocess listening on 127.0.0.1:``port``.

        with ServerProcess("redis", argv, port, log_path) as srv:  # started, accepting
            ...
        # stopped (SIGTERM, then SIGKILL after ``stop_timeout``), even on error

    ``start()`` / ``stop()`` can also be called explicitly; ``stop()`` is
    idempotent.  Servers left running at interpreter exit are stopped by an
    atexit hook, and on Linux they get SIGTERM if this process dies.
    """

    def __init__(self, name: str, argv: list[str], port: int, log_path: str,
                 host: str = "127.0.0.1", start_timeout: float = 15.0, stop_timeout: float = 5.0,
                 cwd: str | None = None, env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.port, self.host = name, argv, port, host
        self.log_path, self.cwd, self.env = log_path, cwd, env
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.proc: subprocess.Popen | None = None
        self._log = None

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return " | ".join(f.read().decode(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def start(self) -> ServerProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.cwd, env=self.env, preexec_fn=_server_preexec if sys.platform == "linux" else None,
        )
        _live.add(self)
        try:
            wait_accepting(self.host, self.port, self.start_timeout, self.proc)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {e}; log: {self.log_tail()}") from e
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(self.stop_timeout)
            except ProcessLookupError:
                pass
        elif proc is not None:
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        _live.discard(self)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    for srv in list(_live):
        srv.stop()


def wait_accepting(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until a TCP connect to host:port succeeds; fail if ``proc`` exits or on timeout."""
    deadline = now() + timeout
    last: Exception | None = None
    while now() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as e:
            last = e
            time.sleep(0.02)
    raise TimeoutError(f"{host}:{port} not accepting after {timeout:.0f}s ({last})")


def start_server(name: str, make_argv: Callable[[int], list[str]], log_path: str,
                 attempts: int = 3, **kw: Any) -> ServerProcess:
    """Start a server on a free port, retrying with a new port if it fails to
    bind (the free-port probe is racy).  ``make_argv(port)`` builds the command."""
    err: Exception | None = None
    for _ in range(attempts):
        port = free_port()
        srv = ServerProcess(name, make_argv(port), port, log_path, **kw)
        try:
            return srv.start()
        except RuntimeError as e:
            err = e
    raise RuntimeError(str(err))


# --------------------------------------------------------------------------- plan & run


@dataclass(frozen=True)
class Workload:
    key: str        # JSON key, e.g. "produce/100B/b100"
    method: str     # driver method name
    kwargs: dict


@dataclass
class Plan:
    workloads: list[Workload]
    repeat: int
    params: dict = field(default_factory=dict)


def make_plan(quick: bool, repeat: int | None) -> Plan:
    if quick:
        n_b1, n_big, n_consume, lat_s, n_acked, cap = 1_000, 10_000, 10_000, 2.0, 1_000, 10.0
    else:
        n_b1, n_big, n_consume, lat_s, n_acked, cap = 10_000, 100_000, 100_000, 5.0, 10_000, 30.0
    rate = 2_000
    wl: list[Workload] = []
    for size, label in ((100, "100B"), (1024, "1KiB")):
        for batch in (1, 100, 1000):
            n = n_b1 if batch == 1 else n_big
            wl.append(Workload(f"produce/{label}/b{batch}", "produce",
                               dict(record_bytes=size, batch=batch, n=n, max_seconds=cap)))
    wl.append(Workload("consume", "consume", dict(n=n_consume, record_bytes=100, max_seconds=cap)))
    wl.append(Workload("produce_acked", "produce_acked", dict(n=n_acked, record_bytes=100, max_seconds=cap)))
    # latency last: its sleep-paced loop tends to leave the scheduler co-locating
    # client and server on one core, which changes later ping-pong rates (see README)
    wl.append(Workload("latency", "latency", dict(rate=rate, seconds=lat_s, record_bytes=100)))
    return Plan(wl, repeat if repeat is not None else (1 if quick else 5),
                params={"quick": quick, "max_seconds_per_run": cap})


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median_of(samples: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in samples[0] if all(isinstance(s.get(k), (int, float)) for s in samples)]
    out = {}
    for k in keys:
        vals = [float(s[k]) for s in samples if not math.isnan(float(s[k]))]
        out[k] = round(statistics.median(vals), 4) if vals else float("nan")
    return out


def run_system(name: str, factory: Callable[[], Driver], plan: Plan) -> dict[str, Any]:
    """Set up one system, run every workload ``plan.repeat`` times, tear down."""
    t0 = now()
    try:
        driver = factory()
    except Skip as e:
        log(f"{name}: skipped: {e}")
        return {"status": "skipped", "reason": str(e)}
    result: dict[str, Any] = {"status": "ok"}
    try:
        try:
            driver.setup()
        except Skip as e:
            log(f"{name}: skipped: {e}")
            return {"status": "skipped", "reason": str(e)}
        except Exception as e:
            log(f"{name}: setup failed: {e!r}")
            return {"status": "error", "reason": f"setup failed: {e!r}"}
        try:
            result["info"] = driver.info()
        except Exception as e:  # informational only
            result["info"] = {"error": repr(e)}
        workloads: dict[str, Any] = {}
        for w in plan.workloads:
            samples: list[dict[str, float]] = []
            try:
                for r in range(plan.repeat):
                    s = getattr(driver, w.method)(**w.kwargs)
                    samples.append(s)
                    log(f"{name} {w.key} [{r + 1}/{plan.repeat}] {_brief(s)}")
            except Unsupported:
                workloads[w.key] = {"status": "unsupported"}
                continue
            except Exception as e:
                log(f"{name} {w.key}: error {e!r}")
                workloads[w.key] = {"status": "error", "reason": repr(e)}
                if samples:
                    workloads[w.key]["partial_median"] = median_of(samples)
                continue
            workloads[w.key] = {"median": median_of(samples), "runs": len(samples),
                                "samples": [_headline(s) for s in samples]}
        result["workloads"] = workloads
    finally:
        try:
            driver.teardown()
        except Exception as e:  # never mask the results because stop failed
            log(f"{name}: teardown error {e!r}")
            result["teardown_error"] = repr(e)
    result["wall_seconds"] = round(now() - t0, 1)
    return result


THROUGHPUT_KEYS = ("records_per_s", "mb_per_s")
LATENCY_KEYS = ("p50_ms", "p99_ms")


def _headline(s: dict[str, float]) -> float | None:
    for k in ("records_per_s", "p99_ms"):
        if k in s:
            return s[k]
    return None


def _brief(s: dict[str, float]) -> str:
    keys = ("records_per_s", "mb_per_s", "p50_ms", "p99_ms", "received")
    return " ".join(f"{k}={s[k]}" for k in keys if k in s)


def ratios(systems: dict[str, Any], subject: str = "streamd") -> dict[str, Any]:
    """streamd / peer for throughputs, peer / streamd for latencies: > 1 means streamd is better."""
    me = systems.get(subject, {})
    if me.get("status") != "ok":
        return {}
    out: dict[str, Any] = {}
    for peer, res in systems.items():
        if peer == subject or res.get("status") != "ok":
            continue
        per: dict[str, Any] = {}
        for key, mine in me.get("workloads", {}).items():
            theirs = res.get("workloads", {}).get(key, {})
            if "median" not in mine or "median" not in theirs:
                continue
            r: dict[str, float] = {}
            for k in THROUGHPUT_KEYS:
                a, b = mine["median"].get(k), theirs["median"].get(k)
                if a is not None and b:
                    r[k] = round(a / b, 3)
            for k in LATENCY_KEYS:
                a, b = mine["median"].get(k), theirs["median"].get(k)
                if a and b is not None:
                    r[k] = round(b / a, 3)
            if r:
                per[key] = r
        out[f"{subject}_vs_{peer}"] = per
    return out


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "cpu_model": cpu,
            "pinning": ({"client_cpus": sorted(CLIENT_CPUS), "server_cpus": sorted(SERVER_CPUS)}
                        if SERVER_CPUS else "none (scheduler decides)")}
