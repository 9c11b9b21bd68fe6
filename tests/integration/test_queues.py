"""Queue groups over gRPC, driven by a fake clock: leases, ack/nack/extend/reject,
backoff, dead letters, delayed delivery, per-key ordering, at-most-once, seek,
restart, and the errors a worker can get."""

from __future__ import annotations

import grpc
import pytest

from streamd.client.records import batch_records, encode_batch
from streamd.testing import FakeClock
from streamd.v1 import streamd_pb2 as pb
from tests.conftest import wait_until

from .helpers import Stubs, error_info


@pytest.fixture
def clocked(make_server):
    clock = FakeClock()
    server = make_server(clock=clock)
    stubs = Stubs(server.address)
    yield server, stubs, clock
    stubs.close()


def produce(stubs: Stubs, topic: str, records: list[dict], partition: int = 0) -> None:
    rs = pb.RecordSet()
    for r in records:
        rs.records.add(**r)
    stubs.log.Produce(pb.ProduceRequest(
        topic=topic, partitions=[pb.PartitionBatches(partition=partition, batches=[encode_batch(rs)])]
    ))


def values(n: int, prefix: str = "v") -> list[dict]:
    return [{"value": f"{prefix}{i}".encode()} for i in range(n)]


def create(stubs: Stubs, group: str = "workers", topic: str = "jobs", **config) -> pb.QueueGroupDescription:
    retry = config.pop("retry", {})
    request = pb.CreateQueueGroupRequest(
        group=group, topic=topic, config=pb.QueueGroupConfig(retry=pb.RetryPolicy(**retry), **config)
    )
    return stubs.queues.CreateQueueGroup(request).group


def receive(stubs: Stubs, n: int = 100, group: str = "workers", topic: str = "jobs", **kw) -> list:
    return list(stubs.queues.Receive(pb.ReceiveRequest(group=group, topic=topic, max_records=n, **kw)).records)


def ref(r: pb.LeasedRecord) -> pb.LeaseRef:
    return pb.LeaseRef(partition=r.partition, offset=r.offset, lease_id=r.lease_id)


def ack(stubs: Stubs, r, group: str = "workers", topic: str = "jobs") -> None:
    stubs.queues.Ack(pb.AckRequest(group=group, topic=topic, lease=ref(r)))


def nack(stubs: Stubs, r, **kw) -> None:
    stubs.queues.Nack(pb.NackRequest(group="workers", topic="jobs", lease=ref(r), **kw))


def stats(stubs: Stubs, group: str = "workers", topic: str = "jobs") -> pb.QueuePartitionStats:
    d = stubs.queues.DescribeQueueGroup(pb.DescribeQueueGroupRequest(group=group, topic=topic)).group
    return d.partitions[0]


def test_each_record_goes_to_one_worker_and_acks_settle_it(clocked):
    _, stubs, _ = clocked
    stubs.create("jobs", 1)
    create(stubs)
    produce(stubs, "jobs", values(10))
    first, second = receive(stubs, 6), receive(stubs, 6)
    assert [r.offset for r in first] == list(range(6)) and [r.offset for r in second] == list(range(6, 10))
    # One lease id per receive (per partition): the records of one answer share it.
    assert {r.delivery_count for r in first + second} == {1} and len({r.lease_id for r in first}) == 1
    assert first[0].lease_id != second[0].lease_id
    assert first[0].record.value == b"v0" and first[0].lease_expires_ms > 0
    assert receive(stubs, 10) == []  # everything is leased
    for r in first + second:
        ack(stubs, r)
    s = stats(stubs)
    assert (s.start_offset, s.acked, s.in_flight, s.backlog) == (10, 10, 0, 0)
    with pytest.raises(grpc.RpcError) as err:  # a settled lease cannot be acked again
        ack(stubs, first[0])
    assert error_info(err.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "LEASE_EXPIRED")


