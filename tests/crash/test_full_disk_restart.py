"""A real broker SIGKILLed on a full disk starts again on it (still full), serves
every acknowledged record, answers DISK_FULL for produce, and takes produce again
once space returns: on a tmpfs and on a loop-mounted ext4.

Recovery must not read through a map (a torn frame over the holes of a sparse,
preallocated segment is a SIGBUS on a full tmpfs) nor need space (index files,
partition.json, the active segment's preallocation)."""

from __future__ import annotations

import os

import pytest

from streamd.client import Admin, Producer
from tests.full_disk import DISK_FULL, ballast_dirs, fill_into, produce_until_full, read_all

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_a_broker_killed_on_a_full_disk_starts_on_it_and_recovers_when_space_returns(
        kind, small_fs, server_process):
    root = small_fs(32 << 20, kind=kind)
    # The data directory is the mount itself, so the server's log (beside it) is not on it.
    first, second, third = ballast_dirs(root, 3)
    proc = server_process(data_dir=root)
    with Admin(proc.address) as admin:
        # Segments larger than the disk: making the last one active again at start-up
        # needs room for its preallocated indexes (384 KiB), which a full disk lacks.
        admin.create_topic("t", 2, segment_bytes=64 << 20)
    ballast = fill_into(first, leave_bytes=6 << 20)
    acked, errors = produce_until_full(proc.address, "t", partitions=2, records=1000)
    assert errors and set(errors) == {DISK_FULL}, set(errors)
    assert len(acked) > 100
    proc.kill()

    os.sync()  # ext4: writeback gives back the dead broker's delayed-allocation reservations
    more_ballast = fill_into(second)  # whatever the kill left free: the disk is full
    proc = server_process(data_dir=root)  # starts on the full disk (no SIGBUS, no ENOSPC)
    assert read_all(proc.address, "t") == acked
    fill_into(third)  # what recovery gave back (preallocated tails), taken too
    again, errors = produce_until_full(proc.address, "t", partitions=2, records=200, tag="again")
    assert errors and set(errors) == {DISK_FULL}, set(errors)
    acked.update(again)

    ballast.release()
    more_ballast.release()
    with Producer(proc.address) as producer:
        for p in (0, 1):
            meta = producer.send_and_wait("t", b"after", partition=p)
            acked[(p, meta.offset)] = b"after"
    assert read_all(proc.address, "t") == acked
    assert proc.terminate() == 0
