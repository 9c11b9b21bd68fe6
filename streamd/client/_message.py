"""Leased records (``Message``) and the words of a queue group's Receive and Settle
calls: the messages of a Receive answer, the settle actions, a group's config from
keywords, and what a batch of acks became (logged).

A ``Message`` settles itself through the receiver that handed it out (its ``_receiver``:
the ``QueueReceiver`` or ``AsyncQueueReceiver`` the user holds), so the blocking and
the asyncio receivers share this class and every function here.

Invariant: ``deadline`` is the lease's end by this process's monotonic clock
(``received + lease_s``, moved by each extension); the broker's clock may differ, so
the SDK never compares ``lease_expires_ms`` with local time.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import grpc

from streamd.v1 import streamd_pb2 as pb

from .errors import StreamdError
from .records import RecordFields, record_runs

log = logging.getLogger("streamd.client.queue")

ACTIONS = {"ack": pb.SETTLE_ACTION_ACK, "nack": pb.SETTLE_ACTION_NACK, "extend": pb.SETTLE_ACTION_EXTEND,
           "reject": pb.SETTLE_ACTION_REJECT}


class Settler(Protocol):
    """What a message settles itself through (a blocking or an asyncio receiver: the
    asyncio one answers nack/extend/reject with coroutines)."""

    def ack(self, msg: Message) -> None: ...
    def nack(self, msg: Message, *, delay_ms: int | None = None, reason: str = "") -> Any: ...
    def extend(self, msg: Message, lease_ms: int) -> Any: ...
    def reject(self, msg: Message, *, reason: str = "") -> Any: ...


class Message(RecordFields):
    """A leased record. Settle it exactly once (extend as often as needed). Key,
    value, headers and timestamp are read from the decoded record when asked for
    (``RecordFields``)."""

    __slots__ = ("topic", "partition", "offset", "_record", "_append_time_ms", "delivery_count", "lease_id",
                 "lease_expires_ms", "_receiver", "deadline", "lease_s")

    def __init__(self, topic: str, partition: int, offset: int, record: pb.Record, append_time_ms: int,
                 delivery_count: int, lease_id: int, lease_expires_ms: int, receiver: Settler | None = None,
                 deadline: float = 0.0, lease_s: float = 0.0) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset
        self._record, self._append_time_ms = record, append_time_ms
        self.delivery_count, self.lease_id, self.lease_expires_ms = delivery_count, lease_id, lease_expires_ms
        self._receiver: Settler = _NO_RECEIVER if receiver is None else receiver
        #: The lease's end by this process's monotonic clock (the broker's clock may differ).
        self.deadline, self.lease_s = deadline, lease_s

    def __repr__(self) -> str:
        return (f"Message(topic={self.topic!r}, partition={self.partition}, offset={self.offset}, "
                f"delivery_count={self.delivery_count}, key={self.key!r}, value={self.value[:64]!r})")

    # Settling goes through the receiver that handed the message out. A message of an
    # AsyncQueueReceiver gets coroutines back from nack/extend/reject: ``await msg.nack()``
    # (its ack is queued, as with the blocking receiver, and needs no await).
    def ack(self) -> None:
        self._receiver.ack(self)

    def nack(self, *, delay_ms: int | None = None, reason: str = "") -> Any:
        return self._receiver.nack(self, delay_ms=delay_ms, reason=reason)

    def extend(self, lease_ms: int) -> Any:
        return self._receiver.extend(self, lease_ms)

    def reject(self, reason: str = "") -> Any:
        return self._receiver.reject(self, reason=reason)

    @property
    def lease(self) -> pb.LeaseRef:
        return pb.LeaseRef(partition=self.partition, offset=self.offset, lease_id=self.lease_id)


class _NoReceiver:
    """The settler of a message made without a receiver (in tests): it refuses."""

    def _refuse(self, *args: object, **kwargs: object) -> Any:
        raise RuntimeError("this message was made without a receiver: nothing can settle it")

    ack = nack = extend = reject = _refuse


_NO_RECEIVER: Settler = _NoReceiver()


def _messages(topic: str, reply: pb.ReceiveResponse, receiver: Settler | None, lease_s: float,
              received: float) -> list[Message]:
    """Messages of a Receive answer: the batched form (``partitions``: stored batches
    and leased ranges, cut by ``record_runs``: only the leased offsets, each once, in
    offset order per partition) and the per-record form (``records``)."""
    out = []
    deadline = received + lease_s
    for part in reply.partitions:
        p = part.partition
        ranges = [(r.first_offset, r.last_offset, r) for r in part.leased]
        for leased, first, append_time, records in record_runs(part.batches, ranges):
            d, lease_id, expires = leased.delivery_count, leased.lease_id, leased.lease_expires_ms
            out += [Message(topic, p, offset, rec, append_time, d, lease_id, expires, receiver, deadline, lease_s)
                    for offset, rec in enumerate(records, first)]
    for r in reply.records:
        out.append(Message(topic, r.partition, r.offset, r.record, r.append_time_ms, r.delivery_count, r.lease_id,
                           r.lease_expires_ms, receiver, deadline, lease_s))
    return out


def settle_error(result: pb.SettleResult) -> StreamdError:
    """The StreamdError of a SettleResult that carries an error."""
    e = result.error
    return StreamdError(_code_name(e.code), e.reason, e.message, dict(e.metadata))


def _code_name(number: int) -> str:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.name
    return grpc.StatusCode.UNKNOWN.name


def log_acks(group: str, topic: str, count: int, results: list[pb.SettleResult] | StreamdError) -> None:
    """Log what became of a batch of ``count`` acks: the Settle failed (``results`` is
    the error), or it refused some (those records will come again)."""
    if isinstance(results, StreamdError):
        log.warning("queue %s/%s: %d ack(s) not delivered: %s", group, topic, count, results)
        return
    refused, reason = 0, ""
    for r in results:
        if r.HasField("error"):
            refused += r.refused or 1
            reason = reason or r.error.reason
    if refused:
        log.info("queue %s/%s: %d ack(s) refused (%s); those records will come again", group, topic, refused, reason)


def queue_config(**kw: Any) -> pb.QueueGroupConfig:
    """``pb.QueueGroupConfig`` from keywords: lease_ms, max_deliveries, dead_letter_topic,
    ordered_by_key, at_most_once, max_in_flight, start ("earliest"/"latest"),
    initial_delay_ms, multiplier, max_delay_ms, jitter ("none"/"full"/"equal")."""
    retry: dict[str, Any] = {k: kw.pop(k) for k in ("initial_delay_ms", "multiplier", "max_delay_ms") if k in kw}
    jitter = kw.pop("jitter", None)
    if jitter is not None:
        retry["jitter"] = {"none": pb.JITTER_NONE, "full": pb.JITTER_FULL, "equal": pb.JITTER_EQUAL}[jitter]
    start = kw.pop("start", None)
    if start is not None:
        kw["start"] = pb.OFFSET_SPEC_LATEST if start == "latest" else pb.OFFSET_SPEC_EARLIEST
    return pb.QueueGroupConfig(retry=pb.RetryPolicy(**retry), **kw)
