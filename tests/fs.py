"""Small real filesystems for failure tests: a tmpfs or a loop-mounted ext4.

    with small_filesystem(tmp_path / "mnt", 64 << 20, kind="ext4") as root:
        ...                             # root is a directory on a 64 MiB filesystem
        ballast = fill(root)            # take (almost) all free space
        ballast.release()               # and give it back

Both need root (``mount``); ``mount_available()`` says whether this machine can,
and tests skip with a reason when it cannot. Every mount is unmounted (lazily, if
something still holds it) when the block ends, whatever happened inside.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def mount_available() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


def skip_without_mount() -> None:
    if not mount_available():
        pytest.skip("mounting a small filesystem needs root and mount(8)")


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def small_filesystem(mountpoint: Path, size_bytes: int, *, kind: str = "tmpfs") -> Iterator[Path]:
    """Mount a ``kind`` ("tmpfs" or "ext4") filesystem of ``size_bytes`` at
    ``mountpoint`` (created); yield it; unmount and clean up afterwards."""
    skip_without_mount()
    mountpoint = Path(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    image = mountpoint.with_name(mountpoint.name + ".img")
    if kind == "tmpfs":
        _run("mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mountpoint))
    elif kind == "ext4":
        if shutil.which("mkfs.ext4") is None:
            pytest.skip("mkfs.ext4 is not installed")
        with open(image, "wb") as f:
            f.truncate(size_bytes)
        # No reserved blocks and no journal-less surprises: a full disk is full for root too.
        _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
        _run("mount", "-o", "loop", str(image), str(mountpoint))
    else:
        raise ValueError(f"unknown filesystem kind {kind!r}")
    try:
        yield mountpoint
    finally:
        try:
            _run("umount", str(mountpoint))
        except subprocess.CalledProcessError:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=60)
        image.unlink(missing_ok=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Ballast:
    """Files that take up a filesystem's free space until released."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.paths: list[Path] = []

    def release(self, nbytes: int | None = None) -> None:
        """Remove ballast files (all of them, or until at least ``nbytes`` are freed)."""
        freed = 0
        while self.paths and (nbytes is None or freed < nbytes):
            path = self.paths.pop()
            freed += path.stat().st_size
            path.unlink()


def fill(root: Path, *, leave_bytes: int = 0, chunk_bytes: int = 1 << 20) -> Ballast:
    """Write ballast files under ``root`` until at most ``leave_bytes`` are free
    (bounded: stops at the first ENOSPC)."""
    ballast = Ballast(root)
    buf = b"\xa5" * chunk_bytes
    for i in range(1 << 20):
        room = free_bytes(root) - leave_bytes
        if room <= 0:
            break
        path = Path(root) / f"ballast-{i:06d}"
        ballast.paths.append(path)
        try:
            with open(path, "wb") as f:
                f.write(buf[: min(chunk_bytes, room)])
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            break
    return ballast
