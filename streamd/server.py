"""The one place that wires configuration, broker, gRPC services and health.

``Server`` owns the lifecycle: open the broker (lock + recovery) -> serve -> on stop,
report NOT_SERVING, refuse new work with UNAVAILABLE, let in-flight RPCs finish
within the grace period, flush and close every log cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from streamd._malloc import tune_malloc
from streamd.broker.broker import Broker
from streamd.broker.topic import TopicSettings
from streamd.clock import Clock, SystemClock
from streamd.config import BrokerConfig
from streamd.service.handlers import generic_handler
from streamd.service.log_service import REQUEST_VIEWS, LogService
from streamd.service.topic_service import TopicService
from streamd.v1 import streamd_pb2 as pb

log = logging.getLogger("streamd.server")

SERVICES = [pb.DESCRIPTOR.services_by_name["TopicService"], pb.DESCRIPTOR.services_by_name["LogService"]]


def topic_defaults(config: BrokerConfig) -> TopicSettings:
    return TopicSettings(
        retention_ms=config.retention_ms,
        retention_bytes=config.retention_bytes,
        segment_bytes=config.segment_bytes,
        segment_ms=config.segment_ms,
        max_record_bytes=config.max_record_bytes,
        fsync_policy=config.fsync_policy,
        fsync_interval_ms=config.fsync_interval_ms,
        compression=config.compression,
    )


class Server:
    def __init__(self, config: BrokerConfig, *, clock: Clock | None = None) -> None:
        self.config = config
        self.executor = ThreadPoolExecutor(config.io_threads, thread_name_prefix="streamd-io")
        self.broker = Broker(
            config.data_dir,
            defaults=topic_defaults(config),
            clock=clock or SystemClock(),
            executor=self.executor,
            index_interval_bytes=config.index_interval_bytes,
            max_topics=config.max_topics,
            max_partitions_per_topic=config.max_partitions_per_topic,
        )
        self.health = HealthServicer()
        self.grpc: grpc.aio.Server | None = None
        self.port: int | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Open storage, start listening; returns the bound port."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.broker.open)
        limit = self.config.max_request_bytes
        self.grpc = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ]
        )
        self.grpc.add_generic_rpc_handlers(
            [
                generic_handler(SERVICES[0], TopicService(self.broker)),
                generic_handler(SERVICES[1], LogService(self.broker), REQUEST_VIEWS),
            ]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = [s.full_name for s in SERVICES] + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection(names + [reflection.SERVICE_NAME], self.grpc)
        self.port = self.grpc.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        await self.grpc.start()
        self.broker.start_background()
        self.broker.add_periodic(self.config.checkpoint_interval_ms, self.broker.checkpoint_all)
        self.broker.add_periodic(self.config.retention_check_ms, self.broker.apply_retention)
        for name in [""] + [s.full_name for s in SERVICES]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        host = self.config.listen.rsplit(":", 1)[0]
        log.info("streamd serving on %s:%d, data in %s", host, self.port, self.config.data_dir)
        return self.port

    async def stop(self) -> None:
        """Graceful stop: NOT_SERVING, refuse new RPCs, finish in-flight ones, close logs."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.health.enter_graceful_shutdown()
        self.broker.state = "stopping"
        # Wake parked subscribers and long polls so they end with UNAVAILABLE.
        for part in self.broker.all_partitions():
            part.close()
        if self.grpc is not None:
            await self.grpc.stop(self.config.shutdown_grace_s)
        await self.broker.close()
        self.executor.shutdown(wait=True)
        log.info("streamd stopped cleanly")

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.stop()


def run(config: BrokerConfig) -> None:
    tune_malloc()
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    asyncio.run(Server(config).serve_forever())
