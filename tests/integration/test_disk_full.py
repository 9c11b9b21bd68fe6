"""A full disk, for real (a small tmpfs, a loop-mounted ext4), through the SDK and
gRPC: every refusal is RESOURCE_EXHAUSTED / DISK_FULL, nothing half-appended is ever
readable, and produce, commits and queue settlements work again, with no restart,
once space returns. A failed fsync answers UNAVAILABLE and the partition is opened
again from disk by itself."""

from __future__ import annotations

import errno
import os

import grpc
import pytest

from streamd.client import Admin, Producer, StreamdError
from streamd.client.records import values_batch
from streamd.v1 import streamd_pb2 as pb
from tests.conftest import wait_until
from tests.full_disk import DISK_FULL, ballast_dirs, fill_into, produce_until_full, read_all

from .helpers import Stubs, error_info
from .test_metrics import samples, scrape, value

KiB = 1 << 10


def _batch(tag: str, size: int) -> pb.RecordBatch:
    return values_batch([tag.encode().ljust(size, b"-")])


def _log_ends(stubs: Stubs, topic: str) -> list[int]:
    reply = stubs.log.ListOffsets(pb.ListOffsetsRequest(topic=topic, position=pb.OFFSET_SPEC_LATEST))
    return [o.offset for o in sorted(reply.offsets, key=lambda o: o.partition)]


def _refused(call, request) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    code, reason, _ = error_info(caught.value)
    return code.name, reason


def _until_refused(call, requests) -> list[tuple[str, str]]:
    """Send ``requests`` until one is refused; the refusals (bounded by the requests)."""
    for request in requests:
        try:
            call(request)
        except grpc.RpcError as err:
            code, reason, _ = error_info(err)
            return [(code.name, reason)]
    return []


def _readable(stubs: Stubs, topic: str) -> bool:
    try:
        stubs.log.Fetch(pb.FetchRequest(topic=topic, partition=0))
    except grpc.RpcError:
        return False
    return True


def _committed(stubs: Stubs, group: str) -> dict[int, int]:
    reply = stubs.groups.FetchOffsets(pb.FetchOffsetsRequest(group=group))
    return {o.partition: o.offset for o in reply.offsets if o.offset >= 0}


def _nacks(leased: list[pb.LeasedRecord]) -> pb.SettleRequest:
    return pb.SettleRequest(group="w", topic="t", settlements=[
        pb.Settlement(lease=pb.LeaseRef(partition=r.partition, offset=r.offset, lease_id=r.lease_id),
                      action=pb.SETTLE_ACTION_NACK, delay_ms=0, reason="r" * 1000) for r in leased])


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_a_full_disk_answers_disk_full_stores_all_or_nothing_and_recovers_without_restart(
        kind, small_fs, make_server):
    root = small_fs(32 << 20, kind=kind)
    first, second, third = ballast_dirs(root, 3)
    server = make_server(data_dir=root / "data")
    stubs = Stubs(server.address)
    with Admin(server.address) as admin:
        admin.create_topic("t", 2, segment_bytes=1 << 20)  # rolls while it fills
        admin.create_topic("m", 2, segment_bytes=1 << 20)
    stubs.queues.CreateQueueGroup(pb.CreateQueueGroupRequest(group="w", topic="t"))

    # Produce until full through the SDK: only DISK_FULL, and exactly what was
    # acknowledged reads back (nothing of a refused batch, nothing twice).
    ballast = fill_into(first, leave_bytes=6 << 20)
    acked, errors = produce_until_full(server.address, "t", partitions=2, records=800)
    assert errors and set(errors) == {DISK_FULL}, set(errors)
    assert read_all(server.address, "t") == acked
    found = samples(scrape(server))
    assert sum(value(found, "streamd_log_disk_full_refusals_total", topic="t", partition=p) for p in (0, 1)) > 0

    # All or none: a request's batches for one partition, and a request's partitions.
    ballast.release()
    ballast = fill_into(second, leave_bytes=300 * KiB)
    ends = _log_ends(stubs, "m")
    two_batches = pb.ProduceRequest(topic="m", partitions=[
        pb.PartitionBatches(partition=0, batches=[_batch("a", 200 * KiB), _batch("b", 200 * KiB)])])
    assert _refused(stubs.log.Produce, two_batches) == DISK_FULL
    two_partitions = pb.ProduceRequest(topic="m", partitions=[
        pb.PartitionBatches(partition=0, batches=[_batch("c", 100 * KiB)]),
        pb.PartitionBatches(partition=1, batches=[_batch("d", 400 * KiB)])])
    assert _refused(stubs.log.Produce, two_partitions) == DISK_FULL
    assert _log_ends(stubs, "m") == ends and read_all(server.address, "m") == {}
    fits = pb.ProduceRequest(topic="m", partitions=[pb.PartitionBatches(partition=0, batches=[_batch("e", 100 * KiB)])])
    assert stubs.log.Produce(fits).results[0].base_offset == 0  # the room was there for one

    # Commits and queue settlements on a full disk: DISK_FULL, nothing half-done.
    leased = list(stubs.queues.Receive(pb.ReceiveRequest(group="w", topic="t", max_records=40)).records)
    assert len(leased) >= 10
    fill_into(third)
    commits = (pb.CommitOffsetsRequest(group="g", offsets=[
        pb.OffsetCommit(topic="t", partition=p, offset=n, metadata=str(n) * 4000) for p in (0, 1)]) for n in range(1, 500))
    assert _until_refused(stubs.groups.CommitOffsets, commits) == [DISK_FULL]
    committed = _committed(stubs, "g")  # those before the refusal (if any)
    settles = (_nacks(leased[i:i + 2]) for i in range(0, len(leased) - 2, 2))
    assert _until_refused(stubs.queues.Settle, settles) == [DISK_FULL]
    assert _refused(stubs.queues.Settle, _nacks(leased[-2:])) == DISK_FULL  # still full: refused at once

    # Space returns: everything works again, no restart.
    for directory in (first, second, third):
        for path in directory.iterdir():
            path.unlink()
    with Producer(server.address) as producer:
        meta = producer.send_and_wait("t", b"after", partition=1)
    acked[(1, meta.offset)] = b"after"
    assert value(samples(scrape(server)), "streamd_log_disk_full", topic="t", partition=1) == 0
    stubs.groups.CommitOffsets(pb.CommitOffsetsRequest(group="g", offsets=[pb.OffsetCommit(topic="t", partition=0, offset=7)]))
    results = stubs.queues.Settle(_nacks(leased[-2:])).results  # the journal was rewritten from memory
    assert len(results) == 2 and not any(r.HasField("error") for r in results)
    assert read_all(server.address, "t") == acked
    committed[0] = 7
    assert _committed(stubs, "g") == committed
    stubs.close()

    # What is on disk is what the broker said: a restart finds the same.
    server.stop()
    again = make_server(data_dir=root / "data")
    assert read_all(again.address, "t") == acked
    stubs = Stubs(again.address)
    assert _committed(stubs, "g") == committed
    stubs.close()


