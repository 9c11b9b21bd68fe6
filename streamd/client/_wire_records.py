"""A producer's records in wire form, encoded by hand once per record at ``send()``
(no protobuf message per record): each record is the bytes of a ``RecordSet.records``
entry (tag, length, ``Record``), so a batch's ``RecordSet`` is their concatenation
(``b"".join``), made once per batch.

The encoding is protobuf's (proto/streamd/v1/streamd.proto ``Record``): fields in
number order, defaults (0, unset) left out, ``key`` written whenever it is not None
(an ``optional`` field). A record of a value only costs a dict look-up for its prefix
(cached by value length). ``tests/property/test_producer_accumulator_model.py``
checks the encoding against protobuf's.

Also the checks a record passes before it is batched (``check_record``): argument
types and ranges, raised at the call.
"""

from __future__ import annotations

from collections.abc import Sequence

#: A gRPC message may not exceed this (the SDK's channels; the broker's default
#: ``max_request_bytes``): a record this big can never be sent.
from ._channel import MAX_MESSAGE_BYTES
from .errors import ProduceError

#: Room in a ProduceStream message for everything but one record's bytes.
_REQUEST_OVERHEAD = 1024
MAX_TRANSPORT_RECORD_BYTES = MAX_MESSAGE_BYTES - _REQUEST_OVERHEAD
_INT64_MAX = 2**63 - 1

#: value length -> (prefix bytes, serialized Record length) of a value-only record.
_PLAIN: dict[int, tuple[bytes, int]] = {}


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def plain_prefix(n: int) -> tuple[bytes, int]:
    """The bytes before a value of ``n`` bytes in a value-only record's entry, and
    that record's serialized length."""
    got = _PLAIN.get(n)
    if got is None:
        inner = b"\x1a" + varint(n)
        record_len = len(inner) + n
        got = (b"\x0a" + varint(record_len) + inner, record_len)
        if n <= 1 << 20:  # bounded: at most ~1M entries of ~8 bytes
            _PLAIN[n] = got
    return got


def encode_record(value: bytes, key: bytes | None, headers: Sequence[tuple[str, bytes]] | None, timestamp_ms: int,
                  idempotency_key: str | None, delay_ms: int, deliver_at_ms: int) -> bytes:
    """One ``Record``'s bytes (without the RecordSet entry's tag and length)."""
    parts: list[bytes] = []
    if timestamp_ms:
        parts += (b"\x08", varint(timestamp_ms))
    if key is not None:
        parts += (b"\x12", varint(len(key)), key)
    if value:
        parts += (b"\x1a", varint(len(value)), value)
    if headers:
        for hkey, hvalue in headers:
            k = hkey.encode()
            header = ((b"\x0a" + varint(len(k)) + k if k else b"")
                      + (b"\x12" + varint(len(hvalue)) + hvalue if hvalue else b""))
            parts += (b"\x22", varint(len(header)), header)
    if deliver_at_ms:
        parts += (b"\x28", varint(deliver_at_ms))
    if delay_ms:
        parts += (b"\x30", varint(delay_ms))
    if idempotency_key:
        ik = idempotency_key.encode()
        parts += (b"\x3a", varint(len(ik)), ik)
    return b"".join(parts)


def entry(record: bytes) -> bytes:
    """``record`` as a RecordSet entry (tag 1, length)."""
    return b"\x0a" + varint(len(record)) + record


def as_bytes(value: object, name: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{name} must be bytes, not {type(value).__name__}")


def check_fields(key: object, partition: object, headers: object, timestamp_ms: object, idempotency_key: object,
                 delay_ms: object, deliver_at_ms: object) -> None:
    """Raise TypeError/ValueError for arguments ``send()`` cannot take (the value
    and key are converted by ``as_bytes``)."""
    if partition is not None and (not isinstance(partition, int) or isinstance(partition, bool)):
        raise TypeError(f"partition must be an int or None, not {type(partition).__name__}")
    if partition is not None and partition < 0:
        raise ValueError(f"partition must not be negative, not {partition}")
    for name, number in (("timestamp_ms", timestamp_ms), ("delay_ms", delay_ms), ("deliver_at_ms", deliver_at_ms)):
        if not isinstance(number, int) or isinstance(number, bool):
            raise TypeError(f"{name} must be an int, not {type(number).__name__}")
        if not 0 <= number <= _INT64_MAX:
            raise ValueError(f"{name} must be between 0 and 2**63 - 1, not {number}")
    if delay_ms and deliver_at_ms:
        raise ValueError("give delay_ms or deliver_at_ms, not both")
    if idempotency_key is not None and not isinstance(idempotency_key, str):
        raise TypeError(f"idempotency_key must be a str or None, not {type(idempotency_key).__name__}")
    if headers is not None:
        if isinstance(headers, (str, bytes)) or not isinstance(headers, Sequence):
            raise TypeError("headers must be a sequence of (str, bytes) pairs")
        for pair in headers:
            if (not isinstance(pair, tuple) or len(pair) != 2 or not isinstance(pair[0], str)
                    or not isinstance(pair[1], bytes)):
                raise TypeError(f"headers must be (str, bytes) pairs, not {pair!r}")


def too_large(topic: str, size: int, limit: int, what: str) -> ProduceError:
    """The error of a record over ``limit`` (``what``: whose limit it is), as the
    broker reports it (RESOURCE_EXHAUSTED / RECORD_TOO_LARGE)."""
    return ProduceError("RESOURCE_EXHAUSTED", "RECORD_TOO_LARGE",
                        f"a record of {size} bytes for {topic} is over {what} of {limit} bytes; nothing was sent",
                        {"size": str(size), "limit": str(limit), "topic": topic})
