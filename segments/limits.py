"""``ReadLimits``: how much one read may return.

The one value that travels from a fetch request down to ``Segment.read`` (service ->
``Broker.fetch`` -> ``Partition.read`` -> ``PartitionLog.read`` -> ``Segment.read``)
instead of a ``max_records``/``max_bytes`` pair of keywords at every step.

A read returns whole frames: always the first one holding the offset asked for
(however large), then more while the totals stay within both limits, so a limit of
0 (or 1) still returns one frame. Callers validate and default the numbers (the
service does, for requests); here they are plain non-negative integers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReadLimits:
    """At most ``max_records`` records and ``max_bytes`` bytes of frames; the first
    frame goes out whatever its size (see the module docstring)."""

    max_records: int
    max_bytes: int


#: Everything there is (scans that rebuild state; tests).
UNLIMITED = ReadLimits(max_records=1 << 62, max_bytes=1 << 62)
