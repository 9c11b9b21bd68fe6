"""Every RPC of TopicService and LogService over real gRPC on 127.0.0.1."""

from __future__ import annotations

import threading
import time

import grpc

from streamd.client.records import batch_records, decode_batches
from streamd.partitioner import key_partition
from streamd.v1 import streamd_pb2 as pb


def test_create_list_describe_delete_topic(stubs):
    created = stubs.create("orders", 3, retention_ms=60_000, fsync_policy=pb.FSYNC_POLICY_NEVER)
    assert created.partition_count == 3
    assert created.config.retention_ms == 60_000
    assert created.config.fsync_policy == pb.FSYNC_POLICY_NEVER
    names = [t.name for t in stubs.topics.ListTopics(pb.ListTopicsRequest()).topics]
    assert names == ["orders"]
    described = stubs.topics.DescribeTopic(pb.DescribeTopicRequest(topic="orders")).topic
    assert [p.partition for p in described.partitions] == [0, 1, 2]
    assert all(p.log_end_offset == 0 and p.segment_count == 1 for p in described.partitions)
    stubs.topics.DeleteTopic(pb.DeleteTopicRequest(topic="orders"))
    assert not stubs.topics.ListTopics(pb.ListTopicsRequest()).topics


def test_produce_then_fetch_returns_records_with_dense_offsets(stubs):
    stubs.create("t", 1)
    first = stubs.produce_values("t", 0, [b"a", b"b", b"c"])
    second = stubs.produce_values("t", 0, [b"d", b"e"], compression="lz4")
    assert (first.base_offset, first.record_count, first.durable) == (0, 3, True)
    assert (second.base_offset, second.record_count) == (3, 2)
    reply = stubs.fetch("t", 0, 0)
    assert reply.log_end_offset == 5 and reply.next_offset == 5 and reply.log_start_offset == 0
    records = list(decode_batches(reply.batches, "t", 0))
    assert [(r.offset, r.value) for r in records] == [(0, b"a"), (1, b"b"), (2, b"c"), (3, b"d"), (4, b"e")]
    assert all(b.crc32 != 0 and b.append_time_ms > 0 for b in reply.batches)


def test_fetch_from_middle_of_batch_starts_with_containing_batch(stubs):
    stubs.create("t", 1)
    stubs.produce_values("t", 0, [b"0", b"1", b"2", b"3"])
    reply = stubs.fetch("t", 0, 2)
    assert reply.batches[0].base_offset == 0
    assert [r.offset for r in decode_batches(reply.batches, "t", 0, 2)] == [2, 3]


def test_fetch_limits_max_records_and_max_bytes(stubs):
    stubs.create("t", 1)
    for _ in range(10):
        stubs.produce_values("t", 0, [b"x" * 100] * 10)
    assert len(stubs.fetch("t", 0, 0, max_records=25).batches) == 3
    one = stubs.fetch("t", 0, 0, max_bytes=1)
    assert len(one.batches) == 1 and one.next_offset == 10


def test_fetch_at_end_long_polls_until_data_arrives(stubs):
    stubs.create("t", 1)
    timer = threading.Timer(0.2, lambda: stubs.produce_values("t", 0, [b"late"]))
    timer.start()
    try:
        reply = stubs.fetch("t", 0, 0, max_wait_ms=10_000)
    finally:
        timer.join()
    assert [r.value for r in decode_batches(reply.batches, "t", 0)] == [b"late"]


def test_fetch_at_end_without_data_returns_empty_after_wait(stubs):
    stubs.create("t", 1)
    reply = stubs.fetch("t", 0, 0, max_wait_ms=50)
    assert not reply.batches and reply.log_end_offset == 0


def test_broker_routes_records_by_key_and_round_robin(stubs):
    stubs.create("t", 4)
    keys = [b"alpha", b"beta", b"gamma", b"delta", b"alpha"]
    records = [pb.Record(key=k, value=k.upper()) for k in keys] + [pb.Record(value=b"nokey")] * 4
    results = stubs.log.Produce(pb.ProduceRequest(topic="t", records=records)).results
    assert sum(r.record_count for r in results) == 9
    seen = {}
    for p in range(4):
        for r in decode_batches(stubs.fetch("t", p, 0).batches, "t", p):
            seen.setdefault(r.value, set()).add(p)
    for k in keys:
        assert seen[k.upper()] == {key_partition(k, 4)}
    assert len(seen[b"nokey"]) == 4  # spread over every partition


def test_record_fields_survive_round_trip(stubs):
    stubs.create("t", 1)
    record = pb.Record(key=b"", value=b"v", timestamp_ms=1234, headers=[pb.RecordHeader(key="h", value=b"1")])
    keyless = pb.Record(value=b"w")
    batch = pb.RecordBatch(records=pb.RecordSet(records=[record, keyless]).SerializeToString())
    stubs.log.Produce(pb.ProduceRequest(topic="t", partitions=[pb.PartitionBatches(partition=0, batches=[batch])]))
    a, b = decode_batches(stubs.fetch("t", 0, 0).batches, "t", 0)
    assert (a.key, a.value, a.timestamp_ms, a.headers) == (b"", b"v", 1234, (("h", b"1"),))
    assert b.key is None and b.timestamp_ms > 1234  # append time stands in


