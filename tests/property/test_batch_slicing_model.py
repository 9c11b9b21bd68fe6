"""Cutting stored batches by offset (``streamd.codec.record_runs``) against a
plain model: a dict offset -> record per partition, and the list of offsets asked for.

Generated: per partition, a log of dense offsets from a random start, cut into batches
of random sizes (some lz4), of which a random subset is in the answer; leased ranges
anywhere around it (across several batches, inside one, on no batch, adjacent,
overlapping, out of order). Checked through the queue receivers' decoder
(``_messages``, on a Receive answer that went through the wire format, its batches in
any order and one maybe twice) and the consumers' (``decode_batches`` / ``iter_batch``
from an offset at, inside, before or past the batches, which come ascending as a Fetch
or Subscribe answers them). All of them cut batches with ``batch_window``.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from streamd.client.queue import _messages
from streamd.client.records import decode_batches, iter_batch
from streamd.codec import add_record, batch_window, encode_batch, record_runs
from streamd.v1 import streamd_pb2 as pb

TOPIC = "t"


def stored_value(partition: int, offset: int) -> bytes:
    return b"p%d-o%d" % (partition, offset)


@st.composite
def stored_batches(draw, partition: int):
    """(batches in the answer, ascending, {offset: (value, key, append_time_ms)} of
    those batches)."""
    offset = draw(st.integers(0, 40))
    batches, stored = [], {}
    for _ in range(draw(st.integers(0, 6))):
        size = draw(st.integers(1, 12))
        append_time = draw(st.integers(1, 10**6))
        keyed = draw(st.booleans())
        record_set = pb.RecordSet()
        for o in range(offset, offset + size):
            add_record(record_set, stored_value(partition, o), key=b"k%d" % o if keyed else None)
        batch = encode_batch(record_set, draw(st.sampled_from(["none", "lz4"])))
        batch.base_offset, batch.record_count, batch.append_time_ms = offset, size, append_time
        if draw(st.booleans()) or not batches:  # the answer holds a subset of the log's batches
            batches.append(batch)
            stored.update({o: (stored_value(partition, o), b"k%d" % o if keyed else None, append_time)
                           for o in range(offset, offset + size)})
        offset += size
    return batches, stored


@st.composite
def leased_ranges(draw, around: int):
    """Inclusive (first, last) ranges near offsets 0 .. ``around``; maybe overlapping."""
    out = []
    for _ in range(draw(st.integers(0, 8))):
        first = draw(st.integers(0, around + 10))
        out.append((first, first + draw(st.integers(0, 25))))
    return out


@st.composite
def receive_answers(draw):
    """A batched Receive answer and the model of each partition: (partition, stored,
    ranges with their delivery counts)."""
    reply = pb.ReceiveResponse()
    model = []
    for p in draw(st.permutations(range(draw(st.integers(1, 3))))):
        batches, stored = draw(stored_batches(p))
        if batches and draw(st.booleans()):
            batches.append(draw(st.sampled_from(batches)))  # the same batch twice
        ranges = draw(leased_ranges(max(stored, default=40)))
        part = reply.partitions.add(partition=p)
        part.batches.extend(draw(st.permutations(batches)))
        for n, (first, last) in enumerate(ranges):
            # A distinct delivery count per range shows which range a record came by.
            part.leased.add(first_offset=first, last_offset=last, lease_id=100 + p, delivery_count=n + 1,
                            lease_expires_ms=5_000 + p)
        model.append((p, stored, list(enumerate(ranges, 1))))
    return pb.ReceiveResponse.FromString(reply.SerializeToString()), model


def expected_messages(model) -> list[tuple]:
    """Per partition (in answer order) the leased offsets held by a stored batch, each
    once, ascending; an offset in several ranges comes by the one that starts first
    (then ends first)."""
    out = []
    for p, stored, ranges in model:
        offsets: dict[int, int] = {}
        for deliveries, (first, last) in sorted(ranges, key=lambda r: r[1]):
            for o in range(first, last + 1):
                offsets.setdefault(o, deliveries)
        for o in sorted(offsets):
            if o in stored:
                value, key, append_time = stored[o]
                out.append((p, o, value, key, append_time, offsets[o], 100 + p, 5_000 + p))
    return out


@settings(max_examples=400, deadline=None)
@given(receive_answers())
def test_receive_decoding_hands_out_exactly_the_leased_records(answer):
    reply, model = answer
    got = [(m.partition, m.offset, m.value, m.key, m.timestamp_ms, m.delivery_count, m.lease_id, m.lease_expires_ms)
           for m in _messages(TOPIC, reply, None, 30.0, 0.0)]
    assert got == expected_messages(model)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fetch_decoding_hands_out_the_records_from_the_offset_asked_for(data):
    batches, stored = data.draw(stored_batches(0))
    min_offset = data.draw(st.integers(0, max(stored, default=0) + 3))
    want = [(o, *stored[o]) for o in sorted(stored) if o >= min_offset]

    def rows(records) -> list[tuple]:
        return [(r.offset, r.value, r.key, r.timestamp_ms) for r in records]

    assert rows(decode_batches(batches, TOPIC, 0, min_offset)) == want
    # One batch at a time (as the streaming readers go).
    assert rows(r for b in batches for r in iter_batch(b, TOPIC, 0, min_offset)) == want


def test_runs_reach_no_batch_outside_the_ranges():
    """A batch no range reaches is not even decoded (its bytes here are not a RecordSet)."""
    good = encode_batch(pb.RecordSet(records=[pb.Record(value=b"a"), pb.Record(value=b"b")]))
    good.base_offset = 10
    garbage = pb.RecordBatch(base_offset=0, record_count=10, records=b"\xff\xff\xff")
    runs = list(record_runs([garbage, good], [(11, 11, "x"), (12, 30, "y")]))
    assert [(tag, first, [r.value for r in records]) for tag, first, _, records in runs] == [("x", 11, [b"b"])]


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 30), st.integers(0, 12), st.integers(-5, 45), st.integers(-5, 45))
def test_batch_window_is_the_batch_offsets_in_the_range(base, count, first, last):
    lo, hi = batch_window(base, count, first, last)
    assert 0 <= lo <= hi <= count
    assert list(range(base + lo, base + hi)) == [o for o in range(base, base + count) if first <= o <= last]
