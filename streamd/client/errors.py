"""Errors the SDK raises.

    StreamdError                 any failure reported by the broker or the transport
    ├── ProduceError             a produce request was refused (e.g. RECORD_TOO_LARGE)
    └── (grpc.RpcError stays as the ``cause`` of transport failures)

Each carries the gRPC ``code`` name, the stable ``reason`` from google.rpc.ErrorInfo
and its ``metadata`` (for OUT_OF_RANGE: log_start_offset, log_end_offset).
"""

from __future__ import annotations

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
    def from_rpc_error(cls, err: grpc.RpcError) -> "StreamdError":
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        reason, metadata = "", {}
        try:
            status = rpc_status.from_call(err)
        except Exception:
            status = None
        if status is not None:
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reason, metadata = info.reason, dict(info.metadata)
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code.name, reason, details or "", metadata)


class ProduceError(StreamdError):
    pass
