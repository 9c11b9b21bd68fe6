"""The idempotent producer's sequence numbering against a fake broker that fails
requests at random (hypothesis), checked against what the fake stored.

The fake (a real grpc.aio LogService on 127.0.0.1) keeps, per partition, the log and
what the real broker keeps of each producer (next sequence, last 5 batches; a new
producer starts at 0), and checks sequences the same way. Per request it applies a
fault drawn by hypothesis:

- ``refuse``: DISK_FULL for a batch it would append (decided after the sequence
  check, as the broker does): nothing stored;
- ``refuse_early``: a refusal decided before the sequence check (a quota), nothing
  stored;
- ``internal_before`` / ``internal_after``: INTERNAL, without / after appending;
- ``drop_before`` / ``drop_after``: the stream ends (UNAVAILABLE), without / after
  appending: the answer is lost;
- ``hang_before`` / ``hang_after``: the stream stops answering (a stopped broker),
  without / after appending;
- and ``InitProducer`` calls answer UNAVAILABLE now and then.

And on the producer's side, ``stuck`` writes (by write number) never complete and
never leave, even once their stream is cancelled: grpc.aio leaves a write pending on
a full HTTP/2 flow-control window (a stopped broker) and does not always end it when
the call is cancelled. The producer must give such a write up, and ``flush()`` must
still return (every run is bounded by ``RUN_BOUND_S``).

What must hold for every record sent (and ``flush()`` returns):

- acknowledged: stored exactly once, at the offset its metadata says;
- failed with a refusal (ProduceError) or DELIVERY_TIMEOUT: not stored;
- failed with OutcomeUnknown: stored at most once;
- no cascade: a record fails only if its own batch was refused by the fake (or, with a
  short delivery timeout, its time ran out);
- each partition's log holds the stored records in the order they were sent, and
  nothing twice.
"""

from __future__ import annotations

import asyncio
import collections
import itertools

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamd.client import AsyncProducer, OutcomeUnknown, ProduceError, StreamdError
from streamd.client.records import batch_records
from streamd.v1 import streamd_pb2 as pb
from streamd.v1 import streamd_pb2_grpc as rpc
from tests.conftest import bounded

REMEMBERED = 5
#: A run whose flush() has not returned by then is wedged (a healthy one takes well
#: under a second, or the pauses of a paused plan).
RUN_BOUND_S = 20
FAULTS = ["refuse", "refuse_early", "internal_before", "internal_after", "drop_before", "drop_after",
          "hang_before", "hang_after"]
_CODE = {name: code.value[0] for name, code in grpc.StatusCode.__members__.items()}


class Producers:
    """One partition's producer state, as streamd.broker.producer_state keeps it."""

    def __init__(self) -> None:
        self.next: dict[int, int] = {}
        self.batches: dict[int, collections.deque] = {}

    def check(self, pid: int, seq: int, count: int):
        """("append", None) | ("duplicate", base_offset) | ("refuse", reason)."""
        expected = self.next.get(pid)
        if expected is None:
            return ("append", None) if seq == 0 else ("refuse", "UNKNOWN_PRODUCER")
        if seq == expected:
            return "append", None
        for b_seq, b_count, b_offset in self.batches[pid]:
            if (b_seq, b_count) == (seq, count):
                return "duplicate", b_offset
        return "refuse", "OUT_OF_ORDER_SEQUENCE"

    def record(self, pid: int, seq: int, count: int, offset: int) -> None:
        self.next[pid] = seq + count
        self.batches.setdefault(pid, collections.deque(maxlen=REMEMBERED)).append((seq, count, offset))


