"""The dedup window: keys seen within the window, expiry by time and by count, and
its rebuild from the log (keys of batches appended within the window only)."""

from __future__ import annotations

import lz4.frame
import pytest

from segments import PartitionLog
from streamd.broker.dedup import DedupWindow, stored_keys
from streamd.v1 import streamd_pb2 as pb

DAY = 86_400_000


def test_a_key_is_seen_within_the_window_only():
    window = DedupWindow(1000)
    window.add(["a", "", "b"], 10, append_time_ms=5000)
    assert window.lookup("a", 5000) == 10 and window.lookup("b", 6000) == 12
    assert window.lookup("", 5000) is None and window.lookup("c", 5000) is None
    assert window.offset_of("a") == 10
    assert window.lookup("a", 6001) is None  # older than the window: forgotten
    assert len(window) == 0 and window.offset_of("a") is None


def test_a_key_appended_again_after_the_window_replaces_the_old_one():
    window = DedupWindow(1000)
    window.add(["a"], 1, append_time_ms=0)
    window.add(["a"], 50, append_time_ms=2000)
    window.evict(2000)  # drops the stale entry of the first "a", not the new one
    assert window.lookup("a", 2500) == 50


def test_past_the_key_limit_the_oldest_keys_go_first():
    window = DedupWindow(DAY, max_keys=3)
    window.add(["a", "b", "c", "d"], 0, append_time_ms=0)
    assert len(window) == 3 and window.lookup("a", 0) is None and window.lookup("d", 0) == 3


def test_past_the_key_character_budget_the_oldest_keys_go_first():
    # Keys are limited only by the record size: the window bounds their total length
    # too, or a producer of long keys would make it hold a million of them.
    window = DedupWindow(DAY, max_key_chars=10)
    window.add(["a" * 4, "b" * 4], 0, append_time_ms=0)
    window.add(["c" * 4], 2, append_time_ms=0)
    assert len(window) == 2 and window.lookup("a" * 4, 0) is None and window.lookup("c" * 4, 0) == 2
    window.add(["d" * 50], 3, append_time_ms=0)  # longer than the whole budget: not kept
    assert len(window) == 0 and window._chars == 0
    window.add(["e"], 4, append_time_ms=0)
    window.evict(DAY + 1)
    assert len(window) == 0 and window._chars == 0


def test_a_window_must_be_positive():
    with pytest.raises(ValueError):
        DedupWindow(0)


def keyed_body(keys, *, lz4: bool = False) -> bytes:
    payload = pb.RecordSet(records=[pb.Record(value=k.encode(), idempotency_key=k) for k in keys]).SerializeToString()
    if lz4:
        return pb.RecordBatch(compression=pb.COMPRESSION_LZ4, records=lz4_compress(payload)).SerializeToString()
    return pb.RecordBatch(records=payload).SerializeToString()


def lz4_compress(payload: bytes) -> bytes:
    return lz4.frame.compress(payload)


def test_stored_keys_reads_plain_and_lz4_batches():
    assert stored_keys(keyed_body(["a", "", "b"])) == ["a", "", "b"]
    assert stored_keys(keyed_body(["x"], lz4=True)) == ["x"]
    assert stored_keys(keyed_body(["", ""])) is None
    assert stored_keys(b"\xff\xff") is None


def test_rebuild_reads_only_the_batches_appended_within_the_window(tmp_path):
    plog = PartitionLog.open(tmp_path / "p", segment_bytes=200, segment_ms=DAY, index_interval_bytes=64, now_ms=0)
    for t in range(10):  # one batch per second, two keys each, several segments
        plog.append(keyed_body([f"k{t}a", f"k{t}b"], lz4=t % 2 == 1), record_count=2, append_time_ms=t * 1000)
    window = DedupWindow(3500)
    read = window.rebuild(plog, now_ms=9000)
    assert read == 4  # appended at 6, 7, 8, 9 s
    assert window.lookup("k6a", 9000) == 12 and window.lookup("k9b", 9000) == 19
    assert window.lookup("k5a", 9000) is None
    plog.close()