def test_forwarded_batch_gets_fresh_broker_fields(stubs):
    stubs.create("a", 1)
    stubs.create("b", 1)
    stubs.produce_values("a", 0, [b"x", b"y"])
    stubs.produce_values("b", 0, [b"first"])
    stored = stubs.fetch("a", 0, 0).batches[0]
    stubs.log.Produce(pb.ProduceRequest(topic="b", partitions=[pb.PartitionBatches(partition=0, batches=[stored])]))
    forwarded = stubs.fetch("b", 0, 1).batches[0]
    assert forwarded.base_offset == 1 and forwarded.record_count == 2
    assert [r.value for r in batch_records(forwarded).records] == [b"x", b"y"]


def test_list_offsets_earliest_latest_and_by_time(stubs):
    stubs.create("t", 2)
    stubs.produce_values("t", 0, [b"a", b"b"])
    before = int(time.time() * 1000)
    time.sleep(0.01)
    stubs.produce_values("t", 0, [b"c"])
    latest = stubs.log.ListOffsets(pb.ListOffsetsRequest(topic="t", position=pb.OFFSET_SPEC_LATEST)).offsets
    assert [(o.partition, o.offset) for o in latest] == [(0, 3), (1, 0)]
    earliest = stubs.log.ListOffsets(pb.ListOffsetsRequest(topic="t", partitions=[0], position=pb.OFFSET_SPEC_EARLIEST))
    assert earliest.offsets[0].offset == 0
    by_time = stubs.log.ListOffsets(pb.ListOffsetsRequest(topic="t", partitions=[0], timestamp_ms=before + 1))
    assert by_time.offsets[0].offset == 2
    future = stubs.log.ListOffsets(pb.ListOffsetsRequest(topic="t", partitions=[0], timestamp_ms=before + 3_600_000))
    assert future.offsets[0].offset == 3


def test_produce_stream_answers_each_request_in_order(stubs):
    stubs.create("t", 1)

    def requests():
        for i in range(20):
            batch = pb.RecordBatch(records=pb.RecordSet(records=[pb.Record(value=b"%d" % i)]).SerializeToString())
            yield pb.ProduceStreamRequest(
                request_id=100 + i,
                request=pb.ProduceRequest(topic="t", partitions=[pb.PartitionBatches(partition=0, batches=[batch])]),
            )
        # a bad request in the middle of a stream is answered, not fatal
        yield pb.ProduceStreamRequest(request_id=999, request=pb.ProduceRequest(topic="missing"))

    answers = list(stubs.log.ProduceStream(requests()))
    assert [a.request_id for a in answers] == [100 + i for i in range(20)] + [999]
    assert [a.response.results[0].base_offset for a in answers[:20]] == list(range(20))
    assert answers[-1].error.reason == "TOPIC_NOT_FOUND" and answers[-1].error.code == grpc.StatusCode.NOT_FOUND.value[0]


def test_subscribe_replays_then_tails_new_records(stubs):
    stubs.create("t", 1)
    stubs.produce_values("t", 0, [b"old"])
    call = stubs.log.Subscribe(pb.SubscribeRequest(topic="t", partition=0, position=pb.OFFSET_SPEC_EARLIEST))
    try:
        got = []
        for message in call:
            got.extend(r.value for r in decode_batches(message.batches, "t", 0))
            if got == [b"old"]:
                stubs.produce_values("t", 0, [b"new1", b"new2"])
            if len(got) >= 3:
                break
        assert got == [b"old", b"new1", b"new2"]
    finally:
        call.cancel()


def test_subscribe_from_latest_and_from_timestamp(stubs):
    stubs.create("t", 1)
    stubs.produce_values("t", 0, [b"a"])
    call = stubs.log.Subscribe(pb.SubscribeRequest(topic="t", partition=0, position=pb.OFFSET_SPEC_LATEST))
    stubs.produce_values("t", 0, [b"b"])
    try:
        message = next(iter(call))
        assert [r.value for r in decode_batches(message.batches, "t", 0, message.batches[0].base_offset)] == [b"b"]
    finally:
        call.cancel()
    call = stubs.log.Subscribe(pb.SubscribeRequest(topic="t", partition=0, timestamp_ms=1))
    try:
        message = next(iter(call))
        assert message.batches[0].base_offset == 0
    finally:
        call.cancel()


def test_subscribe_respects_flow_control(server, stubs):
    """A subscriber that stops reading stops the broker reading the log for it: what
    is in flight is bounded by HTTP/2 windows, not by the size of the log."""
    stubs.create("t", 1, fsync_policy=pb.FSYNC_POLICY_NEVER)
    for _ in range(200):
        stubs.produce_values("t", 0, [b"x" * 10_000] * 10)  # 20 MB
    messages = 20_000_000 // (64 * 1024)
    broker = server.server.broker
    real_read, reads = broker.read, []

    def counting_read(*args, **kwargs):
        reads.append(1)
        return real_read(*args, **kwargs)

    broker.read = counting_read
    call = stubs.log.Subscribe(pb.SubscribeRequest(topic="t", partition=0, offset=0, max_bytes=64 * 1024))
    try:
        stream = iter(call)
        assert next(stream).batches
        time.sleep(1.0)  # the reader stalls; the broker may push only what the windows hold
        stalled = len(reads)
        assert stalled < messages // 2, (stalled, messages)
        received = 1
        for message in stream:  # reading again resumes the stream to the end
            received += 1
            if message.next_offset >= 2000:
                break
        assert received > stalled and len(reads) > stalled
    finally:
        broker.read = real_read
        call.cancel()


def test_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "streamd.v1.TopicService", "streamd.v1.LogService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for a in answers for s in a.list_services_response.service}
        assert {"streamd.v1.TopicService", "streamd.v1.LogService", "grpc.health.v1.Health"} <= names
