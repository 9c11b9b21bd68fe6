"""Shared fixtures: a real broker on 127.0.0.1 (in-process, ``streamd.testing.RunningServer``,
or as a subprocess, ``ServerProcess``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

# Re-exported: tests import RunningServer from here as well as from streamd.testing.
from streamd.testing import RunningServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(tmp_path):
    with RunningServer(tmp_path / "data") as running:
        yield running


@pytest.fixture
def make_server(tmp_path):
    """Start (and always stop) servers with custom config on a shared data dir."""
    started: list[RunningServer] = []

    def start(**overrides) -> RunningServer:
        running = RunningServer(overrides.pop("data_dir", tmp_path / "data"), **overrides)
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``streamd serve`` as a child process (for crash and CLI smoke tests);
    ``command``: another launcher taking the same flags (tests/crash/crash_broker.py)."""

    def __init__(self, data_dir: Path, *extra: str, env: dict | None = None,
                 command: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.env = env
        self.command = command or [sys.executable, "-m", "streamd", "serve"]
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self, timeout: float = 30) -> ServerProcess:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        cmd = [*self.command, "--data-dir", str(self.data_dir),
               "--listen", self.address, "--metrics-listen", "127.0.0.1:0", *self.extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        self.log_path = self.data_dir.parent / f"server-{port}.log"
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        channel = grpc.insecure_channel(self.address)
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            self.kill()
            raise RuntimeError(f"server did not start: {self.log_path.read_text()}") from None
        finally:
            channel.close()
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close_log()

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def same_port(monkeypatch):
    """Every broker the test starts with ``server_process`` listens on one port, so
    clients connected to the first find the ones restarted after it."""
    port = free_port()
    monkeypatch.setattr(sys.modules[__name__], "free_port", lambda: port)
    return port


@pytest.fixture
def server_process(tmp_path):
    procs: list[ServerProcess] = []

    def start(*extra: str, data_dir: Path | None = None, env: dict | None = None,
              command: list[str] | None = None) -> ServerProcess:
        proc = ServerProcess(data_dir or tmp_path / "data", *extra, env=env, command=command).start()
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()


def bounded(timeout_s: float, fn, *args, what: str = ""):
    """``fn(*args)`` in a daemon thread that must end within ``timeout_s`` (a wedged
    call cannot be cancelled, so the test must not wait on it in its own thread); its
    result, or its exception raised here."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # re-raised below, in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"{what or getattr(fn, '__name__', fn)} did not return within {timeout_s} s"
    if "error" in box:
        raise box["error"]
    return box.get("result")


def wait_until(predicate, timeout: float = 10, interval: float = 0.02):
    """Poll ``predicate`` (bounded in time); return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture
def small_fs(tmp_path):
    """Mount small real filesystems (see tests/fs.py): ``small_fs(64 << 20, kind="ext4")``
    returns a directory on one; all are unmounted when the test ends."""
    import contextlib

    from tests.fs import small_filesystem

    with contextlib.ExitStack() as stack:
        count = 0

        def mount(size_bytes: int, *, kind: str = "tmpfs") -> Path:
            nonlocal count
            count += 1
            return stack.enter_context(small_filesystem(tmp_path / f"fs{count}", size_bytes, kind=kind))

        yield mount
