"""Typed errors of the broker layer.

Every error carries structured fields and a stable ``reason`` (an ErrorInfo reason,
UPPER_SNAKE_CASE, never changed once released). ``streamd.service.errors`` maps each
class to a gRPC status code; nothing else decides codes.

    BrokerError
    ├── TopicNotFound            unknown topic
    ├── PartitionNotFound        partition index outside the topic
    ├── TopicAlreadyExists
    ├── InvalidArgument          a request field is out of its domain
    │   ├── InvalidTopicName
    │   └── InvalidBatch         a produced batch is not a valid RecordBatch
    ├── RecordTooLarge           a record or batch over the topic's limit
    ├── LimitExceeded            too many topics, partitions, ...
    │   └── TooManyProducers     a partition's producer table is full of active producers
    ├── OutOfOrderSequence       an idempotent producer's batch is not the next one
    │   └── UnknownProducer      ... and the partition does not know the producer
    ├── RetryAnswerUnknown       a retry whose records the dedup window dropped can't be answered
    ├── ProducerStateNotSaved    a batch is taken but its producer state could not be saved
    └── BrokerUnavailable        starting or stopping
"""

from __future__ import annotations

from streamd.errors import StructuredError


class BrokerError(StructuredError):
    reason = "BROKER_ERROR"


class TopicNotFound(BrokerError):
    reason = "TOPIC_NOT_FOUND"

    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic!r} does not exist", topic=topic)
        self.topic = topic


class PartitionNotFound(BrokerError):
    reason = "PARTITION_NOT_FOUND"

    def __init__(self, topic: str, partition: int, partition_count: int) -> None:
        super().__init__(
            f"topic {topic!r} has partitions 0..{partition_count - 1}, not {partition}",
            topic=topic,
            partition=partition,
            partition_count=partition_count,
        )
        self.topic, self.partition, self.partition_count = topic, partition, partition_count


class TopicAlreadyExists(BrokerError):
    reason = "TOPIC_ALREADY_EXISTS"

    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic!r} already exists", topic=topic)
        self.topic = topic


class InvalidArgument(BrokerError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str, *, reason: str | None = None, **fields: object) -> None:
        super().__init__(f"{field}: {message}", field=field, **fields)
        self.field = field
        if reason is not None:
            self.reason = reason


class InvalidTopicName(InvalidArgument):
    reason = "INVALID_TOPIC_NAME"

    def __init__(self, topic: str, why: str, *, field: str = "topic") -> None:
        super().__init__(field, f"{topic[:300]!r} is not a valid topic name: {why}")


class InvalidBatch(InvalidArgument):
    reason = "INVALID_BATCH"

    def __init__(self, message: str, *, partition: int | None = None, batch: int | None = None) -> None:
        super().__init__("batches", message, partition=partition, batch=batch)


class RecordTooLarge(BrokerError):
    reason = "RECORD_TOO_LARGE"

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} of {size} bytes exceeds the limit of {limit} bytes", size=size, limit=limit)
        self.size, self.limit = size, limit


class LimitExceeded(BrokerError):
    reason = "LIMIT_EXCEEDED"

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"{what} would exceed the limit of {limit}", limit=limit, what=what)
        self.limit = limit


class TooManyProducers(LimitExceeded):
    """A new idempotent producer's first batch (sequence 0, a producer id the
    partition holds no state for) when the partition already remembers
    ``max_producers`` producers and none has been idle for ``min_idle_ms``, the only
    ones it may evict to make room (``producer_state``). Nothing was appended, and the
    producers it remembers keep their guarantees. Retryable later: producers idle that
    long make room."""

    reason = "TOO_MANY_PRODUCERS"

    def __init__(self, producer_id: int, limit: int, min_idle_ms: int, *, topic: str | None = None,
                 partition: int | None = None) -> None:
        where = f" in {topic}/{partition}" if topic is not None else ""
        BrokerError.__init__(
            self,
            f"producer {producer_id}{where}: the partition already remembers {limit} idempotent producers, "
            f"none idle for {min_idle_ms} ms; retry later",
            producer_id=producer_id, limit=limit, min_idle_ms=min_idle_ms, topic=topic, partition=partition,
        )
        self.producer_id, self.limit, self.min_idle_ms = producer_id, limit, min_idle_ms


class OutOfOrderSequence(BrokerError):
    """A batch of an idempotent producer is neither the next one expected from it in
    this partition nor a retry of one of the batches the partition remembers (a gap,
    or a sequence from the past that is no longer remembered). Nothing was appended."""

    reason = "OUT_OF_ORDER_SEQUENCE"

    def __init__(
        self, producer_id: int, expected_sequence: int, got: int, *, topic: str | None = None,
        partition: int | None = None, why: str = "",
    ) -> None:
        where = f" in {topic}/{partition}" if topic is not None else ""
        super().__init__(
            f"producer {producer_id}{where}: expected sequence {expected_sequence}, got {got}"
            + (f" ({why})" if why else ""),
            producer_id=producer_id,
            expected_sequence=expected_sequence,
            got=got,
            topic=topic,
            partition=partition,
        )
        self.producer_id, self.expected_sequence, self.got = producer_id, expected_sequence, got


class UnknownProducer(OutOfOrderSequence):
    """The partition holds no state for this producer id (never seen, expired after
    a week idle, or evicted) and the batch does not start at sequence 0."""

    reason = "UNKNOWN_PRODUCER"

    def __init__(self, producer_id: int, got: int, *, topic: str | None = None, partition: int | None = None) -> None:
        super().__init__(producer_id, 0, got, topic=topic, partition=partition, why="unknown producer id")


class RetryAnswerUnknown(BrokerError):
    """An idempotent producer's batch is a retry (nothing is appended: its sequence
    numbers are used) of a batch the dedup window dropped records from the first
    time, and the broker no longer knows which ones, nor the offsets they were
    answered with: the answer was not kept (the producer state was rebuilt from the
    log, which holds only the stored records, or it was forgotten to bound memory)
    and the window has forgotten the keys. Rather than answer with wrong offsets the
    retry is failed for good (DATA_LOSS): not retryable, and not a refusal either (a
    producer told "refused" would reuse the sequence numbers)."""

    reason = "RETRY_ANSWER_UNKNOWN"

    def __init__(self, producer_id: int, base_sequence: int, *, topic: str | None = None,
                 partition: int | None = None) -> None:
        where = f" in {topic}/{partition}" if topic is not None else ""
        super().__init__(
            f"producer {producer_id}{where}: the batch at sequence {base_sequence} was already appended, "
            "but which of its records were deduplicated is no longer known",
            producer_id=producer_id, base_sequence=base_sequence, topic=topic, partition=partition,
        )
        self.producer_id, self.base_sequence = producer_id, base_sequence


class ProducerStateNotSaved(BrokerError):
    """An idempotent producer's batch was taken (its sequence numbers are used: a
    retry is answered as a duplicate) but the producer state file that must keep
    that could not be written (e.g. a full disk). Retryable, and never a refusal:
    a producer told "refused" would reuse the sequence numbers for new records,
    which the broker would then take for a retry of this batch and drop."""

    reason = "PRODUCER_STATE_NOT_SAVED"

    def __init__(self, topic: str, partition: int, cause: BaseException) -> None:
        super().__init__(f"{topic}/{partition}: the producer state could not be saved ({cause}); retry",
                         topic=topic, partition=partition)


class BrokerUnavailable(BrokerError):
    reason = "BROKER_UNAVAILABLE"

    def __init__(self, state: str) -> None:
        super().__init__(f"the broker is {state}; retry shortly", state=state)
