"""Authentication (bearer tokens, client certificates) and authorization (allow
rules on topic and group patterns) over real gRPC on 127.0.0.1."""

from __future__ import annotations

import grpc
import pytest

from streamd.auth import new_token
from streamd.v1 import streamd_pb2 as pb

from .helpers import ADMIN_OF_ALL, Stubs, auth_toml, refused

ADMIN, ADMIN_HASH = new_token()
PRODUCER, PRODUCER_HASH = new_token()
WORKER, WORKER_HASH = new_token()
HASH_OF = {ADMIN: ADMIN_HASH, PRODUCER: PRODUCER_HASH, WORKER: WORKER_HASH}


def _serve_with(make_server, tmp_path, tokens: dict[str, str], *rules: tuple):
    """A broker whose auth file names one principal per entry of ``tokens`` (name ->
    token; "" is a caller with no token) and the allow ``rules``; one Stubs per name."""
    path = tmp_path / "auth.toml"
    path.write_text(auth_toml({name: HASH_OF[token] for name, token in tokens.items() if token in HASH_OF}, *rules))
    server = make_server(auth_file=str(path))
    return server, {name: Stubs(server.address, token=token) for name, token in tokens.items()}


@pytest.fixture
def secured(make_server, tmp_path):
    server, stubs = _serve_with(make_server, tmp_path, {
        "ops": ADMIN, "orders-api": PRODUCER, "mailer": WORKER, "nobody": "", "forged": "sdt_x"},
        ADMIN_OF_ALL, ("orders-api", ["produce"], ["orders*"]), ("mailer", ["consume"], ["orders"], ["mailers"]))
    stubs["ops"].create("orders", 1)
    stubs["ops"].create("payroll", 1)
    try:
        yield server, stubs
    finally:
        for s in stubs.values():
            s.close()


def test_calls_without_a_known_token_are_unauthenticated(secured):
    _, stubs = secured
    for who in ("nobody", "forged"):
        code, reason, _ = refused(stubs[who].topics.ListTopics, pb.ListTopicsRequest())
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    bad_scheme = [("authorization", "Basic abc")]
    code, _, _ = refused(stubs["nobody"].topics.ListTopics, pb.ListTopicsRequest(), metadata=bad_scheme)
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_each_principal_does_what_its_rules_allow_and_nothing_else(secured):
    _, stubs = secured
    producer = stubs["orders-api"]
    assert producer.produce_values("orders", 0, [b"o1"]).base_offset == 0
    for call, request in ((producer.log.Fetch, pb.FetchRequest(topic="orders")),
                          (producer.log.Produce, pb.ProduceRequest(topic="payroll")),
                          (producer.topics.CreateTopic, pb.CreateTopicRequest(topic="orders-2", partition_count=1))):
        code, reason, meta = refused(call, request)
        assert (code, reason, meta["principal"]) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED",
                                                     "orders-api")
    assert [t.name for t in stubs["ops"].topics.ListTopics(pb.ListTopicsRequest()).topics] == ["orders", "payroll"]
    # Lists are filtered to what the caller may describe.
    assert [t.name for t in producer.topics.ListTopics(pb.ListTopicsRequest()).topics] == ["orders"]
    assert stubs["mailer"].fetch("orders", 0, 0).batches  # consume on orders
    code, _, meta = refused(stubs["mailer"].fetch, "payroll", 0, 0)
    assert code == grpc.StatusCode.PERMISSION_DENIED and meta["resource"] == "topic:payroll"