class FakeBroker(rpc.LogServiceServicer):
    def __init__(self, faults: list[str], init_failures: set[int], partitions: int) -> None:
        self.faults = faults
        self.init_failures = init_failures
        self.requests = itertools.count()
        self.inits = itertools.count()
        self.ids = itertools.count(1000)
        self.logs: list[list[bytes]] = [[] for _ in range(partitions)]
        self.state = [Producers() for _ in range(partitions)]
        self.refused: set[bytes] = set()  # first value of every batch answered with a refusal

    async def InitProducer(self, request, context):
        if next(self.inits) in self.init_failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
        return pb.InitProducerResponse(producer_id=next(self.ids))

    def _apply(self, partition: int, batch: pb.RecordBatch, *, refuse: bool) -> pb.ProduceStreamResponse | None:
        """Check and append as the broker does; the answer (None: appended, or a
        duplicate: see ``result``)."""
        values = [r.value for r in batch_records(batch).records]
        verdict, detail = self.state[partition].check(batch.producer_id, batch.base_sequence, len(values))
        if verdict == "refuse":
            return _error("FAILED_PRECONDITION", detail)
        if verdict == "duplicate":
            return _result(partition, detail, len(values), duplicate=True)
        if refuse:
            self.refused.add(values[0])
            return _error("RESOURCE_EXHAUSTED", "DISK_FULL")
        log = self.logs[partition]
        offset = len(log)
        log.extend(values)
        self.state[partition].record(batch.producer_id, batch.base_sequence, len(values), offset)
        return _result(partition, offset, len(values))

    async def ProduceStream(self, request_iterator, context):
        async for item in request_iterator:
            n = next(self.requests)
            fault = self.faults[n] if n < len(self.faults) else "ok"
            part = item.request.partitions[0]
            batch = part.batches[0]
            if fault == "refuse_early":
                self.refused.add(batch_records(batch).records[0].value)
                answer = _error("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED")
            elif fault.endswith("_before"):
                answer = _error("INTERNAL", "INTERNAL")
            else:
                answer = self._apply(part.partition, batch, refuse=fault == "refuse")
            if fault in ("drop_before", "drop_after"):
                await context.abort(grpc.StatusCode.UNAVAILABLE, "dropped")
            if fault in ("hang_before", "hang_after"):
                await asyncio.Event().wait()  # until the producer gives the stream up
            answer.request_id = item.request_id
            yield answer


class StuckWrites:
    """The producer's LogService stub, with the ProduceStream writes numbered in
    ``stuck`` (counted over all streams) never completing and never sent."""

    def __init__(self, stub, stuck: set[int]) -> None:
        self.stub = stub
        self.stuck = stuck
        self.writes = itertools.count()

    def __getattr__(self, name: str):
        return getattr(self.stub, name)

    def ProduceStream(self):
        return _StuckCall(self.stub.ProduceStream(), self)


class _StuckCall:
    def __init__(self, call, owner: StuckWrites) -> None:
        self.call = call
        self.owner = owner

    def __getattr__(self, name: str):
        return getattr(self.call, name)

    def __aiter__(self):
        return self.call.__aiter__()

    async def write(self, message) -> None:
        if next(self.owner.writes) in self.owner.stuck:
            await asyncio.Event().wait()  # only a cancellation of the writing task ends this
        await self.call.write(message)


def _error(code: str, reason: str) -> pb.ProduceStreamResponse:
    return pb.ProduceStreamResponse(error=pb.StreamError(code=_CODE[code], reason=reason, message=reason))


def _result(partition: int, offset: int, count: int, *, duplicate: bool = False) -> pb.ProduceStreamResponse:
    result = pb.PartitionProduceResult(partition=partition, base_offset=offset, record_count=count,
                                       duplicate=duplicate)
    return pb.ProduceStreamResponse(response=pb.ProduceResponse(results=[result]))


