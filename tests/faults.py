"""Damage done to real files for corruption tests."""

from __future__ import annotations

from pathlib import Path


def flip_byte(path: Path, position: int, mask: int = 0x01) -> None:
    """XOR the byte at ``position`` of ``path`` with ``mask`` (in place)."""
    with open(path, "r+b") as fh:
        fh.seek(position)
        byte = fh.read(1)[0]
        fh.seek(position)
        fh.write(bytes([byte ^ mask]))
