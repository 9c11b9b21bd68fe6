"""Retry policy of a queue group: exponential backoff with jitter.

After failed delivery number ``n`` (1 after the first failure; a Nack or an expired
lease), the record becomes visible again after::

    d     = min(max_delay_ms, initial_delay_ms * multiplier ** (n - 1))
    delay = d                  jitter "none"
            uniform(0, d)      jitter "full"   (spreads retries most; the default)
            uniform(d/2, d)    jitter "equal"  (keeps at least half of the backoff)

``initial_delay_ms = 0`` retries immediately; ``multiplier = 1`` is a fixed delay.
The random source is injected so tests can pin it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

JITTERS = ("none", "full", "equal")
MAX_DELAY_LIMIT_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True)
class RetryPolicy:
    initial_delay_ms: int = 1000
    multiplier: float = 2.0
    max_delay_ms: int = 60_000
    jitter: str = "full"

    def __post_init__(self) -> None:
        if not 0 <= self.initial_delay_ms <= MAX_DELAY_LIMIT_MS:
            raise ValueError(f"initial_delay_ms must be 0 .. {MAX_DELAY_LIMIT_MS}")
        if not 0 <= self.max_delay_ms <= MAX_DELAY_LIMIT_MS:
            raise ValueError(f"max_delay_ms must be 0 .. {MAX_DELAY_LIMIT_MS}")
        if not 1.0 <= self.multiplier <= 100.0:
            raise ValueError("multiplier must be 1 .. 100")
        if self.jitter not in JITTERS:
            raise ValueError(f"jitter must be one of {', '.join(JITTERS)}")

    def ceiling_ms(self, failures: int) -> int:
        """The un-jittered delay after failed delivery number ``failures`` (>= 1)."""
        if failures < 1:
            raise ValueError("failures counts from 1")
        # Cap the exponent first: multiplier ** n overflows a float for large n.
        delay = float(self.initial_delay_ms)
        for _ in range(min(failures - 1, 64)):
            delay *= self.multiplier
            if delay >= self.max_delay_ms:
                break
        return int(min(delay, self.max_delay_ms))

    def bounds_ms(self, failures: int) -> tuple[int, int]:
        """The range the jittered delay falls in."""
        d = self.ceiling_ms(failures)
        if self.jitter == "none":
            return d, d
        if self.jitter == "equal":
            return d // 2, d
        return 0, d

    def delay_ms(self, failures: int, rng: random.Random) -> int:
        low, high = self.bounds_ms(failures)
        return low if low == high else rng.randint(low, high)
