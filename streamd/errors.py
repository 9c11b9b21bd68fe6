"""The base of streamd's typed errors above the storage layer.

A ``StructuredError`` has a stable ``reason`` (an ErrorInfo reason, UPPER_SNAKE_CASE,
never changed once released) and structured fields that travel as ErrorInfo
metadata. ``streamd.broker.errors.BrokerError`` and
``consumer_groups.errors.GroupError`` derive from it; ``streamd.service.errors``
maps each class to a gRPC status code.
"""

from __future__ import annotations


class StructuredError(Exception):
    reason = "ERROR"

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.fields = {k: v for k, v in fields.items() if v is not None}

    def metadata(self) -> dict[str, str]:
        """The structured fields as ErrorInfo metadata (string values)."""
        return {k: str(v) for k, v in self.fields.items()}
