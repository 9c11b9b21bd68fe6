"""The producer's accumulator (``streamd.client._accumulator``: records sliced into
per-partition batches, hand-encoded by ``_wire_records``) against a plain model: the
list of records sent per partition.

Generated: records (value, maybe key, headers, timestamp, delay or deliver_at,
idempotency key; some over the topic's ``max_record_bytes``) sent to random
partitions, with linger expiries and flushes in between, under a small
``batch_max_bytes`` so that batches seal by size too. A fake broker takes the sealed
batches in the order the accumulator hands them over, decodes them with protobuf and
gives each partition's batch the next offsets.

What must hold: an oversized record is refused at the call and in no batch; every
other record is in exactly one batch, each partition's records in the order sent,
encoded as protobuf decodes them (every field); every future resolves to its
partition and its batch's base offset + its index (offsets consecutive per
batch, dense per partition); no batch is over ``batch_max_bytes`` unless it is one
record.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamd.client._accumulator import Accumulator, TopicInfo, encode
from streamd.client._futures import RecordFuture
from streamd.client._wire_records import encode_record, entry, plain_prefix
from streamd.client.errors import ProduceError
from streamd.v1 import streamd_pb2 as pb

LIMIT = 300
BATCH_MAX = 400
PARTITIONS = 3

records = st.fixed_dictionaries({
    "partition": st.integers(0, PARTITIONS - 1),
    "value": st.binary(max_size=400),
    "key": st.none() | st.binary(max_size=20),
    "headers": st.none() | st.lists(st.tuples(st.text(max_size=5), st.binary(max_size=5)), max_size=3),
    "timestamp_ms": st.integers(0, 2**41),
    "delay": st.sampled_from(["none", "delay", "deliver_at"]),
    "delay_value": st.integers(1, 2**40),
    "idempotency_key": st.none() | st.text(max_size=8),
})
ops = st.lists(st.one_of(records, st.sampled_from(["linger", "flush"])), max_size=60)


def _entry(r: dict) -> tuple[bytes, bytes | None, int]:
    delay = r["delay_value"] if r["delay"] == "delay" else 0
    deliver_at = r["delay_value"] if r["delay"] == "deliver_at" else 0
    if (r["key"] is None and not r["headers"] and not r["timestamp_ms"] and not r["idempotency_key"]
            and r["delay"] == "none"):
        prefix, record_len = plain_prefix(len(r["value"]))
        return prefix, r["value"], record_len
    record = encode_record(r["value"], r["key"], r["headers"], r["timestamp_ms"], r["idempotency_key"], delay,
                           deliver_at)
    return entry(record), None, len(record)


def _fields(record: pb.Record) -> tuple:
    return (record.value, record.key if record.HasField("key") else None,
            [(h.key, h.value) for h in record.headers] or None, record.timestamp_ms, record.delay_ms,
            record.deliver_at_ms, record.idempotency_key or None)


def _sent_fields(r: dict) -> tuple:
    return (r["value"], r["key"], r["headers"] or None, r["timestamp_ms"],
            r["delay_value"] if r["delay"] == "delay" else 0, r["delay_value"] if r["delay"] == "deliver_at" else 0,
            r["idempotency_key"] or None)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_accumulated_batches_hold_every_record_once_in_order_at_consecutive_offsets(plan):
    loop = asyncio.new_event_loop()
    try:
        acc = Accumulator(loop, batch_max_bytes=BATCH_MAX, delivery_timeout_s=60)
        acc.topics["t"] = TopicInfo(PARTITIONS, LIMIT)
        sent: dict[int, list[tuple[dict, RecordFuture]]] = {p: [] for p in range(PARTITIONS)}
        logs: dict[int, list[tuple]] = {p: [] for p in range(PARTITIONS)}

        def broker_takes() -> None:
            while (batch := acc.take_sealed()) is not None:
                assert batch.size <= BATCH_MAX or batch.count == 1
                decoded = pb.RecordSet.FromString(encode(batch)).records
                assert len(decoded) == batch.count
                log = logs[batch.partition]
                result = pb.PartitionProduceResult(partition=batch.partition, base_offset=len(log),
                                                   record_count=batch.count)
                log.extend(_fields(r) for r in decoded)
                batch.outcome.resolve(result)

        for op in plan:
            if op == "linger":
                for batch in list(acc.open.values())[:1]:
                    acc.linger_expired(batch)
            elif op == "flush":
                acc.seal_all()
            else:
                prefix, value, record_len = _entry(op)
                if record_len > LIMIT:
                    with pytest.raises(ProduceError) as refused:
                        acc.add("t", prefix, value, record_len, op["key"], op["partition"], RecordFuture)
                    assert refused.value.reason == "RECORD_TOO_LARGE"
                    assert refused.value.metadata["limit"] == str(LIMIT)
                    continue
                future, _, _ = acc.add("t", prefix, value, record_len, op["key"], op["partition"], RecordFuture)
                sent[op["partition"]].append((op, future))
            broker_takes()
        acc.seal_all()
        broker_takes()
        for partition, records_sent in sent.items():
            assert logs[partition] == [_sent_fields(r) for r, _ in records_sent]
            metas = [f.result(timeout=0) for _, f in records_sent]
            assert [m.offset for m in metas] == list(range(len(records_sent)))
            assert all(m.partition == partition and m.topic == "t" for m in metas)
    finally:
        loop.close()
