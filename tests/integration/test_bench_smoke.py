"""The benchmark's streamd driver still runs end to end (numbers are not judged)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ..conftest import ROOT

pytestmark = pytest.mark.slow


def test_bench_streamd_driver_runs_and_prints_json():
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "streamd",
         "--only", "consume", "--only", "produce/100B/b100", "--only", "produce_acked", "--only", "latency"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    streamd = doc["systems"]["streamd"]
    assert streamd["status"] == "ok", streamd
    workloads = streamd["workloads"]
    for key in ("consume", "produce/100B/b100", "produce_acked"):
        assert workloads[key]["median"]["records_per_s"] > 0, key
    assert workloads["latency"]["median"]["received"] == workloads["latency"]["median"]["sent"]


def test_bench_groups_quick_reads_every_record_once_and_times_reassignment():
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "groups"],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    groups = json.loads(result.stdout)["streamd_groups"]
    assert groups["status"] == "ok", groups
    for key in ("group_records_per_s", "single_records_per_s", "single_group_member_records_per_s"):
        assert groups[key] > 0, key
    assert groups["correctness"]["all_records_read_once"], groups["correctness"]
    for key in ("clean_leave_reassign_ms", "kill_reassign_ms"):
        assert groups[key]["timeouts"] == 0 and len(groups[key]["runs"]) == 1, groups[key]


def test_bench_queues_quick_acks_every_record_once_and_times_redelivery():
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "queues"],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
        env={**os.environ, "STREAMD_BENCH_NO_INSTALL": "1"},  # peers run only if already installed
    )
    assert result.returncode == 0, result.stderr[-3000:]
    queues = json.loads(result.stdout)["streamd_queues"]
    assert queues["status"] == "ok", queues
    for key in ("batched_records_per_s", "batched_pipelined_records_per_s", "per_record_acks_per_s",
                "per_record_acks_pipelined_per_s"):
        assert queues[key] > 0, key
    correctness = queues["correctness"]
    assert correctness["streamd_every_record_received_once_and_acked"], correctness
    assert correctness["redelivery_unexpected"] == 0, correctness
    for how in ("nack", "expiry"):
        timing = queues["redelivery_error_ms"][how]
        assert timing["redelivered"] == timing["records"] and timing["early"] == 0, timing
    for peer in queues["peers"].values():  # a peer that cannot run here is skipped, never wrong
        assert peer["status"] in ("ok", "skipped"), peer
        assert peer["status"] == "skipped" or peer["correct"], peer


def test_bench_ab_runs_both_versions_interleaved_and_prints_ratios():
    result = subprocess.run(
        [sys.executable, "-m", "bench.ab", "--before", str(ROOT), "--after", str(ROOT), "--rounds", "1",
         "--records", "3000"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    for workload in ("produce", "consume", "queue", "process", "send"):
        for version in ("before", "after"):
            assert len(doc["workloads"][workload][version]["runs"]) == 1
        assert doc["after_vs_before"][workload] > 0


@pytest.mark.timeout(400)
def test_bench_sdk_paths_quick_fills_every_row_of_the_table():
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "sdk_paths"],
        cwd=ROOT, capture_output=True, text=True, timeout=380,
        env={**os.environ, "STREAMD_BENCH_NO_INSTALL": "1"},  # peers run only if already installed
    )
    assert result.returncode == 0, result.stderr[-3000:]
    paths = json.loads(result.stdout)["sdk_paths"]
    assert paths["status"] == "ok", paths
    peers_up = {name for name, s in paths["servers"].items() if s["status"] == "ok"}
    assert "streamd" in peers_up
    for name, server in paths["servers"].items():  # a peer that cannot run here is skipped, never broken
        assert server["status"] in ("ok", "skipped"), (name, server)
    for name, entry in paths["entries"].items():
        assert all("error" not in run for run in entry["runs"]), (name, entry["runs"])
        if "latency" in name:
            assert entry["median"]["received"] == entry["median"]["sent"] > 0, (name, entry["median"])
    rows = [row for row in paths["table"] if "see" not in row]
    assert len(rows) == 14
    for row in rows:
        assert row["streamd"] > 0, row
        if {"redis", "nats"} <= peers_up:
            assert row["best_peer"] is not None and row["ratio"] > 0, row
