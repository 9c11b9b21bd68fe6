"""Time as a dependency: logic that tests must control takes a ``Clock``.

``SystemClock`` reads the wall clock; ``streamd.testing.FakeClock`` is moved by hand.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000
