"""streamd.v1.LogService: produce, fetch, list offsets, subscribe.

Fetch and Subscribe answer with stored frames as they are: the response bytes are a
slice of the log followed by the serialized scalar fields (protobuf merges
concatenated messages, and each frame is a serialized ``batches`` entry).

Hook: ``on_durable_append()`` (None by default, then it costs nothing) is called
once each produce request (Produce or one ProduceStream request) has been appended
and made as durable as its topic promises, before it is answered: the crash window
an idempotent producer's retry must survive. The crash tests inject one that
SIGKILLs the broker at the N-th call (tests/crash/crash_broker.py, through
``streamd.server.Server(hooks=...)``); production code never sets it.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
from collections.abc import Callable

from segments import ReadLimits
from streamd.broker.broker import Broker, ProduceResult, ReadOut
from streamd.broker.errors import BrokerUnavailable, InvalidArgument
from streamd.metrics.instruments import Traffic
from streamd.v1 import streamd_pb2 as pb
from streamd.wire_pb2 import RawProduceRequest, RawProduceStreamRequest

from .errors import stream_error

DEFAULT_MAX_RECORDS = 10_000
DEFAULT_MAX_BYTES = 4 * 1024 * 1024 - 64 * 1024  # fits grpc's default 4 MiB receive limit
MAX_FETCH_BYTES = 32 * 1024 * 1024  # + one batch (<= 32 MiB) fits the 64 MiB send limit
PIPELINE_DEPTH = 1024  # produce-stream requests in flight before we stop reading

# Methods whose requests are parsed as server-side views that keep batches as bytes.
REQUEST_VIEWS = {"Produce": RawProduceRequest, "ProduceStream": RawProduceStreamRequest}


def _limits(max_records: int, max_bytes: int) -> ReadLimits:
    """A request's limits, checked, with the defaults for 0 and the byte cap."""
    if max_records < 0:
        raise InvalidArgument("max_records", "must not be negative")
    if max_bytes < 0:
        raise InvalidArgument("max_bytes", "must not be negative")
    return ReadLimits(max_records or DEFAULT_MAX_RECORDS, min(max_bytes or DEFAULT_MAX_BYTES, MAX_FETCH_BYTES))


def _frames_response(out: ReadOut) -> bytes:
    tail = pb.FetchResponse(
        log_start_offset=out.log_start_offset,
        log_end_offset=out.log_end_offset,
        next_offset=out.next_offset,
    ).SerializeToString()
    return out.data + tail


def _fill_results(response: pb.ProduceResponse, results: list[ProduceResult]) -> pb.ProduceResponse:
    add = response.results.add
    for r in results:
        result = add(
            partition=r.partition,
            base_offset=r.base_offset,
            record_count=r.record_count,
            append_time_ms=r.append_time_ms,
            durable=r.durable,
        )
        if r.duplicate:
            result.duplicate = True
        if r.deduplicated:
            more = result.deduplicated.add
            for index, offset in r.deduplicated:
                more(index=index, offset=offset)
    return response


def _failed(exc: Exception) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


def _answer(request_id: int, results, durable: asyncio.Future,
            on_durable_append: Callable[[], None] | None = None) -> pb.ProduceStreamResponse:
    """The answer to a request whose ``durable`` future is done (its error, if it failed)."""
    answer = pb.ProduceStreamResponse(request_id=request_id)
    try:
        durable.result()
    except Exception as exc:
        answer.error.CopyFrom(stream_error(exc))
    else:
        if on_durable_append is not None and results is not None:
            on_durable_append()
        _fill_results(answer.response, results)
    return answer


async def _stream_answer(request_id: int, results, durable: asyncio.Future,
                         on_durable_append: Callable[[], None] | None = None) -> pb.ProduceStreamResponse:
    try:
        await durable
    except Exception:
        pass  # answered by _answer
    return _answer(request_id, results, durable, on_durable_append)


