"""``streamd inspect``: a partition directory listed and checked offline, through
``main(argv)``; every run must leave every file's bytes and mtime as they were."""

from __future__ import annotations

import json
import os

import pytest

from segments import PartitionLog
from segments.batch import HEADER_SIZE, encode_frame
from streamd.cli.inspect import inspect_partition
from streamd.cli.main import main
from streamd.client.records import add_record, encode_batch, values_batch
from streamd.v1 import streamd_pb2 as pb

T0 = 1_700_000_000_000
FIRST = "00000000000000000000"


def open_log(path):
    return PartitionLog.open(path, segment_bytes=300, segment_ms=10**12, index_interval_bytes=64, now_ms=0)


def body_for(i: int) -> tuple[bytes, int, list[bytes]]:
    """Every third batch is one keyed lz4 record with a non-UTF-8 header; the rest
    plain batches of 1-2 records (as a producer sends them and the broker stores them)."""
    if i % 3 == 2:
        record_set = pb.RecordSet()
        value = f"lz4-{i}".encode()
        add_record(record_set, value, key=f"key-{i}".encode(), headers=[("bin", b"\xff\x00")], timestamp_ms=T0 - 1)
        return encode_batch(record_set, "lz4").SerializeToString(), 1, [value]
    values = [f"value-{i}-{j}".encode() for j in range(i % 3 + 1)]
    return values_batch(values).SerializeToString(), len(values), values


def write(log, n: int, first: int = 0) -> list[dict]:
    written = []
    for i in range(first, first + n):
        body, count, values = body_for(i)
        info = log.append(body, record_count=count, append_time_ms=T0 + 10 * i)
        written.append({"base_offset": info.base_offset, "record_count": count, "append_time_ms": info.append_time_ms,
                        "size_bytes": info.size, "codec": "lz4" if i % 3 == 2 else "none", "values": values})
    return written


@pytest.fixture
def partition(tmp_path):
    """A cleanly closed partition of several segments; (directory, batches written)."""
    path = tmp_path / "data" / "orders" / "3"
    log = open_log(path)
    written = write(log, 14)
    log.close()
    return path, written


def snapshot(path):
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


def inspect(capsys, path, *flags):
    """Run the command; assert it changed nothing in the directory."""
    before = snapshot(path) if path.is_dir() else None
    code = main(["inspect", str(path), *flags])
    out, err = capsys.readouterr()
    if before is not None:
        assert snapshot(path) == before, "inspect modified the partition directory"
    return code, out, err


def segment_bases(path):
    return sorted(int(p.stem) for p in path.glob("*.log"))


def batch_positions(doc):
    return {(seg["base_offset"], b["base_offset"]): b["position"] for seg in doc["segments"] for b in seg["batches"]}


def json_doc(capsys, path, *flags):
    code, out, _ = inspect(capsys, path, "--json", *flags)
    return code, json.loads(out)


# -- healthy partitions --------------------------------------------------------------
def test_healthy_partition_verifies_and_lists_every_batch(capsys, partition):
    path, written = partition
    assert len(segment_bases(path)) >= 3
    code, out, err = inspect(capsys, path, "--verify")
    assert (code, err) == (0, "")
    assert "partition" in out and "topic orders, partition 3" in out
    assert out.rstrip().endswith("verify: ok: 0 error(s), 0 warning(s)")
    for base in segment_bases(path):
        assert f"segment {base:020d}.log: base offset {base}" in out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit() and "T" in line]
    assert [(int(r[1]), int(r[3]), int(r[4])) for r in rows] == [
        (w["base_offset"], w["record_count"], w["append_time_ms"]) for w in written]
    assert "CORRUPT" not in out


def test_json_document_matches_the_log(capsys, partition):
    path, written = partition
    code, doc = json_doc(capsys, path, "--verify")
    assert code == 0 and doc["errors"] == doc["warnings"] == 0 and doc["problems"] == []
    assert (doc["topic"], doc["partition"], doc["clean_shutdown"]) == ("orders", 3, True)
    assert (doc["log_start_offset"], doc["log_end_offset"]) == (0, written[-1]["base_offset"] + written[-1]["record_count"])
    assert [s["base_offset"] for s in doc["segments"]] == segment_bases(path)
    batches = [b for s in doc["segments"] for b in s["batches"]]
    keys = ("base_offset", "record_count", "append_time_ms", "size_bytes", "codec")
    assert [{k: b[k] for k in keys} for b in batches] == [{k: w[k] for k in keys} for w in written]
    assert all(b["checksum"] == "ok" and b["records"] is None for b in batches)
    for seg in doc["segments"]:
        assert seg["data_bytes"] == seg["file_bytes"] and seg["tail"] is None
        positions = {b["position"]: b["base_offset"] for b in seg["batches"]}
        index, times = seg["offset_index"], seg["time_index"]
        assert index["used"] == len(index["entries"]) >= 1 and times["used"] == index["used"]
        for e, t in zip(index["entries"], times["entries"], strict=False):
            assert positions[e["position"]] == e["offset"] == t["offset"] and e["problem"] is None
    assert doc["state"]["recovery_point"]["offset"] == doc["log_end_offset"]