def test_queue_and_group_calls_check_the_group_and_the_topic(secured):
    _, stubs = secured
    ops, mailer = stubs["ops"], stubs["mailer"]
    ops.queues.CreateQueueGroup(pb.CreateQueueGroupRequest(group="mailers", topic="orders"))
    stubs["orders-api"].produce_values("orders", 0, [b"o1", b"o2"])
    got = mailer.queues.Receive(pb.ReceiveRequest(group="mailers", topic="orders", max_records=10)).records
    assert [r.record.value for r in got] == [b"o1", b"o2"]
    code, _, meta = refused(mailer.queues.CreateQueueGroup, pb.CreateQueueGroupRequest(group="mailers2", topic="orders"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and meta["operation"] == "admin"
    code, _, meta = refused(mailer.queues.Receive, pb.ReceiveRequest(group="others", topic="orders"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and meta["resource"] == "group:others"
    # A stream is checked per message: a JoinGroup for a group the member may not join.
    join = pb.JoinGroupRequest(join=pb.MemberJoin(group="payroll-readers", topics=["orders"]))
    call = mailer.groups.JoinGroup(iter([join]))
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_produce_stream_messages_are_checked_one_by_one(secured):
    _, stubs = secured
    producer = stubs["orders-api"]
    from streamd.client.records import values_batch

    def request(i: int, topic: str) -> pb.ProduceStreamRequest:
        return pb.ProduceStreamRequest(request_id=i, request=pb.ProduceRequest(
            topic=topic, partitions=[pb.PartitionBatches(partition=0, batches=[values_batch([b"s"])])]))

    call = producer.log.ProduceStream(iter([request(1, "orders"), request(2, "payroll")]))
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stubs["ops"].fetch("payroll", 0, 0).batches == []  # nothing reached the forbidden topic


def test_the_sdk_sends_the_token_from_the_environment(secured, monkeypatch):
    server, _ = secured
    from streamd.client import Admin, Producer

    monkeypatch.setenv("STREAMD_TOKEN", PRODUCER)
    with Producer(server.address) as producer:
        producer.send("orders", b"via sdk").result(timeout=10)
    monkeypatch.setenv("STREAMD_TOKEN", ADMIN)
    with Admin(server.address) as admin:
        assert sum(o.log_end_offset for o in admin.list_offsets("orders")) == 1


def test_a_principal_over_its_produce_quota_is_told_when_to_retry(make_server, tmp_path):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from streamd.testing import FakeClock

    path = tmp_path / "auth.toml"
    path.write_text(f'[[principal]]\nname = "p"\ntoken_sha256 = ["{PRODUCER_HASH}"]\n'
                    '[[allow]]\nprincipal = "p"\noperations = ["admin"]\ntopics = ["*"]\n'
                    '[[quota]]\nprincipal = "p"\nproduce_bytes_per_s = 1000\n')
    clock = FakeClock()
    server = make_server(clock=clock, auth_file=str(path))
    stubs = Stubs(server.address, token=PRODUCER)
    try:
        stubs.create("t", 1)
        stubs.produce_values("t", 0, [b"x" * 1500])  # a full bucket lets one large request through
        with pytest.raises(grpc.RpcError) as caught:
            stubs.produce_values("t", 0, [b"y"])
        code, reason, meta = refused(stubs.produce_values, "t", 0, [b"y"])
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
        assert 0 < int(meta["retry_after_ms"]) <= 1000
        retry = [d for d in rpc_status.from_call(caught.value).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert len(retry) == 1
        assert stubs.fetch("t", 0, 0).batches and len(stubs.fetch("t", 0, 1).batches) == 0  # nothing appended
        clock.advance(int(meta["retry_after_ms"]) + 1)
        assert stubs.produce_values("t", 0, [b"y"]).base_offset == 1
    finally:
        stubs.close()


def test_a_produce_stream_over_its_quota_is_throttled_not_failed(make_server, tmp_path, monkeypatch):
    from streamd.client import Producer

    path = tmp_path / "auth.toml"
    path.write_text(f'[[principal]]\nname = "p"\ntoken_sha256 = ["{PRODUCER_HASH}"]\n'
                    '[[allow]]\nprincipal = "p"\noperations = ["admin"]\ntopics = ["*"]\n'
                    '[[quota]]\nprincipal = "p"\nproduce_bytes_per_s = 40000\n')
    server = make_server(auth_file=str(path))  # the real clock: the bucket refills as time passes
    monkeypatch.setenv("STREAMD_TOKEN", PRODUCER)
    stubs = Stubs(server.address, token=PRODUCER)
    try:
        stubs.create("t", 1)
        with Producer(server.address) as producer:  # ~80 KB: 2 s of quota
            offsets = [producer.send_batch("t", 0, [b"x" * 1000] * 10).offset for _ in range(8)]
        assert offsets == list(range(0, 80, 10))  # every batch, in order, none failed
        guard = server.server.grpc_guard
        assert guard.quotas.throttled > 0  # and the stream was held back on the way
    finally:
        stubs.close()


LEAD, LEAD_HASH = new_token()
HASH_OF[LEAD] = LEAD_HASH


@pytest.fixture
def two_queues(make_server, tmp_path):
    """Queue group "mailers" on "orders" and on "secret"; "mailer" may consume topic
    "orders" and group "mailers"; "lead" is admin of group "mailers" and topic "orders"."""
    stubs = _serve_with(make_server, tmp_path, {"ops": ADMIN, "mailer": WORKER, "lead": LEAD}, ADMIN_OF_ALL,
                        ("mailer", ["consume"], ["orders"], ["mailers"]),
                        ("lead", ["admin"], ["orders", "orders.dlq"], ["mailers"]))[1]
    ops = stubs["ops"]
    for topic in ("orders", "secret"):
        ops.create(topic, 1)
        ops.queues.CreateQueueGroup(pb.CreateQueueGroupRequest(group="mailers", topic=topic))
        ops.produce_values(topic, 0, [b"a", b"b", b"c"])
    try:
        yield stubs
    finally:
        for s in stubs.values():
            s.close()


def _queue_calls(lease: pb.LeaseRef, topic: str) -> dict[str, tuple]:
    """Each queue RPC naming group "mailers" on ``topic`` (stub attribute, request)."""
    g = {"group": "mailers", "topic": topic}
    rng = pb.SettleRange(partition=0, first_offset=lease.offset, last_offset=lease.offset, lease_id=lease.lease_id,
                         action=pb.SETTLE_ACTION_ACK)
    return {
        "DescribeQueueGroup": ("DescribeQueueGroup", pb.DescribeQueueGroupRequest(**g)),
        "Receive": ("Receive", pb.ReceiveRequest(**g, max_records=10, max_wait_ms=0)),
        "Ack": ("Ack", pb.AckRequest(**g, lease=lease)),
        "Nack": ("Nack", pb.NackRequest(**g, lease=lease, delay_ms=0)),
        "Extend": ("Extend", pb.ExtendRequest(**g, lease=lease, lease_ms=60_000)),
        "Reject": ("Reject", pb.RejectRequest(**g, lease=lease, reason="x")),
        "Settle": ("Settle", pb.SettleRequest(**g, ranges=[rng])),
        "SeekQueueGroup": ("SeekQueueGroup", pb.SeekQueueGroupRequest(**g, offset=0, execute=True)),
        "DeleteQueueGroup": ("DeleteQueueGroup", pb.DeleteQueueGroupRequest(**g)),
        "CreateQueueGroup": ("CreateQueueGroup", pb.CreateQueueGroupRequest(**g)),
    }


@pytest.mark.parametrize("rpc_name", list(_queue_calls(pb.LeaseRef(), "t")))
def test_every_queue_rpc_checks_the_topic_as_well_as_the_group(two_queues, rpc_name):
    ops = two_queues["ops"]
    # ops holds a lease on "secret": a refused call must leave it exactly as it is.
    [held] = ops.queues.Receive(pb.ReceiveRequest(group="mailers", topic="secret", max_records=1)).records
    lease = pb.LeaseRef(partition=0, offset=held.offset, lease_id=held.lease_id)
    before = ops.queues.DescribeQueueGroup(pb.DescribeQueueGroupRequest(group="mailers", topic="secret")).group
    # "lead" may administer the group: for the admin RPCs it is the topic that refuses.
    who = "lead" if rpc_name in ("SeekQueueGroup", "DeleteQueueGroup", "CreateQueueGroup") else "mailer"
    method, request = _queue_calls(lease, "secret")[rpc_name]
    code, reason, meta = refused(getattr(two_queues[who].queues, method), request)
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    assert (meta["principal"], meta["resource"]) == (who, "topic:secret")
    after = ops.queues.DescribeQueueGroup(pb.DescribeQueueGroupRequest(group="mailers", topic="secret")).group
    for stats in (*before.partitions, *after.partitions):
        stats.ClearField("oldest_unacked_ms")  # an age: it grows by itself
    assert after.partitions == before.partitions  # nothing leased, settled, moved or deleted
    # The same call on the topic the grant names passes the guard (it may still fail
    # on its own terms, e.g. a lease of another topic, or an existing group).
    method, request = _queue_calls(lease, "orders")[rpc_name]
    try:
        getattr(two_queues[who].queues, method)(request)
    except grpc.RpcError as err:
        assert err.code() != grpc.StatusCode.PERMISSION_DENIED, err


def test_queue_group_lists_and_group_offsets_show_only_what_both_names_allow(two_queues):
    mailer, ops = two_queues["mailer"], two_queues["ops"]
    listed = mailer.queues.ListQueueGroups(pb.ListQueueGroupsRequest()).groups
    assert [(g.group, g.topic) for g in listed] == [("mailers", "orders")]
    assert len(ops.queues.ListQueueGroups(pb.ListQueueGroupsRequest()).groups) == 2
    commits = [pb.OffsetCommit(topic=t, partition=0, offset=1) for t in ("orders", "secret")]
    ops.groups.CommitOffsets(pb.CommitOffsetsRequest(group="mailers", offsets=commits))
    got = mailer.groups.FetchOffsets(pb.FetchOffsetsRequest(group="mailers")).offsets
    assert [o.topic for o in got] == ["orders"]
    named = pb.FetchOffsetsRequest(group="mailers", partitions=[pb.TopicPartitions(topic="secret", partitions=[0])])
    code, _, meta = refused(mailer.groups.FetchOffsets, named)
    assert code == grpc.StatusCode.PERMISSION_DENIED and meta["resource"] == "topic:secret"
    reset = pb.ResetOffsetsRequest(group="mailers", partitions=[pb.TopicPartitions(topic="secret")], offset=0,
                                   execute=True)
    code, _, meta = refused(two_queues["lead"].groups.ResetOffsets, reset)
    assert code == grpc.StatusCode.PERMISSION_DENIED and meta["resource"] == "topic:secret"
    # all_topics names no topic, but resets every topic of the group: "secret" too.
    every = pb.ResetOffsetsRequest(group="mailers", all_topics=True, offset=0, execute=True)
    code, _, meta = refused(two_queues["lead"].groups.ResetOffsets, every)
    assert code == grpc.StatusCode.PERMISSION_DENIED and meta["resource"] == "topic:secret"
    assert ops.groups.FetchOffsets(named).offsets[0].offset == 1
    # The group's answers name only the topics the caller may describe, as FetchOffsets.
    described = mailer.groups.DescribeGroup(pb.DescribeGroupRequest(group="mailers")).group
    assert [p.topic for p in described.partitions] == ["orders"]
    assert [g.topics for g in mailer.groups.ListGroups(pb.ListGroupsRequest()).groups] == [["orders"]]
    assert {p.topic for p in ops.groups.DescribeGroup(pb.DescribeGroupRequest(group="mailers")).group.partitions} == {
        "orders", "secret"}
    # Deleting the group would drop its "secret" offsets, as a reset of them would.
    code, _, meta = refused(two_queues["lead"].groups.DeleteGroup, pb.DeleteGroupRequest(group="mailers"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and meta["resource"] == "topic:secret"
    assert ops.groups.ResetOffsets(every).executed
    ops.topics.DeleteTopic(pb.DeleteTopicRequest(topic="secret"))  # now the group's topics are all "lead"'s
    assert [e.topic for e in two_queues["lead"].groups.ResetOffsets(every).plan] == ["orders"]


def test_a_queue_group_may_dead_letter_only_into_a_topic_its_creator_may_produce_to(two_queues):
    lead, ops = two_queues["lead"], two_queues["ops"]
    ops.queues.DeleteQueueGroup(pb.DeleteQueueGroupRequest(group="mailers", topic="orders"))
    into_secret = pb.CreateQueueGroupRequest(group="mailers", topic="orders",
                                             config=pb.QueueGroupConfig(dead_letter_topic="secret"))
    code, _, meta = refused(lead.queues.CreateQueueGroup, into_secret)
    assert code == grpc.StatusCode.PERMISSION_DENIED and meta["resource"] == "topic:secret"
    lead.queues.CreateQueueGroup(pb.CreateQueueGroupRequest(group="mailers", topic="orders"))  # orders.dlq: allowed
