"""The server-side views in streamd/wire.proto agree with their public twins."""

from __future__ import annotations

from streamd.v1 import streamd_pb2 as pb
from streamd.wire_pb2 import RawProduceRequest, RawProduceStreamRequest, RawRecordSet

TWINS = [
    (pb.ProduceRequest, RawProduceRequest),
    (pb.ProduceStreamRequest, RawProduceStreamRequest),
    (pb.PartitionBatches, RawProduceRequest.DESCRIPTOR.fields_by_name["partitions"].message_type._concrete_class),
    (pb.RecordSet, RawRecordSet),
]


def test_twins_have_the_same_field_numbers_and_compatible_types():
    for public, raw in TWINS:
        pf = {f.number: f for f in public.DESCRIPTOR.fields}
        rf = {f.number: f for f in raw.DESCRIPTOR.fields}
        assert pf.keys() == rf.keys(), public.DESCRIPTOR.full_name
        for number, field in pf.items():
            twin = rf[number]
            assert field.name == twin.name
            assert field.is_repeated == twin.is_repeated
            if field.type == field.TYPE_MESSAGE and twin.type == twin.TYPE_BYTES:
                continue  # an embedded message kept as bytes
            assert field.type == twin.type, (public.DESCRIPTOR.full_name, field.name)


def test_raw_view_round_trips_a_public_request():
    batch = pb.RecordBatch(records=pb.RecordSet(records=[pb.Record(value=b"v")]).SerializeToString())
    public = pb.ProduceStreamRequest(
        request_id=7,
        request=pb.ProduceRequest(
            topic="t", partitions=[pb.PartitionBatches(partition=3, batches=[batch])], records=[pb.Record(value=b"r")]
        ),
    )
    raw = RawProduceStreamRequest.FromString(public.SerializeToString())
    assert raw.request_id == 7 and raw.request.topic == "t"
    assert pb.RecordBatch.FromString(raw.request.partitions[0].batches[0]) == batch
    assert pb.Record.FromString(raw.request.records[0]).value == b"r"
    assert pb.ProduceStreamRequest.FromString(raw.SerializeToString()) == public
