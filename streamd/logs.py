"""Broker log output: the standard ``logging`` module with one of two formats.

- ``text`` (default), for people: ``2026-11-28 10:00:00,123 INFO streamd.server message``.
- ``json``, for log pipelines: one JSON object per line with ``ts`` (UTC, ISO 8601,
  milliseconds), ``level``, ``logger``, ``message``, ``exc`` when there is a
  traceback, and every ``extra`` field the call passed. Lifecycle lines carry an
  ``event`` field (``start``, ``stopping``, ``stop``, ``loaded``, ``recovery``,
  ``topic_created``, ``topic_deleted``, ``retention``, ``rebalance``) so a pipeline
  can select them without parsing messages.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
#: Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.UTC)
        doc = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                doc.setdefault(key, value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str)


def configure(*, level: str, log_format: str, stream=None) -> None:
    """Send every logger's output to ``stream`` (stderr) in ``log_format``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
