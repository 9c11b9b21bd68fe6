"""Prometheus metrics: a scrape of a busy broker (values, promtool's lint), a real
Prometheus server reading a lag series back, and the Grafana dashboard's names.

promtool and prometheus come from Debian's ``prometheus`` package; without them the
two tests that need them are skipped, except in CI (``$CI`` set), where they must run.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import urllib.parse
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamd.testing import FakeClock
from streamd.v1 import streamd_pb2 as pb
from tests.conftest import ROOT, free_port, wait_until

from .helpers import Stubs
from .test_queues import create, produce, receive, stats, values

DASHBOARD = ROOT / "deploy" / "grafana" / "streamd.json"
LAG_AGE_MS = 2_000
RETENTION_AGE_MS = 5_000


def needs(binary: str):
    return pytest.mark.skipif(shutil.which(binary) is None and not os.environ.get("CI"),
                              reason=f"{binary} is not installed (Debian package prometheus)")


def scrape(server) -> str:
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels) -> float:
    key = (name, frozenset((k, str(v)) for k, v in labels.items()))
    assert key in found, f"no sample {name}{labels}"
    return found[key]


class Busy:
    """A broker with traffic of every kind (see ``busy``)."""

    def __init__(self, server, stubs: Stubs, clock: FakeClock) -> None:
        self.server, self.stubs, self.clock = server, stubs, clock
        self.hold_member: queue.Queue = queue.Queue()
        self.streams: list = []

    def close(self) -> None:
        self.hold_member.put(None)
        for call in self.streams:
            call.cancel()
        self.stubs.close()


@pytest.fixture
def busy(make_server):
    """orders (2 partitions): 5 + 3 records produced, 5 fetched, a Subscribe open; group
    billing committed at 2 on partition 0, one member, lag aged LAG_AGE_MS + RETENTION_AGE_MS;
    queue group workers on jobs: one lease expired, one dead-lettered, one acked, one in
    flight; queue group late on old: records lost to retention."""
    clock = FakeClock()
    server = make_server(clock=clock)
    b = Busy(server, Stubs(server.address), clock)
    s = b.stubs
    try:
        s.create("orders", 2)
        s.produce_values("orders", 0, [b"a", b"b", b"c", b"d", b"e"])
        s.produce_values("orders", 1, [b"x", b"y", b"z"])
        assert s.fetch("orders", 0, 0).next_offset == 5
        with pytest.raises(grpc.RpcError):
            s.fetch("missing", 0, 0)
        sub = s.log.Subscribe(pb.SubscribeRequest(topic="orders", partition=1, offset=0))
        b.streams.append(sub)
        next(sub)
        s.groups.ResetOffsets(pb.ResetOffsetsRequest(
            group="billing", partitions=[pb.TopicPartitions(topic="orders", partitions=[0])], offset=2, execute=True))

        def member():
            yield pb.JoinGroupRequest(join=pb.MemberJoin(group="billing", topics=["orders"]))
            b.hold_member.get()

        join = s.groups.JoinGroup(member())
        b.streams.append(join)
        next(join)  # the assignment: the member is in

        s.create("jobs", 1)
        create(s, max_deliveries=2, retry={"initial_delay_ms": 600_000, "jitter": pb.JITTER_NONE})
        produce(s, "jobs", values(4))
        [first] = receive(s, 1, lease_ms=1000)
        clock.advance(LAG_AGE_MS)  # the lease expires; billing's lag ages
        server.call(server.server.queues.tick)
        r1, r2, r3 = receive(s, 3, lease_ms=600_000)
        ref = lambda r: pb.LeaseRef(partition=r.partition, offset=r.offset, lease_id=r.lease_id)  # noqa: E731
        s.queues.Reject(pb.RejectRequest(group="workers", topic="jobs", lease=ref(r1), reason="poison"))
        s.queues.Ack(pb.AckRequest(group="workers", topic="jobs", lease=ref(r2)))
        assert wait_until(lambda: stats(s).dead_lettered == 1)  # the DLQ append is async

        s.create("old", 1, segment_bytes=4096, retention_ms=1000)
        create(s, group="late", topic="old")
        for _ in range(40):
            produce(s, "old", [{"value": b"x" * 200}])
        clock.advance(RETENTION_AGE_MS)
        produce(s, "old", [{"value": b"new"}])  # in the active segment, which stays
        server.call(server.server.broker.apply_retention)
        server.call(server.server.queues.tick)  # the queue group notices what it lost
        yield b
    finally:
        b.close()


def test_a_scrape_reports_traffic_storage_groups_and_queues(busy):
    found = samples(scrape(busy.server))
    assert value(found, "streamd_build_info", version="0.1.0", python_version=__import__("platform").python_version())
    assert value(found, "streamd_produced_records_total", topic="orders") == 8
    assert value(found, "streamd_produced_bytes_total", topic="orders") > 0
    assert value(found, "streamd_fetched_records_total", topic="orders") >= 5 + 3  # Fetch + Subscribe
    assert value(found, "streamd_fetched_bytes_total", topic="orders") > 0
    assert value(found, "streamd_active_subscribers", topic="orders") == 1
    # RPCs, with go-grpc-prometheus' names and Go's code names.
    rpc = {"grpc_service": "streamd.v1.LogService", "grpc_type": "unary"}
    assert value(found, "grpc_server_handled_total", grpc_method="Produce", grpc_code="OK", **rpc) >= 2
    assert value(found, "grpc_server_handled_total", grpc_method="Fetch", grpc_code="NotFound", **rpc) == 1
    assert value(found, "grpc_server_started_total", grpc_method="Fetch", **rpc) == 2
    assert value(found, "grpc_server_handling_seconds_count", grpc_method="Fetch", **rpc) == 2
    assert value(found, "grpc_server_handling_seconds_bucket", grpc_method="Fetch", le="+Inf", **rpc) == 2
    assert value(found, "grpc_server_started_total", grpc_method="Subscribe", grpc_service="streamd.v1.LogService",
                 grpc_type="server_stream") == 1
    assert value(found, "streamd_log_fsync_duration_seconds_count") >= 2
    # Storage.
    assert value(found, "streamd_log_end_offset", topic="orders", partition=0) == 5
    assert value(found, "streamd_log_start_offset", topic="orders", partition=0) == 0
    assert value(found, "streamd_log_segments", topic="orders", partition=0) == 1
    assert value(found, "streamd_log_size_bytes", topic="orders", partition=0) > 0
    assert value(found, "streamd_topic_partitions", topic="orders") == 2
    deleted = value(found, "streamd_log_retention_deleted_segments_total", topic="old", partition=0)
    assert deleted >= 1 and value(found, "streamd_log_start_offset", topic="old", partition=0) > 0
    assert value(found, "streamd_log_retention_deleted_bytes_total", topic="old", partition=0) >= 4096 * deleted / 2
    assert value(found, "streamd_log_recovery_truncated_bytes", topic="orders", partition=0) == 0
    # The stream group.
    g0 = {"group": "billing", "topic": "orders", "partition": 0}
    g1 = {"group": "billing", "topic": "orders", "partition": 1}
    assert value(found, "streamd_consumergroup_current_offset", **g0) == 2
    assert ("streamd_consumergroup_current_offset", frozenset((k, str(v)) for k, v in g1.items())) not in found
    assert value(found, "streamd_consumergroup_lag", **g0) == 3
    assert value(found, "streamd_consumergroup_lag", **g1) == 3  # nothing committed: from the log start
    assert value(found, "streamd_consumergroup_lag_seconds", **g0) == (LAG_AGE_MS + RETENTION_AGE_MS) / 1000
    assert value(found, "streamd_consumergroup_members", group="billing") == 1
    assert value(found, "streamd_consumergroup_rebalances_total", group="billing") >= 1
    # Queue groups.
    q = {"group": "workers", "topic": "jobs", "partition": 0}
    assert value(found, "streamd_queue_in_flight", **q) == 1
    assert value(found, "streamd_queue_waiting", **q) == 1  # the expired one, backing off
    assert value(found, "streamd_queue_backlog", **q) == 0
    assert value(found, "streamd_queue_acked_total", **q) == 1
    assert value(found, "streamd_queue_dead_lettered_total", **q) == 1
    assert value(found, "streamd_queue_lease_expired_total", **q) == 1
    assert value(found, "streamd_queue_redelivered_total", **q) == 0
    assert value(found, "streamd_queue_oldest_unacked_age_seconds", **q) == (LAG_AGE_MS + RETENTION_AGE_MS) / 1000
    late = {"group": "late", "topic": "old", "partition": 0}
    lost = value(found, "streamd_queue_lost_to_retention_total", **late)
    assert lost == value(found, "streamd_log_start_offset", topic="old", partition=0) > 0
    # Labels are names and numbers of partitions only: never offsets, ids or peers.
    allowed = {"topic", "partition", "group", "grpc_service", "grpc_method", "grpc_type", "grpc_code", "le",
               "version", "python_version", "implementation", "major", "minor", "patchlevel", "generation"}
    assert {k for _, labels in found for k, _ in labels} <= allowed


@needs("promtool")
def test_promtool_finds_nothing_to_complain_about_in_a_scrape(busy):
    result = subprocess.run(["promtool", "check", "metrics"], input=scrape(busy.server), capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result.stderr


@needs("prometheus")
def test_a_prometheus_server_scrapes_the_broker_and_serves_its_lag(busy, tmp_path):
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: streamd\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{busy.server.server.metrics_port}']\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    query = urllib.parse.quote('streamd_consumergroup_lag{group="billing",partition="0"}')

    def lag_series():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query={query}", timeout=5) as r:
                return json.load(r)["data"]["result"]
        except OSError:
            return None

    try:
        result = wait_until(lag_series, timeout=60, interval=0.5)
        assert result, (tmp_path / "prometheus.log").read_text(errors="replace")[-3000:]
        [series] = result
        assert series["metric"]["topic"] == "orders" and series["metric"]["job"] == "streamd"
        assert float(series["value"][1]) == 3
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "by", "without", "rate", "irate", "increase", "histogram_quantile",
    "topk", "bottomk", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "time", "clamp_min",
    "label_replace", "delta", "deriv", "abs", "offset", "bool", "vector", "scalar", "sort_desc", "max_over_time",
}


def dashboard_metric_names(dashboard: dict) -> set[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    names = set()
    for expr in exprs:
        expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
        expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
        expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
        expr = re.sub(r'"[^"]*"', "", expr)
        expr = re.sub(r"\$\w+", "", expr)  # dashboard variables ($__rate_interval)
        for name in re.findall(r"(?<![\w:])[A-Za-z_:][\w:]*(?![\w:])(?!\s*\()", expr):
            if name not in PROMQL_WORDS and not re.fullmatch(r"e\d*|inf|nan", name, re.I):
                names.add(name)
    return names


def exported_names(text: str) -> set[str]:
    names = set()
    for f in text_string_to_metric_families(text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(f.type, [""])
        names |= {f.name + s for s in suffixes}
        names |= {s.name for s in f.samples}
    return names


def test_every_metric_the_grafana_dashboard_queries_is_exported(busy):
    dashboard = json.loads(DASHBOARD.read_text())
    used = dashboard_metric_names(dashboard)
    missing = used - exported_names(scrape(busy.server))
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"
    assert {"grpc_server_handling_seconds_bucket", "streamd_consumergroup_lag", "streamd_queue_backlog",
            "streamd_produced_records_total"} <= used