def test_an_expired_lease_is_redelivered_after_backoff_and_its_ack_refused(clocked):
    _, stubs, clock = clocked
    stubs.create("jobs", 1)
    create(stubs, lease_ms=1000, retry={"initial_delay_ms": 500, "jitter": pb.JITTER_NONE})
    produce(stubs, "jobs", values(1))
    [r1] = receive(stubs)
    clock.advance(1000)
    with pytest.raises(grpc.RpcError) as err:
        ack(stubs, r1)
    assert error_info(err.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "LEASE_EXPIRED")
    assert receive(stubs) == []  # expired at 1000, backoff 500 ms
    clock.advance(499)
    assert receive(stubs) == []
    clock.advance(1)
    [r2] = receive(stubs)
    assert (r2.offset, r2.delivery_count) == (0, 2) and r2.lease_id != r1.lease_id
    with pytest.raises(grpc.RpcError):
        ack(stubs, r1)  # the old lease stays dead
    ack(stubs, r2)
    assert stats(stubs).redelivered == 1


def test_nack_backs_off_exponentially_and_dead_letters_at_the_limit(clocked):
    _, stubs, clock = clocked
    stubs.create("jobs", 1)
    create(stubs, max_deliveries=3, retry={"initial_delay_ms": 100, "multiplier": 2.0, "jitter": pb.JITTER_NONE})
    produce(stubs, "jobs", values(1))
    waits = []
    [r] = receive(stubs)
    for attempt in (1, 2):
        assert r.delivery_count == attempt
        nack(stubs, r, reason=f"failure {attempt}")
        waited = 0
        while not (got := receive(stubs, max_wait_ms=0)) and waited < 1000:
            clock.advance(10)
            waited += 10
        waits.append(waited)
        [r] = got
    assert waits == [100, 200]  # 100 ms, then x2
    nack(stubs, r, reason="failure 3")  # the third failure at max_deliveries=3: dead letter
    assert wait_until(lambda: stats(stubs).dead_lettered == 1)  # the DLQ append is async (fsync)
    assert receive(stubs, max_wait_ms=0) == []


def test_max_deliveries_moves_the_record_to_the_dead_letter_topic(clocked):
    _, stubs, clock = clocked
    stubs.create("jobs", 2)
    create(stubs, max_deliveries=2, retry={"initial_delay_ms": 0, "jitter": pb.JITTER_NONE})
    produce(stubs, "jobs", [{"key": b"k", "value": b"poison", "headers": [pb.RecordHeader(key="h", value=b"1")]}], 1)
    produce(stubs, "jobs", values(1, "ok"), 0)
    seen = []
    for _ in range(2):
        for r in receive(stubs):
            seen.append((r.partition, r.delivery_count))
            if r.record.value == b"poison":
                nack(stubs, r, reason="cannot parse")
            else:
                ack(stubs, r)
    assert sorted(seen) == [(0, 1), (1, 1), (1, 2)]  # the good record was not held back
    def describe():
        return stubs.queues.DescribeQueueGroup(pb.DescribeQueueGroupRequest(group="workers", topic="jobs")).group

    assert wait_until(lambda: describe().partitions[1].dead_lettered == 1)
    d = describe()
    assert d.partitions[1].start_offset == 1
    letters = [b for p in range(2) for b in stubs.fetch("jobs.dlq", p, 0).batches]
    rs = pb.RecordSet.FromString(letters[0].records)
    letter = rs.records[0]
    headers = {h.key: h.value for h in letter.headers}
    assert letter.value == b"poison" and letter.key == b"k" and headers["h"] == b"1"
    assert headers["streamd-dlq-topic"] == b"jobs" and headers["streamd-dlq-partition"] == b"1"
    assert headers["streamd-dlq-offset"] == b"0" and headers["streamd-dlq-group"] == b"workers"
    assert headers["streamd-dlq-deliveries"] == b"2" and headers["streamd-dlq-reason"] == b"cannot parse"
    assert int(headers["streamd-dlq-first-delivery-ms"]) <= int(headers["streamd-dlq-last-delivery-ms"])
    assert receive(stubs, max_wait_ms=0) == []


def test_reject_dead_letters_at_once_and_extend_keeps_the_lease(clocked):
    _, stubs, clock = clocked
    stubs.create("jobs", 1)
    create(stubs, lease_ms=1000)
    produce(stubs, "jobs", values(2))
    a, b = receive(stubs)
    clock.advance(900)
    expiry = stubs.queues.Extend(pb.ExtendRequest(group="workers", topic="jobs", lease=ref(a), lease_ms=5000))
    assert expiry.lease_expires_ms == clock.now_ms() + 5000
    stubs.queues.Reject(pb.RejectRequest(group="workers", topic="jobs", lease=ref(b), reason="poison"))
    clock.advance(2000)
    ack(stubs, a)  # still held thanks to the extension
    assert receive(stubs, max_wait_ms=0) == []


