"""``--log-format json``: every broker log line is one JSON object, and each lifecycle
event kind is there with its ``event`` field."""

from __future__ import annotations

import json

from streamd.client import Admin, GroupConsumer, Producer

from ..conftest import wait_until


def events_of(proc) -> list[dict]:
    lines = [line for line in proc.output().splitlines() if line.strip()]
    docs = [json.loads(line) for line in lines if line.startswith("{")]
    assert all({"ts", "level", "logger", "message"} <= set(d) for d in docs)
    assert not [line for line in lines if " streamd." in line and not line.startswith("{")]  # no text lines
    return docs


def test_json_logs_carry_every_lifecycle_event(server_process, tmp_path):
    env = {"STREAMD_RETENTION_CHECK_MS": "50", "STREAMD_LOG_FORMAT": "json"}
    first = server_process(env=env)
    with Admin(first.address) as admin, Producer(first.address) as producer:
        admin.create_topic("gone", 1)
        admin.delete_topic("gone")
        admin.create_topic("t", 1, segment_bytes=4096, retention_ms=300, fsync="never")
        for _ in range(20):
            producer.send_batch("t", 0, [b"x" * 1000])
        assert wait_until(lambda: admin.describe_topic("t").partitions[0].segment_count == 1, timeout=30)
        member = GroupConsumer("g", "t", first.address, auto_commit_interval_ms=None)
        try:
            assert wait_until(member.poll_assignment, timeout=30)
        finally:
            member.close()
    first.kill()  # an unclean stop: the next start recovers the partition's tail
    second = server_process(env=env, data_dir=first.data_dir)
    assert second.terminate(timeout=60) == 0

    run1, run2 = events_of(first), events_of(second)
    kinds = {d.get("event") for d in run1 + run2}
    assert {"start", "loaded", "topic_created", "topic_deleted", "retention", "rebalance", "recovery",
            "stopping", "stop"} <= kinds
    start = next(d for d in run1 if d.get("event") == "start")
    assert start["listen"] == first.address and start["data_dir"] == str(first.data_dir) and start["version"]
    assert {d["topic"] for d in run1 if d.get("event") == "topic_created"} == {"gone", "t"}
    assert next(d for d in run1 if d.get("event") == "rebalance")["group"] == "g"
    loaded = next(d for d in run2 if d.get("event") == "loaded")
    assert loaded["recovered"] == 1
    assert next(d for d in run2 if d.get("event") == "recovery")["level"] == "WARNING"
