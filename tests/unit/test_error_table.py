"""Every public error maps to a specific status code in the one table."""

from __future__ import annotations

import inspect

import grpc

import segments
import segments.errors
from consumer_groups import errors as group_errors
from streamd.broker import errors as broker_errors
from streamd.service.errors import rich_status, status_code_for, to_status


def _public_errors(module, root):
    return [
        obj for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, root) and obj is not root and obj.__module__ == module.__name__
    ]


def test_every_broker_error_maps_to_a_specific_code():
    for cls in _public_errors(broker_errors, broker_errors.BrokerError):
        code = status_code_for(cls.__new__(cls))
        assert code not in (None, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), cls


def test_every_storage_error_maps_to_a_specific_code():
    for cls in _public_errors(segments.errors, segments.errors.StorageError):
        code = status_code_for(cls.__new__(cls))
        assert code not in (None, grpc.StatusCode.UNKNOWN), cls


def test_every_group_error_maps_to_a_specific_code():
    for cls in _public_errors(group_errors, group_errors.GroupError):
        code = status_code_for(cls.__new__(cls))
        assert code not in (None, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), cls


def test_stale_generation_is_aborted_with_its_reason():
    exc = group_errors.StaleGeneration("g", "m-1", 3, "t", 0, "why")
    code, reason, _, metadata = to_status(exc)
    assert code == grpc.StatusCode.ABORTED and reason == "STALE_GENERATION"
    assert metadata["generation"] == "3" and metadata["partition"] == "0"


def test_offset_out_of_range_carries_the_valid_range():
    exc = segments.OffsetOutOfRange(9, 2, 5)
    code, reason, _, metadata = to_status(exc)
    assert code == grpc.StatusCode.OUT_OF_RANGE and reason == "OFFSET_OUT_OF_RANGE"
    assert metadata == {"offset": "9", "log_start_offset": "2", "log_end_offset": "5"}


def test_unknown_exceptions_become_internal_with_a_generic_message():
    code, reason, message, _ = to_status(RuntimeError("secret"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message
    assert rich_status(broker_errors.TopicNotFound("t")).code == grpc.StatusCode.NOT_FOUND


def test_no_room_is_disk_full_and_a_failed_fsync_is_retryable_even_for_enospc():
    import errno

    full = segments.DiskFull("append 2 batch(es) of 10 bytes", name="t/0",
                             cause=OSError(errno.ENOSPC, "No space left on device"))
    code, reason, message, _ = to_status(full)
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "DISK_FULL") and "t/0" in message
    assert to_status(OSError(errno.EDQUOT, "Disk quota exceeded"))[:2] == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                                           "DISK_FULL")
    # What a failed fsync covered may or may not be kept: never DISK_FULL ("nothing stored").
    failed = segments.LogFailed("/d", OSError(errno.ENOSPC, "No space left on device"), "t/0")
    assert to_status(failed)[:2] == (grpc.StatusCode.UNAVAILABLE, "STORAGE_FAILED")


def test_running_out_of_file_descriptors_is_retryable_and_names_no_file():
    import errno

    for number in (errno.EMFILE, errno.ENFILE):
        code, reason, message, _ = to_status(OSError(number, "Too many open files", "/var/lib/streamd/t/0/x.index"))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "TOO_MANY_OPEN_FILES")
        assert "/var/lib" not in message
