"""Topic names at the length limit (249 characters) over gRPC: the whole life of a
topic, a restart, the one-over refusal, and a queue group's default dead-letter topic
(``<topic>.dlq``) that a long topic name would push over the limit."""

from __future__ import annotations

import uuid

import grpc

from streamd.client.records import batch_records
from streamd.v1 import streamd_pb2 as pb
from tests.conftest import wait_until

from .helpers import Stubs, refused

LONGEST = "t" * 249  # the longest valid name
SCRATCH_DIRS = ("@tmp", "@deleted")


def values_in(stubs: Stubs, topic: str, partition: int) -> list[bytes]:
    batches = stubs.fetch(topic, partition, 0).batches
    return [r.value for b in batches for r in batch_records(b).records]


def scratch_entries(data_dir) -> list[str]:
    return [e.name for d in SCRATCH_DIRS if (data_dir / d).is_dir() for e in (data_dir / d).iterdir()]


def test_a_topic_with_the_longest_name_is_created_used_deleted_and_created_again(stubs, server):
    data_dir = server.config.data_dir
    described = stubs.create(LONGEST, 2)
    assert (described.name, described.partition_count) == (LONGEST, 2)
    assert (data_dir / LONGEST / "topic.json").is_file()
    assert stubs.produce_values(LONGEST, 1, [b"a", b"b"]).base_offset == 0
    assert values_in(stubs, LONGEST, 1) == [b"a", b"b"]
    listed = stubs.topics.ListTopics(pb.ListTopicsRequest()).topics
    assert [t.name for t in listed] == [LONGEST]

    stubs.topics.DeleteTopic(pb.DeleteTopicRequest(topic=LONGEST))
    assert not (data_dir / LONGEST).exists() and scratch_entries(data_dir) == []
    code, reason, _ = refused(stubs.fetch, LONGEST, 0, 0)
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "TOPIC_NOT_FOUND")

    stubs.create(LONGEST, 1)  # the name is free again, and the new topic starts empty
    assert stubs.fetch(LONGEST, 0, 0).log_end_offset == 0
    assert stubs.produce_values(LONGEST, 0, [b"c"]).base_offset == 0
    assert values_in(stubs, LONGEST, 0) == [b"c"]


def test_a_name_one_over_the_limit_is_invalid_topic_name_everywhere(stubs, server):
    name = "t" * 250
    calls = [
        lambda: stubs.create(name, 1),
        lambda: stubs.produce_values(name, 0, [b"x"]),
        lambda: stubs.fetch(name, 0, 0),
        lambda: stubs.topics.DeleteTopic(pb.DeleteTopicRequest(topic=name)),
    ]
    for call in calls:
        code, reason, meta = refused(call)
        assert (code, reason, meta["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TOPIC_NAME", "topic")
    assert stubs.topics.ListTopics(pb.ListTopicsRequest()).topics == []
    assert not (server.config.data_dir / name).exists() and scratch_entries(server.config.data_dir) == []


def test_a_topic_with_the_longest_name_survives_a_restart(make_server):
    first = make_server()
    data_dir = first.config.data_dir
    stubs = Stubs(first.address)
    try:
        stubs.create(LONGEST, 1)
        stubs.produce_values(LONGEST, 0, [b"kept", b"too"])
    finally:
        stubs.close()
    first.stop()
    # What a crash in the middle of a create or a delete leaves behind.
    for scratch in SCRATCH_DIRS:
        (data_dir / scratch / f"{LONGEST[:64]}.{uuid.uuid4().hex}" / "0").mkdir(parents=True)

    second = make_server()
    stubs = Stubs(second.address)
    try:
        assert [t.name for t in stubs.topics.ListTopics(pb.ListTopicsRequest()).topics] == [LONGEST]
        assert values_in(stubs, LONGEST, 0) == [b"kept", b"too"]
        assert scratch_entries(data_dir) == []
        assert stubs.produce_values(LONGEST, 0, [b"more"]).base_offset == 2
    finally:
        stubs.close()


def create_queue_group(stubs: Stubs, topic: str, **config) -> pb.QueueGroupDescription:
    request = pb.CreateQueueGroupRequest(group="workers", topic=topic, config=pb.QueueGroupConfig(**config))
    return stubs.queues.CreateQueueGroup(request).group


def test_a_default_dead_letter_topic_over_the_limit_is_refused_with_the_field_to_set(stubs):
    topic = "q" * 246  # "<topic>.dlq" is 250 characters
    stubs.create(topic, 1)
    code, reason, meta = refused(create_queue_group, stubs, topic)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TOPIC_NAME")
    assert meta["field"] == "config.dead_letter_topic"
    code, reason, meta = refused(create_queue_group, stubs, topic, dead_letter_topic="d" * 250)
    assert (code, reason, meta["field"]) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TOPIC_NAME", "config.dead_letter_topic"
    )
    assert stubs.queues.ListQueueGroups(pb.ListQueueGroupsRequest()).groups == []

    shorter = "q" * 245  # "<topic>.dlq" is exactly 249 characters
    stubs.create(shorter, 1)
    assert create_queue_group(stubs, shorter).config.dead_letter_topic == shorter + ".dlq"


def test_dead_letters_go_to_a_dead_letter_topic_with_the_longest_name(stubs):
    stubs.create(LONGEST, 1)
    dead_letters = "d" * 249
    create_queue_group(stubs, LONGEST, dead_letter_topic=dead_letters)
    stubs.produce_values(LONGEST, 0, [b"poison"])
    [leased] = stubs.queues.Receive(pb.ReceiveRequest(group="workers", topic=LONGEST, max_records=1)).records
    lease = pb.LeaseRef(partition=leased.partition, offset=leased.offset, lease_id=leased.lease_id)
    stubs.queues.Reject(pb.RejectRequest(group="workers", topic=LONGEST, lease=lease, reason="bad"))

    def dead_lettered() -> int:
        d = stubs.queues.DescribeQueueGroup(pb.DescribeQueueGroupRequest(group="workers", topic=LONGEST)).group
        return d.partitions[0].dead_lettered

    assert wait_until(lambda: dead_lettered() == 1)  # created on demand, appended in the background
    assert values_in(stubs, dead_letters, 0) == [b"poison"]