def test_delayed_records_wait_for_their_time_but_stream_readers_see_them_at_once(clocked):
    _, stubs, clock = clocked
    stubs.create("jobs", 1)
    create(stubs)
    produce(stubs, "jobs", [{"value": b"later", "delay_ms": 5000}, {"value": b"at", "deliver_at_ms": clock.now_ms() + 3000},
                            {"value": b"now"}])
    assert len(stubs.fetch("jobs", 0, 0).batches) == 1  # the log has all three
    assert [r.record.value for r in receive(stubs)] == [b"now"]
    clock.advance(3000)
    assert [r.record.value for r in receive(stubs)] == [b"at"]
    clock.advance(2000)
    assert [r.record.value for r in receive(stubs)] == [b"later"]


def test_ordered_by_key_holds_back_only_the_failing_key(clocked):
    _, stubs, clock = clocked
    stubs.create("jobs", 1)
    create(stubs, ordered_by_key=True, retry={"initial_delay_ms": 1000, "jitter": pb.JITTER_NONE})
    produce(stubs, "jobs", [{"key": b"a", "value": b"a1"}, {"key": b"a", "value": b"a2"}, {"key": b"b", "value": b"b1"},
                            {"key": b"b", "value": b"b2"}])
    got = receive(stubs)
    assert [r.record.value for r in got] == [b"a1", b"b1"]  # one per key in flight
    a1, b1 = got
    nack(stubs, a1)  # a fails: a2 must wait behind it
    ack(stubs, b1)
    assert [r.record.value for r in receive(stubs, max_wait_ms=0)] == [b"b2"]
    clock.advance(1000)
    [again] = receive(stubs)
    assert again.record.value == b"a1" and again.delivery_count == 2
    ack(stubs, again)
    assert [r.record.value for r in receive(stubs)] == [b"a2"]


def test_at_most_once_counts_a_record_acked_when_handed_out(clocked):
    _, stubs, clock = clocked
    stubs.create("jobs", 1)
    create(stubs, at_most_once=True, lease_ms=1000)
    produce(stubs, "jobs", values(3))
    assert len(receive(stubs)) == 3
    clock.advance(10_000)
    assert receive(stubs, max_wait_ms=0) == []
    assert stats(stubs).acked == 3 and stats(stubs).start_offset == 3


def test_settle_applies_each_settlement_and_reports_each_failure(clocked):
    _, stubs, _ = clocked
    stubs.create("jobs", 1)
    create(stubs)
    produce(stubs, "jobs", values(3))
    a, b, c = receive(stubs)
    stale = pb.LeaseRef(partition=0, offset=b.offset, lease_id=b.lease_id + 1)
    reply = stubs.queues.Settle(pb.SettleRequest(group="workers", topic="jobs", settlements=[
        pb.Settlement(lease=ref(a), action=pb.SETTLE_ACTION_ACK),
        pb.Settlement(lease=stale, action=pb.SETTLE_ACTION_ACK),
        pb.Settlement(lease=ref(c), action=pb.SETTLE_ACTION_NACK, delay_ms=0),
    ]))
    assert [r.HasField("error") for r in reply.results] == [False, True, False]
    assert reply.results[1].error.reason == "LEASE_EXPIRED"
    assert [r.offset for r in receive(stubs)] == [2]  # c came back; b is still leased


def test_queue_state_survives_a_restart(make_server, tmp_path):
    clock = FakeClock()
    server = make_server(clock=clock)
    stubs = Stubs(server.address)
    stubs.create("jobs", 1)
    create(stubs, retry={"initial_delay_ms": 0, "jitter": pb.JITTER_NONE})
    produce(stubs, "jobs", values(5))
    got = receive(stubs, 3)
    ack(stubs, got[1])
    nack(stubs, got[2])
    stubs.close()
    server.stop()
    server = make_server(clock=clock)
    stubs = Stubs(server.address)
    try:
        again = receive(stubs)
        by_offset = {r.offset: r.delivery_count for r in again}
        assert 1 not in by_offset  # acked stays acked
        assert by_offset == {0: 2, 2: 2, 3: 1, 4: 1}  # the lease in flight and the nack both count
        for r in again:
            ack(stubs, r)
        assert stats(stubs).start_offset == 5
    finally:
        stubs.close()


