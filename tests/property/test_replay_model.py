"""The replay selection layer against a plain list-comprehension model: generated
partitions of records (keys, headers, timestamps, log start offsets), start/stop specs
(offsets, per-partition offsets, times, resume offsets) and filters."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from streamd.cli.replay import Progress, ReplayState, TokenBucket, resume_command
from streamd.cli.replay_select import (
    Offset,
    PerPartition,
    Time,
    parse_position,
    requested_offsets,
    resolve_ranges,
    select,
)
from streamd.client.records import ConsumerRecord
from streamd.v1 import streamd_pb2 as pb

KEYS = [None, b"a", b"b", "\u00e9".encode()]
HEADERS = [("h", b"1"), ("h", b"2"), ("g", b"1"), ("g", b"")]


@st.composite
def partition_logs(draw):
    """{partition: (log_start, [ConsumerRecord...])} with append times non-decreasing."""
    logs = {}
    for p in range(draw(st.integers(1, 3))):
        log_start = draw(st.integers(0, 6))
        append, records = 1_000, []
        for offset in range(log_start, log_start + draw(st.integers(0, 14))):
            append += draw(st.integers(0, 3))
            record = pb.Record(value=b"v%d" % offset, timestamp_ms=draw(st.sampled_from([0, 5, 2_000_000])))
            key = draw(st.sampled_from(KEYS))
            if key is not None:
                record.key = key
            record.headers.extend(pb.RecordHeader(key=k, value=v) for k, v in draw(st.lists(st.sampled_from(HEADERS),
                                                                                              max_size=3)))
            records.append(ConsumerRecord("src", p, offset, record, append))
        logs[p] = (log_start, records)
    return logs


def positions(partitions):
    offsets = st.integers(0, 24)
    return st.one_of(
        st.none(),
        st.builds(Offset, st.integers(0, 4)),  # mostly non-empty ranges
        st.builds(Offset, offsets),
        st.builds(Time, st.integers(990, 1_060)),
        st.builds(PerPartition, st.dictionaries(st.sampled_from(partitions), offsets, max_size=3)),
    )


def offset_for_time(log_start, records, timestamp_ms):
    return next((r.offset for r in records if r._append_time_ms >= timestamp_ms), log_start + len(records))


def model_offset(spec, p, log_start, records, default):
    if spec is None:
        return default
    if isinstance(spec, Offset):
        return spec.offset
    if isinstance(spec, PerPartition):
        return spec.offsets.get(p, default)
    return offset_for_time(log_start, records, spec.timestamp_ms)


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_selection_equals_list_comprehension_model(data):
    logs = data.draw(partition_logs())
    all_parts = sorted(logs)
    parts = data.draw(st.lists(st.sampled_from(all_parts), min_size=1, unique=True))
    from_, to = data.draw(positions(all_parts)), data.draw(positions(all_parts))
    resume = data.draw(st.none() | st.dictionaries(st.sampled_from(parts), st.integers(0, 24)))
    key = data.draw(st.sampled_from(KEYS))
    headers = data.draw(st.lists(st.sampled_from(HEADERS), max_size=2))

    bounds = {p: (s, s + len(recs)) for p, (s, recs) in logs.items()}

    def offsets_for_time(ts):
        return {p: offset_for_time(s, recs, ts) for p, (s, recs) in logs.items()}

    starts = requested_offsets(from_, parts, default={p: b[0] for p, b in bounds.items()},
                               offsets_for_time=offsets_for_time)
    stops = requested_offsets(to, parts, default={p: b[1] for p, b in bounds.items()},
                              offsets_for_time=offsets_for_time)
    ranges, notes = resolve_ranges(bounds, starts, stops, resume=resume)
    got = [r for rng in ranges
           for r in select(iter(logs[rng.partition][1]), from_offset=rng.start, to_offset=rng.stop,
                           key=key, headers=headers)]

    def lo(p):
        s, recs = logs[p]
        wanted = (resume or {}).get(p, model_offset(from_, p, s, recs, s))
        return max(wanted, s)

    def hi(p):
        s, recs = logs[p]
        return min(model_offset(to, p, s, recs, s + len(recs)), s + len(recs))

    expected = [r for p in sorted(parts) for r in logs[p][1]
                if lo(p) <= r.offset < hi(p)
                and (key is None or r.key == key)
                and all(h in r.headers for h in headers)]
    assert got == expected
    assert [r.partition for r in ranges] == sorted(parts)
    for rng in ranges:
        assert rng.start == lo(rng.partition) and rng.size == max(0, hi(rng.partition) - lo(rng.partition))
    clamped = sum(1 for p in parts if (resume or {}).get(p, model_offset(from_, p, *logs[p], bounds[p][0]))
                  < bounds[p][0])
    assert sum("below the log start" in n for n in notes) == clamped


@settings(max_examples=40, deadline=None)
@given(logs=partition_logs(), key=st.sampled_from(KEYS),
       headers=st.lists(st.sampled_from(HEADERS), min_size=1, max_size=3))
def test_filters_equal_model_over_whole_partitions(logs, key, headers):
    for _, records in logs.values():
        got = list(select(iter(records), key=key, headers=headers))
        assert got == [r for r in records if (key is None or r.key == key) and all(h in r.headers for h in headers)]


@settings(max_examples=30, deadline=None)
@given(records=st.lists(st.tuples(st.integers(0, 40), st.sampled_from(KEYS)), max_size=20),
       to_offset=st.none() | st.integers(0, 40))
def test_select_stops_reading_at_the_stop_offset(records, to_offset):
    offsets = sorted({o for o, _ in records})
    consumed = []

    def source():
        for o in offsets:
            consumed.append(o)
            yield ConsumerRecord("t", 0, o, pb.Record(value=b"x"), 0)

    got = [r.offset for r in select(source(), to_offset=to_offset)]
    assert got == [o for o in offsets if to_offset is None or o < to_offset]
    assert consumed == offsets[: len(got) + (len(got) < len(offsets))]


def test_parse_position_reads_offsets_per_partition_offsets_and_times():
    assert parse_position("42") == Offset(42)
    assert parse_position("0:5,2:7") == PerPartition({0: 5, 2: 7})
    assert parse_position("@1700000000000") == Time(1_700_000_000_000)
    assert parse_position("2023-11-14T22:13:20Z") == Time(1_700_000_000_000)


def test_resume_command_pins_stops_and_carries_filters():
    import argparse

    from streamd.cli.main import build_parser

    args = build_parser().parse_args(["--server", "h:1", "replay", "src", "--from", "@5", "--key", "k y",
                                      "--header", "a=b=c", "--partition", "0,2", "--into", "dst",
                                      "--rate", "10/s"])
    assert isinstance(args, argparse.Namespace)
    ranges, _ = resolve_ranges({0: (0, 9), 2: (0, 4)}, {0: 1, 2: 0}, {0: 9, 2: 4})
    command = resume_command(args, ranges, {0: 5, 2: 4})
    assert command == ("streamd --server h:1 replay src --from @5 --to 0:9,2:4 --partition 0,2 --key 'k y' "
                       "--header a=b=c --into dst --rate 10/s --resume 0:5,2:4")


def test_token_bucket_paces_with_bounded_sleeps():
    now = [0.0]
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(20, clock=lambda: now[0], sleep=sleep)
    for _ in range(42):
        bucket.acquire()
    assert 1.9 <= now[0] <= 2.1  # 40 tokens at 20/s after a 2-token burst
    assert max(sleeps) <= 0.1


class FakeTTY:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_progress_is_one_line_updated_at_most_five_times_a_second_on_a_tty():
    now = [100.0]
    state = ReplayState({0: 0}, started=100.0)
    tty, pipe = FakeTTY(True), FakeTTY(False)
    progress, quiet = Progress(tty, 1280, clock=lambda: now[0]), Progress(pipe, 1280, clock=lambda: now[0])
    for _ in range(80):  # 10 s of work in 1/8 s steps
        now[0] += 0.125
        state.read += 16
        state.matched += 8
        progress.update(state)
        quiet.update(state)
    progress.clear()
    assert pipe.text == ""
    assert "\n" not in tty.text and tty.text.count("\r") == 40 + 2  # every other step, then cleared
    assert "\rreplay: 632 copied, 64 rec/s, ETA 0s" in tty.text
    assert tty.text.endswith("\r")
