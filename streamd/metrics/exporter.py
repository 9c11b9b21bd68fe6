"""``/metrics`` over HTTP: a registry per broker and prometheus_client's own server.

Never the global default registry: tests run several brokers in one process. The
registry holds the broker's ``StreamdCollector`` and prometheus_client's process,
platform and GC collectors (``process_resident_memory_bytes``, ``python_info``, ...).
"""

from __future__ import annotations

import asyncio
import logging
import threading

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server

from .collector import StreamdCollector
from .snapshot import Sources

log = logging.getLogger("streamd.metrics")


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) -> (host, port); ValueError otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics_listen must be HOST:PORT (or empty to disable), not {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsExporter:
    def __init__(self, sources: Sources, loop: asyncio.AbstractEventLoop) -> None:
        self.registry = CollectorRegistry()
        self.collector = StreamdCollector(sources, loop)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._httpd = None
        self._thread: threading.Thread | None = None

    def start(self, listen: str) -> int:
        """Serve ``/metrics`` on ``listen``; returns the bound port."""
        host, port = parse_listen(listen)
        self._httpd, self._thread = start_http_server(port, host, registry=self.registry)
        bound = self._httpd.server_port
        log.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", bound)
        return bound

    def stop(self) -> None:
        """Stop serving (blocks up to the server's 0.5 s poll: call it off the loop)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._httpd = self._thread = None
