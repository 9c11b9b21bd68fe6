"""Guards found in review: failed fsyncs, failed dup()s, broker-owned fields sent by a
producer, and the high watermark of fsync=always topics."""

from __future__ import annotations

import asyncio
import errno
import os
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from segments import LogFailed, PartitionLog, ReadLimits
from streamd.broker.batches import check_batch
from streamd.broker.broker import Broker
from streamd.broker.topic import TopicSettings
from streamd.client.records import values_batch
from streamd.service.errors import to_status
from streamd.testing import FakeClock
from streamd.v1 import streamd_pb2 as pb


def _open(path) -> PartitionLog:
    return PartitionLog.open(path, segment_bytes=4096, segment_ms=10**9, now_ms=0)


def test_failed_fsync_fails_the_log_instead_of_retrying(tmp_path, monkeypatch):
    plog = _open(tmp_path / "p")
    plog.append(b"x" * 10, record_count=1, append_time_ms=1)
    real_fsync = os.fdatasync

    def eio(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fdatasync", eio)
    with pytest.raises(LogFailed):
        plog.flush()
    monkeypatch.setattr(os, "fdatasync", real_fsync)
    # A retry must not report the data durable: the log refuses work until reopened.
    with pytest.raises(LogFailed):
        plog.flush()
    with pytest.raises(LogFailed):
        plog.append(b"y", record_count=1, append_time_ms=2)
    assert plog.flushed_offset == 0
    assert to_status(LogFailed(tmp_path, OSError()))[:2] == (grpc.StatusCode.UNAVAILABLE, "STORAGE_FAILED")
    plog.close()
    reopened = _open(tmp_path / "p")  # recovers from disk, as after a crash
    assert reopened.recovery is not None and reopened.log_end_offset == 1
    reopened.close()


def test_failed_dup_loses_no_dirty_segment(tmp_path, monkeypatch):
    plog = _open(tmp_path / "p")
    for i in range(20):  # several segments
        plog.append(b"x" * 500, record_count=1, append_time_ms=i)
    real_dup, calls = os.dup, []

    def flaky_dup(fd):
        if not calls:
            calls.append(fd)
            raise OSError(errno.EMFILE, "Too many open files")
        return real_dup(fd)

    monkeypatch.setattr(os, "dup", flaky_dup)
    with pytest.raises(OSError):
        plog.flush()
    synced = []
    real_fsync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real_fsync(fd)))
    assert plog.flush() == 20
    assert synced, "the second flush must fsync what the first could not"
    plog.close()


def test_explicit_zero_broker_fields_cannot_override_the_stored_header():
    batch = values_batch([b"a", b"b"]).SerializeToString()
    # base_offset (field 2, sfixed64) and record_count (field 4, fixed32) written as 0.
    sneaky = bytes([0x11]) + bytes(8) + bytes([0x25]) + bytes(4) + batch
    body, count = check_batch(sneaky, max_batch_bytes=1 << 20, max_record_bytes=1 << 20)
    assert count == 2
    parsed = pb.RecordBatch.FromString(body)
    assert parsed.records  # still a batch
    assert body == batch  # the broker-owned fields are gone from what is stored


def test_disk_full_is_resource_exhausted():
    code, reason, _, _ = to_status(OSError(errno.ENOSPC, "No space left on device"))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "DISK_FULL")


def test_fsync_always_readers_see_only_fsynced_records(tmp_path):
    settings = TopicSettings(
        retention_ms=-1, retention_bytes=-1, segment_bytes=1 << 20, segment_ms=10**9,
        max_record_bytes=1 << 20, fsync_policy="always", fsync_interval_ms=1000, compression="producer",
    )

    async def scenario() -> None:
        with ThreadPoolExecutor(2) as executor:
            broker = Broker(tmp_path / "data", defaults=settings, clock=FakeClock(), executor=executor)
            broker.open()
            broker.state = "serving"
            broker.create_topic("t", 1, {})
            raw = values_batch([b"r1", b"r2"]).SerializeToString()
            results, durable = broker.append("t", [(0, [raw])], [])
            assert broker.partition("t", 0).log_end_offset == 2
            before = broker.read("t", 0, 0, ReadLimits(100, 1 << 20))
            assert (before.data, before.log_end_offset) == (b"", 0)  # not yet durable
            assert broker.offset_for("t", 0, position="latest") == 0
            await durable
            after = broker.read("t", 0, 0, ReadLimits(100, 1 << 20))
            assert after.data and after.log_end_offset == 2 and after.next_offset == 2
            await broker.close()

    asyncio.run(scenario())


