"""The one place where errors become gRPC statuses.

Each typed error of a lower layer maps to a status code here; its ``reason`` and
structured fields travel as a ``google.rpc.ErrorInfo`` in the status details
(``grpc-status-details-bin``), which every gRPC language can decode. Anything not
in the table is a bug: INTERNAL, logged with its traceback, and the server keeps
serving.

No space on the data directory's filesystem is RESOURCE_EXHAUSTED / ``DISK_FULL``
wherever it comes from (``segments.DiskFull``, or any OSError with ENOSPC/EDQUOT: a
topic's files, a journal, a snapshot), and it always means that nothing of the call
was stored (for a produce: no batch of the request was appended and no idempotent
producer's sequence moved). A failed fsync is not DISK_FULL even when its errno is
ENOSPC: what it covered may or may not be kept, so it answers the retryable
UNAVAILABLE / ``STORAGE_FAILED``.

Running out of file descriptors (EMFILE/ENFILE) is UNAVAILABLE /
``TOO_MANY_OPEN_FILES``: retryable, and not a refusal, because it can strike after a
produce's records were appended (while syncing them), so a producer must send the
same batch again rather than take it as not stored.
"""

from __future__ import annotations

import errno
import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import segments
from consumer_groups import errors as group_errors
from consumer_groups.journal import JournalFailed
from streamd import auth
from streamd.broker import errors as broker_errors
from streamd.errors import StructuredError
from streamd.v1 import streamd_pb2 as pb

log = logging.getLogger("streamd.service")

DOMAIN = "streamd.io"

