"""Errors the SDK raises.

    StreamdError                 any failure reported by the broker or the transport
    ├── ProduceError             a produce request was refused (e.g. RECORD_TOO_LARGE):
    │                            nothing of the batch was stored
    ├── OutcomeUnknown           a produce request whose answer never came (or was an
    │                            error that does not say): its records may or may not
    │                            have been stored
    └── CorruptRecordsError      DATA_LOSS / CORRUPT_BATCH: offsets first..last of a
                                 partition cannot be read; reading goes on at next_offset
    (grpc.RpcError stays as the ``cause`` of transport failures)

Each carries the gRPC ``code`` name, the stable ``reason`` from google.rpc.ErrorInfo
and its ``metadata`` (for OUT_OF_RANGE: log_start_offset, log_end_offset). Errors
made by the SDK itself use the same fields: a call that got no answer within its
deadline is ``DEADLINE_EXCEEDED`` / ``TIMED_OUT`` (``streamd.client._channel``); a
record not sent within the producer's ``delivery_timeout_ms`` is
``DEADLINE_EXCEEDED`` / ``DELIVERY_TIMEOUT`` (definitely not stored) or an
``OutcomeUnknown``.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class StreamdError(Exception):
    def __init__(self, code: str, reason: str, message: str, metadata: dict[str, str] | None = None) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> StreamdError:
        # A failed call's RpcError is also its grpc.Call (code, details, trailers).
        call: Any = err
        code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
        reason, metadata = "", {}
        try:
            status = rpc_status.from_call(call)
        except Exception:
            status = None
        if status is not None:
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reason, metadata = info.reason, dict(info.metadata)
        details = call.details() if hasattr(call, "details") else str(err)
        if cls is StreamdError and reason == CorruptRecordsError.REASON and "next_offset" in metadata:
            return CorruptRecordsError(code.name, reason, details or "", metadata)
        return cls(code.name, reason, details or "", metadata)


class ProduceError(StreamdError):
    pass


class CorruptRecordsError(StreamdError):
    """Offsets ``first_offset .. last_offset`` of ``topic``/``partition`` are damaged on
    the broker (a batch failed its checksum, a segment file was cut short) and cannot be
    read; the records after them can, from ``next_offset``. Consumers stop here by
    default; with ``skip_corrupt=True`` they go on at ``next_offset`` and log a warning."""

    REASON = "CORRUPT_BATCH"

    def __init__(self, code: str, reason: str, message: str, metadata: dict[str, str] | None = None) -> None:
        super().__init__(code, reason, message, metadata)
        m = self.metadata
        self.topic = m.get("topic", "")
        self.partition = int(m.get("partition", "0"))
        self.first_offset = int(m["first_offset"])
        self.last_offset = int(m["last_offset"])
        self.next_offset = int(m["next_offset"])


class OutcomeUnknown(StreamdError):
    """The records of a produce request may or may not have been stored: the request
    was written, and no answer that says which came back before the producer's
    ``delivery_timeout_ms`` ran out (the broker was down or stopped, the connection
    broke) or, without idempotence, before the stream broke. Resending them may
    duplicate them; reading the partition tells.

    ``code`` is that of the last failure (``DEADLINE_EXCEEDED`` when the delivery
    timeout ran out); ``cause`` is the last error seen, if any."""

    reason_name = "OUTCOME_UNKNOWN"

    def __init__(self, code: str, message: str, *, cause: BaseException | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(code, self.reason_name, message, metadata)
        self.cause = cause
