"""streamd.v1.QueueService: queue groups over gRPC, glue only: validate the request,
call ``consumer_groups.queue.engine.QueueEngine`` (which decides everything), encode
the answer. Errors are raised, never aborted here (``streamd.service.errors`` maps
them)."""

from __future__ import annotations

import asyncio
from typing import Any

from consumer_groups.queue.engine import Leased, QueueEngine
from consumer_groups.queue.retry import RetryPolicy
from consumer_groups.queue.stats import PartitionStats
from consumer_groups.queue.store import QueueGroup
from consumer_groups.queue.window import QueueConfig
from streamd.broker.errors import BrokerUnavailable, InvalidArgument
from streamd.v1 import streamd_pb2 as pb

from .errors import stream_error

JITTER = {pb.JITTER_UNSPECIFIED: "full", pb.JITTER_NONE: "none", pb.JITTER_FULL: "full", pb.JITTER_EQUAL: "equal"}
_START = {pb.OFFSET_SPEC_UNSPECIFIED: "earliest", pb.OFFSET_SPEC_EARLIEST: "earliest",
          pb.OFFSET_SPEC_LATEST: "latest"}
JITTER_PB = {"none": pb.JITTER_NONE, "full": pb.JITTER_FULL, "equal": pb.JITTER_EQUAL}
ACTIONS = {pb.SETTLE_ACTION_ACK: "ack", pb.SETTLE_ACTION_NACK: "nack", pb.SETTLE_ACTION_EXTEND: "extend",
           pb.SETTLE_ACTION_REJECT: "reject"}
MAX_SETTLEMENTS = 10_000
MAX_RANGE_OFFSETS = 100_000
MAX_REASON_BYTES = 1024


def config_from_pb(c: pb.QueueGroupConfig) -> QueueConfig:
    r = c.retry
    defaults = RetryPolicy()
    try:
        retry = RetryPolicy(
            initial_delay_ms=r.initial_delay_ms if r.HasField("initial_delay_ms") else defaults.initial_delay_ms,
            multiplier=r.multiplier if r.HasField("multiplier") else defaults.multiplier,
            max_delay_ms=r.max_delay_ms if r.HasField("max_delay_ms") else defaults.max_delay_ms,
            jitter=JITTER[r.jitter] if r.jitter in JITTER else "bad",
        )
        base = QueueConfig()
        return QueueConfig(
            lease_ms=c.lease_ms if c.HasField("lease_ms") else base.lease_ms,
            max_deliveries=c.max_deliveries if c.HasField("max_deliveries") else base.max_deliveries,
            dead_letter_topic=c.dead_letter_topic if c.HasField("dead_letter_topic") else "",
            retry=retry,
            ordered_by_key=c.ordered_by_key,
            at_most_once=c.at_most_once,
            max_in_flight=c.max_in_flight if c.HasField("max_in_flight") else base.max_in_flight,
            start=_START[c.start],
        )
    except (ValueError, KeyError) as exc:
        raise InvalidArgument("config", str(exc)) from None


def config_to_pb(c: QueueConfig, topic: str) -> pb.QueueGroupConfig:
    return pb.QueueGroupConfig(
        lease_ms=c.lease_ms, max_deliveries=c.max_deliveries, dead_letter_topic=c.dead_letter_topic or f"{topic}.dlq",
        retry=pb.RetryPolicy(initial_delay_ms=c.retry.initial_delay_ms, multiplier=c.retry.multiplier,
                             max_delay_ms=c.retry.max_delay_ms, jitter=JITTER_PB[c.retry.jitter]),
        ordered_by_key=c.ordered_by_key, at_most_once=c.at_most_once, max_in_flight=c.max_in_flight,
        start=pb.OFFSET_SPEC_LATEST if c.start == "latest" else pb.OFFSET_SPEC_EARLIEST,
    )


