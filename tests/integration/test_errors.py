"""Every refusal is a specific gRPC status with a stable ErrorInfo reason, and the
server keeps serving afterwards."""

from __future__ import annotations

import grpc
import pytest

from streamd.v1 import streamd_pb2 as pb

from .helpers import Stubs, refused


def test_unknown_topic_is_not_found(stubs):
    code, reason, meta = refused(stubs.fetch, "nope", 0, 0)
    assert (code, reason, meta["topic"]) == (grpc.StatusCode.NOT_FOUND, "TOPIC_NOT_FOUND", "nope")
    code, reason, _ = refused(stubs.topics.DeleteTopic, pb.DeleteTopicRequest(topic="nope"))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "TOPIC_NOT_FOUND")


def test_unknown_partition_is_not_found(stubs):
    stubs.create("t", 2)
    code, reason, meta = refused(stubs.produce_values, "t", 2, [b"x"])
    assert (code, reason, meta["partition_count"]) == (grpc.StatusCode.NOT_FOUND, "PARTITION_NOT_FOUND", "2")
    code, reason, _ = refused(stubs.fetch, "t", -1, 0)
    assert reason == "PARTITION_NOT_FOUND"


def test_duplicate_topic_is_already_exists(stubs):
    stubs.create("t", 1)
    code, reason, _ = refused(stubs.create, "t", 1)
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "TOPIC_ALREADY_EXISTS")


@pytest.mark.parametrize("name", ["../x", "..", ".", "", "a/b", "x" * 250, "bad name", "é", "@meta"])
def test_bad_topic_names_are_invalid_argument(stubs, tmp_path, name):
    code, reason, _ = refused(stubs.create, name, 1)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TOPIC_NAME")
    code, reason, _ = refused(stubs.fetch, name, 0, 0)
    assert reason == "INVALID_TOPIC_NAME"
    assert not (tmp_path / "x").exists()


def test_offset_out_of_range_carries_the_valid_range(stubs):
    stubs.create("t", 1)
    stubs.produce_values("t", 0, [b"a", b"b"])
    for offset in (3, -1, 1_000_000):
        code, reason, meta = refused(stubs.fetch, "t", 0, offset)
        assert (code, reason) == (grpc.StatusCode.OUT_OF_RANGE, "OFFSET_OUT_OF_RANGE")
        assert (meta["log_start_offset"], meta["log_end_offset"]) == ("0", "2")
    call = stubs.log.Subscribe(pb.SubscribeRequest(topic="t", partition=0, offset=7))
    code, reason, meta = refused(lambda: next(iter(call)))
    assert (code, reason, meta["log_end_offset"]) == (grpc.StatusCode.OUT_OF_RANGE, "OFFSET_OUT_OF_RANGE", "2")


def test_malformed_request_bytes_are_invalid_argument(server):
    with grpc.insecure_channel(server.address) as channel:
        for method in ("/streamd.v1.LogService/Fetch", "/streamd.v1.LogService/Produce",
                       "/streamd.v1.TopicService/CreateTopic"):
            call = channel.unary_unary(method)  # bytes in, bytes out
            code, reason, _ = refused(call, b"\xff\xff\xff\xff garbage")
            assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")


def test_invalid_batches_are_invalid_argument(stubs):
    stubs.create("t", 1)

    def produce(batch: pb.RecordBatch):
        return stubs.log.Produce(
            pb.ProduceRequest(topic="t", partitions=[pb.PartitionBatches(partition=0, batches=[batch])])
        )

    cases = [
        pb.RecordBatch(records=b"\xff\xff"),  # not a RecordSet
        pb.RecordBatch(),  # no records
        pb.RecordBatch(compression=pb.COMPRESSION_LZ4, records=b"not lz4"),
        pb.RecordBatch(compression=7, records=pb.RecordSet(records=[pb.Record()]).SerializeToString()),
    ]
    for batch in cases:
        code, reason, _ = refused(produce, batch)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BATCH"), batch
    assert stubs.fetch("t", 0, 0).log_end_offset == 0  # nothing appended


