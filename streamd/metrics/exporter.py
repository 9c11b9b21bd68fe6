"""``/metrics`` over HTTP: a registry per broker and prometheus_client's WSGI app.

Never the global default registry: tests run several brokers in one process. The
registry holds the broker's ``StreamdCollector`` and prometheus_client's process,
platform and GC collectors (``process_resident_memory_bytes``, ``python_info``, ...).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, make_wsgi_app

from streamd.addresses import split_address

from .collector import StreamdCollector
from .snapshot import Sources

log = logging.getLogger("streamd.metrics")


def parse_listen(listen: str) -> tuple[str, int]:
    """``metrics_listen`` -> (host, port); ValueError otherwise."""
    try:
        return split_address(listen)
    except ValueError:
        raise ValueError(f"metrics_listen must be HOST:PORT (or empty to disable), not {listen!r}") from None


class MetricsExporter:
    def __init__(self, sources: Sources, loop: asyncio.AbstractEventLoop) -> None:
        self.registry = CollectorRegistry()
        self.collector = StreamdCollector(sources, loop)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, listen: str) -> int:
        """Serve ``/metrics`` on ``listen``; returns the bound port. (prometheus_client's
        ``start_http_server`` polls for shutdown every 0.5 s; this server every 50 ms,
        so a stop does not wait.)"""
        host, port = parse_listen(listen)
        server_class = _IPv6Server if ":" in host else _Server
        httpd = self._httpd = make_server(host, port, make_wsgi_app(self.registry), server_class,
                                          handler_class=_QuietHandler)
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="streamd-metrics", daemon=True)
        self._thread.start()
        bound = httpd.server_port
        log.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", bound)
        return bound

    def stop(self) -> None:
        """Stop serving (blocks up to the server's 50 ms poll: call it off the loop)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._httpd = self._thread = None


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # scrapes are not worth a log line each
        pass
