"""The one place that wires configuration, broker, gRPC services and health.

``Server`` owns the lifecycle: open the broker (lock + recovery) -> serve -> stop.

A graceful stop (SIGTERM or SIGINT), in order:

1. health reports NOT_SERVING for the server and every service;
2. every new streamd RPC is refused with UNAVAILABLE / ``BROKER_UNAVAILABLE``
   (health checks and reflection are still answered);
3. long polls (Fetch, Receive) answer at once with what they have, long-lived
   streams (Subscribe, ProduceStream, ReceiveStream, JoinGroup) end with
   UNAVAILABLE, and the RPCs in flight finish, a produce awaiting its fsync
   included; the broker waits for them, and for ``shutdown_drain_s``, at most
   ``shutdown_grace_s`` from the signal (a second signal stops waiting);
4. the listener closes, RPCs still running are cancelled;
5. queue state, logs and offsets are flushed and closed cleanly (each partition
   marked clean), so the next start recovers nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from consumer_groups.coordinator import Coordinator
from consumer_groups.expiry import expire_groups
from consumer_groups.offsets import OffsetStore
from consumer_groups.queue.engine import TICK_MS, QueueEngine
from consumer_groups.queue.store import QueueStore
from streamd import __version__, logs
from streamd._malloc import tune_malloc
from streamd.addresses import is_loopback
from streamd.auth import Authority
from streamd.broker.broker import Broker
from streamd.broker.topic import TopicSettings
from streamd.clock import Clock, SystemClock
from streamd.config import BrokerConfig
from streamd.metrics.exporter import MetricsExporter
from streamd.metrics.instruments import FSYNC_BUCKETS_SECONDS, Histogram, Traffic
from streamd.metrics.rpc_metrics import RpcMetrics
from streamd.metrics.snapshot import Sources
from streamd.service.group_service import GroupService
from streamd.service.guard import Guard
from streamd.service.handlers import Admission, generic_handler
from streamd.service.log_service import REQUEST_VIEWS, LogService
from streamd.service.queue_service import QueueService
from streamd.service.topic_service import TopicService
from streamd.v1 import streamd_pb2 as pb

log = logging.getLogger("streamd.server")

SERVICES = [
    pb.DESCRIPTOR.services_by_name[name] for name in ("TopicService", "LogService", "GroupService", "QueueService")
]
GROUPS_DIR = "@groups"
QUEUES_DIR = "@queues"
GROUP_TICK_MS = 100


def topic_defaults(config: BrokerConfig) -> TopicSettings:
    """The broker-wide topic defaults: the config fields TopicSettings shares."""
    return TopicSettings(**{f.name: getattr(config, f.name) for f in dataclasses.fields(TopicSettings)})


@dataclasses.dataclass(frozen=True)
class ServerHooks:
    """Calls the server makes at points a test needs to act at; none in production
    (tests/crash/crash_broker.py injects one)."""

    #: After each produce request is appended and durable, before it is answered
    #: (``LogService``'s ``on_durable_append``).
    on_durable_append: Callable[[], None] | None = None


class Server:
    def __init__(self, config: BrokerConfig, *, clock: Clock | None = None, hooks: ServerHooks | None = None) -> None:
        self.config = config
        self.hooks = hooks or ServerHooks()
        self.executor = ThreadPoolExecutor(config.io_threads, thread_name_prefix="streamd-io")
        self.traffic = Traffic()
        self.fsync_seconds = Histogram(FSYNC_BUCKETS_SECONDS)
        self.broker = Broker(
            config.data_dir,
            defaults=topic_defaults(config),
            clock=clock or SystemClock(),
            executor=self.executor,
            index_interval_bytes=config.index_interval_bytes,
            max_topics=config.max_topics,
            max_partitions_per_topic=config.max_partitions_per_topic,
            on_fsync=self.fsync_seconds.observe,
        )
        self.clock = self.broker.clock
        self.store: OffsetStore | None = None
        self.queues: QueueEngine | None = None
        self.coordinator = Coordinator(
            clock=self.clock,
            partition_count=self._partition_count,
            max_groups=config.max_groups,
            max_members=config.max_group_members,
            default_session_timeout_ms=config.group_session_timeout_ms,
            default_rebalance_timeout_ms=config.group_rebalance_timeout_ms,
        )
        self.health = HealthServicer()
        self.admission = Admission()
        self.grpc: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics: MetricsExporter | None = None
        self.grpc_guard: Guard | None = None
        #: Where /metrics is served (None: metrics off).
        self.metrics_port: int | None = None
        self._stopped = asyncio.Event()
        self._hurry = asyncio.Event()

    def _partition_count(self, topic: str) -> int:
        t = self.broker.topics.get(topic)
        return len(t.partitions) if t is not None else 0

    async def start(self) -> int:
        """Open storage, start listening; returns the bound port."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.broker.open)
        store = self.store = await loop.run_in_executor(
            self.executor,
            lambda: OffsetStore(self.config.data_dir / GROUPS_DIR, clock=self.clock, executor=self.executor),
        )
        groups = GroupService(self.broker, self.coordinator, store)
        await groups.purge_missing_topics()
        queue_store = await loop.run_in_executor(
            self.executor, lambda: QueueStore(self.config.data_dir / QUEUES_DIR, executor=self.executor)
        )
        self.queues = QueueEngine(self.broker, queue_store)
        await self.queues.purge_missing_topics()
        limit = self.config.max_request_bytes
        rpc_metrics = RpcMetrics() if self.config.metrics_listen else None
        self.grpc = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.max_concurrent_streams", self.config.max_concurrent_streams),
            ]
        )
        guard = None
        if self.config.auth_file:
            clock = self.broker.clock
            guard = Guard(Authority.load(Path(self.config.auth_file)), clock=lambda: clock.now_ms() / 1000)
        if guard is not None:
            guard.derived["@group_topics"] = lambda request: sorted(groups.view.topics(request.group))
            guard.derived["@group_topics_if_all"] = (
                lambda request: sorted(groups.view.topics(request.group)) if request.all_topics else [])
        self.grpc_guard = guard

        def wired(service: ServiceDescriptor, servicer: object,
                  request_types: dict[str, type[Message]] | None = None) -> grpc.GenericRpcHandler:
            return generic_handler(service, servicer, request_types, admission=self.admission, guard=guard,
                                   rpc_metrics=rpc_metrics)

        self.grpc.add_generic_rpc_handlers(
            [
                wired(SERVICES[0], TopicService(self.broker, groups, self.queues)),
                wired(SERVICES[1], LogService(self.broker, self.traffic, on_durable_append=self.hooks.on_durable_append),
                      REQUEST_VIEWS),
                wired(SERVICES[2], groups),
                wired(SERVICES[3], QueueService(self.queues)),
            ]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = [s.full_name for s in SERVICES] + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection(names + [reflection.SERVICE_NAME], self.grpc)
        credentials = server_credentials(self.config)
        if credentials is None:
            self.port = self.grpc.add_insecure_port(self.config.listen)
        else:
            self.port = self.grpc.add_secure_port(self.config.listen, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        if guard is None and not is_loopback(self.config.listen):
            log.warning("!!! no auth_file: anyone who can reach %s can read, write and delete everything "
                        "(set auth_file, and TLS) !!!", self.config.listen)
        if rpc_metrics is not None:
            sources = Sources(self.broker, self.traffic, self.fsync_seconds, rpc_metrics.rpcs, groups.view, self.queues)
            self.metrics = MetricsExporter(sources, loop)
            self.metrics_port = self.metrics.start(self.config.metrics_listen)
        await self.grpc.start()
        self.broker.start_background(
            checkpoint_interval_ms=self.config.checkpoint_interval_ms,
            retention_check_ms=self.config.retention_check_ms,
        )
        started_ms = self.clock.now_ms()

        async def tick() -> None:
            self.coordinator.tick()

        async def expire() -> None:
            await expire_groups(
                self.coordinator, store, retention_ms=self.config.group_retention_ms, started_ms=started_ms
            )

        self.broker.run_every("group-timeouts", GROUP_TICK_MS, tick)
        self.broker.run_every("queue-timers", TICK_MS, self.queues.tick)
        self.broker.run_every("group-expiry", self.config.retention_check_ms, expire)
        for name in [""] + [s.full_name for s in SERVICES]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        host = self.config.listen.rsplit(":", 1)[0]
        listen = f"{host}:{self.port}"
        log.info(
            "streamd %s serving on %s, data in %s", __version__, listen, self.config.data_dir,
            extra={"event": "start", "version": __version__, "listen": listen, "data_dir": str(self.config.data_dir)},
        )
        return self.port

    async def stop(self, *, why: str = "stop requested") -> None:
        """Graceful stop, in the order of the module docstring. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace_s
        log.info(
            "stopping (%s): health NOT_SERVING, refusing new work, up to %g s for %d RPC(s) in flight",
            why, self.config.shutdown_grace_s, self.admission.in_flight,
            extra={"event": "stopping", "reason": why, "in_flight": self.admission.in_flight},
        )
        await self.health.enter_graceful_shutdown()
        self.admission.close()
        # Wake parked long polls (they answer) and streams (they end with UNAVAILABLE).
        self.broker.stop_accepting()
        self.coordinator.shutdown()
        await self._drain(loop.time() + self.config.shutdown_drain_s, deadline)
        if self.grpc is not None:
            left = self.admission.in_flight
            await self.grpc.stop(0 if self._hurry.is_set() else max(0.0, deadline - loop.time()))
            if left:
                log.warning("cancelled %d RPC(s) still running after the grace period", left)
        if self.metrics is not None:
            await loop.run_in_executor(self.executor, self.metrics.stop)
        if self.queues is not None:
            await self.queues.close()
        await self.broker.close()
        if self.store is not None:
            await self.store.close()
        self.executor.shutdown(wait=True)
        log.info("streamd stopped cleanly: data flushed, every partition closed", extra={"event": "stop"})

    async def _drain(self, drain_until: float, deadline: float) -> None:
        """Wait for the RPCs in flight and the drain time, until the deadline or a hurry."""
        loop = asyncio.get_running_loop()
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            idle = asyncio.ensure_future(self.admission.idle())
            await asyncio.wait([idle, hurry], timeout=max(0.0, deadline - loop.time()),
                               return_when=asyncio.FIRST_COMPLETED)
            idle.cancel()
            pause = min(drain_until, deadline) - loop.time()
            if pause > 0 and not hurry.done():
                await asyncio.wait([hurry], timeout=pause)
        finally:
            hurry.cancel()

    def hurry(self) -> None:
        """Stop waiting for in-flight RPCs and the drain time (a second signal)."""
        if not self._hurry.is_set():
            log.warning("second stop signal: not waiting for RPCs in flight")
            self._hurry.set()

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[str] = loop.create_future()

        def signalled(sig: signal.Signals) -> None:
            if stop.done():
                self.hurry()
            else:
                stop.set_result(sig.name)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signalled, sig)
        await self.stop(why=await stop)


def server_credentials(config: BrokerConfig) -> grpc.ServerCredentials | None:
    """TLS (and, with a client CA, mutual TLS) from the config's PEM files; None: plain."""
    if not config.tls_cert_file:
        return None

    def read(path: str) -> bytes:
        with open(path, "rb") as fh:
            return fh.read()

    ca = read(config.tls_client_ca_file) if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(read(config.tls_key_file), read(config.tls_cert_file))],
                                       root_certificates=ca, require_client_auth=ca is not None)


def run(config: BrokerConfig) -> None:
    logs.configure(level=config.log_level, log_format=config.log_format)
    tune_malloc()
    asyncio.run(Server(config).serve_forever())
