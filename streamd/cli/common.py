"""What several commands share, in a leaf module of ``streamd.cli`` (it imports no
other module of it, so every command module can import it at the top):
``parse_time`` (a time argument as epoch ms), ``format_age`` (a duration as "1h2m3s"),
``TokenBucket`` (the ``--rate`` limiter of replay and queue requeue) and
``client_warnings`` (the SDK's warnings on stderr while a command runs).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sys
import time
from collections.abc import Iterator

MAX_SLEEP_S = 0.1  # the longest single sleep of the rate limiter (keeps Ctrl-C prompt)


def parse_time(text: str) -> int:
    """Epoch ms ("1700000000000", "@1700000000000") or ISO-8601 ("2026-11-28T10:00:00Z")."""
    text = text.lstrip("@")
    if text.isdigit():
        return int(text)
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp() * 1000)


def format_age(ms: int) -> str:
    if ms <= 0:
        return "-"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return "".join(f"{v}{u}" for v, u in ((days, "d"), (hours, "h"), (minutes, "m"), (s, "s")) if v) or "0s"


class TokenBucket:
    """At most ``rate`` records a second, bursts up to a tenth of a second's worth."""

    def __init__(self, rate: float, *, clock=time.monotonic, sleep=time.sleep) -> None:
        self._rate = rate
        self._capacity = max(1.0, rate / 10)
        self._tokens = self._capacity
        self._clock, self._sleep = clock, sleep
        self._last = clock()
        self._max_waits = int(1 / (rate * MAX_SLEEP_S)) + 3  # enough bounded sleeps for one token

    def acquire(self) -> None:
        for _ in range(self._max_waits):
            now = self._clock()
            self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens >= 1:
                break
            self._sleep(min((1 - self._tokens) / self._rate, MAX_SLEEP_S))
        self._tokens -= 1


@contextlib.contextmanager
def client_warnings() -> Iterator[None]:
    """The SDK's warnings (e.g. damaged records skipped) as ``streamd: warning: ...``
    lines on stderr while a command runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("streamd: warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("streamd.client")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
