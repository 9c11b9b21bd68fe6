"""Limits a client cannot talk its way past: streams per connection, a warning when
the broker is reachable beyond loopback with no auth, and the data directory as the
only place any client-chosen name can land."""

from __future__ import annotations

import logging

from streamd.v1 import streamd_pb2 as pb
from tests.conftest import wait_until

from .helpers import Stubs


def test_a_connection_gets_at_most_max_concurrent_streams(make_server):
    server = make_server(max_concurrent_streams=2)
    stubs = Stubs(server.address)
    try:
        stubs.create("t", 1)
        stubs.produce_values("t", 0, [b"r"])
        subscribe = pb.SubscribeRequest(topic="t", partition=0, offset=0)
        first, second = stubs.log.Subscribe(subscribe), stubs.log.Subscribe(subscribe)
        assert next(first).batches and next(second).batches  # two streams open and served
        traffic = server.server.traffic.topic("t")
        third = stubs.log.Subscribe(subscribe)
        # The third waits on the client's side while two streams hold the connection:
        # the broker never sees a third subscriber (given a second to appear, it would).
        assert not wait_until(lambda: traffic.subscribers > 2, timeout=1.0)
        first.cancel()
        assert next(third).batches  # once a stream ends, the third is served
        assert traffic.subscribers <= 2
        second.cancel()
        third.cancel()
    finally:
        stubs.close()


def test_serving_beyond_loopback_without_auth_is_warned_about(tmp_path, caplog):
    from streamd.addresses import is_loopback
    from tests.conftest import RunningServer

    assert is_loopback("127.0.0.1:1") and is_loopback("localhost:1") and is_loopback("[::1]:1")
    assert not is_loopback("0.0.0.0:1") and not is_loopback("10.0.0.1:1") and not is_loopback("example.com:1")
    with caplog.at_level(logging.WARNING, logger="streamd.server"):
        # Listening on every address (this test still talks to 127.0.0.1 only).
        server = RunningServer(tmp_path / "data", listen_host="0.0.0.0")
        server.stop()
    assert any("no auth_file" in r.getMessage() for r in caplog.records)


BAD_NAMES = ["../x", "..", ".", "a/b", "/abs", "x\x00y", "a\\b", "~", "", "t" * 250, "../../etc/passwd"]


def test_no_client_chosen_name_reaches_outside_the_data_directory(make_server, tmp_path):
    import grpc

    root = tmp_path / "root"
    (root / "outside").mkdir(parents=True)
    server = make_server(data_dir=root / "data")
    stubs = Stubs(server.address)
    try:
        stubs.create("ok", 1)
        for name in BAD_NAMES:
            # Topic names become directories: every one of these is refused.
            topic_calls = [
                lambda name=name: stubs.create(name, 1),
                lambda name=name: stubs.produce_values(name, 0, [b"x"]),
                lambda name=name: stubs.fetch(name, 0, 0),
                lambda name=name: stubs.topics.DeleteTopic(pb.DeleteTopicRequest(topic=name)),
                lambda name=name: stubs.queues.CreateQueueGroup(pb.CreateQueueGroupRequest(
                    group="q", topic="ok", config=pb.QueueGroupConfig(dead_letter_topic=name or "."))),
            ]
            for call in topic_calls:
                try:
                    call()
                except grpc.RpcError as err:
                    assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (name, err)
                else:
                    raise AssertionError(f"topic name {name!r} was accepted")
            # Group names are only journal content ("." and ".." are valid names):
            # accepted or refused, they never become paths.
            for call in (lambda name=name: stubs.groups.CommitOffsets(pb.CommitOffsetsRequest(
                             group=name, offsets=[pb.OffsetCommit(topic="ok", partition=0, offset=0)])),
                         lambda name=name: stubs.queues.CreateQueueGroup(pb.CreateQueueGroupRequest(group=name, topic="ok"))):
                try:
                    call()
                except grpc.RpcError as err:
                    assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS), err
        stubs.produce_values("ok", 0, [b"still serving"])
    finally:
        stubs.close()
    outside = [p for p in root.rglob("*") if not p.is_relative_to(root / "data") and p != root / "outside"]
    assert outside == []


def test_a_broker_out_of_file_descriptors_answers_unavailable_and_keeps_serving(server_process):
    """A broker process under a small open-files limit (prlimit on the running
    process): creating partitions until the descriptors run out answers UNAVAILABLE /
    TOO_MANY_OPEN_FILES (retryable; never INTERNAL, no server path in the message),
    and what exists keeps working."""
    import os
    import resource

    import grpc

    from .helpers import error_info

    broker = server_process()
    stubs = Stubs(broker.address)
    try:
        stubs.create("kept", 1)
        assert stubs.produce_values("kept", 0, [b"before"]).base_offset == 0
        in_use = len(os.listdir(f"/proc/{broker.proc.pid}/fd"))
        resource.prlimit(broker.proc.pid, resource.RLIMIT_NOFILE, (in_use + 24, in_use + 24))
        seen = set()
        for i in range(40):  # 3 partitions, ~6 descriptors each: out well before 40
            try:
                stubs.create(f"t{i}", 3)
            except grpc.RpcError as err:
                code, reason, _ = error_info(err)
                seen.add((code, reason))
                assert "/" not in err.details(), err.details()
        assert seen == {(grpc.StatusCode.UNAVAILABLE, "TOO_MANY_OPEN_FILES")}
        assert stubs.produce_values("kept", 0, [b"after"]).base_offset == 1
        assert [t.name for t in stubs.topics.ListTopics(pb.ListTopicsRequest()).topics]
    finally:
        stubs.close()
