"""Test helper: what a byte string of stored frames holds."""

from __future__ import annotations

from segments.batch import body_of, iter_headers


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(base_offset, record_count, append_time_ms, body) of every frame; the data must
    be nothing but whole frames."""
    out, end = [], 0
    for h in iter_headers(data):
        out.append((h.base_offset, h.record_count, h.append_time_ms, body_of(data[h.position:h.end])))
        end = h.end
    assert end == len(data), "trailing bytes that are not a frame"
    return out