async def run(plan, faults, init_failures, partitions: int, delivery_timeout_ms: int, stuck: set[int] = frozenset()):
    """Send ``plan`` ((partition, record count) per batch; partition -1: pause for
    longer than the delivery timeout) through an AsyncProducer to a fake broker
    failing requests as ``faults`` say, with the writes numbered in ``stuck`` never
    completing; the fake and each batch's outcome."""
    fake = FakeBroker(faults, init_failures, partitions)
    server = grpc.aio.server()
    rpc.add_LogServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sent: list[tuple[int, list[bytes], asyncio.Future]] = []
    try:
        async with AsyncProducer(f"127.0.0.1:{port}", request_timeout_ms=150, retry_backoff_ms=1,
                                 retry_backoff_max_ms=5, delivery_timeout_ms=delivery_timeout_ms) as producer:
            producer._sender._log = StuckWrites(producer._sender._log, set(stuck))  # the one seam for it
            serial = itertools.count()
            for partition, size in plan:
                if partition < 0:
                    await asyncio.sleep(delivery_timeout_ms * 1.5 / 1000)
                    continue
                values = [b"p%d-%04d" % (partition, next(serial)) for _ in range(size)]
                sent.append((partition, values, await producer.send_batch("t", partition, values)))
            await producer.flush()
    finally:
        await server.stop(None)
    return fake, [(p, values, f.result() if f.exception() is None else f.exception()) for p, values, f in sent]


def check(fake: FakeBroker, outcomes, *, expiry: bool) -> None:
    counts = collections.Counter(v for log in fake.logs for v in log)
    assert all(n == 1 for n in counts.values()), "a record is stored twice"
    for partition, values, outcome in outcomes:
        log = fake.logs[partition]
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, StreamdError), outcome
            assert outcome.reason not in ("OUT_OF_ORDER_SEQUENCE", "UNKNOWN_PRODUCER"), outcome
            timed_out = outcome.code == "DEADLINE_EXCEEDED"
            assert fake.refused.__contains__(values[0]) or (expiry and timed_out), f"cascade: {outcome}"
            if not isinstance(outcome, OutcomeUnknown):
                assert isinstance(outcome, ProduceError) or outcome.reason == "DELIVERY_TIMEOUT", outcome
                assert not any(counts[v] for v in values), f"stored, yet failed as not stored: {outcome}"
        else:
            assert log[outcome.offset:outcome.offset + len(values)] == values
    for partition, log in enumerate(fake.logs):
        order = [v for p, values, _ in outcomes if p == partition for v in values]
        assert log == [v for v in order if counts[v]], "a partition's records out of order"


def bounded_run(coro):
    """``asyncio.run(coro)`` in a thread that must end within RUN_BOUND_S (a wedged
    producer cannot even be cancelled: its close() would wait too)."""
    return bounded(RUN_BOUND_S, asyncio.run, coro, what="the producer is wedged: flush()")


plans = st.lists(st.tuples(st.integers(0, 2), st.integers(1, 3)), min_size=1, max_size=24)
paused_plans = st.lists(st.tuples(st.sampled_from([0, 1, 2, 0, 1, 2, -1]), st.integers(1, 3)), min_size=1, max_size=24)
fault_lists = st.lists(st.sampled_from(["ok"] * 12 + FAULTS), max_size=40)
init_failures = st.sets(st.integers(0, 6), max_size=3)
stuck_writes = st.sets(st.integers(0, 30), max_size=2)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(plan=plans, faults=fault_lists, inits=init_failures, stuck=stuck_writes)
def test_every_batch_is_stored_once_or_fails_alone_and_nothing_cascades(plan, faults, inits, stuck):
    fake, outcomes = bounded_run(run(plan, faults, inits, 3, delivery_timeout_ms=60_000, stuck=stuck))
    check(fake, outcomes, expiry=False)
    for _, _values, outcome in outcomes:  # without expiry, only refusals fail
        if isinstance(outcome, BaseException) and not isinstance(outcome, OutcomeUnknown):
            assert outcome.reason in ("DISK_FULL", "QUOTA_EXCEEDED"), outcome


@SETTINGS
@given(plan=paused_plans, faults=st.lists(st.sampled_from(["ok"] * 6 + FAULTS + ["hang_before"] * 3), max_size=40),
       inits=init_failures, stuck=stuck_writes)
def test_batches_whose_time_runs_out_fail_honestly_and_later_ones_still_go_through(plan, faults, inits, stuck):
    # 100 ms: shorter than the request timeout, so batches expire on the wire too.
    fake, outcomes = bounded_run(run(plan, faults, inits, 3, delivery_timeout_ms=100, stuck=stuck))
    check(fake, outcomes, expiry=True)
