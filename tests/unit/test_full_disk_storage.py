"""The storage engine on a real full filesystem (a small tmpfs, a loop-mounted ext4):
an append is DiskFull and stores nothing of itself; a log opened on a full disk
serves reads and takes appends once there is room; recovery never reads through a
map (SIGBUS on a full tmpfs) and needs no space."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from segments import DiskFull, PartitionLog, ReadLimits
from segments.batch import encode_frame
from tests.full_disk import ballast_dirs, fill_into

KINDS = ["tmpfs", "ext4"]
KiB = 1 << 10


def _open(path, segment_bytes: int = 1 << 20) -> PartitionLog:
    return PartitionLog.open(path, segment_bytes=segment_bytes, segment_ms=10**9, now_ms=0)


def _all(plog: PartitionLog) -> bytes:
    return plog.read(plog.log_start_offset, ReadLimits(1 << 30, 1 << 30)).data


@pytest.mark.parametrize("kind", KINDS)
def test_an_append_on_a_full_disk_is_disk_full_and_stores_nothing_of_itself(kind, small_fs):
    root = small_fs(16 << 20, kind=kind)
    (ballast_dir,) = ballast_dirs(root, 1)
    plog = _open(root / "p")
    ballast = fill_into(ballast_dir, leave_bytes=3 << 20)
    sizes = [300 * KiB, 200 * KiB, 7 * KiB, 64 * KiB]
    stored, full = [], 0
    for i in range(200):  # fills within ~3 MiB / 7 KiB appends; bounded anyway
        body = bytes([65 + i % 26]) * sizes[i % len(sizes)]
        end = plog.log_end_offset
        try:
            plog.append(body, record_count=1, append_time_ms=i)
        except DiskFull as exc:
            full += 1
            assert exc.errno and "p" in str(exc) and plog.log_end_offset == end
            continue
        stored.append(body)
    assert full and stored
    data = _all(plog)
    # Two batches together, when only the first would fit: neither is stored.
    with pytest.raises(DiskFull):
        plog.append_batches([(b"x" * KiB, 1), (b"y" * (4 << 20), 1)], append_time_ms=500)
    assert _all(plog) == data and plog.log_end_offset == len(stored)
    plog._release()  # as a crash leaves it: nothing half-written to cut
    ballast.release()
    again = _open(root / "p")
    assert again.recovery is not None and again.recovery.bytes_truncated == 0
    assert _all(again) == data and again.log_end_offset == len(stored)
    again.append(b"after", record_count=1, append_time_ms=1000)
    again.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_log_opened_on_a_full_disk_serves_reads_and_takes_appends_once_there_is_room(kind, small_fs):
    root = small_fs(32 << 20, kind=kind)
    (ballast_dir,) = ballast_dirs(root, 1)
    # Written with 1 MiB segments, opened with 1 GiB ones: making the last segment
    # active then preallocates 6 MiB of indexes, more than recovery gives back.
    plog = _open(root / "p")
    for i in range(10):
        plog.append(b"r%d" % i, record_count=1, append_time_ms=i)
    data = _all(plog)
    plog._release()  # killed
    os.sync()
    ballast = fill_into(ballast_dir)
    reopened = _open(root / "p", segment_bytes=1 << 30)  # no ENOSPC
    assert not reopened.writable and _all(reopened) == data and reopened.log_end_offset == 10
    with pytest.raises(DiskFull):
        reopened.append(b"refused", record_count=1, append_time_ms=20)
    assert _all(reopened) == data
    ballast.release()
    assert reopened.append(b"r10", record_count=1, append_time_ms=20).base_offset == 10
    assert reopened.writable
    reopened.close()
    final = _open(root / "p", segment_bytes=1 << 30)
    assert final.recovery is None and final.log_end_offset == 11
    final.close()


_RECOVER = textwrap.dedent("""
    import sys
    from segments import PartitionLog
    plog = PartitionLog.open(sys.argv[1], segment_bytes=64 << 20, segment_ms=10**9, now_ms=0)
    print(plog.log_end_offset, plog.recovery.bytes_truncated)
""")


def test_recovery_reads_a_torn_tail_over_holes_of_a_full_tmpfs_without_sigbus(small_fs, tmp_path):
    root = small_fs(16 << 20)
    (ballast_dir,) = ballast_dirs(root, 1)
    plog = _open(root / "p", segment_bytes=64 << 20)
    for i in range(3):
        plog.append(b"r" * 100, record_count=1, append_time_ms=i)
    end = plog._active.size
    plog._release()
    # A torn frame: the first 4 KiB of a 2 MiB one, its length prefix pointing far into
    # the holes of the sparse, preallocated 64 MiB file.
    torn = encode_frame(b"t" * (2 << 20), base_offset=3, append_time_ms=3, record_count=1)[: 4 * KiB]
    fd = os.open(root / "p" / "00000000000000000000.log", os.O_RDWR)
    try:
        os.pwrite(fd, torn, end)
    finally:
        os.close(fd)
    fill_into(ballast_dir)
    # In a child: a read fault on a hole of the full tmpfs would kill it with SIGBUS.
    out = subprocess.run([sys.executable, "-c", _RECOVER, str(root / "p")], capture_output=True, text=True,
                         timeout=60, cwd=os.getcwd())
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.split() == ["3", str(len(torn))]