class QueueService:
    def __init__(self, engine: QueueEngine) -> None:
        self.engine = engine
        self.broker = engine.broker

    # -- groups ------------------------------------------------------------------
    async def CreateQueueGroup(self, request: pb.CreateQueueGroupRequest, context) -> pb.CreateQueueGroupResponse:
        config = config_from_pb(request.config)
        g = await self.engine.create(request.group, request.topic, config)
        return pb.CreateQueueGroupResponse(group=self._describe(g))

    async def DeleteQueueGroup(self, request: pb.DeleteQueueGroupRequest, context) -> pb.DeleteQueueGroupResponse:
        await self.engine.delete(request.group, request.topic)
        return pb.DeleteQueueGroupResponse()

    async def DescribeQueueGroup(self, request, context) -> pb.DescribeQueueGroupResponse:
        return pb.DescribeQueueGroupResponse(group=self._describe(self.engine.group(request.group, request.topic)))

    async def ListQueueGroups(self, request: pb.ListQueueGroupsRequest, context) -> pb.ListQueueGroupsResponse:
        return pb.ListQueueGroupsResponse(groups=[self._describe(g) for g in self.engine.groups(request.topic)])

    def _describe(self, g: QueueGroup) -> pb.QueueGroupDescription:
        d = pb.QueueGroupDescription(
            group=g.name, topic=g.topic, config=config_to_pb(g.config, g.topic), created_ms=g.created_ms
        )
        d.partitions.extend(_stats_pb(s) for s in self.engine.partition_stats(g, self.broker.clock.now_ms()))
        return d

    # -- receive -------------------------------------------------------------------
    async def Receive(self, request: pb.ReceiveRequest, context) -> pb.ReceiveResponse:
        leased = await self._receive(request, request.max_records)
        response = pb.ReceiveResponse()
        _fill(response, leased)
        return response

    async def ReceiveStream(self, read, context) -> None:
        """The first message opens the stream with an initial credit; later messages
        add credit. Records are pushed while credit lasts."""
        first = await read()
        if first is None:
            return
        if first.WhichOneof("kind") != "open":
            raise InvalidArgument("open", "the first message of a ReceiveStream must be `open`")
        request = first.open
        self.engine.group(request.group, request.topic)
        if not 0 <= request.max_records <= 10_000:
            raise InvalidArgument("max_records", "the initial credit must be 0 .. 10000")
        credit = request.max_records or 100
        more = asyncio.Event()

        async def credits() -> None:
            nonlocal credit
            while (message := await read()) is not None:
                if message.WhichOneof("kind") != "credit" or not 0 < message.credit <= 10_000:
                    raise InvalidArgument("credit", "later messages carry a credit of 1 .. 10000")
                credit += message.credit
                more.set()

        # A client that half-closes its side stops granting credit; the stream ends
        # once the credit it granted is used up.
        reader = asyncio.create_task(credits())
        try:
            stopping = self.engine.broker.stopping()
            while credit > 0 or not reader.done():
                if reader.done() and reader.exception() is not None:
                    reader.result()
                if stopping.done():
                    raise BrokerUnavailable("stopping")
                if credit <= 0:
                    more.clear()
                    waiter = asyncio.ensure_future(more.wait())
                    waits: list[asyncio.Future[Any]] = [waiter, reader, stopping]
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    continue
                wait = pb.ReceiveRequest()
                wait.CopyFrom(request)
                wait.max_wait_ms = 1000
                leased = await self._receive(wait, min(credit, 10_000))
                if leased:
                    credit -= sum(len(x.lease) for x in leased)
                    response = pb.ReceiveStreamResponse()
                    _fill(response, leased)
                    await context.write(response)
        finally:
            reader.cancel()

    async def _receive(self, request: pb.ReceiveRequest, max_records: int):
        return await self.engine.receive(
            request.group, request.topic, max_records=max_records, max_wait_ms=request.max_wait_ms,
            lease_ms=request.lease_ms if request.HasField("lease_ms") else None, batched=request.batched,
            max_bytes=request.max_bytes,
        )

    # -- settling ------------------------------------------------------------------
    async def _one(self, request, action: str, delay_ms=None, reason: str = ""):
        lease = request.lease
        [result] = await self.engine.settle(
            request.group, request.topic, [(action, lease.partition, lease.offset, lease.lease_id, delay_ms, reason)]
        )
        if isinstance(result, BaseException):
            raise result
        return result

    async def Ack(self, request: pb.AckRequest, context) -> pb.AckResponse:
        await self._one(request, "ack")
        return pb.AckResponse()

    async def Nack(self, request: pb.NackRequest, context) -> pb.NackResponse:
        await self._one(request, "nack", request.delay_ms if request.HasField("delay_ms") else None,
                        _reason(request.reason))
        return pb.NackResponse()

    async def Extend(self, request: pb.ExtendRequest, context) -> pb.ExtendResponse:
        return pb.ExtendResponse(lease_expires_ms=await self._one(request, "extend", request.lease_ms))

    async def Reject(self, request: pb.RejectRequest, context) -> pb.RejectResponse:
        await self._one(request, "reject", None, _reason(request.reason))
        return pb.RejectResponse()

    async def Settle(self, request: pb.SettleRequest, context) -> pb.SettleResponse:
        if len(request.settlements) > MAX_SETTLEMENTS:
            raise InvalidArgument("settlements", f"at most {MAX_SETTLEMENTS} per call")
        if len(request.ranges) > MAX_SETTLEMENTS:
            raise InvalidArgument("ranges", f"at most {MAX_SETTLEMENTS} per call")
        ranges = []
        total = 0
        for r in request.ranges:
            action = ACTIONS.get(r.action)
            if action is None:
                raise InvalidArgument("action", "each range needs an action")
            total += max(0, r.last_offset - r.first_offset + 1)
            if total > MAX_RANGE_OFFSETS:
                raise InvalidArgument("ranges", f"at most {MAX_RANGE_OFFSETS} offsets per call")
            delay = r.delay_ms if action != "ack" and r.HasField("delay_ms") else None
            ranges.append((action, r.partition, r.first_offset, r.last_offset, r.lease_id, delay,
                           _reason(r.reason) if r.reason else ""))
        batch = []
        for s in request.settlements:
            action = ACTIONS.get(s.action)
            if action is None:
                raise InvalidArgument("action", "each settlement needs an action")
            lease = s.lease
            delay = s.delay_ms if action != "ack" and s.HasField("delay_ms") else None
            reason = s.reason
            batch.append((action, lease.partition, lease.offset, lease.lease_id, delay,
                          _reason(reason) if reason else ""))
        results = await self.engine.settle(request.group, request.topic, batch, ranges)
        response = pb.SettleResponse()
        add = response.results.add
        for result in results:
            if result is None:
                add()
            elif isinstance(result, BaseException):
                add(error=stream_error(result))
            elif isinstance(result, tuple):  # a range
                settled, refused, expires, error = result
                out = add(settled=settled, refused=refused, lease_expires_ms=expires or 0)
                if error is not None:
                    out.error.CopyFrom(stream_error(error))
            else:
                add(lease_expires_ms=result)
        return response

    # -- seek ------------------------------------------------------------------------
    async def SeekQueueGroup(self, request: pb.SeekQueueGroupRequest, context) -> pb.SeekQueueGroupResponse:
        g = self.engine.group(request.group, request.topic)
        target = request.WhichOneof("target")
        if target is None:
            raise InvalidArgument("target", "say where to move the start offset")
        partitions = list(request.partitions) or sorted(g.partitions)
        if target == "offset":
            plan = self.engine.plan_seek(g, partitions, "offset", request.offset)
        elif target == "timestamp_ms":
            plan = self.engine.plan_seek(g, partitions, "timestamp_ms", request.timestamp_ms)
        else:
            plan = self.engine.plan_seek(g, partitions, "latest" if request.position == pb.OFFSET_SPEC_LATEST
                                         else "earliest")
        response = pb.SeekQueueGroupResponse()
        for step in plan:
            response.plan.add(partition=step.partition, old_offset=step.old_offset, new_offset=step.new_offset,
                              clamped=step.clamped)
        if request.execute:
            await self.engine.seek(request.group, request.topic, {step.partition: step.new_offset for step in plan})
            response.executed = True
        return response


