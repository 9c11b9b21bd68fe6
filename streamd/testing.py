"""Test helpers shipped with the library (as trio ships ``trio.testing``), for streamd's
own tests and for users who test their code against a real broker:

- ``FakeClock``: a clock that moves only when told to; hand it to a broker (or to
  ``RunningServer``) to drive leases, backoff and retention without sleeping;
- ``RunningServer``: a real broker in this process, on its own event-loop thread,
  listening on 127.0.0.1 on a free port::

      from streamd.client import Producer
      from streamd.testing import RunningServer

      def test_my_service(tmp_path):
          with RunningServer(tmp_path / "data") as server:
              with Producer(server.address) as producer:
                  producer.send("orders", b"...").result(10)

  It is the broker ``streamd serve`` runs (the same ``Server``, storage, groups and
  queues), not a fake; the SDK, the CLI (``--server``) and generated stubs in any
  language reach it at ``server.address``. It listens on loopback only and never on
  the fixed metrics port, so tests may run several at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from streamd.clock import Clock
from streamd.config import BrokerConfig
from streamd.server import Server

T = TypeVar("T")

#: Seconds ``RunningServer`` waits for the broker to start, and to stop.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> int:
        return self._now_ms

    def advance(self, ms: int) -> None:
        if ms < 0:
            raise ValueError("time does not go backwards")
        self._now_ms += ms


class RunningServer:
    """A ``streamd.server.Server`` on its own event-loop thread, started by the
    constructor (it returns once the broker listens) and stopped by ``stop()`` or on
    leaving a ``with`` block.

    ``data_dir``: where the broker keeps its data (a fresh directory per test; a second
    ``RunningServer`` on the same directory after ``stop()`` reopens what the first
    wrote, as a restarted broker does). ``clock``: the broker's clock (a ``FakeClock``
    to move time by hand). ``port``: a fixed port, so clients connected to a stopped
    broker find the one restarted after it (0: any free port). ``listen_host``: the
    interface to bind (clients always connect through 127.0.0.1). ``overrides``: any
    ``BrokerConfig`` field (``auth_file=...``, ``max_request_bytes=...``).

    Attributes: ``address`` ("127.0.0.1:PORT", for clients), ``config`` (the
    ``BrokerConfig``), ``server`` (the ``Server``) and ``loop`` (its event loop; use
    ``call`` to run code there). Not thread-safe: start and stop it from one thread.
    """

    def __init__(self, data_dir: Path, *, clock: Clock | None = None, port: int = 0,
                 listen_host: str = "127.0.0.1", **overrides: Any) -> None:
        overrides.setdefault("metrics_listen", "127.0.0.1:0")  # never the fixed default port
        self.config = BrokerConfig(data_dir=Path(data_dir), listen=f"{listen_host}:{port}", **overrides)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="streamd-testing-server", daemon=True)
        self.thread.start()
        try:
            self.server = Server(self.config, clock=clock)
            bound = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(START_TIMEOUT_S)
        except BaseException:
            # A broker that did not start leaves no loop thread behind.
            self._close_loop()
            raise
        self.address = f"127.0.0.1:{bound}"

    def call(self, coro_fn: Callable[[], Awaitable[T]], timeout: float = 30) -> T:
        """Run ``coro_fn()`` on the broker's event loop (where its state lives) and
        return its result; e.g. ``server.call(server.server.broker.apply_retention)``
        runs a retention pass now (with a ``FakeClock`` moved past the limit)."""
        async def go() -> T:
            return await coro_fn()

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(timeout)

    def stop(self) -> None:
        """Stop the broker gracefully (data flushed, partitions marked clean) and end its
        thread. Idempotent."""
        if self.loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(STOP_TIMEOUT_S)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
