"""Crash-safe writes of small state files (partition.json, offsets, snapshots).

``write_atomic`` leaves either the old or the new content at ``path``, never a mix:
the data goes to a unique temporary file in the same directory (``.<name>.<random>.tmp``),
is fsynced, renamed over ``path``, and the directory is fsynced so the rename itself
survives a power loss. Leftover ``*.tmp`` files from a crash are garbage; owners may
delete them on open. Thread-safe: concurrent writers of one path each rename a
complete file; the last rename wins.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .layout import TEMP_SUFFIX

__all__ = ["TEMP_SUFFIX", "fsync_directory", "remove_durable", "write_atomic"]


def fsync_directory(directory: Path | str) -> None:
    """Make creations, renames and removals of entries in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path | str, data: bytes) -> None:
    """Replace the content of ``path`` with ``data`` atomically and durably."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(path.parent)


def remove_durable(path: Path | str) -> bool:
    """Remove ``path`` (if present) and make the removal durable; whether it existed."""
    path = Path(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_directory(path.parent)
    return True