def test_a_failed_roll_leaves_the_partition_writable(tmp_path, monkeypatch):
    from segments import segment as segment_module

    plog = _open(tmp_path / "p")
    plog.append(b"x" * 3000, record_count=1, append_time_ms=1)
    real = segment_module.Segment._open_writable
    calls = []

    def failing(self, capacity):
        if not calls:
            calls.append(capacity)
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real(self, capacity)

    monkeypatch.setattr(segment_module.Segment, "_open_writable", failing)
    with pytest.raises(OSError):
        plog.append(b"y" * 3000, record_count=1, append_time_ms=2)  # needs a roll
    info = plog.append(b"y" * 3000, record_count=1, append_time_ms=2)  # retried roll works
    assert info.base_offset == 1 and plog.log_end_offset == 2
    plog.close()


def test_a_topic_that_fails_to_open_leaves_its_name_free(tmp_path, monkeypatch):
    from streamd.broker import broker as broker_module

    settings = TopicSettings(
        retention_ms=-1, retention_bytes=-1, segment_bytes=1 << 20, segment_ms=10**9,
        max_record_bytes=1 << 20, fsync_policy="never", fsync_interval_ms=1000, compression="producer",
    )

    async def scenario() -> None:
        with ThreadPoolExecutor(2) as executor:
            broker = Broker(tmp_path / "data", defaults=settings, clock=FakeClock(), executor=executor)
            broker.open()
            broker.state = "serving"
            real_open, calls = broker_module.PartitionLog.open, []

            def flaky_open(directory, **kw):
                calls.append(directory)
                if len(calls) == 2:  # the second partition fails
                    raise OSError(errno.EMFILE, "Too many open files")
                return real_open(directory, **kw)

            monkeypatch.setattr(broker_module.PartitionLog, "open", flaky_open)
            with pytest.raises(OSError):
                broker.create_topic("t", 3, {})
            monkeypatch.undo()
            assert "t" not in broker.topics and not (tmp_path / "data" / "t").exists()
            assert len(broker.create_topic("t", 3, {}).partitions) == 3
            await broker.close()

    asyncio.run(scenario())


def test_a_damaged_index_entry_is_rebuilt_not_data_loss(tmp_path):
    import numpy as np

    from segments.index import OFFSET_ENTRY

    kw = dict(segment_bytes=4096, segment_ms=10**9, index_interval_bytes=1)
    plog = PartitionLog.open(tmp_path / "p", now_ms=0, **kw)
    for _ in range(100):
        plog.append(b"\x2a\x05hello", record_count=1, append_time_ms=1)
    plog.close()
    index = tmp_path / "p" / "00000000000000000000.index"
    entries = np.fromfile(index, dtype=OFFSET_ENTRY)
    entries[2]["position"] += 1  # still increasing, so load-time checks pass
    entries.tofile(index)
    plog = PartitionLog.open(tmp_path / "p", now_ms=0, **kw)
    got = plog.read(2, ReadLimits(1, 1))
    assert got.first_offset == 2 and got.batch_count == 1
    plog.close()


def test_flush_syncs_index_files_only_when_their_entries_changed(tmp_path, monkeypatch):
    plog = PartitionLog.open(tmp_path / "p", segment_bytes=1 << 20, segment_ms=10**9, index_interval_bytes=1000,
                             now_ms=0)
    real, synced = os.fdatasync, []
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))

    def flushed_files(value: bytes, t: int) -> int:
        synced.clear()
        plog.append(value, record_count=1, append_time_ms=t)
        plog.flush()
        return len(synced)

    assert flushed_files(b"a" * 10, 1) == 3  # the log and both new index entries
    assert flushed_files(b"b" * 10, 2) == 1  # no index entry due: the log alone
    assert flushed_files(b"c" * 2000, 3) == 1
    assert flushed_files(b"d" * 10, 4) == 3  # past the interval: an entry in each index
    plog.close()
    reopened = PartitionLog.open(tmp_path / "p", segment_bytes=1 << 20, segment_ms=10**9,
                                 index_interval_bytes=1000, now_ms=0)
    assert reopened.log_end_offset == 4 and reopened.recovery is None
    reopened.close()
