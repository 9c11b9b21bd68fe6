"""Consumers: read a topic's partitions by offset or time, pull or push.

``Consumer`` (blocking) keeps a position per assigned partition and offers
- ``poll()``: one round of Fetch over the assigned partitions (long-poll when idle);
- ``records()``: an iterator built on ``poll`` that tails, or stops at the end;
- ``subscribe()``: a Subscribe stream on one partition (the broker pushes; gRPC flow
  control stops it when the reader falls behind).
Positions move with ``seek``, ``seek_to_time``, ``seek_to_beginning``, ``seek_to_end``.

``AsyncConsumer`` offers the same on asyncio, and merges Subscribe streams of several
partitions into one async iterator with a bounded queue.

Damaged records (the broker answers DATA_LOSS / CORRUPT_BATCH with the offset range
it cannot read): the records before them are handed out, then ``records()``,
``poll()`` and ``subscribe()`` raise ``CorruptRecordsError`` (topic, partition,
first_offset, last_offset, next_offset) with the position left at the damage, as
Kafka's consumer does with a CorruptRecordException: the caller decides. With
``skip_corrupt=True`` they go on at ``next_offset`` instead and log a warning naming
the range (logger ``streamd.client.consumer``). ``fetch()`` is one plain Fetch and
always raises.

Positions out of range (OFFSET_OUT_OF_RANGE: retention deleted the records, or the
position is past the end): ``auto_offset_reset`` says what ``poll()``, ``records()``
and ``subscribe()`` do, with Kafka's names. ``"error"`` (the default: a plain
consumer's positions are the caller's own, so nothing moves them behind its back,
as before) raises the ``StreamdError`` (reason ``OFFSET_OUT_OF_RANGE``, metadata
``log_start_offset``/``log_end_offset``) with the position left where it was;
``"earliest"`` goes on at the log start and ``"latest"`` at the log end (the high
watermark), whichever side the position fell off, and each reset is logged once as a
warning naming the partition and both offsets (event ``offset_reset``). Kafka's
default for a new group is ``latest``; a plain consumer has no group and starts
where ``assign``/``seek`` put it, so it keeps raising unless asked otherwise.
``fetch()`` is one plain Fetch at the offset given and always raises.

Deadlines: each unary call (and each Fetch, with its long-poll ``max_wait_ms`` added)
gets the client's ``timeout_s`` (default 30 s) or a per-call ``timeout_s=``;
Subscribe streams have none (``streamd.client._channel``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import grpc

from streamd.v1 import streamd_pb2 as pb
from streamd.v1 import streamd_pb2_grpc as rpc

from ._channel import DEFAULT_TIMEOUT_S, AsyncClient, Security, SyncClient, stub
from .errors import CorruptRecordsError, StreamdError
from .records import ConsumerRecord, decode_batches, iter_batch

log = logging.getLogger("streamd.client.consumer")

DEFAULT_MAX_WAIT_MS = 500
#: ``auto_offset_reset`` values (module docstring); "error" is the default.
AUTO_OFFSET_RESETS = ("earliest", "latest", "error")
OUT_OF_RANGE_REASON = "OFFSET_OUT_OF_RANGE"


def check_reset(policy: str) -> str:
    if policy not in AUTO_OFFSET_RESETS:
        raise ValueError(f"auto_offset_reset must be one of {AUTO_OFFSET_RESETS}, not {policy!r}")
    return policy


def reset_offset(err: StreamdError, policy: str, topic: str, partition: int) -> int:
    """Where to go on after ``err``: for OFFSET_OUT_OF_RANGE with an ``earliest`` or
    ``latest`` policy, the log start or end the broker named (logged once); any other
    error, or the ``error`` policy, raises ``err``."""
    if err.reason != OUT_OF_RANGE_REASON or policy == "error":
        raise err
    try:
        start, end = int(err.metadata["log_start_offset"]), int(err.metadata["log_end_offset"])
    except (KeyError, ValueError):
        raise err from None
    offset = start if policy == "earliest" else end
    log.warning("%s/%d: offset %s is out of range [%d, %d]; auto_offset_reset=%s goes on at %d",
                topic, partition, err.metadata.get("offset", "?"), start, end, policy, offset,
                extra={"event": "offset_reset", "topic": topic, "partition": partition,
                       "from_offset": err.metadata.get("offset"), "to_offset": offset, "policy": policy})
    return offset


def go_on_at(err: StreamdError, skip_corrupt: bool, reset: str, topic: str, partition: int) -> int:
    """Where reading goes on after ``err``: past damage (``skip_past``), at a reset
    position (``reset_offset``), or ``err`` is raised."""
    if isinstance(err, CorruptRecordsError):
        return skip_past(err, skip_corrupt)
    return reset_offset(err, reset, topic, partition)


def skip_past(err: CorruptRecordsError, skip: bool) -> int:
    """Where to go on after damaged records: ``err.next_offset`` (logged) when
    skipping, else ``err`` is raised."""
    if not skip:
        raise err
    log.warning("%s/%d: skipping damaged offsets %d..%d the broker cannot read; going on at %d",
                err.topic, err.partition, err.first_offset, err.last_offset, err.next_offset,
                extra={"event": "corrupt_records_skipped", "topic": err.topic, "partition": err.partition,
                       "first_offset": err.first_offset, "last_offset": err.last_offset})
    return err.next_offset


def resubscribe_at(err: grpc.RpcError, skip: bool, reset: str = "error", topic: str = "", partition: int = 0) -> int:
    """Where a Subscribe stream that ended with ``err`` starts again: past damaged
    records when skipping them, at the reset position when out of range (both
    logged); any other error is raised as a StreamdError."""
    error = StreamdError.from_rpc_error(err)
    try:
        return go_on_at(error, skip, reset, topic, partition)
    except StreamdError:
        raise error from None


def _start_fields(offset: int | None, timestamp_ms: int | None, position: str | None) -> dict[str, Any]:
    """The one start field of a ListOffsets or Subscribe request (offset, time or position)."""
    if offset is not None:
        return {"offset": offset}
    if timestamp_ms is not None:
        return {"timestamp_ms": timestamp_ms}
    spec = pb.OFFSET_SPEC_LATEST if position in ("end", "latest") else pb.OFFSET_SPEC_EARLIEST
    return {"position": spec}


def fetch_future(
    stub: rpc.LogServiceStub,
    key: tuple[str, int],
    offset: int,
    *,
    max_wait_ms: int = 0,
    max_bytes: int = 0,
    max_records: int = 0,
    timeout: float | None = None,
) -> grpc.Future[pb.FetchResponse]:
    """A Fetch of partition ``key`` from ``offset`` on the wire (blocking stub);
    ``timeout``: its deadline in seconds (``Calls.deadline``)."""
    request = pb.FetchRequest(
        topic=key[0], partition=key[1], offset=offset, max_wait_ms=max_wait_ms, max_bytes=max_bytes,
        max_records=max_records,
    )
    future: grpc.Future[pb.FetchResponse] = stub.Fetch.future(request, timeout=timeout)
    return future


class Consumer(SyncClient):
    def __init__(self, server: str | None = None, *, channel: grpc.Channel | None = None,
                 security: Security | None = None, skip_corrupt: bool = False,
                 timeout_s: float = DEFAULT_TIMEOUT_S, auto_offset_reset: str = "error") -> None:
        """``skip_corrupt``: go on past damaged records (logged) instead of raising
        ``CorruptRecordsError``; ``auto_offset_reset``: "earliest", "latest" or
        "error" for positions out of range (see the module docstring)."""
        self.auto_offset_reset = check_reset(auto_offset_reset)  # before a channel exists
        super().__init__(server, channel=channel, security=security, timeout_s=timeout_s)
        self.skip_corrupt = skip_corrupt
        self.positions: dict[tuple[str, int], int] = {}
        self.ends: dict[tuple[str, int], int] = {}

    # -- assignment and positions -------------------------------------------
    def partition_count(self, topic: str, *, timeout_s: float | None = None) -> int:
        request = pb.DescribeTopicRequest(topic=topic)
        reply: pb.DescribeTopicResponse = self._call(self._topics.DescribeTopic, request, timeout_s=timeout_s)
        return reply.topic.partition_count

    def assign(self, topic: str, partitions: Iterable[int] | None = None, *, start: str = "beginning",
               timeout_s: float | None = None) -> None:
        """Read ``partitions`` of ``topic`` (all when None) from the beginning or end."""
        if partitions is None:
            partitions = range(self.partition_count(topic, timeout_s=timeout_s))
        partitions = list(partitions)
        spec = pb.OFFSET_SPEC_LATEST if start == "end" else pb.OFFSET_SPEC_EARLIEST
        reply = self._call(
            self._log.ListOffsets, pb.ListOffsetsRequest(topic=topic, partitions=partitions, position=spec),
            timeout_s=timeout_s,
        )
        for o in reply.offsets:
            self.positions[(topic, o.partition)] = o.offset
            self.ends[(topic, o.partition)] = o.log_end_offset

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self.positions[(topic, partition)] = offset

    def seek_to_time(self, topic: str, timestamp_ms: int, partitions: Iterable[int] | None = None, *,
                     timeout_s: float | None = None) -> None:
        """Move to the first record appended at or after ``timestamp_ms``."""
        parts = [p for (t, p) in self.positions if t == topic] if partitions is None else list(partitions)
        for p, offset in self.offsets_for_time(topic, timestamp_ms, parts, timeout_s=timeout_s).items():
            self.positions[(topic, p)] = offset

    def offsets_for_time(self, topic: str, timestamp_ms: int, partitions: Iterable[int] | None = None, *,
                         timeout_s: float | None = None) -> dict[int, int]:
        """Per partition (all when None or empty), the first offset appended at or
        after ``timestamp_ms``. Where that may lie in damaged records (their append
        times are unknown) the broker answers DATA_LOSS: ``CorruptRecordsError``, or
        with ``skip_corrupt`` the offset after them (logged)."""
        parts = list(partitions or [])
        out: dict[int, int] = {}
        for _ in range(len(parts) or self.partition_count(topic, timeout_s=timeout_s)):
            request = pb.ListOffsetsRequest(topic=topic, partitions=parts, timestamp_ms=timestamp_ms)
            try:
                reply = self._call(self._log.ListOffsets, request, timeout_s=timeout_s)
            except CorruptRecordsError as err:
                out[err.partition] = skip_past(err, self.skip_corrupt)
                parts = [p for p in (parts or range(self.partition_count(topic, timeout_s=timeout_s))) if p != err.partition]
                if not parts:
                    break
                continue
            out.update((o.partition, o.offset) for o in reply.offsets)
            break
        return out

    def seek_to_beginning(self, topic: str) -> None:
        self.assign(topic, [p for (t, p) in self.positions if t == topic] or None, start="beginning")

    def seek_to_end(self, topic: str) -> None:
        self.assign(topic, [p for (t, p) in self.positions if t == topic] or None, start="end")

    def list_offsets(self, topic: str, *, timestamp_ms: int | None = None, position: str = "earliest",
                     timeout_s: float | None = None) -> list[pb.PartitionOffset]:
        request = pb.ListOffsetsRequest(topic=topic, **_start_fields(None, timestamp_ms, position))
        reply: pb.ListOffsetsResponse = self._call(self._log.ListOffsets, request, timeout_s=timeout_s)
        return list(reply.offsets)

    # -- pull ------------------------------------------------------------------
    def fetch(
        self,
        topic: str,
        partition: int,
        offset: int,
        *,
        max_records: int = 0,
        max_bytes: int = 0,
        max_wait_ms: int = 0,
        timeout_s: float | None = None,
    ) -> tuple[list[ConsumerRecord], pb.FetchResponse]:
        """One Fetch: the records at or after ``offset`` and the raw response."""
        deadline = self._calls.deadline(timeout_s, max_wait_ms / 1000)
        future = fetch_future(
            self._log, (topic, partition), offset, max_wait_ms=max_wait_ms, max_bytes=max_bytes, max_records=max_records,
            timeout=deadline,
        )
        reply = self._result(future, deadline)
        return decode_batches(reply.batches, topic, partition, offset), reply

    def poll(self, *, max_records: int = 0, max_wait_ms: int = DEFAULT_MAX_WAIT_MS) -> list[ConsumerRecord]:
        """Fetch once from each assigned partition; long-poll only when all are idle."""
        out: list[ConsumerRecord] = []
        for key, offset in list(self.positions.items()):
            try:
                records, reply = self.fetch(*key, offset, max_records=max_records)
            except StreamdError as err:
                self.positions[key] = self._go_on_at(err, key)
                continue
            self._advance(key, reply)
            out.extend(records)
        if not out and max_wait_ms > 0 and len(self.positions) == 1:
            key, offset = next(iter(self.positions.items()))
            try:
                records, reply = self.fetch(*key, offset, max_records=max_records, max_wait_ms=max_wait_ms)
            except StreamdError as err:
                self.positions[key] = self._go_on_at(err, key)
                return out
            self._advance(key, reply)
            out.extend(records)
        elif not out and max_wait_ms > 0:
            time.sleep(min(max_wait_ms, 50) / 1000)
        return out

    def _go_on_at(self, err: StreamdError, key: tuple[str, int]) -> int:
        offset = go_on_at(err, self.skip_corrupt, self.auto_offset_reset, *key)
        if err.reason == OUT_OF_RANGE_REASON:  # reset: the end the broker named is the end
            self.ends[key] = int(err.metadata["log_end_offset"])
        return offset

    def _advance(self, key: tuple[str, int], reply: pb.FetchResponse) -> None:
        if reply.batches:
            self.positions[key] = reply.next_offset
        self.ends[key] = reply.log_end_offset

    def at_end(self) -> bool:
        return all(self.positions[k] >= self.ends.get(k, 0) for k in self.positions)

    def records(
        self, *, exit_at_end: bool = False, max_wait_ms: int = DEFAULT_MAX_WAIT_MS, max_bytes: int = 0
    ) -> Iterator[ConsumerRecord]:
        """Records of every assigned partition; tails unless ``exit_at_end``.

        Pipelined: each partition's next Fetch is on the wire while the previous
        answer is decoded. Positions set by ``seek`` apply to the next call.
        """
        keys = list(self.positions)
        if not keys:
            return
        # One partition can long-poll; several are polled without waiting, so an idle
        # partition never holds back a busy one.
        wait = 0 if exit_at_end or len(keys) > 1 else max_wait_ms
        inflight = {key: self._fetch_future(key, self.positions[key], wait, max_bytes) for key in keys}
        try:
            while True:
                got = 0
                for key in keys:
                    try:
                        reply = self._result(inflight[key], self._calls.deadline(wait_s=wait / 1000))
                    except StreamdError as err:
                        self.positions[key] = self._go_on_at(err, key)
                        inflight[key] = self._fetch_future(key, self.positions[key], wait, max_bytes)
                        continue
                    start = self.positions[key]
                    self._advance(key, reply)
                    inflight[key] = self._fetch_future(key, self.positions[key], wait, max_bytes)
                    # Record by record: objects that die as soon as they are read never
                    # survive into older GC generations (a decoded list of 10^5 records
                    # made the cyclic GC cost ~40% of consuming).
                    for batch in reply.batches:
                        got += batch.record_count
                        yield from iter_batch(batch, key[0], key[1], start)
                if not got:
                    if exit_at_end and self.at_end():
                        return
                    if wait == 0 and not exit_at_end:
                        time.sleep(min(max_wait_ms, 50) / 1000)
        finally:
            for future in inflight.values():
                future.cancel()

    def _fetch_future(self, key: tuple[str, int], offset: int, max_wait_ms: int,
                      max_bytes: int = 0) -> grpc.Future[pb.FetchResponse]:
        return fetch_future(self._log, key, offset, max_wait_ms=max_wait_ms, max_bytes=max_bytes,
                            timeout=self._calls.deadline(wait_s=max_wait_ms / 1000))

    def _result(self, future: grpc.Future[pb.FetchResponse], deadline: float) -> pb.FetchResponse:
        try:
            return future.result()
        except grpc.RpcError as err:
            raise self._calls.error(err, deadline, self._log.Fetch) from None

    # -- push ------------------------------------------------------------------
    def subscribe(
        self,
        topic: str,
        partition: int = 0,
        *,
        offset: int | None = None,
        timestamp_ms: int | None = None,
        position: str = "beginning",
        max_bytes: int = 0,
    ) -> Iterator[ConsumerRecord]:
        """Records pushed by the broker from a start position on, tailing forever."""
        start_fields = _start_fields(offset, timestamp_ms, position)
        start = offset or 0
        while True:
            request = pb.SubscribeRequest(topic=topic, partition=partition, max_bytes=max_bytes, **start_fields)
            call = self._log.Subscribe(request)
            try:
                for message in call:
                    for batch in message.batches:
                        yield from iter_batch(batch, topic, partition, start)
                    start = message.next_offset
                return
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.CANCELLED:
                    return
                start = resubscribe_at(err, self.skip_corrupt, self.auto_offset_reset, topic, partition)
                start_fields = {"offset": start}
            finally:
                call.cancel()


class AsyncConsumer(AsyncClient):
    """asyncio flavour: ``fetch`` and a merged multi-partition ``subscribe``."""

    def __init__(self, server: str | None = None, *, channel: grpc.aio.Channel | None = None,
                 security: Security | None = None, skip_corrupt: bool = False,
                 timeout_s: float = DEFAULT_TIMEOUT_S, auto_offset_reset: str = "error") -> None:
        """``skip_corrupt``, ``auto_offset_reset``: as ``Consumer``'s, for ``subscribe``."""
        self.auto_offset_reset = check_reset(auto_offset_reset)  # before a channel exists
        super().__init__(server, channel=channel, security=security, timeout_s=timeout_s)
        self.skip_corrupt = skip_corrupt
        self._log = stub(rpc.LogServiceStub, self._channel)
        self._topics = stub(rpc.TopicServiceStub, self._channel)

    async def fetch(self, topic: str, partition: int, offset: int, *, timeout_s: float | None = None,
                    **limits: int) -> tuple[list[ConsumerRecord], pb.FetchResponse]:
        request = pb.FetchRequest(topic=topic, partition=partition, offset=offset, **limits)
        reply: pb.FetchResponse = await self._calls.acall(self._log.Fetch, request, timeout_s=timeout_s,
                                        wait_s=limits.get("max_wait_ms", 0) / 1000)
        return decode_batches(reply.batches, topic, partition, offset), reply

    async def subscribe(
        self,
        topic: str,
        partitions: Iterable[int] | None = None,
        *,
        offset: int | None = None,
        timestamp_ms: int | None = None,
        position: str = "beginning",
        queue_size: int = 16,
    ) -> AsyncIterator[ConsumerRecord]:
        """Records of several partitions as they arrive (order kept per partition)."""
        if partitions is None:
            described: pb.DescribeTopicResponse = await self._calls.acall(
                self._topics.DescribeTopic, pb.DescribeTopicRequest(topic=topic))
            reply = described
            partitions = range(reply.topic.partition_count)
        partitions = list(partitions)
        if len(partitions) == 1:  # no merging needed: read the stream directly
            async for record in self._stream(topic, partitions[0], _start_fields(offset, timestamp_ms, position),
                                             offset or 0):
                yield record
            return
        queue: asyncio.Queue[list[ConsumerRecord] | StreamdError] = asyncio.Queue(queue_size)

        async def pump(partition: int) -> None:
            start_fields, start = _start_fields(offset, timestamp_ms, position), offset or 0
            while True:
                request = pb.SubscribeRequest(topic=topic, partition=partition, **start_fields)
                try:
                    async for message in self._log.Subscribe(request):
                        await queue.put(list(decode_batches(message.batches, topic, partition, start)))
                        start = message.next_offset
                    return
                except grpc.RpcError as err:
                    error = StreamdError.from_rpc_error(err)
                    try:
                        start = go_on_at(error, self.skip_corrupt, self.auto_offset_reset, topic, partition)
                    except StreamdError:
                        await queue.put(error)
                        return
                    start_fields = {"offset": start}

        tasks = [asyncio.create_task(pump(p)) for p in partitions]
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                for record in item:
                    yield record
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream(self, topic: str, partition: int, start_fields: dict[str, Any],
                      start: int) -> AsyncIterator[ConsumerRecord]:
        """One partition's Subscribe stream, resubscribed past damaged records when
        skipping them."""
        while True:
            call = self._log.Subscribe(pb.SubscribeRequest(topic=topic, partition=partition, **start_fields))
            try:
                async for message in call:
                    for batch in message.batches:
                        for record in iter_batch(batch, topic, partition, start):
                            yield record
                    start = message.next_offset
                return
            except grpc.RpcError as err:
                start = resubscribe_at(err, self.skip_corrupt, self.auto_offset_reset, topic, partition)
                start_fields = {"offset": start}
            finally:
                call.cancel()