def test_records_are_decoded_with_lz4_keys_and_base64_headers(capsys, partition):
    path, written = partition
    code, out, _ = inspect(capsys, path, "--records")
    assert code == 0
    for w in written:
        for value in w["values"]:
            assert f'"{value.decode()}"' in out
    assert '"key-2"' in out and "bin=base64:/wA=" in out
    code, doc = json_doc(capsys, path, "--records")
    records = [r for s in doc["segments"] for b in s["batches"] for r in b["records"]]
    assert [r["offset"] for r in records] == list(range(doc["log_end_offset"]))
    assert [r["value"] for r in records] == [v.decode() for w in written for v in w["values"]]
    lz4 = [b for s in doc["segments"] for b in s["batches"] if b["codec"] == "lz4"]
    assert lz4 and all(b["min_timestamp_ms"] == b["max_timestamp_ms"] == T0 - 1 for b in lz4)
    assert lz4[0]["records"][0]["headers"] == {"bin": {"base64": "/wA="}}
    assert lz4[0]["records"][0]["key"] == "key-2"


def test_segment_option_limits_the_output_to_one_segment(capsys, partition):
    path, _ = partition
    bases = segment_bases(path)
    code, out, _ = inspect(capsys, path, "--segment", str(bases[1]), "--verify")
    assert code == 0
    assert f"segment {bases[1]:020d}.log" in out
    assert f"segment {bases[0]:020d}.log" not in out and f"segment {bases[2]:020d}.log" not in out
    code, doc = json_doc(capsys, path, "--segment", str(bases[1]))
    assert [s["base_offset"] for s in doc["segments"]] == [bases[1]]
    assert doc["log_end_offset"] is None  # the last segment was not read
    code, out, err = inspect(capsys, path, "--segment", str(bases[1] + 1))
    assert code == 1 and out == "" and err.startswith("streamd: ") and err.count("\n") == 1


def test_pure_layer_reports_without_printing(partition):
    path, written = partition
    report = inspect_partition(path, records=True)
    assert report.errors == [] and report.warnings == []
    assert sum(len(s.batches) for s in report.segments) == len(written)
    assert report.segments[0].batches[0].records[0]["value"] == "value-0-0"


# -- damage ----------------------------------------------------------------------------
def test_flipped_byte_is_reported_corrupt_and_fails_verify(capsys, partition):
    path, _ = partition
    _, doc = json_doc(capsys, path)
    seg = doc["segments"][1]
    victim = seg["batches"][1]
    log_path = path / seg["file"]
    data = bytearray(log_path.read_bytes())
    data[victim["position"] + HEADER_SIZE + 3] ^= 0x40
    log_path.write_bytes(bytes(data))
    code, out, _ = inspect(capsys, path)
    assert code == 0 and "CORRUPT" in out and "status: 1 error(s)" in out
    code, out, _ = inspect(capsys, path, "--verify")
    assert code == 1 and "verify: FAILED" in out
    line = next(line for line in out.splitlines() if "checksum mismatch" in line)
    assert line.split()[:4] == ["error", seg["file"], str(victim["position"]), str(victim["base_offset"])]
    code, doc = json_doc(capsys, path, "--verify")
    assert code == 1
    assert [(p["file"], p["position"], p["offset"]) for p in doc["problems"]] == [
        (seg["file"], victim["position"], victim["base_offset"])]
    # A bad checksum does not stop the walk: every later batch is still listed.
    assert [b["checksum"] for b in doc["segments"][1]["batches"]].count("CORRUPT") == 1
    assert len(doc["segments"][1]["batches"]) == len(seg["batches"])


def test_garbled_index_entries_are_marked_and_fail_verify(capsys, partition):
    path, _ = partition
    index = path / f"{FIRST}.index"
    raw = bytearray(index.read_bytes())
    assert len(raw) >= 16
    raw[12] ^= 0x01  # entry 1's position: no longer a batch boundary
    index.write_bytes(bytes(raw))
    timeindex = path / f"{FIRST}.timeindex"
    raw = bytearray(timeindex.read_bytes())
    raw[16] ^= 0x01  # entry 1's timestamp: no longer the batch's append time
    timeindex.write_bytes(bytes(raw))
    code, out, _ = inspect(capsys, path)
    assert code == 0 and "is not at a batch boundary" in out and "the batch's append time is" in out
    code, doc = json_doc(capsys, path, "--verify")
    assert code == 1
    assert [(p["file"], p["position"]) for p in doc["problems"]] == [(f"{FIRST}.index", 1), (f"{FIRST}.timeindex", 1)]
    assert all(b["checksum"] == "ok" for s in doc["segments"] for b in s["batches"])


def test_index_bytes_past_the_used_entries_are_reported(capsys, partition):
    path, _ = partition
    index = path / f"{FIRST}.index"
    raw = index.read_bytes()
    index.write_bytes(raw + bytes(8 * 3) + (7).to_bytes(4, "little") + bytes(4) + bytes(5))
    code, doc = json_doc(capsys, path, "--verify")
    assert code == 1
    messages = [p["message"] for p in doc["problems"]]
    assert any("not a whole number of 8-byte entries" in m for m in messages)
    assert any("past the" in m and "used entries" in m for m in messages)