class LogService:
    def __init__(self, broker: Broker, traffic: Traffic | None = None, *,
                 on_durable_append: Callable[[], None] | None = None) -> None:
        """``on_durable_append``: the hook of the module docstring (tests only)."""
        self.broker = broker
        #: Records and bytes in and out per topic (metrics); counted per request.
        self.traffic = traffic if traffic is not None else Traffic()
        self._on_durable_append = on_durable_append

    def _append(self, request: RawProduceRequest):
        batches = [(p.partition, list(p.batches)) for p in request.partitions]
        results, durable = self.broker.append(request.topic, batches, list(request.records))
        # Appended records (a retried batch answered as a duplicate is not appended
        # again) and the request's batch and record bytes as sent.
        records = sum(r.record_count for r in results if not r.duplicate)
        nbytes = sum(len(b) for _, raws in batches for b in raws) + sum(map(len, request.records))
        self.traffic.produced(request.topic, records, nbytes)
        return results, durable

    async def Produce(self, request: RawProduceRequest, context) -> pb.ProduceResponse:
        results, durable = self._append(request)
        await durable
        if self._on_durable_append is not None:
            self._on_durable_append()
        return _fill_results(pb.ProduceResponse(), results)

    async def InitProducer(self, request: pb.InitProducerRequest, context) -> pb.InitProducerResponse:
        # Random 63-bit ids: unique without any state to persist or coordinate.
        return pb.InitProducerResponse(producer_id=secrets.randbelow((1 << 63) - 1) + 1)

    async def ProduceStream(self, read, context) -> None:
        """Append each request as it arrives; answer in request order once durable.

        With nothing pending and the request already durable (fsync interval/never)
        the answer is written inline; otherwise answers queue for a writer task, so a
        pipelining producer keeps appending while earlier requests wait for their
        (shared) fsync. When the broker stops, the stream stops reading, answers
        what it appended and ends with UNAVAILABLE (a producer retries elsewhere or
        later) instead of holding the graceful stop up until its deadline.
        """
        pending: collections.deque = collections.deque()
        writer: asyncio.Task | None = None
        appended = self._on_durable_append

        async def drain() -> None:
            while pending:
                request_id, results, durable = pending[0]
                await context.write(await _stream_answer(request_id, results, durable, appended))
                pending.popleft()

        async def requests() -> None:
            nonlocal writer
            while (item := await read()) is not None:
                try:
                    results, durable = self._append(item.request)
                except Exception as exc:
                    results, durable = None, _failed(exc)
                if not pending and durable.done():  # answered inline: no coroutine, no task
                    await context.write(_answer(item.request_id, results, durable, appended))
                    continue
                pending.append((item.request_id, results, durable))
                if writer is None or writer.done():
                    writer = asyncio.create_task(drain())
                if len(pending) >= PIPELINE_DEPTH:
                    await asyncio.shield(writer)  # stop reading until answers go out

        reading = asyncio.ensure_future(requests())
        stopping = self.broker.stopping()
        try:
            await asyncio.wait([reading, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not reading.done():
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
        if writer is not None:
            await writer
        if not reading.cancelled():
            reading.result()  # a failure of the stream itself ends it with its error
            return
        raise BrokerUnavailable("stopping")

    async def Fetch(self, request: pb.FetchRequest, context) -> bytes:
        limits = _limits(request.max_records, request.max_bytes)
        if request.max_wait_ms < 0:
            raise InvalidArgument("max_wait_ms", "must not be negative")
        out = await self.broker.fetch(
            request.topic, request.partition, request.offset, limits, max_wait_ms=request.max_wait_ms
        )
        self.traffic.fetched(request.topic, out.next_offset - request.offset, len(out.data))
        return _frames_response(out)

    async def ListOffsets(self, request: pb.ListOffsetsRequest, context) -> pb.ListOffsetsResponse:
        topic = self.broker.topic(request.topic)
        partitions = list(request.partitions) or list(range(len(topic.partitions)))
        which = request.WhichOneof("spec")
        out = []
        for p in partitions:
            part = self.broker.partition(request.topic, p)
            if which == "timestamp_ms":
                offset = self.broker.offset_for(request.topic, p, timestamp_ms=request.timestamp_ms)
            else:
                latest = which == "position" and request.position == pb.OFFSET_SPEC_LATEST
                offset = self.broker.offset_for(request.topic, p, position="latest" if latest else "earliest")
            out.append(
                pb.PartitionOffset(
                    partition=p,
                    offset=offset,
                    log_start_offset=part.log_start_offset,
                    log_end_offset=part.high_watermark,
                )
            )
        return pb.ListOffsetsResponse(offsets=out)

    async def Subscribe(self, request: pb.SubscribeRequest, context):
        limits = _limits(request.max_records, request.max_bytes)
        topic, p = request.topic, request.partition
        self.broker.partition(topic, p)
        which = request.WhichOneof("start")
        if which == "offset":
            offset = request.offset
        elif which == "timestamp_ms":
            offset = self.broker.offset_for(topic, p, timestamp_ms=request.timestamp_ms)
        else:
            latest = which == "position" and request.position == pb.OFFSET_SPEC_LATEST
            offset = self.broker.offset_for(topic, p, position="latest" if latest else "earliest")
        traffic = self.traffic.topic(topic)
        traffic.subscribers += 1
        try:
            async for out in self.broker.subscribe(topic, p, offset, limits):
                traffic.records_fetched += out.next_offset - offset
                traffic.bytes_fetched += len(out.data)
                offset = out.next_offset
                yield _frames_response(out)
        finally:
            traffic.subscribers -= 1