def test_bad_arguments_are_invalid_argument(stubs):
    stubs.create("t", 1)
    code, reason, meta = refused(stubs.fetch, "t", 0, 0, max_bytes=-5)
    assert (code, reason, meta["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "max_bytes")
    code, reason, meta = refused(stubs.create, "u", -3)
    assert (code, meta["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "partition_count")
    code, reason, meta = refused(stubs.create, "u", 1, retention_ms=0)
    assert (code, meta["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "config.retention_ms")


def test_oversized_records_are_resource_exhausted(stubs):
    stubs.create("t", 1, max_record_bytes=1000)
    code, reason, meta = refused(stubs.produce_values, "t", 0, [b"x" * 10, b"y" * 2000])
    assert (code, reason, meta["limit"]) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RECORD_TOO_LARGE", "1000")
    code, reason, _ = refused(stubs.produce_values, "t", 0, [b"z" * 1000] * 5000)  # batch over 4 MiB
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RECORD_TOO_LARGE")
    code, reason, _ = refused(
        stubs.log.Produce, pb.ProduceRequest(topic="t", records=[pb.Record(value=b"q" * 5000)])
    )
    assert reason == "RECORD_TOO_LARGE"
    assert stubs.fetch("t", 0, 0).log_end_offset == 0


def test_requests_over_the_message_limit_are_refused_by_grpc(make_server):
    running = make_server(max_request_bytes=100_000)
    stubs = Stubs(running.address)
    try:
        stubs.create("t", 1)
        with pytest.raises(grpc.RpcError) as caught:
            stubs.produce_values("t", 0, [b"x" * 200_000])
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stubs.produce_values("t", 0, [b"ok"]).base_offset == 0  # still serving
    finally:
        stubs.close()


def test_lz4_bomb_is_refused(stubs):
    import lz4.frame

    stubs.create("t", 1)
    bomb = lz4.frame.compress(b"\x00" * (64 * 1024 * 1024))
    batch = pb.RecordBatch(compression=pb.COMPRESSION_LZ4, records=bomb)
    code, reason, _ = refused(
        stubs.log.Produce, pb.ProduceRequest(topic="t", partitions=[pb.PartitionBatches(partition=0, batches=[batch])])
    )
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RECORD_TOO_LARGE")


def test_too_many_topics_and_partitions_are_resource_exhausted(make_server):
    running = make_server(max_topics=2, max_partitions_per_topic=4)
    stubs = Stubs(running.address)
    try:
        code, reason, _ = refused(stubs.create, "big", 5)
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED")
        stubs.create("a", 1)
        stubs.create("b", 1)
        code, reason, _ = refused(stubs.create, "c", 1)
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED")
    finally:
        stubs.close()


def test_corrupt_stored_batch_is_data_loss(server, stubs, tmp_path):
    stubs.create("t", 1)
    stubs.produce_values("t", 0, [b"precious" * 10])
    log_file = next((tmp_path / "data" / "t" / "0").glob("*.log"))
    with open(log_file, "r+b") as fh:  # flip a byte inside the record payload
        fh.seek(60)
        byte = fh.read(1)
        fh.seek(60)
        fh.write(bytes([byte[0] ^ 0xFF]))
    code, reason, _ = refused(stubs.fetch, "t", 0, 0)
    assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "CORRUPT_BATCH")


def test_unavailable_while_stopping(make_server):
    running = make_server()
    stubs = Stubs(running.address)
    try:
        stubs.create("t", 1)
        running.server.broker.state = "stopping"
        code, reason, _ = refused(stubs.produce_values, "t", 0, [b"x"])
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "BROKER_UNAVAILABLE")
        running.server.broker.state = "serving"
    finally:
        stubs.close()


def test_unexpected_errors_are_internal_without_traceback(server, stubs, monkeypatch):
    stubs.create("t", 1)

    def boom(*args, **kwargs):
        raise ZeroDivisionError("secret detail")

    monkeypatch.setattr(server.server.broker, "read", boom)
    with pytest.raises(grpc.RpcError) as caught:
        stubs.fetch("t", 0, 0)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in caught.value.details() and "Traceback" not in caught.value.details()
    monkeypatch.undo()
    assert stubs.fetch("t", 0, 0).log_end_offset == 0
