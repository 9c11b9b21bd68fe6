"""Redelivery timing of queue groups (``bench.queues``): how far from its schedule a
failed record comes back.

A producer writes ``redelivery_records`` records to a one-partition topic, one every
``redelivery_interval_ms`` (deadline schedule, so the redeliveries spread over the
broker's 20 ms timer grid instead of landing on one tick). One worker (asyncio,
raw stubs) long-polls ``Receive(max_records=100, max_wait_ms=1000)`` in a loop; the
queue group has a fixed backoff (``initial_delay_ms = max_delay_ms = backoff_ms``,
multiplier 1, no jitter). Each record's first delivery fails:

- ``nack``: the worker sends a Nack at once (its own task; 30 s leases). Scheduled
  redelivery = the client's clock just before sending the Nack + backoff. The broker
  takes its time a little later (when the request arrives), so the error measured is
  an upper bound: it includes the Nack's one-way latency (``nack_rtt_ms`` reported).
- ``expiry``: the worker leaves the record alone; its lease (``expiry_lease_ms``)
  expires. Scheduled redelivery = ``lease_expires_ms`` (the broker's, same machine
  clock) + backoff.

Error = the client's ``time.time()`` when the Receive carrying the redelivery returned
- scheduled, in ms (negative: early). Redelivered records are acked (one Settle per
Receive).
"""

from __future__ import annotations

import asyncio
import time

from bench.harness import percentile
from bench.queue_workers import Params

RECEIVE_MAX_RECORDS = 100
RECEIVE_WAIT_MS = 1000
NACK_LEASE_MS = 30_000
EARLY_MS = -1.0  # ms-granular broker clock: an error below this is a real early delivery


def measure(address: str, admin, how: str, params: Params) -> dict:
    topic = f"redelivery-{how}"
    admin.create_topic(topic, 1, fsync="interval")
    try:
        return asyncio.run(_measure(address, topic, how, params))
    finally:
        admin.delete_topic(topic)


async def _measure(address: str, topic: str, how: str, params: Params) -> dict:
    from streamd.client._channel import aio_channel
    from streamd.v1 import streamd_pb2 as pb
    from streamd.v1 import streamd_pb2_grpc as rpc

    group, n, backoff = f"redelivery-{how}", params.redelivery_records, params.backoff_ms
    retry = pb.RetryPolicy(initial_delay_ms=backoff, multiplier=1.0, max_delay_ms=backoff, jitter=pb.JITTER_NONE)
    lease_ms = params.expiry_lease_ms if how == "expiry" else NACK_LEASE_MS
    async with aio_channel(address) as channel:
        stub = rpc.QueueServiceStub(channel)
        await stub.CreateQueueGroup(pb.CreateQueueGroupRequest(
            group=group, topic=topic, config=pb.QueueGroupConfig(lease_ms=lease_ms, max_deliveries=5, retry=retry)))
        scheduled: dict[int, float] = {}
        errors: list[float] = []
        rtts: list[float] = []
        tasks: set[asyncio.Task] = set()
        counts = {"first_deliveries": 0, "unexpected": 0, "settle_errors": 0}

        def spawn(coro) -> None:
            task = asyncio.ensure_future(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def nack(r) -> None:
            t = time.time() * 1000
            scheduled[r.offset] = t + backoff
            await stub.Nack(pb.NackRequest(group=group, topic=topic, lease=_lease(pb, r)))
            rtts.append(time.time() * 1000 - t)

        async def ack(records) -> None:
            request = pb.SettleRequest(group=group, topic=topic)
            for r in records:
                request.settlements.add(lease=_lease(pb, r), action=pb.SETTLE_ACTION_ACK)
            response = await stub.Settle(request)
            counts["settle_errors"] += sum(1 for x in response.results if x.HasField("error"))

        producer = asyncio.ensure_future(_produce(address, topic, n, params.redelivery_interval_ms))
        deadline = time.time() + params.run_timeout_s
        try:
            while len(errors) < n and time.time() < deadline:
                reply = await stub.Receive(pb.ReceiveRequest(
                    group=group, topic=topic, max_records=RECEIVE_MAX_RECORDS, max_wait_ms=RECEIVE_WAIT_MS))
                now_ms = time.time() * 1000
                redelivered = []
                for r in reply.records:
                    if r.delivery_count == 1:
                        counts["first_deliveries"] += 1
                        if how == "nack":
                            spawn(nack(r))
                        else:
                            scheduled[r.offset] = r.lease_expires_ms + backoff
                    elif r.delivery_count == 2 and r.offset in scheduled:
                        errors.append(now_ms - scheduled.pop(r.offset))
                        redelivered.append(r)
                    else:
                        counts["unexpected"] += 1
                if redelivered:
                    spawn(ack(redelivered))
            await producer
            await asyncio.gather(*tasks)
        finally:
            producer.cancel()
            for task in tasks:
                task.cancel()
            await stub.DeleteQueueGroup(pb.DeleteQueueGroupRequest(group=group, topic=topic))
    return _summary(errors, rtts, counts, n)


def _lease(pb, r):
    return pb.LeaseRef(partition=r.partition, offset=r.offset, lease_id=r.lease_id)


async def _produce(address: str, topic: str, n: int, interval_ms: int) -> None:
    from streamd.client import AsyncProducer

    async with AsyncProducer(address) as producer:
        start, sent = time.perf_counter(), []
        for i in range(n):  # deadline schedule: record i is due at start + i * interval
            delay = start + i * interval_ms / 1000 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent.append(await producer.send_batch(topic, 0, [b"%d" % i]))
        await asyncio.gather(*sent)


def _summary(errors: list[float], rtts: list[float], counts: dict, n: int) -> dict:
    ordered = sorted(errors)
    out = {
        "records": n, "redelivered": len(errors),
        "median": round(percentile(ordered, 50), 2), "p90": round(percentile(ordered, 90), 2),
        "max": round(ordered[-1], 2) if ordered else None, "min": round(ordered[0], 2) if ordered else None,
        "early": sum(1 for e in errors if e < EARLY_MS), **counts,
    }
    if rtts:
        out["nack_rtt_ms_median"] = round(percentile(sorted(rtts), 50), 2)
    return out