def test_seek_plans_then_moves_the_start_offset(clocked):
    _, stubs, _ = clocked
    stubs.create("jobs", 1)
    create(stubs)
    produce(stubs, "jobs", values(10))
    for r in receive(stubs):
        ack(stubs, r)
    plan = stubs.queues.SeekQueueGroup(pb.SeekQueueGroupRequest(group="workers", topic="jobs", offset=4))
    assert not plan.executed and (plan.plan[0].old_offset, plan.plan[0].new_offset) == (10, 4)
    assert receive(stubs, max_wait_ms=0) == []
    stubs.queues.SeekQueueGroup(pb.SeekQueueGroupRequest(group="workers", topic="jobs", offset=4, execute=True))
    assert [r.offset for r in receive(stubs)] == list(range(4, 10))
    clamped = stubs.queues.SeekQueueGroup(pb.SeekQueueGroupRequest(group="workers", topic="jobs", offset=99))
    assert clamped.plan[0].clamped and clamped.plan[0].new_offset == 10


def test_receive_stream_pushes_as_credit_allows(clocked):
    _, stubs, _ = clocked
    stubs.create("jobs", 1)
    create(stubs)
    produce(stubs, "jobs", values(5))
    requests = iter([pb.ReceiveStreamRequest(open=pb.ReceiveRequest(group="workers", topic="jobs", max_records=3))])
    call = stubs.queues.ReceiveStream(requests)
    first = next(call)
    assert [r.offset for r in first.records] == [0, 1, 2]
    call.cancel()
    # The batched form: the stored batch and the leased range, within the credit.
    requests = iter([pb.ReceiveStreamRequest(open=pb.ReceiveRequest(group="workers", topic="jobs", max_records=2,
                                                                    batched=True))])
    call = stubs.queues.ReceiveStream(requests)
    [part] = next(call).partitions
    assert [(r.first_offset, r.last_offset) for r in part.leased] == [(3, 4)]
    assert leased_values(part) == {3: b"v3", 4: b"v4"}
    call.cancel()