def test_truncated_log_tail_is_a_torn_tail(capsys, partition):
    path, written = partition
    last = path / f"{segment_bases(path)[-1]:020d}.log"
    size = last.stat().st_size
    os.truncate(last, size - 5)
    code, out, _ = inspect(capsys, path, "--verify")
    assert code == 1 and "torn tail:" in out and "runs past the end of the file" in out
    code, doc = json_doc(capsys, path, "--verify")
    seg = doc["segments"][-1]
    assert seg["tail"]["position"] == size - written[-1]["size_bytes"]
    assert seg["batches"][-1]["base_offset"] == written[-2]["base_offset"]
    assert doc["log_end_offset"] == written[-1]["base_offset"]


def test_zero_filled_tail_of_a_crashed_active_segment_is_a_warning(capsys, tmp_path):
    path = tmp_path / "t" / "0"
    log = open_log(path)
    written = write(log, 8)
    log.flush()
    log._release()  # files left as a killed broker leaves them: preallocated, untrimmed
    last = path / f"{segment_bases(path)[-1]:020d}.log"
    assert last.stat().st_size == 300
    code, doc = json_doc(capsys, path, "--verify")
    assert code == 0 and doc["errors"] == 0 and doc["clean_shutdown"] is False
    assert [p["message"].split(":")[0] for p in doc["problems"]] == ["zero fill"]
    assert doc["log_end_offset"] == written[-1]["base_offset"] + written[-1]["record_count"]
    index = doc["segments"][-1]["offset_index"]
    assert index["capacity"] > index["used"] == len(index["entries"])  # preallocated zeros are not entries
    with last.open("r+b") as f:  # a torn write after the zeros of a crashed segment
        f.seek(290)
        f.write(b"\x0a\x01")
    code, out, _ = inspect(capsys, path, "--verify")
    assert code == 1 and "torn tail:" in out and "2 non-zero" in out


def test_missing_segment_breaks_offset_contiguity(capsys, partition):
    path, _ = partition
    middle = segment_bases(path)[1]
    for suffix in (".log", ".index", ".timeindex"):
        (path / f"{middle:020d}{suffix}").unlink()
    code, doc = json_doc(capsys, path, "--verify")
    assert code == 1
    assert any("not contiguous" in p["message"] for p in doc["problems"])


def test_offset_gap_and_time_going_back_inside_a_segment(capsys, tmp_path):
    path = tmp_path / "p"
    path.mkdir()
    body = values_batch([b"x"]).SerializeToString()
    frames = [encode_frame(body, base_offset=0, append_time_ms=T0, record_count=1),
              encode_frame(body, base_offset=5, append_time_ms=T0 - 1, record_count=1)]
    (path / f"{FIRST}.log").write_bytes(b"".join(frames))
    code, doc = json_doc(capsys, path, "--verify")
    assert code == 1
    notes = doc["segments"][0]["batches"][1]["notes"]
    assert "does not continue the offsets (expected 1)" in notes[0] and "is before the previous" in notes[1]
    assert any("missing" in p["message"] and p["severity"] == "warning" for p in doc["problems"])


@pytest.mark.parametrize("where", ["topic_dir", "missing", "file"])
def test_a_path_that_is_not_a_partition_exits_1(capsys, partition, where):
    path, _ = partition
    target = {"topic_dir": path.parent, "missing": path / "nope", "file": path / f"{FIRST}.log"}[where]
    for flags in ((), ("--verify",), ("--json",)):
        code, out, err = inspect(capsys, target, *flags)
        assert code == 1 and out == "" and err.startswith("streamd: ") and err.count("\n") == 1


@pytest.mark.parametrize("which", ["last segment", "sealed segment"])
def test_a_count_failing_its_checksum_does_not_move_the_segment_end(capsys, partition, which):
    """A flipped high bit in the record_count of a segment's last batch: the next
    offset (and the log end) come from what verifies, not from that header."""
    path, written = partition
    _, doc = json_doc(capsys, path)
    true_end = doc["log_end_offset"]
    seg = doc["segments"][-1 if which == "last segment" else 0]
    log_path = path / seg["file"]
    data = bytearray(log_path.read_bytes())
    data[seg["batches"][-1]["position"] + 33] ^= 0x40  # the top byte of record_count
    log_path.write_bytes(bytes(data))
    code, doc = json_doc(capsys, path, "--verify")
    assert code == 1 and doc["log_end_offset"] == true_end
    index = -1 if which == "last segment" else 0
    assert doc["segments"][index]["next_offset"] == (true_end if index == -1 else doc["segments"][1]["base_offset"])
    assert doc["segments"][index]["end_verified"] is False
    assert not any("not contiguous" in p["message"] for p in doc["problems"])
    code, out, _ = inspect(capsys, path)
    assert "the last batch fails its checksum" in out