def _reason(text: str) -> str:
    if len(text.encode()) > MAX_REASON_BYTES:
        raise InvalidArgument("reason", f"at most {MAX_REASON_BYTES} bytes")
    return text


def _fill(response, leased: list[Leased]) -> None:
    """One LeasedRecord per record, or (batched) the stored frames and the leased
    ranges per partition."""
    for part in leased:
        lease = part.lease
        if part.records is None:
            lb = response.partitions.add()
            lb.MergeFromString(part.frames)  # frames are LeasedBatches.batches entries as stored
            lb.partition = part.partition
            add = lb.leased.add
            for first, last, deliveries in lease.runs():
                add(first_offset=first, last_offset=last, lease_id=lease.lease_id, delivery_count=deliveries,
                    lease_expires_ms=lease.expires_ms)
            continue
        add = response.records.add
        records = part.records
        for offset, deliveries in lease.records():
            record, append_time = records[offset]
            add(partition=part.partition, offset=offset, record=record, append_time_ms=append_time,
                lease_id=lease.lease_id, delivery_count=deliveries, lease_expires_ms=lease.expires_ms)


def _stats_pb(s: PartitionStats) -> pb.QueuePartitionStats:
    return pb.QueuePartitionStats(
        partition=s.partition, start_offset=s.start_offset, backlog=s.backlog, in_flight=s.in_flight,
        waiting=s.waiting, acked=s.acked, redelivered=s.redelivered, dead_lettered=s.dead_lettered,
        oldest_unacked_ms=s.oldest_unacked_ms, lost_to_retention=s.lost_to_retention,
        log_end_offset=s.log_end_offset, lost_to_corruption=s.lost_to_corruption,
    )