def test_bad_queue_requests_get_clear_statuses(clocked):
    _, stubs, _ = clocked
    stubs.create("jobs", 1)
    create(stubs)
    cases = [
        (lambda: create(stubs), grpc.StatusCode.ALREADY_EXISTS, "QUEUE_GROUP_EXISTS"),
        (lambda: create(stubs, group="x", topic="nope"), grpc.StatusCode.NOT_FOUND, "TOPIC_NOT_FOUND"),
        (lambda: create(stubs, group="y", lease_ms=1), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (lambda: create(stubs, group="z", retry={"multiplier": 0.5}), grpc.StatusCode.INVALID_ARGUMENT,
         "INVALID_ARGUMENT"),
        (lambda: create(stubs, group="../x"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_GROUP_NAME"),
        (lambda: create(stubs, group="w", max_in_flight=100_001), grpc.StatusCode.INVALID_ARGUMENT,
         "INVALID_ARGUMENT"),
        (lambda: receive(stubs, group="missing"), grpc.StatusCode.NOT_FOUND, "QUEUE_GROUP_NOT_FOUND"),
        (lambda: receive(stubs, 100_000), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (lambda: receive(stubs, 1, lease_ms=5), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (lambda: stubs.queues.Ack(pb.AckRequest(group="workers", topic="jobs", lease=pb.LeaseRef(offset=99))),
         grpc.StatusCode.FAILED_PRECONDITION, "LEASE_EXPIRED"),
    ]
    for call, code, reason in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert error_info(err.value)[:2] == (code, reason), reason
    assert receive(stubs, max_wait_ms=0) == []  # still serving


def test_deleting_the_topic_deletes_its_queue_groups(clocked):
    _, stubs, _ = clocked
    stubs.create("jobs", 1)
    create(stubs)
    stubs.topics.DeleteTopic(pb.DeleteTopicRequest(topic="jobs"))
    assert not stubs.queues.ListQueueGroups(pb.ListQueueGroupsRequest()).groups


def test_records_deleted_by_retention_before_delivery_are_counted(make_server):
    server = make_server(retention_check_ms=50, segment_bytes=4096)
    stubs = Stubs(server.address)
    try:
        stubs.create("jobs", 1, retention_bytes=4096, segment_bytes=4096)
        create(stubs)
        for _ in range(40):
            produce(stubs, "jobs", [{"value": b"x" * 200}])
        assert wait_until(lambda: stubs.log.ListOffsets(pb.ListOffsetsRequest(topic="jobs")).offsets[0]
                          .log_start_offset > 0)
        got = receive(stubs, 100)
        s = stats(stubs)
        assert s.lost_to_retention > 0 and got[0].offset == s.lost_to_retention
    finally:
        stubs.close()


def test_a_slow_record_does_not_hold_back_the_rest_of_a_small_window(clocked):
    _, stubs, _ = clocked
    stubs.create("jobs", 1)
    create(stubs, max_in_flight=3)
    produce(stubs, "jobs", values(6))
    first = receive(stubs)
    assert [r.offset for r in first] == [0, 1, 2]
    nack(stubs, first[0], delay_ms=3_600_000)  # back in an hour
    ack(stubs, first[1])
    ack(stubs, first[2])
    assert [r.offset for r in receive(stubs, max_wait_ms=0)] == [3, 4]  # 3 unsettled at most


def test_ordered_keys_do_not_let_a_hot_key_block_others(clocked):
    _, stubs, _ = clocked
    stubs.create("jobs", 1)
    create(stubs, ordered_by_key=True, max_in_flight=3)
    produce(stubs, "jobs", [{"key": b"a", "value": b"a%d" % i} for i in range(4)] + [{"key": b"b", "value": b"b0"}])
    got = receive(stubs)
    assert [r.record.value for r in got] == [b"a0", b"b0"]  # a1..a3 wait behind a0, b0 goes on
    ack(stubs, got[0])
    assert [r.record.value for r in receive(stubs)] == [b"a1"]


def test_dead_letters_of_large_records_fit_and_the_own_topic_is_refused(clocked):
    _, stubs, clock = clocked
    stubs.create("big", 1, max_record_bytes=2 * 1024 * 1024)
    create(stubs, topic="big", max_deliveries=1)
    produce(stubs, "big", [{"value": b"x" * (1024 * 1024 + 512 * 1024)}])
    [r] = receive(stubs, topic="big")
    stubs.queues.Reject(pb.RejectRequest(group="workers", topic="big", lease=ref(r), reason="too big to handle"))
    assert wait_until(lambda: stats(stubs, topic="big").dead_lettered == 1)
    with pytest.raises(grpc.RpcError) as err:
        create(stubs, group="loop", topic="big", dead_letter_topic="big")
    assert error_info(err.value)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


def test_stats_see_the_backlog_age_with_nobody_receiving(clocked):
    _, stubs, clock = clocked
    stubs.create("jobs", 1)
    create(stubs)
    produce(stubs, "jobs", values(3))
    clock.advance(60_000)
    s = stats(stubs)
    assert s.backlog == 3 and s.oldest_unacked_ms == 60_000


def test_a_half_closed_receive_stream_uses_up_its_credit(clocked):
    _, stubs, _ = clocked
    stubs.create("jobs", 1)
    create(stubs)
    produce(stubs, "jobs", values(2))
    opened = pb.ReceiveStreamRequest(open=pb.ReceiveRequest(group="workers", topic="jobs", max_records=4))
    call = stubs.queues.ReceiveStream(iter([opened]))  # the request side closes at once
    first = next(call)
    produce(stubs, "jobs", values(2, "late"))
    second = next(call)
    assert [r.offset for r in first.records] + [r.offset for r in second.records] == [0, 1, 2, 3]
    assert list(call) == []  # credit used up: the stream ends


def test_a_failed_queue_journal_is_rewritten_from_memory_by_the_next_change(clocked):
    # The journal's file is in an unknown state after a failed write: the next change
    # rewrites it from memory first and goes through; receiving never stopped.
    server, stubs, _ = clocked
    stubs.create("jobs", 1)
    create(stubs)
    produce(stubs, "jobs", values(2))
    journal = server.server.queues.store._journal
    journal._failed = OSError(5, "injected")
    leased = receive(stubs)
    assert [r.offset for r in leased] == [0, 1]
    ack(stubs, leased[0])
    assert journal._failed is None
    assert stats(stubs).acked == 1 and stubs.fetch("jobs", 0, 0).batches


# -- the batched form: stored batches + leased ranges, acks as ranges -------------------


def receive_batched(stubs: Stubs, n: int = 100, **kw) -> list:
    request = pb.ReceiveRequest(group="workers", topic="jobs", max_records=n, batched=True, **kw)
    return list(stubs.queues.Receive(request).partitions)


def leased_values(part: pb.LeasedBatches) -> dict[int, bytes]:
    """offset -> value of the leased records of one partition's answer."""
    records = {}
    for batch in part.batches:
        for i, r in enumerate(batch_records(batch).records, batch.base_offset):
            records[i] = r.value
    return {o: records[o] for r in part.leased for o in range(r.first_offset, r.last_offset + 1)}


def three_leased(stubs: Stubs) -> int:
    """Topic "jobs" with 3 records, group "workers", all 3 leased: the lease id."""
    stubs.create("jobs", 1)
    create(stubs)
    produce(stubs, "jobs", values(3))
    [part] = receive_batched(stubs)
    return part.leased[0].lease_id


def settle_ranges(stubs: Stubs, *ranges) -> list:
    request = pb.SettleRequest(group="workers", topic="jobs", ranges=[pb.SettleRange(**r) for r in ranges])
    return list(stubs.queues.Settle(request).results)


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_batched_receive_hands_out_stored_batches_with_leased_ranges(clocked, compression):
    _, stubs, clock = clocked
    stubs.create("jobs", 1)
    create(stubs)
    for batch in range(3):  # three stored batches of 4 records
        rs = pb.RecordSet()
        for i in range(4):
            rs.records.add(value=f"b{batch}-{i}".encode())
        stubs.log.Produce(pb.ProduceRequest(
            topic="jobs", partitions=[pb.PartitionBatches(partition=0, batches=[encode_batch(rs, compression)])]))
    [part] = receive_batched(stubs, 6)
    assert part.partition == 0 and len(part.batches) == 2  # offsets 0..5 live in the first two batches
    [r] = part.leased
    assert (r.first_offset, r.last_offset, r.delivery_count) == (0, 5, 1)
    assert r.lease_expires_ms == clock.now_ms() + 30_000
    assert leased_values(part) == {i: f"b{i // 4}-{i % 4}".encode() for i in range(6)}
    [rest] = receive_batched(stubs)
    assert [(x.first_offset, x.last_offset) for x in rest.leased] == [(6, 11)] and rest.leased[0].lease_id != r.lease_id
    # Ack a range: offsets 0..3 go, 4..5 stay leased.
    [result] = settle_ranges(stubs, dict(partition=0, first_offset=0, last_offset=3, lease_id=r.lease_id,
                                         action=pb.SETTLE_ACTION_ACK))
    assert (result.HasField("error"), result.settled, result.refused) == (False, 4, 0)
    assert stats(stubs).start_offset == 4 and stats(stubs).acked == 4


def test_a_range_settles_what_its_lease_holds_and_counts_the_rest(clocked):
    _, stubs, clock = clocked
    stubs.create("jobs", 1)
    create(stubs, retry={"initial_delay_ms": 0, "jitter": pb.JITTER_NONE})
    produce(stubs, "jobs", values(10))
    [part] = receive_batched(stubs, 10)
    lease = part.leased[0].lease_id
    ack(stubs, pb.LeasedRecord(partition=0, offset=2, lease_id=lease))  # one acked alone first
    results = settle_ranges(
        stubs,
        dict(partition=0, first_offset=0, last_offset=4, lease_id=lease, action=pb.SETTLE_ACTION_ACK),
        dict(partition=0, first_offset=5, last_offset=6, lease_id=lease + 1, action=pb.SETTLE_ACTION_ACK),
        dict(partition=0, first_offset=7, last_offset=7, lease_id=lease, action=pb.SETTLE_ACTION_NACK,
             reason="flaky"),
        dict(partition=0, first_offset=8, last_offset=9, lease_id=lease, action=pb.SETTLE_ACTION_EXTEND,
             delay_ms=60_000),
    )
    assert [(r.settled, r.refused) for r in results] == [(4, 1), (0, 2), (1, 0), (2, 0)]
    assert [r.error.reason for r in results] == ["LEASE_EXPIRED", "LEASE_EXPIRED", "", ""]
    assert results[3].lease_expires_ms == clock.now_ms() + 60_000
    s = stats(stubs)
    assert (s.start_offset, s.acked) == (5, 5)
    clock.advance(30_000)  # 5 and 6 expire (their lease was not extended); 8, 9 hold on
    [again] = receive_batched(stubs)
    got = {o: r.delivery_count for r in again.leased for o in range(r.first_offset, r.last_offset + 1)}
    assert got == {5: 2, 6: 2, 7: 2}


def test_bad_ranges_get_invalid_argument_and_change_nothing(clocked):
    _, stubs, _ = clocked
    lease = three_leased(stubs)
    results = settle_ranges(
        stubs,
        dict(partition=0, first_offset=2, last_offset=1, lease_id=lease, action=pb.SETTLE_ACTION_ACK),
        dict(partition=0, first_offset=-5, last_offset=1, lease_id=lease, action=pb.SETTLE_ACTION_ACK),
        dict(partition=7, first_offset=0, last_offset=1, lease_id=lease, action=pb.SETTLE_ACTION_ACK),
    )
    assert [r.error.reason for r in results] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", "LEASE_EXPIRED"]
    for bad, reason in [
        (dict(partition=0, first_offset=0, last_offset=200_000, lease_id=lease, action=pb.SETTLE_ACTION_ACK),
         "INVALID_ARGUMENT"),
        (dict(partition=0, first_offset=0, last_offset=1, lease_id=lease), "INVALID_ARGUMENT"),  # no action
    ]:
        with pytest.raises(grpc.RpcError) as err:
            settle_ranges(stubs, bad)
        assert error_info(err.value)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert stats(stubs).acked == 0 and stats(stubs).in_flight == 3


def test_delayed_records_inside_a_batch_wait_in_the_batched_form(clocked):
    """A batch with a delivery time on one record is admitted record by record; the
    others of the batch go out at once."""
    _, stubs, clock = clocked
    stubs.create("jobs", 1)
    create(stubs)
    produce(stubs, "jobs", [{"value": b"a"}, {"value": b"later", "delay_ms": 2000}, {"value": b"c"}])
    produce(stubs, "jobs", values(2, "x"))  # a plain batch after it
    [part] = receive_batched(stubs)
    assert leased_values(part) == {0: b"a", 2: b"c", 3: b"x0", 4: b"x1"}
    assert [(r.first_offset, r.last_offset) for r in part.leased] == [(0, 0), (2, 4)]
    assert receive_batched(stubs, max_wait_ms=0) == []
    clock.advance(2000)
    [part] = receive_batched(stubs)
    assert leased_values(part) == {1: b"later"}


def test_batched_receive_after_a_restart_keeps_counts_and_acked_ranges(make_server):
    clock = FakeClock()
    server = make_server(clock=clock)
    stubs = Stubs(server.address)
    stubs.create("jobs", 1)
    create(stubs)
    produce(stubs, "jobs", values(8))
    [part] = receive_batched(stubs, 8)
    lease = part.leased[0].lease_id
    settle_ranges(stubs, dict(partition=0, first_offset=4, last_offset=5, lease_id=lease,
                              action=pb.SETTLE_ACTION_ACK))
    stubs.close()
    server.stop()
    server = make_server(clock=clock)
    stubs = Stubs(server.address)
    try:
        [part] = receive_batched(stubs)
        got = {o: r.delivery_count for r in part.leased for o in range(r.first_offset, r.last_offset + 1)}
        assert got == {0: 2, 1: 2, 2: 2, 3: 2, 6: 2, 7: 2}  # leases lost in the restart count; 4, 5 stay acked
        assert stats(stubs).acked == 2
    finally:
        stubs.close()


@pytest.mark.parametrize("batched", [True, False])
def test_a_receive_stays_within_max_bytes_and_leaves_the_rest_available(clocked, batched):
    _, stubs, _ = clocked
    stubs.create("jobs", 1)
    create(stubs)
    for i in range(6):  # one stored batch of ~100 KB per record
        produce(stubs, "jobs", [{"value": bytes([i]) * 100_000}])
    request = pb.ReceiveRequest(group="workers", topic="jobs", max_records=100, batched=batched,
                                max_bytes=250_000)

    def got(reply) -> dict[int, int]:
        if batched:
            return {o: r.delivery_count for p in reply.partitions for r in p.leased
                    for o in range(r.first_offset, r.last_offset + 1)}
        return {r.offset: r.delivery_count for r in reply.records}

    assert got(stubs.queues.Receive(request)) == {0: 1, 1: 1}
    request.max_bytes = 1  # the first record comes whatever its size
    assert got(stubs.queues.Receive(request)) == {2: 1}
    request.max_bytes = 0  # just under 4 MiB: the rest, each on its first delivery
    assert got(stubs.queues.Receive(request)) == {3: 1, 4: 1, 5: 1}
    assert stats(stubs).in_flight == 6 and stats(stubs).redelivered == 0
    request.max_bytes = 64 << 20
    with pytest.raises(grpc.RpcError) as err:
        stubs.queues.Receive(request)
    assert error_info(err.value)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


def test_a_per_record_receive_over_partitions_stays_within_max_bytes_with_lz4(clocked):
    """The budget left for the next partition is what the records took, not the
    compressed frames they came in (tiny with lz4)."""
    _, stubs, _ = clocked
    stubs.create("jobs", 3)
    create(stubs)
    for p in range(3):
        stubs.produce_values("jobs", p, [bytes(10_000)] * 50, compression="lz4")
    reply = stubs.queues.Receive(pb.ReceiveRequest(group="workers", topic="jobs", max_records=1000,
                                                   max_bytes=200_000))
    size = sum(r.record.ByteSize() for r in reply.records)
    assert reply.records and size <= 200_000, f"{len(reply.records)} records, {size} bytes"


@pytest.mark.parametrize("batched", [True, False])
def test_a_receive_by_default_fits_a_default_grpc_channel(clocked, batched):
    """Without max_bytes an answer stays under gRPC's default 4 MiB receive limit (a
    worker in any language with a default channel); else the records would be
    leased, their delivery counted, and the answer lost."""
    _, stubs, _ = clocked  # stubs: a channel with grpc's default limits
    stubs.create("jobs", 1)
    create(stubs)
    for i in range(6):
        produce(stubs, "jobs", [{"value": bytes([i]) * 900_000}])
    reply = stubs.queues.Receive(pb.ReceiveRequest(group="workers", topic="jobs", max_records=100,
                                                   batched=batched))
    assert 0 < reply.ByteSize() < 4 << 20
    assert stats(stubs).in_flight == len(reply.records) + sum(
        r.last_offset - r.first_offset + 1 for p in reply.partitions for r in p.leased)


def test_odd_settle_ranges_are_refused_or_invalid_never_internal(clocked):
    _, stubs, _ = clocked
    lease = three_leased(stubs)
    top = (1 << 63) - 1
    ranges = [
        dict(partition=0, first_offset=top - 1, last_offset=top, lease_id=(1 << 64) - 1, action=pb.SETTLE_ACTION_ACK),
        dict(partition=-1, first_offset=0, last_offset=0, lease_id=lease, action=pb.SETTLE_ACTION_ACK),
        dict(partition=(1 << 31) - 1, first_offset=0, last_offset=0, lease_id=lease, action=pb.SETTLE_ACTION_NACK),
        dict(partition=0, first_offset=0, last_offset=0, lease_id=lease, action=pb.SETTLE_ACTION_EXTEND, delay_ms=-1),
        dict(partition=0, first_offset=0, last_offset=0, lease_id=lease, action=pb.SETTLE_ACTION_NACK,
             delay_ms=top),
        dict(partition=0, first_offset=-top - 1, last_offset=-top, lease_id=lease, action=pb.SETTLE_ACTION_ACK),
    ]
    results = settle_ranges(stubs, *ranges)
    assert [r.error.reason for r in results] == ["LEASE_EXPIRED", "LEASE_EXPIRED", "LEASE_EXPIRED",
                                                 "INVALID_ARGUMENT", "INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert stats(stubs).in_flight == 3 and stats(stubs).acked == 0