#: error class -> gRPC status code; the most specific class listed wins.
STATUS_CODES: dict[type[BaseException], grpc.StatusCode] = {
    broker_errors.TopicNotFound: grpc.StatusCode.NOT_FOUND,
    broker_errors.PartitionNotFound: grpc.StatusCode.NOT_FOUND,
    broker_errors.TopicAlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    broker_errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    broker_errors.RecordTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    broker_errors.LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    broker_errors.TooManyProducers: grpc.StatusCode.RESOURCE_EXHAUSTED,
    broker_errors.OutOfOrderSequence: grpc.StatusCode.FAILED_PRECONDITION,
    broker_errors.ProducerStateNotSaved: grpc.StatusCode.UNAVAILABLE,
    broker_errors.RetryAnswerUnknown: grpc.StatusCode.DATA_LOSS,
    broker_errors.BrokerUnavailable: grpc.StatusCode.UNAVAILABLE,
    segments.OffsetOutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    segments.CorruptBatch: grpc.StatusCode.DATA_LOSS,
    segments.CorruptRecords: grpc.StatusCode.DATA_LOSS,
    segments.LogClosed: grpc.StatusCode.UNAVAILABLE,
    segments.LogFailed: grpc.StatusCode.UNAVAILABLE,
    segments.InvalidBatch: grpc.StatusCode.INVALID_ARGUMENT,
    segments.BatchTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    segments.DiskFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    group_errors.InvalidGroupRequest: grpc.StatusCode.INVALID_ARGUMENT,
    group_errors.GroupNotFound: grpc.StatusCode.NOT_FOUND,
    group_errors.GroupNotEmpty: grpc.StatusCode.FAILED_PRECONDITION,
    group_errors.UnknownMember: grpc.StatusCode.ABORTED,
    group_errors.MemberFenced: grpc.StatusCode.ABORTED,
    group_errors.InstanceFenced: grpc.StatusCode.ABORTED,
    group_errors.StaleGeneration: grpc.StatusCode.ABORTED,
    group_errors.NothingToUndo: grpc.StatusCode.FAILED_PRECONDITION,
    group_errors.GroupLimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    JournalFailed: grpc.StatusCode.UNAVAILABLE,
    group_errors.QueueGroupNotFound: grpc.StatusCode.NOT_FOUND,
    group_errors.QueueGroupExists: grpc.StatusCode.ALREADY_EXISTS,
    group_errors.LeaseExpired: grpc.StatusCode.FAILED_PRECONDITION,
    auth.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    auth.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    auth.QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class MalformedRequest(broker_errors.InvalidArgument):
    """The request bytes do not parse as the method's message."""

    reason = "MALFORMED_REQUEST"

    def __init__(self, message_type: str) -> None:
        super().__init__("request", f"the request is not a valid {message_type}")


def status_code_for(exc: BaseException) -> grpc.StatusCode | None:
    if _disk_full(exc):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if _out_of_descriptors(exc):
        return grpc.StatusCode.UNAVAILABLE
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return None


def _disk_full(exc: BaseException) -> bool:
    return segments.is_disk_full(exc)


def _out_of_descriptors(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)


def reason_and_metadata(exc: BaseException) -> tuple[str, dict[str, str]]:
    if _disk_full(exc):
        return "DISK_FULL", {}
    if _out_of_descriptors(exc):
        return "TOO_MANY_OPEN_FILES", {}
    if isinstance(exc, StructuredError):
        return exc.reason, exc.metadata()
    if isinstance(exc, segments.OffsetOutOfRange):
        return "OFFSET_OUT_OF_RANGE", {
            "offset": str(exc.offset),
            "log_start_offset": str(exc.log_start_offset),
            "log_end_offset": str(exc.log_end_offset),
        }
    if isinstance(exc, segments.CorruptRecords):
        # What a reader needs to skip the damage (and nothing about the broker's files).
        fields = {"topic": exc.topic, "partition": exc.partition, "first_offset": exc.first_offset,
                  "last_offset": exc.last_offset, "next_offset": exc.next_offset}
        return "CORRUPT_BATCH", {k: str(v) for k, v in fields.items() if v is not None}
    if isinstance(exc, segments.CorruptBatch):
        return "CORRUPT_BATCH", {}
    if isinstance(exc, (segments.LogFailed, JournalFailed)):
        return "STORAGE_FAILED", {}
    if isinstance(exc, segments.LogClosed):
        return "PARTITION_CLOSED", {}
    if isinstance(exc, segments.InvalidBatch):
        return "INVALID_BATCH", {}
    if isinstance(exc, segments.BatchTooLarge):
        return "RECORD_TOO_LARGE", {"size": str(exc.size), "limit": str(exc.max_bytes)}
    return "INTERNAL", {}


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str, str, dict[str, str]]:
    """(code, reason, message, metadata) for any exception; logs the unexpected ones."""
    code = status_code_for(exc)
    if code is None:
        log.error("unexpected error", exc_info=exc)
        return grpc.StatusCode.INTERNAL, "INTERNAL", "internal error; see the broker log", {}
    reason, metadata = reason_and_metadata(exc)
    if _out_of_descriptors(exc):
        # The errno's text names a file of the broker's: for its log, not for clients.
        log.warning("out of file descriptors: %s", exc, extra={"event": "too_many_open_files"})
        return code, reason, ("the broker has no file descriptors left (EMFILE): raise its open-files limit "
                              "(ulimit -n, systemd LimitNOFILE) or use fewer partitions; retry"), metadata
    if isinstance(exc, segments.CorruptBatch):
        # Names a file and a byte position: for the broker's log, not for clients.
        log.error("corrupt stored batch: %s", exc)
        return code, reason, "a stored batch is corrupt; see the broker log", metadata
    return code, reason, str(exc), metadata


def rich_status(exc: BaseException) -> grpc.Status:
    code, reason, message, metadata = to_status(exc)
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    retry_after_ms = getattr(exc, "retry_after_ms", None)
    if retry_after_ms is not None:  # a standard RetryInfo, for clients that honour it
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=_duration_ms(retry_after_ms)))
        details.append(retry)
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    return rpc_status.to_status(status)


def _duration_ms(ms: int):
    from google.protobuf import duration_pb2

    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def stream_error(exc: BaseException) -> pb.StreamError:
    """The same information as ``rich_status``, as a message inside a stream."""
    code, reason, message, metadata = to_status(exc)
    return pb.StreamError(code=code.value[0], reason=reason, message=message, metadata=metadata)


assert code_pb2.OUT_OF_RANGE == grpc.StatusCode.OUT_OF_RANGE.value[0]