def test_topic_creation_on_a_full_disk_answers_disk_full_and_leaves_nothing(small_fs, make_server):
    root = small_fs(16 << 20)
    (ballast_dir,) = ballast_dirs(root, 1)
    server = make_server(data_dir=root / "data")
    ballast = fill_into(ballast_dir)
    with Admin(server.address) as admin:
        with pytest.raises(StreamdError) as caught:
            admin.create_topic("late", 3)
        assert (caught.value.code, caught.value.reason) == DISK_FULL
        assert [t.name for t in admin.list_topics()] == []
        ballast.release()
        admin.create_topic("late", 3)
        assert [t.name for t in admin.list_topics()] == ["late"]
    assert sorted(p.name for p in (root / "data" / "@tmp").iterdir()) == []


def test_dead_letters_that_cannot_be_written_are_logged_once_and_written_once_there_is_room(
        small_fs, make_server, caplog):
    from streamd.client.queue import QueueReceiver

    root = small_fs(16 << 20)
    (ballast_dir,) = ballast_dirs(root, 1)
    server = make_server(data_dir=root / "data")
    with Admin(server.address) as admin, Producer(server.address) as producer:
        admin.create_topic("w", 1)
        producer.send_batch("w", 0, [b"job-%d" % i for i in range(20)])
    with QueueReceiver("g", "w", server.address, create={"max_deliveries": 1}) as receiver:
        messages = receiver.receive(20)
        assert len(messages) == 20
        ballast = fill_into(ballast_dir)  # no room for the dead-letter topic w.dlq
        for msg in messages:
            msg.nack(reason="poison")  # the last delivery: each is dead-lettered
        # Every record's attempt fails (and is retried after a backoff); said once.
        wait_until(lambda: sum(r.getMessage().startswith("dead-lettering w/0") for r in caplog.records) >= 20,
                   timeout=15)
        failures = [r for r in caplog.records if r.getMessage().startswith("dead-lettering w/0")]
        assert [r.levelname for r in failures].count("ERROR") == 1, [r.getMessage() for r in failures[:3]]
        ballast.release()
        assert wait_until(lambda: sum(p.dead_lettered for p in receiver.describe().partitions) == 20, timeout=30)
    recovered = [r for r in caplog.records if getattr(r, "event", "") == "dead_letter_recovered"]
    assert len(recovered) == 1 and recovered[0].levelname == "WARNING"
    assert len(read_all(server.address, "w.dlq")) == 20  # each once


class _FsyncFailsOnce:
    """``os`` for ``segments.log``: its first fsync of a file's data (``fdatasync``)
    fails with ENOSPC, as ext4 may when writeback cannot allocate."""

    def __init__(self) -> None:
        self.failed = 0

    def __getattr__(self, name):
        return getattr(os, name)

    def fdatasync(self, fd: int) -> None:
        if not self.failed:
            self.failed += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fdatasync(fd)


def test_a_failed_fsync_answers_unavailable_and_the_partition_recovers_by_itself(server, monkeypatch):
    from segments import log as log_module

    with Admin(server.address) as admin:
        admin.create_topic("t", 1, fsync="always")
    stubs = Stubs(server.address)
    stubs.produce_values("t", 0, [b"first"])
    fake = _FsyncFailsOnce()
    monkeypatch.setattr(log_module, "os", fake)
    # What the failed fsync covered may or may not be kept: a retryable answer, not
    # DISK_FULL (which would let a producer reuse the batch's sequence numbers).
    request = pb.ProduceRequest(topic="t", partitions=[pb.PartitionBatches(partition=0, batches=[_batch("x", 10)])])
    assert _refused(stubs.log.Produce, request) == ("UNAVAILABLE", "STORAGE_FAILED")
    assert _refused(stubs.log.Fetch, pb.FetchRequest(topic="t", partition=0)) == ("UNAVAILABLE", "STORAGE_FAILED")
    assert wait_until(lambda: _readable(stubs, "t"), timeout=30)  # the repair job opened it again
    with Producer(server.address) as producer:  # idempotent: its retries are not appended twice
        assert producer.send_and_wait("t", b"second").offset == 2
    values = [v for _, v in sorted(read_all(server.address, "t").items())]
    assert values[0] == b"first" and values[2] == b"second" and values[1].startswith(b"x")
    assert fake.failed == 1
    stubs.close()
