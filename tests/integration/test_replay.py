"""``streamd replay`` through main(argv) against a real broker: into a topic (other
partition count, provenance, timestamps), to JSON lines, by offset and time ranges,
filters, dry runs, pacing, a pinned end while producers write, interrupt and resume."""

from __future__ import annotations

import datetime as dt
import json
import re
import shlex
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamd.cli import replay
from streamd.cli.format import record_json
from streamd.cli.main import main
from streamd.client import Admin, Consumer, Producer
from streamd.partitioner import key_partition

from ..conftest import wait_until

PROVENANCE = {"streamd-source-topic", "streamd-source-partition", "streamd-source-offset"}


def run_cli(capsys, server, *argv):
    code = main(["--server", server.address, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def produce_dataset(address: str, topic: str, count: int = 60, *, start: int = 0) -> None:
    """Keyed and keyless records with headers; a third carry no timestamp (append time)."""
    with Producer(address) as producer:
        futures = []
        for i in range(start, start + count):
            key = None if i % 4 == 0 else b"k%d" % (i % 5)
            value = b"\xff\x00binary" if i == 7 else b"value-%d" % i
            headers = [("n", b"%d" % i), ("parity", b"even" if i % 2 == 0 else b"odd")]
            futures.append(producer.send(topic, value, key=key, headers=headers,
                                         partition=i % 3 if key is None else None,
                                         timestamp_ms=0 if i % 3 == 0 else 1_600_000_000_000 + i))
        for f in futures:
            f.result(30)


def read_all(address: str, topic: str) -> list:
    """Every record of ``topic``, partition by partition in offset order."""
    with Consumer(address) as consumer:
        consumer.assign(topic)
        records = list(consumer.records(exit_at_end=True))
    return sorted(records, key=lambda r: (r.partition, r.offset))


def source_of(record) -> tuple[int, int]:
    h = dict(record.headers)
    return int(h["streamd-source-partition"]), int(h["streamd-source-offset"])


def own_headers(record) -> tuple:
    return tuple(h for h in record.headers if h[0] not in PROVENANCE)


@pytest.fixture
def source(server):
    with Admin(server.address) as admin:
        admin.create_topic("src", 3)
        admin.create_topic("dst", 2)
    produce_dataset(server.address, "src")
    return read_all(server.address, "src")


def assert_copied(server, expected, target="dst") -> list:
    """``target`` holds each of ``expected`` exactly once, faithfully, in source order."""
    copied = read_all(server.address, target)
    by_source = {source_of(r): r for r in copied}
    assert len(by_source) == len(copied) == len(expected)
    for src in expected:
        dst = by_source[(src.partition, src.offset)]
        assert (dst.key, dst.value, own_headers(dst), dst.timestamp_ms) == (
            src.key, src.value, src.headers, src.timestamp_ms)
        assert dict(dst.headers)["streamd-source-topic"] == b"src"
        if src.key is not None:
            assert dst.partition == key_partition(src.key, 2)
    for p in {r.partition for r in copied}:  # per source partition, order is kept
        for sp in range(3):
            offsets = [source_of(r)[1] for r in copied if r.partition == p and source_of(r)[0] == sp]
            assert offsets == sorted(offsets)
    return copied


def test_replay_offset_range_into_topic_with_other_partition_count(server, source, capsys):
    code, out, err = run_cli(capsys, server, "replay", "src", "--from", "2", "--to", "15", "--into", "dst")
    assert code == 0, err
    expected = [r for r in source if 2 <= r.offset < 15]
    assert_copied(server, expected)
    assert any(r.timestamp_ms > 1_700_000_000_000 for r in expected)  # some came with no timestamp
    n = len(expected)
    assert err.splitlines()[-1].startswith(f"replay: read {n}, matched {n}, written {n} in ")


def test_replay_to_stdout_json_lines_equals_source(server, source, capsys):
    code, out, err = run_cli(capsys, server, "replay", "src", "--from", "0", "--output", "-")
    assert code == 0, err
    assert out.splitlines() == [record_json(r) for r in source]
    first = json.loads(out.splitlines()[0])
    assert set(first) == {"topic", "partition", "offset", "timestamp_ms", "key", "value", "headers"}


def test_replay_by_datetime_range(server, capsys):
    with Admin(server.address) as admin:
        admin.create_topic("t", 3)
    phases, limits = [], []
    with Producer(server.address) as producer:
        for phase in range(3):
            if phases:  # the next phase is appended strictly later (bounded wait)
                limit = max(m.append_time_ms for m in phases[-1]) + 1
                wait_until(lambda limit=limit: time.time() * 1000 > limit + 1, timeout=5)
                limits.append(limit)
            futures = [producer.send("t", b"%d-%d" % (phase, i), key=b"k%d" % i) for i in range(12)]
            phases.append([f.result(30) for f in futures])
    assert min(m.append_time_ms for m in phases[1]) >= limits[0]
    iso = dt.datetime.fromtimestamp(limits[0] / 1000, dt.UTC).isoformat(timespec="milliseconds")
    code, out, err = run_cli(capsys, server, "replay", "t", "--from", iso, "--to", f"@{limits[1]}", "--output", "-")
    assert code == 0, err
    values = sorted(json.loads(line)["value"] for line in out.splitlines())
    assert values == sorted(f"1-{i}" for i in range(12))


def test_replay_key_and_header_filters(server, source, capsys):
    code, out, err = run_cli(capsys, server, "replay", "src", "--from", "0", "--key", "k1",
                             "--header", "parity=odd", "--output", "-")
    assert code == 0, err
    expected = [r for r in source if r.key == b"k1" and ("parity", b"odd") in r.headers]
    assert expected and out.splitlines() == [record_json(r) for r in expected]
    code, out, err = run_cli(capsys, server, "replay", "src", "--from", "0", "--header", "parity=even",
                             "--header", "n=8", "--into", "dst")
    assert code == 0, err
    assert_copied(server, [r for r in source if dict(r.headers) == {"n": b"8", "parity": b"even"}])


def test_replay_dry_run_plans_and_writes_nothing(server, source, capsys):
    code, out, err = run_cli(capsys, server, "replay", "src", "--from", "1", "--to", "9", "--partition", "0,2",
                             "--key", "k2", "--into", "dst", "--dry-run")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["PARTITION", "FROM", "TO", "RECORDS", "MATCHED"]
    ends = {p: sum(1 for r in source if r.partition == p) for p in range(3)}
    expected = []
    for p in (0, 2):
        stop = min(9, ends[p])
        matched = sum(1 for r in source if r.partition == p and 1 <= r.offset < stop and r.key == b"k2")
        expected.append([str(p), "1", str(stop), str(stop - 1), str(matched)])
    assert rows[1:] == expected
    code, out, _ = run_cli(capsys, server, "replay", "src", "--from", "0", "--dry-run")
    assert code == 0 and [line.split()[-1] for line in out.splitlines()[1:]] == [str(ends[p]) for p in range(3)]
    with Admin(server.address) as admin:
        assert all(o.log_end_offset == 0 for o in admin.list_offsets("dst", latest=True))


def test_replay_with_rate_limit_finishes(server, source, capsys):
    code, _, err = run_cli(capsys, server, "replay", "src", "--from", "0", "--to", "4", "--rate", "200/s",
                           "--into", "dst")
    assert code == 0, err
    assert_copied(server, [r for r in source if r.offset < 4])


def test_replay_default_end_is_the_log_end_at_start(server, source, capsys, monkeypatch):
    write = replay.TopicSink.write
    calls = []

    def write_while_producers_write(self, record):
        if not calls:
            produce_dataset(server.address, "src", 30, start=1000)
        calls.append(record)
        write(self, record)

    monkeypatch.setattr(replay.TopicSink, "write", write_while_producers_write)
    code, _, err = run_cli(capsys, server, "replay", "src", "--from", "0", "--into", "dst")
    assert code == 0, err
    assert_copied(server, source)
    assert len(read_all(server.address, "src")) == len(source) + 30


def interrupt_after(monkeypatch, sink_class, count: int) -> None:
    write = sink_class.write
    calls = [0]

    def write_then_interrupt(self, record):
        if calls[0] == count:
            raise KeyboardInterrupt
        calls[0] += 1
        write(self, record)

    monkeypatch.setattr(sink_class, "write", write_then_interrupt)


def expected_frontier(selected, ranges, count: int) -> dict[int, int]:
    """Where a replay that wrote ``count`` of ``selected`` (in partition order) stands."""
    taken, interrupted = selected[:count], selected[count]
    frontier = {}
    for p, (start, stop) in ranges.items():
        mine = [r.offset + 1 for r in taken if r.partition == p]
        if p < interrupted.partition:
            frontier[p] = stop
        else:
            frontier[p] = mine[-1] if mine else start
    return frontier


def resume_argv(err: str) -> list[str]:
    command = re.search(r"resume with: (.*)", err).group(1)
    argv = shlex.split(command)
    assert argv[0] == "streamd"
    return argv[1:]


def test_interrupted_replay_into_topic_resumes_with_no_duplicate_or_gap(server, source, capsys, monkeypatch):
    ends = {p: sum(1 for r in source if r.partition == p) for p in range(3)}
    count = ends[0] + 3  # stop inside partition 1
    interrupt_after(monkeypatch, replay.TopicSink, count)
    code, _, err = run_cli(capsys, server, "replay", "src", "--from", "1", "--into", "dst")
    assert code == 130
    selected = [r for r in source if r.offset >= 1]
    frontier = expected_frontier(selected, {p: (1, ends[p]) for p in range(3)}, count)
    assert f"next offsets not yet copied: {replay._offsets_text(frontier)}" in err
    assert_copied(server, selected[:count])
    produce_dataset(server.address, "src", 9, start=2000)  # must not be replayed on resume
    monkeypatch.undo()
    code, _, err = run_cli(capsys, server, *resume_argv(err)[2:])  # without --server (run_cli adds it)
    assert code == 0, err
    assert_copied(server, selected)


def test_interrupted_replay_to_file_resumes_by_appending(server, source, capsys, monkeypatch, tmp_path):
    path = tmp_path / "out.jsonl"
    ends = {p: sum(1 for r in source if r.partition == p) for p in range(3)}
    selected = [r for r in source if ("parity", b"even") in r.headers]
    count = sum(1 for r in selected if r.partition == 0) - 1  # stop inside partition 0
    interrupt_after(monkeypatch, replay.JsonLinesSink, count)
    code, _, err = run_cli(capsys, server, "replay", "src", "--from", "0", "--header", "parity=even",
                           "--output", str(path))
    assert code == 130
    frontier = expected_frontier(selected, {p: (0, ends[p]) for p in range(3)}, count)
    assert f"next offsets not yet copied: {replay._offsets_text(frontier)}" in err
    monkeypatch.undo()
    code, _, err = run_cli(capsys, server, *resume_argv(err)[2:])
    assert code == 0, err
    assert path.read_text().splitlines() == [record_json(r) for r in selected]


def test_failed_write_reports_where_it_stopped_and_exits_1(server, capsys):
    with Admin(server.address) as admin:
        admin.create_topic("src", 1)
        admin.create_topic("small", 1, max_record_bytes=1000)
    with Producer(server.address) as producer:
        for i in range(30):
            producer.send("src", b"x" * (5000 if i == 20 else 10)).result(30)
    code, _, err = run_cli(capsys, server, "replay", "src", "--from", "0", "--into", "small")
    assert code == 1
    assert "streamd: replay failed:" in err and "RECORD_TOO_LARGE" in err
    stopped = int(re.search(r"next offsets not yet copied: 0:(\d+)", err).group(1))
    assert stopped <= 20  # the record that failed, or the batch it was in, is not counted as copied
    copied = read_all(server.address, "small")
    assert [source_of(r)[1] for r in copied] == list(range(stopped))
    assert f"--resume 0:{stopped}" in err


def test_replay_clamps_offsets_below_the_log_start(make_server, capsys):
    server = make_server(retention_check_ms=50)
    with Admin(server.address) as admin:
        admin.create_topic("t", 1, segment_bytes=4096, retention_bytes=8192)
        with Producer(server.address) as producer:
            for i in range(20):
                producer.send_batch("t", 0, [b"record-%02d" % i + b"." * 200] * 5)
        assert wait_until(lambda: admin.list_offsets("t")[0].log_start_offset > 0, timeout=10)
    code, out, err = run_cli(capsys, server, "replay", "t", "--from", "0", "--output", "-")
    assert code == 0, err
    assert "below the log start" in err
    offsets = [json.loads(line)["offset"] for line in out.splitlines()]
    assert offsets and offsets[0] > 0 and offsets == list(range(offsets[0], 100))


def test_replay_errors_are_one_line_and_usage_errors_exit_2(server, source, capsys):
    code, out, err = run_cli(capsys, server, "replay", "missing", "--from", "0", "--output", "-")
    assert code == 1 and err.count("\n") == 1 and "TOPIC_NOT_FOUND" in err
    code, out, err = run_cli(capsys, server, "replay", "src", "--from", "0", "--into", "missing")
    assert code == 1 and err.count("\n") == 1 and "TOPIC_NOT_FOUND" in err
    code, _, err = run_cli(capsys, server, "replay", "src", "--from", "0", "--partition", "7", "--output", "-")
    assert code == 1 and err.count("\n") == 1
    code, _, err = run_cli(capsys, server, "replay", "src", "--from", "0")
    assert code == 2
    with pytest.raises(SystemExit) as exited:
        main(["replay", "src", "--from", "0", "--into", "a", "--output", "-"])
    assert exited.value.code == 2


def test_replay_random_ranges_and_filters_match_the_model(server, source, capsys):
    @settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(from_=st.integers(0, 25), to=st.none() | st.integers(0, 25),
           partitions=st.none() | st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True),
           key=st.none() | st.sampled_from(["k0", "k1", "k4"]),
           parity=st.none() | st.sampled_from(["even", "odd"]))
    def check(from_, to, partitions, key, parity):
        argv = ["replay", "src", "--from", str(from_), "--output", "-"]
        argv += ["--to", str(to)] if to is not None else []
        argv += ["--partition", ",".join(map(str, partitions))] if partitions else []
        argv += ["--key", key] if key else []
        argv += ["--header", f"parity={parity}"] if parity else []
        code, out, err = run_cli(capsys, server, *argv)
        assert code == 0, err
        expected = [r for r in source
                    if (not partitions or r.partition in partitions)
                    and from_ <= r.offset and (to is None or r.offset < to)
                    and (key is None or r.key == key.encode())
                    and (parity is None or ("parity", parity.encode()) in r.headers)]
        assert out.splitlines() == [record_json(r) for r in expected]

    check()
